//! Observability with a real Prometheus: two nodes with mTLS between them, both mesh-nodes
//! (on `--metrics-addr`) and mesh-control scraped every second, and PromQL — the queries
//! Istio's dashboards run — answering with Istio's full label set for the traffic the test
//! sent: HTTP and TCP at both ends (`reporter="source"` at the client's node,
//! `reporter="destination"` at the serving node), a proxy-made answer with its response flag,
//! and mesh-control's xDS and CA metrics.

use std::time::Duration;

use nodemesh_tests::{
    Registration, SimCluster,
    mesh::{answered, eventually, hello_counts, http_service_yaml, service_yaml},
    prometheus::Prometheus,
};

const WEB_VIP: &str = "10.96.0.20";
const DB_VIP: &str = "10.96.0.21";
const NOWHERE_VIP: &str = "10.96.0.22";
const GREETER_VIP: &str = "10.96.0.23";
const NEAR_VIP: &str = "10.96.0.24";
const WEB: &str = "web.shop.svc.cluster.local";
const DB: &str = "db.shop.svc.cluster.local";
const METRICS_PORT: u16 = 15020;
const NODE_MANIFEST: &str = "deploy/daemonset/base/mesh-node/daemonset.yaml";
const CONTROL_MANIFEST: &str = "deploy/daemonset/base/mesh-control/deployment.yaml";
const SCRAPE_CONFIG: &str = "deploy/observability/prometheus.yml";
const DASHBOARDS: &str = "deploy/observability/grafana";

fn labelled(labels: &[(&str, &str)], account: &str) -> Registration {
    Registration { service_account: Some(account.into()), ..Registration::labelled(labels) }
}

#[test]
fn prometheus_sees_istio_labelled_traffic_from_both_reporters_and_the_control_planes_metrics() {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.write_config("web.yaml", &http_service_yaml("web", "shop", WEB_VIP, "web"));
    cluster.write_config("db.yaml", &service_yaml("db", DB_VIP, "db"));
    // A Service whose selector matches nothing: the proxy answers its requests itself.
    cluster.write_config("nowhere.yaml", &http_service_yaml("nowhere", "shop", NOWHERE_VIP, "nothing"));
    cluster.write_config("greeter.yaml", &http_service_yaml("greeter", "shop", GREETER_VIP, "greeter"));
    cluster.write_config("near.yaml", &http_service_yaml("near", "shop", NEAR_VIP, "near"));
    // Requests for /fault are aborted by the client's node (flag FI); the rest go to web.
    cluster.write_config(
        "web-routes.yaml",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: web}}]
  - route: [{destination: {host: web}}]
