//! How a DestinationRule shapes the connections to a service's endpoints, on a simulated
//! two-node cluster (client on node 0, servers on node 1):
//! - `tls.mode`: unset, a meshed endpoint is reached through the mTLS tunnel; DISABLE sends
//!   plaintext even to it (its PeerAuthentication judges that: PERMISSIVE delivers, STRICT
//!   refuses); ISTIO_MUTUAL never dials an endpoint without a mesh identity in plaintext.
//! - `connectionPool.tcp.tcpKeepalive`: keepalive on the upstream socket, with the rule's time.
//! - `connectionPool.tcp.idleTimeout`: a relayed connection silent that long is closed.
//! - `connectionPool.http.idleTimeout`: a pooled upstream HTTP connection idle that long is
//!   closed, so the next request opens a new one.

use std::time::Duration;

use nodemesh_tests::{
    Pod, Registration, SimCluster, SimNode,
    mesh::{answered, eventually, labelled},
};
use serde_json::Value;

const WEB_VIP: &str = "10.96.0.10";
const LEGACY_VIP: &str = "10.96.0.11";

/// web (meshed, app=web) and legacy (opted out of the mesh, app=legacy), each on port 80 → 8080
/// (opaque TCP) and web also 9080 (HTTP).
const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
spec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: tcp-echo, port: 80, targetPort: 8080}, {name: http, port: 9080, targetPort: 9080}]\n\
---\napiVersion: v1\nkind: Service\nmetadata: {name: legacy, namespace: shop}\n\
spec:\n  clusterIP: 10.96.0.11\n  selector: {app: legacy}\n  ports: [{name: tcp-echo, port: 80, targetPort: 8080}]\n";

fn rule(host: &str, policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}, namespace: shop}}\n\
         spec:\n  host: {host}\n  trafficPolicy: {policy}\n"
    )
}

struct Setup {
    cluster: SimCluster,
    client: Pod,
    web: Pod,
    legacy: Pod,
}

fn setup() -> Setup {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.write_config("services.yaml", SERVICES);
    cluster.start(&[], &[]).unwrap();
    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0].register(&client, &Registration::meshed()).unwrap();
    let node1 = &mut cluster.nodes[1];
    let web = node1.add_pod("web", "shop").unwrap();
    node1.register(&web, &labelled("web")).unwrap();
    node1.serve(&web, &[web.addr(8080)]).unwrap();
    node1.serve_http(&web, &[web.addr(9080)]).unwrap();
    let legacy = node1.add_pod("legacy", "shop").unwrap();
    let opted_out = Registration {
        namespace_enabled: true,
        pod_labels: vec![("app".into(), "legacy".into()), ("nodemesh.io/enabled".into(), "false".into())],
        service_account: None,
    };
    node1.register(&legacy, &opted_out).unwrap();
    node1.serve(&legacy, &[legacy.addr(8080)]).unwrap();
    let node0 = &cluster.nodes[0];
    eventually("both services answer", Duration::from_secs(20), || {
        answered(node0, &client, &format!("{WEB_VIP}:80"))
            && answered(node0, &client, &format!("{LEGACY_VIP}:80"))
    });
    Setup { cluster, client, web, legacy }
}

/// Writes `file` and waits until every node applied it.
fn apply(cluster: &SimCluster, file: &str, yaml: &str) {
    cluster.control.apply_and_wait(|| cluster.write_config(file, yaml)).unwrap();
}

/// Connections into `workload` node 1 counted, by the caller it proved (`unknown`: plaintext).
fn arrived(node: &SimNode, workload: &str, source: &str) -> f64 {
    node.metrics().unwrap().sum(
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination"), ("destination_workload", workload), ("source_workload", source)],
    )
}

