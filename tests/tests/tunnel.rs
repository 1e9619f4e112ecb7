//! HBONE between nodes, on a simulated two-node cluster: meshed traffic from a pod on one node
//! to a pod on the other rides the nodes' mTLS tunnel — the link between the nodes carries none
//! of its payload — and the server application sees the client pod's own address. Same-node
//! traffic is delivered into the server pod the same way (as the client's address), without TLS.

use nodemesh_tests::{
    HeldConnection, Pod, Registration, SimCluster, SimNode,
    link_capture::{LinkCapture, contains},
    mesh::{answered_by, endpoint_count, eventually, held_certificates, http_get, labelled, service_yaml},
};
use serde_json::Value;
use std::time::Duration;

const VIP: &str = "10.96.0.10";
const WEB: &str = "outbound|80||web.shop.svc.cluster.local";

struct Setup {
    cluster: SimCluster,
    /// On node 0.
    client: Pod,
    /// On node 1, meshed, behind `web`.
    web: Pod,
    /// On node 1, in a namespace outside the mesh.
    plain: Pod,
}

fn setup() -> Setup {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.write_config("web.yaml", &service_yaml("web", VIP, "web"));
    cluster.start(&[], &[]).unwrap();
    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0].register(&client, &Registration::meshed()).unwrap();
    let node1 = &mut cluster.nodes[1];
    let web = node1.add_pod("web", "shop").unwrap();
    node1.register(&web, &labelled("web")).unwrap();
    node1.serve_http(&web, &[web.addr(8080)]).unwrap();
    let plain = node1.add_pod("plain", "legacy").unwrap();
    node1.register(&plain, &Registration::unmeshed_namespace()).unwrap();
    node1.serve_http(&plain, &[plain.addr(8080)]).unwrap();
    ready(&cluster.nodes[0], &client);
    Setup { cluster, client, web, plain }
}

/// Waits until `client` gets answers from web (its node has asked for the service and holds
/// web's endpoint).
fn ready(node: &SimNode, client: &Pod) {
    eventually("web answers", Duration::from_secs(10), || {
        let r = node.testapp(client, &["http-client", "--to", &format!("{VIP}:80")]);
        r.is_ok_and(|r| r["statuses"]["200"] == 1) && endpoint_count(node, WEB) == 1
    });
}

fn peer_ip(reply: &Value) -> String {
    let peer = reply["first"]["peer"].as_str().unwrap_or_else(|| panic!("no peer in {reply}"));
    peer.rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap()
}

#[test]
fn cross_node_traffic_rides_the_tunnel_and_the_link_carries_none_of_its_payload() {
    let s = setup();
    let node0 = &s.cluster.nodes[0];
    let capture = LinkCapture::start(&s.cluster.fabric_netns).unwrap();
    // To the meshed pod: through the tunnel. The marker travels in the request (path, a
    // header) and comes back in the echoed answer.
    let secret = format!("tunnelled-payload-{}", std::process::id());
    let to_web = http_get(
        node0,
        &s.client,
        &format!("{VIP}:80"),
        &["--path", &format!("/{secret}"), "--header", &format!("x-secret: {secret}")],
    );
    // Control: to the pod outside the mesh, in plaintext, so the capture must see it.
    let visible = format!("plaintext-payload-{}", std::process::id());
    let to_plain =
        http_get(node0, &s.client, &s.plain.addr(8080).to_string(), &["--path", &format!("/{visible}")]);
    let frames = capture.stop();

    assert_eq!(to_web["statuses"]["200"], 1, "{to_web}");
    assert!(to_web["first"]["path"].as_str().unwrap().contains(&secret), "{to_web}");
    assert_eq!(to_plain["statuses"]["200"], 1, "{to_plain}");
    assert!(
        contains(&frames, visible.as_bytes()),
        "the capture did not see the plaintext control request ({} bytes captured)",
        frames.len()
    );
    assert!(
        !contains(&frames, secret.as_bytes()),
        "the payload of a meshed request crossed the link in the clear\n{}",
        node0.log_tail()
    );
    // The application sees the client pod itself, not a node or proxy address.
    assert_eq!(peer_ip(&to_web), s.client.ip.to_string(), "{to_web}");
    assert_eq!(peer_ip(&to_plain), s.client.ip.to_string(), "{to_plain}");

    // It went through one pooled tunnel connection, as the client's identity to web's.
    let dump = node0.config_dump().unwrap();
    let tunnels = dump["tunnels"].as_array().cloned().unwrap_or_default();
    assert!(
        tunnels.iter().any(|t| t["destination"] == "spiffe://cluster.local/ns/shop/sa/default"
            && t["source"] == "spiffe://cluster.local/ns/shop/sa/default"
            && t["connections"] == 1),
        "{tunnels:?}"
    );
    let opened = s.cluster.nodes[1].metrics().unwrap().sum(
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination"), ("destination_workload", "web"), ("source_workload", "client")],
    );
    assert!(opened >= 1.0, "node 1 counted no tunnelled connection into web");
    let _ = &s.web;
}

#[test]
fn same_node_traffic_is_delivered_as_the_client_pod() {
    let mut s = setup();
    // A second client, on web's node: delivered into web's netns as itself.
    let node1 = &mut s.cluster.nodes[1];
    let neighbour = node1.add_pod("neighbour", "shop").unwrap();
    let status = node1.register(&neighbour, &Registration::meshed()).unwrap();
    assert_eq!(status["inbound"], "transparent", "{status}");
    ready(&s.cluster.nodes[1], &neighbour);
    let reply = http_get(&s.cluster.nodes[1], &neighbour, &format!("{VIP}:80"), &["--requests", "3"]);
    assert_eq!(reply["statuses"]["200"], 3, "{reply}");
    assert_eq!(peer_ip(&reply), neighbour.ip.to_string(), "{reply}");
}