"#,
    );
    let metrics_addr = format!("0.0.0.0:{METRICS_PORT}");
    cluster.start(&[], &["--metrics-addr", &metrics_addr]).unwrap();

    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0]
        .register(&client, &labelled(&[("app", "client"), ("version", "v2")], "client-sa"))
        .unwrap();
    // On the client's own node: delivered in-process, both reporters counted by node 0.
    let near = cluster.nodes[0].add_pod("near0", "shop").unwrap();
    cluster.nodes[0].register(&near, &labelled(&[("app", "near")], "near-sa")).unwrap();
    cluster.nodes[0].serve_http(&near, &[near.addr(8080)]).unwrap();
    let web = cluster.nodes[1].add_pod("web0", "shop").unwrap();
    cluster.nodes[1].register(&web, &labelled(&[("app", "web"), ("version", "v1")], "web-sa")).unwrap();
    cluster.nodes[1].serve_http(&web, &[web.addr(8080)]).unwrap();
    let greeter = cluster.nodes[1].add_pod("greeter0", "shop").unwrap();
    cluster.nodes[1].register(&greeter, &labelled(&[("app", "greeter")], "greeter-sa")).unwrap();
    cluster.nodes[1].serve_grpc(&greeter, &[greeter.addr(8080)]).unwrap();
    let db = cluster.nodes[1].add_pod("db0", "shop").unwrap();
    cluster.nodes[1].register(&db, &labelled(&[("app", "db")], "db-sa")).unwrap();
    cluster.nodes[1].serve(&db, &[db.addr(8080)]).unwrap();

    // The shipped scrape config, with the pods the cluster would list: both mesh-nodes and
    // mesh-control annotated as their manifests are, and a pod that is not.
    let targets_file = cluster.work_dir.join("pods.json");
    let mut pods =
        vec![pod_target(&cluster.control.admin_addr().ip().to_string(), "mesh-control", CONTROL_MANIFEST)];
    for i in 0..2 {
        pods.push(pod_target(&cluster.node_ip(i).to_string(), "mesh-node", NODE_MANIFEST));
    }
    pods.push(serde_json::json!({"targets": [client.ip.to_string()], "labels": {
        "__meta_kubernetes_pod_ip": client.ip.to_string(), "__meta_kubernetes_pod_label_app": "client"}}));
    std::fs::write(&targets_file, serde_json::to_string(&pods).unwrap()).unwrap();
    let prometheus = Prometheus::start_with_config(
        &cluster.fabric_netns,
        &cluster.work_dir,
        &shipped_scrape_config(&targets_file),
    )
    .unwrap();
    prometheus.wait_for(r#"sum(up{job="nodemesh"})"#, Duration::from_secs(20), |v| v == 3.0).unwrap();
    let scraped = prometheus.query(r#"up{job="nodemesh"}"#).unwrap();
    let mut apps: Vec<&str> =
        scraped.iter().filter_map(|s| s.labels.get("app").map(String::as_str)).collect();
    apps.sort();
    assert_eq!(
        apps,
        ["mesh-control", "mesh-node", "mesh-node"],
        "the unannotated pod is not scraped: {scraped:?}"
    );

    let node0 = &cluster.nodes[0];
    let web_to = format!("{WEB_VIP}:80");
    eventually("the client reaches web across the nodes", Duration::from_secs(20), || {
        node0.testapp(&client, &["http-client", "--to", &web_to]).is_ok_and(|r| r.get("error").is_none())
    });
    let served = format!(
        r#"sum(istio_requests_total{{reporter="source",destination_service="{WEB}",response_code="200"}})"#
    );
    // What Prometheus has once the warm-up requests are scraped; then exactly 20 more.
    let before = prometheus.wait_for(&served, Duration::from_secs(20), |v| v >= 1.0).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = prometheus.value(&served).unwrap().max(before);
    let r = node0.testapp(&client, &["http-client", "--to", &web_to, "--requests", "20"]).unwrap();
    assert!(r.get("error").is_none(), "{r}");
    let after = prometheus.wait_for(&served, Duration::from_secs(20), |v| v >= before + 20.0).unwrap();
    assert_eq!(after, before + 20.0, "Prometheus must count exactly the 20 requests sent");
    let rate = prometheus
        .value(&format!(
            r#"sum(rate(istio_requests_total{{destination_service="{WEB}",response_code="200"}}[1m]))"#
        ))
        .unwrap();
    assert!(rate > 0.0, "rate() over the requests: {rate}");

    // The series carries Istio's whole label set, derived as Istio derives it, the same from
    // both reporters: the serving node has the caller's labels from the tunnel.
    for reporter in ["source", "destination"] {
        let series = prometheus
            .query(&format!(
                r#"istio_requests_total{{reporter="{reporter}",destination_service_name="web",response_code="200"}}"#
            ))
            .unwrap();
        assert_eq!(
            series.len(),
            1,
            "{reporter}: one series for one caller, one endpoint, one code: {series:?}"
        );
        assert_labels(&series[0].labels);
    }

    let bytes = prometheus
        .value(&format!(r#"sum(istio_response_bytes_sum{{destination_service="{WEB}"}})"#))
        .unwrap();
    assert!(bytes > 0.0, "response sizes are recorded: {bytes}");

    // A Service on the client's own node: each request counted once by each reporter.
    let near_to = format!("{NEAR_VIP}:80");
    eventually("the client reaches near", Duration::from_secs(20), || {
        node0.testapp(&client, &["http-client", "--to", &near_to]).is_ok_and(|r| r.get("error").is_none())
    });
    let r = node0.testapp(&client, &["http-client", "--to", &near_to, "--requests", "7"]).unwrap();
    assert_eq!(r["statuses"]["200"], 7, "{r}");
    let near_count = |reporter: &str| {
        format!(
            r#"sum(istio_requests_total{{reporter="{reporter}",destination_workload="near0",destination_principal="spiffe://cluster.local/ns/shop/sa/near-sa",source_workload="client",connection_security_policy="mutual_tls",response_code="200"}})"#
        )
    };
    let sourced = prometheus.wait_for(&near_count("source"), Duration::from_secs(20), |v| v >= 8.0).unwrap();
    let destined =
        prometheus.wait_for(&near_count("destination"), Duration::from_secs(20), |v| v >= 8.0).unwrap();
    assert_eq!(sourced, destined, "same-node requests: one count per reporter");
    // Their connections into the pod, with the bytes that passed, at the destination too.
    prometheus
        .wait_for(
            r#"sum(istio_tcp_received_bytes_total{reporter="destination",destination_workload="near0",source_workload="client",connection_security_policy="mutual_tls"})"#,
            Duration::from_secs(20),
            |v| v > 0.0,
        )
        .unwrap();

    // gRPC over h2c: 10 unary calls, their status (in trailers) at both reporters. (The
    // server stream the client drops after 4 messages counts as `DC`, no status.)
    let greeter_to = format!("{GREETER_VIP}:80");
    eventually("the client reaches greeter", Duration::from_secs(20), || {
        node0.testapp(&client, &["grpc-client", "--to", &greeter_to, "--calls", "1"]).is_ok()
    });
    let r = node0
        .testapp(&client, &["grpc-client", "--to", &greeter_to, "--calls", "10", "--messages", "4"])
        .unwrap();
    assert_eq!(r["checks_serving"], 10, "{r}");
    for reporter in ["source", "destination"] {
        let ok = format!(
            r#"sum(istio_requests_total{{reporter="{reporter}",destination_service_name="greeter",request_protocol="grpc",response_code="200",grpc_response_status="0"}})"#
        );
        prometheus.wait_for(&ok, Duration::from_secs(20), |v| v >= 10.0).unwrap();
    }

    // A fault abort: the client's node answers 503 itself, flagged FI.
    eventually("the fault route is in force", Duration::from_secs(20), || {
        node0
            .testapp(&client, &["http-client", "--to", &web_to, "--path", "/fault"])
            .is_ok_and(|r| r["statuses"]["503"] == 1)
    });
    prometheus
        .wait_for(
            r#"sum(istio_requests_total{reporter="source",destination_service_name="web",response_code="503",response_flags="FI"})"#,
            Duration::from_secs(20),
            |v| v >= 1.0,
        )
        .unwrap();

    // A Service with no endpoints: the proxy's own 503, flagged UH (no healthy upstream).
    let _ = node0.testapp(&client, &["http-client", "--to", &format!("{NOWHERE_VIP}:80")]);
    prometheus
        .wait_for(
            r#"sum(istio_requests_total{destination_service_name="nowhere",response_code="503",response_flags="UH"})"#,
            Duration::from_secs(20),
            |v| v >= 1.0,
        )
        .unwrap();

    // TCP, counted at both ends: the serving node learns the caller's labels from the tunnel
    // (namespace and principal proven by its certificate) and which Service it dialled.
    let db_to = format!("{DB_VIP}:80");
    eventually("the client reaches db", Duration::from_secs(20), || answered(node0, &client, &db_to));
    assert_eq!(hello_counts(node0, &client, &db_to, 5).values().sum::<usize>(), 5);
    for reporter in ["source", "destination"] {
        let by_policy = format!(
            r#"sum by (connection_security_policy) (istio_tcp_connections_opened_total{{reporter="{reporter}",source_workload="client",source_app="client",source_principal="spiffe://cluster.local/ns/shop/sa/client-sa",destination_workload="db0",destination_principal="spiffe://cluster.local/ns/shop/sa/db-sa",destination_service="{DB}"}})"#
        );
        prometheus.wait_for(&by_policy, Duration::from_secs(20), |v| v >= 6.0).unwrap();
        let split = prometheus.query(&by_policy).unwrap();
        assert_eq!(split.len(), 1, "{reporter}: every connection is mutual TLS: {split:?}");
        assert_eq!(split[0].labels.get("connection_security_policy").map(String::as_str), Some("mutual_tls"));
    }

    // mesh-control: both nodes connected, pushes made, certificates issued.
    prometheus.wait_for("sum(pilot_xds)", Duration::from_secs(10), |v| v == 2.0).unwrap();
    assert!(prometheus.value("sum(pilot_xds_pushes_total)").unwrap() >= 2.0);
    assert!(prometheus.value(r#"sum(pilot_xds_pushes_total{type="ads"})"#).unwrap() >= 1.0);
    assert!(prometheus.value("sum(citadel_server_success_cert_issuance_count_total)").unwrap() >= 3.0);
    assert!(prometheus.value("sum(pilot_proxy_convergence_time_seconds_count)").unwrap() >= 2.0);
    assert!(prometheus.value("nodemesh_control_config_generation").unwrap() >= 1.0);
    assert_eq!(prometheus.value("sum(pilot_total_xds_rejects_total)").unwrap(), 0.0);

    // Every panel of the shipped Grafana dashboards shows data for this traffic, and their
    // variables offer what was sent (once the newest series have two scrapes: rate() needs
    // them).
    std::thread::sleep(Duration::from_secs(3));
    dashboards_show_the_traffic(&prometheus);
}

fn workspace_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A pod as Kubernetes service discovery labels it: its IP, its `app` label and the
/// annotations of `manifest`'s pod template (`prometheus.io/port` → the
/// `__meta_kubernetes_pod_annotation_prometheus_io_port` label, and so on).
fn pod_target(ip: &str, app: &str, manifest: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(workspace_file(manifest)).unwrap();
    let object: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    let annotations =
        object["spec"]["template"]["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    let mut labels = serde_json::Map::new();
    labels.insert("__meta_kubernetes_pod_ip".into(), ip.into());
    labels.insert("__meta_kubernetes_pod_label_app".into(), app.into());
    labels.insert("__meta_kubernetes_pod_name".into(), format!("{app}-0").into());
    labels.insert("__meta_kubernetes_pod_node_name".into(), "node".into());
    for (key, value) in annotations {
        let name = key.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        labels.insert(format!("__meta_kubernetes_pod_annotation_{name}"), value);
    }
    serde_json::json!({"targets": [ip], "labels": labels})
}

/// The shipped scrape config with its pods read from `targets` instead of the API server
/// (Debian's Prometheus has no Kubernetes discovery; a file hands over the same labels, and
/// the shipped relabelling decides what is scraped), scraping every second.
fn shipped_scrape_config(targets: &std::path::Path) -> String {
    let text = std::fs::read_to_string(workspace_file(SCRAPE_CONFIG)).unwrap();
    let mut config: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    config["global"] = serde_json::json!({"scrape_interval": "1s", "scrape_timeout": "900ms"});
    for job in config["scrape_configs"].as_array_mut().unwrap() {
        let job = job.as_object_mut().unwrap();
        assert!(job.remove("kubernetes_sd_configs").is_some(), "{SCRAPE_CONFIG}: pods come from Kubernetes");
        job.insert("file_sd_configs".into(), serde_json::json!([{"files": [targets]}]));
    }
    serde_json::to_string(&config).unwrap()
}

/// Grafana's expressions as Prometheus runs them: `$__rate_interval` a minute, the
/// variables set to this test's service and `workload`.
fn grafana_to_promql(expr: &str, workload: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$service", WEB)
        .replace("$namespace", "shop")
        .replace("$workload", workload)
}

fn dashboards_show_the_traffic(prometheus: &Prometheus) {
    let mut checked = 0;
    for entry in std::fs::read_dir(workspace_file(DASHBOARDS)).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            let Some(query) = variable["query"]["query"].as_str() else { continue };
            // label_values(selector, label): the values Prometheus has for `label`.
            let inner = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).unwrap();
            let (selector, label) = inner.rsplit_once(',').unwrap();
            let promql = grafana_to_promql(&format!("count by ({}) ({selector})", label.trim()), "web0");
            let values: Vec<String> = prometheus
                .query(&promql)
                .unwrap()
                .into_iter()
                .filter_map(|s| s.labels.get(label.trim()).cloned())
                .collect();
            let want = grafana_to_promql(&format!("${}", variable["name"].as_str().unwrap()), "web0");
            assert!(
                values.contains(&want),
                "{name}: variable {} offers {values:?}, not {want}",
                variable["name"]
            );
        }
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            // What web0 serves, or what the client calls (the workload view shows both sides).
            let exprs: Vec<String> = panel["targets"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|t| ["web0", "client"].map(|w| grafana_to_promql(t["expr"].as_str().unwrap(), w)))
                .collect();
            let shown = exprs.iter().any(|e| {
                let series =
                    prometheus.query(e).unwrap_or_else(|err| panic!("{name}: panel {title:?}: {err:#}"));
                !series.is_empty()
            });
            assert!(shown, "{name}: panel {title:?} shows nothing for the test's traffic: {exprs:?}");
            checked += 1;
        }
    }
    assert!(checked >= 15, "the dashboards hold {checked} panels");
}

/// Istio's labels of the client's requests to web, from either reporter.
fn assert_labels(labels: &std::collections::BTreeMap<String, String>) {
    for (key, want) in [
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/client-sa"),
        ("source_app", "client"),
        ("source_version", "v2"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v2"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "web0"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/web-sa"),
        ("destination_app", "web"),
        ("destination_version", "v1"),
        ("destination_service", WEB),
        ("destination_service_namespace", "shop"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
        ("grpc_response_status", ""),
    ] {
        assert_eq!(labels.get(key).map(String::as_str).unwrap_or(""), want, "{key} in {labels:?}");
    }
}