#[test]
fn tls_mode_disable_sends_plaintext_and_istio_mutual_never_does() {
    let s = setup();
    let (node0, node1) = (&s.cluster.nodes[0], &s.cluster.nodes[1]);
    let web = format!("{WEB_VIP}:80");

    // Unset: through the tunnel, the client proven by its certificate.
    let before = arrived(node1, "web", "client");
    assert!(answered(node0, &s.client, &web));
    eventually("web counts a tunnelled connection from client", Duration::from_secs(5), || {
        arrived(node1, "web", "client") > before
    });

    // DISABLE: plaintext to the meshed pod, captured at web and delivered under PERMISSIVE as
    // the client pod itself, counted without an identity.
    apply(&s.cluster, "web-rule.yaml", &rule("web", "{tls: {mode: DISABLE}}"));
    let (tunnelled, plaintext) = (arrived(node1, "web", "client"), arrived(node1, "web", "unknown"));
    let r = node0.testapp(&s.client, &["client", "--to", &web]).unwrap();
    let peer = r["connections"][0]["reply"]["peer"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
    assert!(peer.starts_with(&format!("{}:", s.client.ip)), "delivered as the client pod: {r}");
    eventually("web counts a plaintext connection", Duration::from_secs(5), || {
        arrived(node1, "web", "unknown") > plaintext
    });
    assert_eq!(arrived(node1, "web", "client"), tunnelled, "DISABLE still went through the tunnel");

    // …which web's STRICT PeerAuthentication refuses: DISABLE really is plaintext.
    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: web, namespace: shop}\n\
                  spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}\n";
    apply(&s.cluster, "web-strict.yaml", strict);
    eventually("STRICT refuses the plaintext", Duration::from_secs(10), || !answered(node0, &s.client, &web));
    // Without the DestinationRule, mTLS again: STRICT lets it in.
    s.cluster.control.apply_and_wait(|| s.cluster.remove_config("web-rule.yaml").unwrap()).unwrap();
    eventually("mTLS again under STRICT", Duration::from_secs(10), || answered(node0, &s.client, &web));

    // ISTIO_MUTUAL to a service whose endpoint has no mesh identity: never dialled in plaintext.
    let legacy = format!("{LEGACY_VIP}:80");
    assert!(answered(node0, &s.client, &legacy), "plaintext to a non-mesh endpoint by default");
    apply(&s.cluster, "legacy-rule.yaml", &rule("legacy", "{tls: {mode: ISTIO_MUTUAL}}"));
    let r = node0.testapp(&s.client, &["client", "--to", &legacy]).unwrap();
    assert!(r["error"].is_string(), "ISTIO_MUTUAL reached a non-mesh endpoint: {r}");
    let failures = node0.metrics().unwrap().sum(
        "nodemesh_proxy_failures_total",
        &[("source_workload", "client"), ("reason", "upstream_connect_refused")],
    );
    assert!(failures >= 1.0, "the refusal is counted");
    assert!(node0.log().contains("tls.mode is ISTIO_MUTUAL: not dialled in plaintext"), "the log says why");
    let _ = (&s.web, &s.legacy);
}

/// What `ss` shows of mesh-node's upstream socket to `to` in `pod`'s netns (it dials from
/// there), if one is open.
fn upstream_socket(pod: &Pod, to: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns, "ss", "-tnoH", "state", "established", "dst", to])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string)
}

/// The keepalive timer on that socket (`timer:(keepalive,6.9sec,0)`), if it has one.
fn keepalive_timer(pod: &Pod, to: &str) -> Option<String> {
    upstream_socket(pod, to)?
        .split_whitespace()
        .find(|w| w.starts_with("timer:(keepalive,"))
        .map(str::to_string)
}