/// The delivery routing rule in `pod`'s netns (`ip rule`), if there is one.
fn delivery_rule(pod: &Pod) -> Option<String> {
    let out = std::process::Command::new("ip").args(["-n", &pod.netns, "rule", "show"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find(|l| l.contains("lookup 15008")).map(str::to_string)
}

/// The socket inode of mesh-node's inbound listener (15006) in `pod`'s netns.
fn inbound_listener(pod: &Pod) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns, "ss", "-tlneH", "sport", "= :15006"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("127.0.0.1:15006"))?;
    line.split_whitespace().find_map(|f| f.strip_prefix("ino:")).map(str::to_string)
}

/// A pod unregistered while it still runs (terminating, relabelled, re-registered) keeps
/// answering the connections already delivered into it: its delivery routing stays until the
/// last of them ends, however often it is removed and registered again meanwhile — and then
/// comes out. Registered again while registered, it keeps its listening sockets.
#[test]
fn a_removed_pod_keeps_answering_its_delivered_connections_and_its_routing_goes_after_the_last() {
    let mut s = setup();
    let node1 = &mut s.cluster.nodes[1];
    node1.serve(&s.web, &[s.web.addr(9000)]).unwrap();
    let mut held = HeldConnection::open(&s.client, &s.web.addr(9000).to_string()).unwrap();
    held.round_trip("before").unwrap();
    let node1 = &s.cluster.nodes[1];
    let socket = node1.api_socket().display().to_string();
    let remove =
        || node1.mesh_node_cli(&["workload", "--api-socket", &socket, "remove", "shop/web"]).unwrap();

    // Registered again as it is: the same listening sockets go on (nothing queued on them is
    // reset, and capture never points at a closed one).
    let before = inbound_listener(&s.web);
    assert!(before.is_some(), "no inbound listener in web's netns");
    node1.register(&s.web, &labelled("web")).unwrap();
    assert_eq!(inbound_listener(&s.web), before, "re-registration replaced the inbound listener");
    held.round_trip("after a re-registration").unwrap();

    remove();
    held.round_trip("after a removal").unwrap();
    assert!(delivery_rule(&s.web).is_some(), "the routing went while a delivered connection lives");
    // Removed and registered again at once, repeatedly: a removal never undoes the
    // registration that followed it.
    for round in 0..5 {
        node1.register(&s.web, &labelled("web")).unwrap();
        remove();
        node1.register(&s.web, &labelled("web")).unwrap();
        held.round_trip(&format!("re-registered {round}")).unwrap();
    }
    remove();
    held.round_trip("removed for good").unwrap();
    held.close().unwrap();
    eventually("the routing is removed after the last connection", Duration::from_secs(10), || {
        delivery_rule(&s.web).is_none()
    });
    // Registered again: routing back, and new connections delivered.
    node1.register(&s.web, &labelled("web")).unwrap();
    assert!(delivery_rule(&s.web).is_some());
    let mut again = HeldConnection::open(&s.client, &s.web.addr(9000).to_string()).unwrap();
    again.round_trip("new connection").unwrap();
    again.close().unwrap();
}

#[test]
fn certificates_rotate_under_continuous_traffic_without_a_failed_connection() {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.write_config("web.yaml", &service_yaml("web", VIP, "web"));
    // 5 s certificates: each side renews every 2.5 s.
    cluster.start(&["--cert-ttl-secs", "5"], &[]).unwrap();
    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0].register(&client, &Registration::meshed().as_account("client")).unwrap();
    let node1 = &mut cluster.nodes[1];
    let web = node1.add_pod("web", "shop").unwrap();
    node1.register(&web, &labelled("web").as_account("web")).unwrap();
    node1.serve(&web, &[web.addr(8080)]).unwrap();
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let to = format!("{VIP}:80");
    eventually("web answers", Duration::from_secs(10), || answered_by(node0, &client, &to, 1).is_ok());

    let mut seen: std::collections::BTreeSet<(String, u64)> = Default::default();
    let held = |node| held_certificates(node).into_iter().map(|(id, _, not_after)| (id, not_after));
    let (mut connections, mut failures) = (0, Vec::new());
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        match answered_by(node0, &client, &to, 20) {
            Ok(counts) => connections += counts.values().sum::<usize>(),
            Err(e) => failures.push(e.to_string()),
        }
        seen.extend(held(node0));
        seen.extend(held(node1));
    }
    assert!(failures.is_empty(), "{} rounds failed: {failures:?}\n{}", failures.len(), node0.log_tail());
    let generations = |id: &str| {
        seen.iter().filter(|(i, _)| i == &format!("spiffe://cluster.local/ns/shop/sa/{id}")).count()
    };
    assert!(
        generations("client") >= 4 && generations("web") >= 4,
        "certificates did not rotate during the run: {seen:?}"
    );
    // Renewed certificates retire pooled tunnel connections: new ones were opened.
    let accepted = node1.metrics().unwrap().sum("nodemesh_tunnel_connections_accepted_total", &[]);
    assert!(accepted >= 3.0, "{accepted} tunnel connections over {connections} connections");
}
