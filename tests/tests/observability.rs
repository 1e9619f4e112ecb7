//! Observability with a real Prometheus: two nodes with mTLS between them, both mesh-nodes
//! (on `--metrics-addr`) and mesh-control scraped every second, and PromQL — the queries
//! Istio's dashboards run — answering with Istio's full label set for the traffic the test
//! sent: HTTP and TCP at both ends (`reporter="source"` at the client's node,
//! `reporter="destination"` at the serving node), a proxy-made answer with its response flag,
//! and mesh-control's xDS and CA metrics.

use std::time::Duration;

use nodemesh_tests::{
    Registration, SimCluster,
    mesh::{answered, eventually, hello_counts, service_yaml},
    prometheus::{Job, Prometheus},
};

const WEB_VIP: &str = "10.96.0.20";
const DB_VIP: &str = "10.96.0.21";
const NOWHERE_VIP: &str = "10.96.0.22";
const WEB: &str = "web.shop.svc.cluster.local";
const DB: &str = "db.shop.svc.cluster.local";
const METRICS_PORT: u16 = 15020;

/// An HTTP Service (port name `http`) at `vip`, 80 → 8080 on `app=<app>` pods.
fn http_service(name: &str, vip: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{app: {app}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
    )
}

fn labelled(labels: &[(&str, &str)], account: &str) -> Registration {
    Registration { service_account: Some(account.into()), ..Registration::labelled(labels) }
}

#[test]
fn prometheus_sees_istio_labelled_traffic_from_both_reporters_and_the_control_planes_metrics() {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.write_config("web.yaml", &http_service("web", WEB_VIP, "web"));
    cluster.write_config("db.yaml", &service_yaml("db", DB_VIP, "db"));
    // A Service whose selector matches nothing: the proxy answers its requests itself.
    cluster.write_config("nowhere.yaml", &http_service("nowhere", NOWHERE_VIP, "nothing"));
    let metrics_addr = format!("0.0.0.0:{METRICS_PORT}");
    cluster.start(&[], &["--metrics-addr", &metrics_addr]).unwrap();

    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0]
        .register(&client, &labelled(&[("app", "client"), ("version", "v2")], "client-sa"))
        .unwrap();
    let web = cluster.nodes[1].add_pod("web0", "shop").unwrap();
    cluster.nodes[1].register(&web, &labelled(&[("app", "web"), ("version", "v1")], "web-sa")).unwrap();
    cluster.nodes[1].serve_http(&web, &[web.addr(8080)]).unwrap();
    let db = cluster.nodes[1].add_pod("db0", "shop").unwrap();
    cluster.nodes[1].register(&db, &labelled(&[("app", "db")], "db-sa")).unwrap();
    cluster.nodes[1].serve(&db, &[db.addr(8080)]).unwrap();

    let node_targets = (0..2).map(|i| (cluster.node_ip(i), METRICS_PORT).into()).collect();
    let prometheus = Prometheus::start(
        &cluster.fabric_netns,
        &cluster.work_dir,
        &[
            Job { name: "mesh-node", targets: node_targets },
            Job { name: "mesh-control", targets: vec![cluster.control.admin_addr()] },
        ],
    )
    .unwrap();

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
                r#"istio_requests_total{{reporter="{reporter}",destination_service_name="web"}}"#
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
