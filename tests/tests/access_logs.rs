//! Access logs switched at runtime with Istio's Telemetry, on a two-node cluster with mTLS
//! between the nodes: off by default; on for one namespace — lines, client side at the
//! caller's node and server side at the serving node, appear within a second for that
//! namespace's workloads only, in Envoy's default text format on the node's stdout and as JSON
//! in a file; a filter keeps only errors; each response flag a user looks for appears for the
//! case that causes it (no route, upstream reset, denied by policy, rate limited, timeout); a
//! TCP connection gets one line per side with its bytes; off again — they stop.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nodemesh_tests::{
    Pod, Registration, SimCluster, SimNode,
    mesh::{eventually, hello_counts, http_get, http_service_yaml, service_yaml},
};
use serde_json::Value;

const WEB_VIP: &str = "10.96.0.30";
const API_VIP: &str = "10.96.0.31";
const ECHO_VIP: &str = "10.96.0.32";
const DB_VIP: &str = "10.96.0.33";
const CACHE_VIP: &str = "10.96.0.34";
const WEB_CLUSTER: &str = "outbound|80||web.shop.svc.cluster.local";

/// An HTTP Service at `vip`, 80 → 8080 on `app=<app>` pods of `namespace`.
/// `/delay/*` times out after 300 ms; `api` (the same pods) routes only `/v1`.
const ROUTES: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /delay}}]
    timeout: 0.3s
    route: [{destination: {host: web}}]
  - route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: shop}
spec:
  hosts: [api]
  http:
  - match: [{uri: {prefix: /v1}}]
    route: [{destination: {host: api}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: web-callers, namespace: shop}
spec:
  host: web
  limits:
  - {name: limited, match: [{uri: {prefix: /limited}}], maxTokens: 1, fillInterval: 1h}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
"#;

/// A JSON file provider beside the built-in `envoy` one (text, to the node's stdout).
fn mesh_config(json_log: &Path) -> String {
    format!(
        r#"apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec:
  extensionProviders:
  - name: json-file
    envoyFileAccessLog:
      path: {}
      logFormat:
        labels:
          code: "%RESPONSE_CODE%"
          flags: "%RESPONSE_FLAGS%"
          details: "%RESPONSE_CODE_DETAILS%"
          method: "%REQ(:METHOD)%"
          path: "%REQ(:PATH)%"
          cluster: "%UPSTREAM_CLUSTER%"
          upstream: "%UPSTREAM_HOST%"
          duration: "%DURATION%"
          received: "%BYTES_RECEIVED%"
          sent: "%BYTES_SENT%"
          agent: "%REQ(USER-AGENT)%"
"#,
        json_log.display()
    )
}

/// Both providers on for every workload of `shop`, optionally with a filter.
fn shop_logging(filter: Option<&str>) -> String {
    let filter = filter.map(|f| format!("\n    filter: {{expression: '{f}'}}")).unwrap_or_default();
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: debug, namespace: shop}}\n\
         spec:\n  accessLogging:\n  - providers: [{{name: envoy}}, {{name: json-file}}]{filter}\n"
    )
}

/// The JSON lines written so far.
fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// The JSON lines for requests to `path`.
fn lines_for(log: &Path, path: &str) -> Vec<Value> {
    json_lines(log).into_iter().filter(|l| l["path"] == path).collect()
}

/// The access-log lines (Envoy's text format: they start with `[START_TIME]`) in a node's log.
fn text_lines(node: &SimNode) -> Vec<String> {
    node.log().lines().filter(|l| l.starts_with("[20") && l.contains("\" ")).map(str::to_string).collect()
}

fn get(node: &SimNode, client: &Pod, vip: &str, path: &str) -> Value {
    http_get(node, client, &format!("{vip}:80"), &["--path", path])
}

/// Sends requests to `path` (numbered) until one is logged, or not logged, as `logged` asks;
/// returns how long after `since` that was, and the number of the first such request.
fn until_logged(node: &SimNode, client: &Pod, log: &Path, since: Instant, logged: bool) -> (Duration, u32) {
    for n in 0..200 {
        let path = format!("/probe/{n}");
        get(node, client, WEB_VIP, &path);
        // A line is written when the answer ends; its writer thread flushes it right after.
        let seen = wait_for_line(log, &path, Duration::from_millis(200));
        if seen == logged {
            return (since.elapsed(), n);
        }
    }
    panic!("access logs never turned {}", if logged { "on" } else { "off" });
}