#[test]
fn keepalive_and_idle_timeouts_come_from_the_connection_pool() {
    let s = setup();
    let node0 = &s.cluster.nodes[0];
    let legacy = format!("{LEGACY_VIP}:80");
    let upstream = s.legacy.addr(8080).to_string();

    // tcpKeepalive: mesh-node's socket to the endpoint (in the client pod's netns) probes after
    // the rule's 7 s, not the kernel's 2 hours.
    let held = |wait_ms: &str| {
        node0.testapp(&s.client, &["client", "--mode", "idle", "--to", &legacy, "--wait-ms", wait_ms])
    };
    std::thread::scope(|scope| {
        let before = scope.spawn(|| held("1500"));
        let mut socket = None;
        eventually("the upstream connection is open", Duration::from_secs(5), || {
            socket = upstream_socket(&s.client, &upstream);
            socket.is_some()
        });
        assert!(!socket.unwrap().contains("keepalive"), "keepalive without a rule");
        let _ = before.join();
    });
    apply(
        &s.cluster,
        "legacy-rule.yaml",
        &rule("legacy", "{connectionPool: {tcp: {tcpKeepalive: {time: 7s, interval: 2s, probes: 3}}}}"),
    );
    std::thread::scope(|scope| {
        let during = scope.spawn(|| held("3000"));
        let mut timer = None;
        eventually("a keepalive timer on the upstream socket", Duration::from_secs(5), || {
            timer = keepalive_timer(&s.client, &upstream);
            timer.is_some()
        });
        let timer = timer.unwrap();
        let secs: f64 = timer
            .trim_start_matches("timer:(keepalive,")
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read {timer}"));
        assert!(secs <= 7.0, "keepalive after the rule's 7 s: {timer}");
        let r = during.join().unwrap().unwrap();
        assert!(r["open_after_ms"].is_u64(), "keepalive alone closes nothing: {r}");
    });

    // tcp.idleTimeout: without it a silent connection stays open; with 1 s it is closed (FIN)
    // once nothing moved for 1 s.
    let r = held("2500").unwrap();
    assert!(r["open_after_ms"].is_u64(), "{r}");
    apply(&s.cluster, "legacy-rule.yaml", &rule("legacy", "{connectionPool: {tcp: {idleTimeout: 1s}}}"));
    let r = held("5000").unwrap();
    let after = r["closed_after_ms"].as_u64().unwrap_or_else(|| panic!("not closed when idle: {r}"));
    assert!((900..4000).contains(&after), "closed after the 1 s idle timeout: {r}");
    assert_eq!(r["how"], "eof", "an idle close is a normal close: {r}");
}

/// The upstream address the server saw for one request (mesh-node's pooled connection).
fn upstream_peer(node: &SimNode, client: &Pod) -> String {
    let r: Value = nodemesh_tests::mesh::http_get(node, client, &format!("{WEB_VIP}:9080"), &[]);
    r["first"]["peer"].as_str().unwrap_or_else(|| panic!("{r}")).to_string()
}

#[test]
fn http_idle_timeout_retires_pooled_upstream_connections() {
    let s = setup();
    let node0 = &s.cluster.nodes[0];
    eventually("web answers HTTP", Duration::from_secs(10), || {
        node0
            .testapp(&s.client, &["http-client", "--to", &format!("{WEB_VIP}:9080")])
            .is_ok_and(|r| r["error"].is_null())
    });
    // Pooled: two requests 1.5 s apart ride one upstream connection.
    let first = upstream_peer(node0, &s.client);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        upstream_peer(node0, &s.client),
        first,
        "without an idle timeout the pool keeps the connection"
    );

    apply(&s.cluster, "web-rule.yaml", &rule("web", "{connectionPool: {http: {idleTimeout: 500ms}}}"));
    let dump = node0.config_dump().unwrap();
    let cluster =
        nodemesh_tests::mesh::dumped_cluster(&dump, "outbound|9080||web.shop.svc.cluster.local").unwrap();
    assert_eq!(cluster["connection"]["http_idle_timeout_ms"], 500, "{cluster}");
    let first = upstream_peer(node0, &s.client);
    assert_eq!(upstream_peer(node0, &s.client), first, "back to back, the pooled connection is reused");
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(
        upstream_peer(node0, &s.client),
        first,
        "idle 1.5 s > 500 ms: the pooled connection was closed"
    );
}