fn wait_for_line(log: &Path, path: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if json_lines(log).iter().any(|l| l["path"] == path) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn one(lines: &[Value], cluster_prefix: &str, what: &str) -> Value {
    let found: Vec<&Value> = lines
        .iter()
        .filter(|l| l["cluster"].as_str().is_some_and(|c| c.starts_with(cluster_prefix)))
        .collect();
    assert_eq!(found.len(), 1, "{what}: one {cluster_prefix} line expected in {lines:#?}");
    found[0].clone()
}

#[test]
fn telemetry_turns_access_logs_on_for_one_namespace_with_filters_and_response_flags() {
    let mut cluster = SimCluster::new(2).unwrap();
    let json_log: PathBuf = cluster.work_dir.join("access.json");
    cluster.write_config("web.yaml", &http_service_yaml("web", "shop", WEB_VIP, "web"));
    cluster.write_config("api.yaml", &http_service_yaml("api", "shop", API_VIP, "web"));
    cluster.write_config("echo.yaml", &http_service_yaml("echo", "other", ECHO_VIP, "echo"));
    cluster.write_config("db.yaml", &service_yaml("db", DB_VIP, "db"));
    cluster.write_config("cache.yaml", &service_yaml("cache", CACHE_VIP, "cache"));
    cluster.write_config("routes.yaml", ROUTES);
    cluster.write_config("mesh.yaml", &mesh_config(&json_log));
    cluster.start(&[], &[]).unwrap();

    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0].register(&client, &Registration::labelled(&[("app", "client")])).unwrap();
    let outsider = cluster.nodes[0].add_pod("outsider", "other").unwrap();
    cluster.nodes[0].register(&outsider, &Registration::labelled(&[("app", "outsider")])).unwrap();
    let web = cluster.nodes[1].add_pod("web0", "shop").unwrap();
    cluster.nodes[1].register(&web, &Registration::labelled(&[("app", "web")])).unwrap();
    cluster.nodes[1].serve_http(&web, &[web.addr(8080)]).unwrap();
    let echo = cluster.nodes[1].add_pod("echo0", "other").unwrap();
    cluster.nodes[1].register(&echo, &Registration::labelled(&[("app", "echo")])).unwrap();
    cluster.nodes[1].serve_http(&echo, &[echo.addr(8080)]).unwrap();
    let db = cluster.nodes[1].add_pod("db0", "shop").unwrap();
    cluster.nodes[1].register(&db, &Registration::labelled(&[("app", "db")])).unwrap();
    cluster.nodes[1].serve(&db, &[db.addr(8080)]).unwrap();
    // On the client's own node: delivered by node 0 itself, which writes both lines.
    let cache = cluster.nodes[0].add_pod("cache0", "shop").unwrap();
    cluster.nodes[0].register(&cache, &Registration::labelled(&[("app", "cache")])).unwrap();
    cluster.nodes[0].serve(&cache, &[cache.addr(8080)]).unwrap();

    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let web_to = format!("{WEB_VIP}:80");
    eventually("the client reaches web across the nodes", Duration::from_secs(20), || {
        node0.testapp(&client, &["http-client", "--to", &web_to]).is_ok_and(|r| r.get("error").is_none())
    });
    // Off by default: nothing is logged anywhere.
    get(node0, &client, WEB_VIP, "/before");
    get(node0, &outsider, ECHO_VIP, "/before");
    std::thread::sleep(Duration::from_millis(300));
    assert!(json_lines(&json_log).is_empty(), "logged before any Telemetry: {:?}", json_lines(&json_log));
    assert!(text_lines(node0).is_empty() && text_lines(node1).is_empty(), "{:?}", text_lines(node0));

    // On for `shop`, with traffic running: the first line comes within a second, no restart.
    let switched = Instant::now();
    cluster.write_config("telemetry.yaml", &shop_logging(None));
    let (took, first) = until_logged(node0, &client, &json_log, switched, true);
    eprintln!("access logs on after {took:?} (request {first})");
    assert!(took <= Duration::from_secs(1), "the first line took {took:?}");

    // Each request is logged twice: client side at node 0, server side at node 1.
    get(node0, &client, WEB_VIP, "/ok");
    get(node0, &outsider, ECHO_VIP, "/ok");
    assert!(wait_for_line(&json_log, "/ok", Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(300));
    let ok = lines_for(&json_log, "/ok");
    assert_eq!(ok.len(), 2, "one client and one server line, none for `other`: {ok:#?}");
    let client_line = one(&ok, WEB_CLUSTER, "client side");
    let server_line = one(&ok, "inbound|8080||", "server side");
    for line in [&client_line, &server_line] {
        assert_eq!(line["code"], 200, "{line}");
        assert_eq!(line["flags"], "-", "{line}");
        assert_eq!(line["details"], "via_upstream", "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        assert!(line["duration"].is_u64(), "typed JSON: {line}");
    }
    assert_eq!(server_line["upstream"], web.addr(8080).to_string());
    assert!(
        !json_lines(&json_log).iter().any(|l| l.to_string().contains("echo.other")),
        "nothing of namespace `other` is logged"
    );
    // The same request in Envoy's default text format on each node's stdout.
    let text = text_lines(node0);
    let line =
        text.iter().find(|l| l.contains("\"GET /ok HTTP/1.1\"")).unwrap_or_else(|| panic!("{text:#?}"));
    assert!(line.contains(" 200 - via_upstream ") && line.contains(WEB_CLUSTER), "{line}");
    assert!(text_lines(node1).iter().any(|l| l.contains("\"GET /ok HTTP/1.1\" 200 - via_upstream")));

    // A TCP connection (not HTTP): one line per side when it ends, with its bytes.
    let db_to = format!("{DB_VIP}:80");
    assert_eq!(hello_counts(node0, &client, &db_to, 1).values().sum::<usize>(), 1);
    let db_cluster = "outbound|80||db.shop.svc.cluster.local";
    eventually("both TCP lines", Duration::from_secs(2), || {
        let tcp: Vec<Value> = json_lines(&json_log).into_iter().filter(|l| l["method"].is_null()).collect();
        tcp.iter().any(|l| l["cluster"] == db_cluster) && tcp.iter().any(|l| l["cluster"] == "inbound|8080||")
    });
    let tcp: Vec<Value> = json_lines(&json_log).into_iter().filter(|l| l["method"].is_null()).collect();
    let client_line = one(&tcp, db_cluster, "TCP client side");
    let server_line = one(&tcp, "inbound|8080||", "TCP server side");
    for line in [&client_line, &server_line] {
        assert_eq!((line["code"].clone(), line["flags"].clone()), (0.into(), "-".into()), "{line}");
    }
    // The client said `HELLO\n`; both sides count the same bytes each way.
    assert_eq!(client_line["received"], 6, "{client_line}");
    assert_eq!(server_line["received"], 6, "{server_line}");
    assert!(client_line["sent"].as_u64().is_some_and(|n| n > 6), "{client_line}");
    assert_eq!(client_line["sent"], server_line["sent"]);
    assert_eq!(client_line["upstream"], db.addr(8080).to_string(), "{client_line}");
    assert_eq!(server_line["upstream"], db.addr(8080).to_string(), "{server_line}");

    // The same for a pod on the client's node: node 0 writes the server side's line too.
    let cache_to = format!("{CACHE_VIP}:80");
    assert_eq!(hello_counts(node0, &client, &cache_to, 1).values().sum::<usize>(), 1);
    let cache_addr = cache.addr(8080).to_string();
    let cache_lines = || -> Vec<Value> {
        json_lines(&json_log)
            .into_iter()
            .filter(|l| l["method"].is_null() && l["upstream"] == cache_addr)
            .collect()
    };
    eventually("both same-node TCP lines", Duration::from_secs(2), || cache_lines().len() == 2);
    let tcp = cache_lines();
    let client_line = one(&tcp, "outbound|80||cache.shop.svc.cluster.local", "same-node TCP client side");
    let server_line = one(&tcp, "inbound|8080||", "same-node TCP server side");
    assert_eq!((client_line["received"].clone(), server_line["received"].clone()), (6.into(), 6.into()));
    assert_eq!(client_line["sent"], server_line["sent"], "{client_line} {server_line}");

    // The response flags a user looks for, each where Envoy would write it.
    let flagged = |path: &str, side: &str| -> Value {
        assert!(wait_for_line(&json_log, path, Duration::from_secs(2)), "no line for {path}");
        std::thread::sleep(Duration::from_millis(200));
        one(&lines_for(&json_log, path), side, path)
    };
    http_get(node0, &client, &format!("{API_VIP}:80"), &["--path", "/v2"]);
    let no_route = flagged("/v2", "outbound|80||api.shop");
    assert_eq!(
        (no_route["code"].clone(), no_route["flags"].clone()),
        (404.into(), "NR".into()),
        "{no_route}"
    );
    assert_eq!(no_route["details"], "route_not_found");

    get(node0, &client, WEB_VIP, "/reset");
    let reset = flagged("/reset", "inbound|8080||");
    assert_eq!((reset["code"].clone(), reset["flags"].clone()), (502.into(), "UC".into()), "{reset}");
    assert_eq!(reset["details"], "upstream_reset_before_response_started{connection_termination}");

    get(node0, &client, WEB_VIP, "/admin");
    let denied = flagged("/admin", "inbound|8080||");
    assert_eq!((denied["code"].clone(), denied["flags"].clone()), (403.into(), "-".into()), "{denied}");
    let details = denied["details"].as_str().unwrap_or_default();
    assert!(
        details.starts_with("rbac_access_denied_matched_policy[") && details.contains("no-admin"),
        "{denied}"
    );

    get(node0, &client, WEB_VIP, "/limited");
    get(node0, &client, WEB_VIP, "/limited");
    assert!(wait_for_line(&json_log, "/limited", Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(300));
    let limited = lines_for(&json_log, "/limited");
    let refused: Vec<&Value> = limited.iter().filter(|l| l["flags"] == "RL").collect();
    assert_eq!(refused.len(), 1, "the second request is refused at the caller's node: {limited:#?}");
    assert_eq!(
        (refused[0]["code"].clone(), refused[0]["details"].clone()),
        (429.into(), "local_rate_limited".into())
    );

    get(node0, &client, WEB_VIP, "/delay/2000");
    let timeout = flagged("/delay/2000", WEB_CLUSTER);
    assert_eq!((timeout["code"].clone(), timeout["flags"].clone()), (504.into(), "UT".into()), "{timeout}");
    assert_eq!(timeout["details"], "response_timeout");

    // A filter: only errors are logged from now on.
    cluster.write_config("telemetry.yaml", &shop_logging(Some("response.code >= 400")));
    let filtered = Instant::now();
    eventually("the filter applies", Duration::from_secs(5), || {
        let n = filtered.elapsed().as_millis();
        get(node0, &client, WEB_VIP, &format!("/fine/{n}"));
        get(node0, &client, WEB_VIP, &format!("/status/500?n={n}"));
        let fine = wait_for_line(&json_log, &format!("/fine/{n}"), Duration::from_millis(300));
        !fine && !lines_for(&json_log, &format!("/status/500?n={n}")).is_empty()
    });
    get(node0, &client, WEB_VIP, "/fine/last");
    get(node0, &client, WEB_VIP, "/status/500?n=last");
    assert!(wait_for_line(&json_log, "/status/500?n=last", Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(300));
    assert!(lines_for(&json_log, "/fine/last").is_empty(), "a 200 passed the filter");

    // Off: the lines stop.
    let switched = Instant::now();
    cluster.remove_config("telemetry.yaml").unwrap();
    let (took, _) = until_logged(node0, &client, &json_log, switched, false);
    eprintln!("access logs off after {took:?}");
    let before = json_lines(&json_log).len();
    for n in 0..5 {
        get(node0, &client, WEB_VIP, &format!("/after/{n}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(json_lines(&json_log).len(), before, "lines written after logging was turned off");
}
