//! A simulated cluster of two nodes joined by a fabric, one mesh-control in the fabric: Service
//! VIP traffic balanced across endpoints on both nodes under each policy, endpoint changes from
//! the config directory reaching every node, scoping per node, and locality preference with
//! failover from Node topology labels; established and new connections across a
//! mesh-control crash and restart.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use nodemesh_tests::{
    HeldConnection, Pod, Registration, SimCluster, SimNode,
    kube_api::FakeApiServer,
    mesh::{answered, endpoint_count, eventually, hello_counts, labelled, rule_yaml, service_yaml},
    netns,
};
use serde_json::json;

const VIP: &str = "10.96.0.10";
const WEB: &str = "outbound|80||web.shop.svc.cluster.local";

/// Two nodes: node 0 runs `client0` and `web0`; node 1 runs `client1`, `web1` and `web2`.
struct Setup {
    cluster: SimCluster,
    clients: [Pod; 2],
    /// PID of each web server, by pod name.
    servers: Vec<(String, u32)>,
}

fn node_yaml(name: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: {zone}}}\n"
    )
}

fn setup() -> Setup {
    let cluster = SimCluster::new(2).unwrap();
    cluster.write_config("web.yaml", &service_yaml("web", VIP, "web"));
    setup_on(cluster, &[])
}

/// Node objects (zone-a, zone-b) in the config dir, mesh-control with `control_args`, then the
/// pods of [`Setup`].
fn setup_on(mut cluster: SimCluster, control_args: &[&str]) -> Setup {
    for (i, zone) in ["zone-a", "zone-b"].iter().enumerate() {
        let name = cluster.nodes[i].node_netns.clone();
        cluster.write_config(&format!("node{i}.yaml"), &node_yaml(&name, zone));
    }
    cluster.start(control_args, &[]).unwrap();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for (i, node) in cluster.nodes.iter_mut().enumerate() {
        let client = node.add_pod(&format!("client{i}"), "shop").unwrap();
        node.register(&client, &Registration::meshed()).unwrap();
        clients.push(client);
        let webs: &[&str] = if i == 0 { &["web0"] } else { &["web1", "web2"] };
        for name in webs {
            let pod = node.add_pod(name, "shop").unwrap();
            node.register(&pod, &labelled("web")).unwrap();
            servers.push((name.to_string(), node.serve(&pod, &[pod.addr(8080)]).unwrap()));
        }
    }
    let clients: [Pod; 2] = clients.try_into().unwrap();
    Setup { cluster, clients, servers }
}

#[test]
fn vip_traffic_is_balanced_across_two_nodes_and_endpoint_changes_reach_every_node() {
    let Setup { cluster, clients, .. } = setup();
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let to = format!("{VIP}:80");

    // Round robin (no DestinationRule) from node 0 across one local and two remote endpoints.
    eventually("node 0 reaches all three endpoints", Duration::from_secs(15), || {
        answered(node0, &clients[0], &to) && endpoint_count(node0, WEB) == 3
    });
    let counts = hello_counts(node0, &clients[0], &to, 30);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|c| (9..=11).contains(c)), "round robin not even within ±1: {counts:?}");
    // TCP metrics name the destination workload, also for endpoints on the other node.
    let m = node0.metrics().unwrap();
    for web in ["web0", "web1", "web2"] {
        let series = [
            ("source_workload", "client0"),
            ("destination_workload", web),
            ("destination_workload_namespace", "shop"),
        ];
        assert!(
            m.sum("istio_tcp_connections_opened_total", &series) >= 9.0,
            "no connections to {web} counted"
        );
    }

    // Scoping: node 1 runs two of web's endpoints but none of its workloads has dialled web,
    // so it holds nothing of it.
    assert_eq!(endpoint_count(node1, WEB), 0, "node 1 must hold no endpoints of web");
    let dump = node1.config_dump().unwrap();
    assert!(dump["xds"]["config"]["clusters"].get(WEB).is_none(), "{dump}");
    // Once a workload there dials web, node 1 gets it too.
    assert_eq!(hello_counts(node1, &clients[1], &to, 3).values().sum::<usize>(), 3);

    // Consistent hash on source IP: each client sticks to one endpoint.
    cluster.write_config("rule.yaml", &rule_yaml("{loadBalancer: {consistentHash: {useSourceIp: true}}}"));
    for (node, client) in [(node0, &clients[0]), (node1, &clients[1])] {
        eventually("ring hash reaches the node", Duration::from_secs(10), || {
            node.config_dump().is_ok_and(|d| {
                d["xds"]["config"]["clusters"][WEB]["lb_policy"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("RingHash"))
            })
        });
        let counts = hello_counts(node, client, &to, 20);
        assert_eq!(counts.len(), 1, "consistent hash must be sticky per source: {counts:?}");
    }

    // Random and least request spread over endpoints on both nodes.
    for (lb, want) in [("RANDOM", "Random"), ("LEAST_REQUEST", "LeastRequest")] {
        cluster.write_config("rule.yaml", &rule_yaml(&format!("{{loadBalancer: {{simple: {lb}}}}}")));
        eventually(&format!("{want} reaches node 0"), Duration::from_secs(10), || {
            node0.config_dump().is_ok_and(|d| d["xds"]["config"]["clusters"][WEB]["lb_policy"] == want)
        });
        let counts = hello_counts(node0, &clients[0], &to, 60);
        assert_eq!(counts.len(), 3, "{want} must reach every endpoint: {counts:?}");
    }
    cluster.remove_config("rule.yaml").unwrap();

    // An endpoint added in the config directory (a WorkloadEntry for an unmeshed host on node
    // 1) reaches both nodes; removing the file takes it away again from both.
    let vm_ip = node1.pod_ip4(200);
    let added = Instant::now();
    cluster.write_config(
        "vm.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: vm0, namespace: shop}}\n\
             spec: {{address: {vm_ip}, labels: {{app: web}}}}\n"
        ),
    );
    eventually("both nodes hold four endpoints", Duration::from_secs(10), || {
        endpoint_count(node0, WEB) == 4 && endpoint_count(node1, WEB) == 4
    });
    eprintln!("endpoint added: on every node after {:?}", added.elapsed());
    let removed = Instant::now();
    cluster.remove_config("vm.yaml").unwrap();
    eventually("both nodes back to three endpoints", Duration::from_secs(10), || {
        endpoint_count(node0, WEB) == 3 && endpoint_count(node1, WEB) == 3
    });
    eprintln!("endpoint removed: on every node after {:?}", removed.elapsed());
    let counts = hello_counts(node1, &clients[1], &to, 12);
    assert_eq!(counts.values().sum::<usize>(), 12, "{counts:?}");
}

#[test]
fn locality_prefers_the_clients_zone_and_fails_over_to_the_next() {
    let Setup { mut cluster, clients, servers } = setup();
    let to = format!("{VIP}:80");
    // Istio: locality-aware balancing is on once outlier detection is configured.
    cluster.write_config(
        "rule.yaml",
        &rule_yaml("{outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s}}"),
    );
    let node0 = &cluster.nodes[0];
    eventually("node 0 runs web zone-aware with all three endpoints", Duration::from_secs(15), || {
        answered(node0, &clients[0], &to)
            && node0.config_dump().is_ok_and(|d| {
                let c = &d["xds"]["config"]["clusters"][WEB];
                c["locality_aware"] == true && c["endpoints"].as_array().is_some_and(|e| e.len() == 3)
            })
    });
    // client0 is in zone-a with web0 only: every connection stays in the zone.
    let counts = hello_counts(node0, &clients[0], &to, 12);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["web0"], "zone-a client must stay in zone-a: {counts:?}");
    // client1 is in zone-b with web1 and web2.
    let node1 = &cluster.nodes[1];
    let counts = hello_counts(node1, &clients[1], &to, 12);
    assert!(!counts.contains_key("web0"), "zone-b client must stay in zone-b: {counts:?}");

    // web0 goes down: zone-a has nothing left, so client0 fails over to zone-b, every
    // connection still answered.
    let (_, web0_pid) = servers.iter().find(|(n, _)| n == "web0").cloned().unwrap();
    cluster.nodes[0].kill_process(web0_pid).unwrap();
    let node0 = &cluster.nodes[0];
    let counts = hello_counts(node0, &clients[0], &to, 12);
    assert_eq!(counts.values().sum::<usize>(), 12, "{counts:?}");
    assert!(!counts.contains_key("web0"), "{counts:?}");
}

/// Every node connected to the current mesh-control and past its resync grace.
fn all_nodes_resynced(cluster: &SimCluster) -> bool {
    cluster.control.status_json().is_ok_and(|s| {
        s["warm"] == true
            && s["nodes"].as_array().is_some_and(|nodes| {
                nodes.len() == cluster.nodes.len() && nodes.iter().all(|n| n["connected"] == true)
            })
    })
}

/// Connections the node proxy has opened for its clients and not yet closed.
fn proxied_open(node: &SimNode) -> f64 {
    let m = node.metrics().unwrap();
    let source = [("reporter", "source")];
    m.sum("istio_tcp_connections_opened_total", &source)
        - m.sum("istio_tcp_connections_closed_total", &source)
}

/// One round trip on every held connection; a broken one fails the test with both logs.
fn round_trip_all(cluster: &SimCluster, held: &mut [HeldConnection], when: &str) {
    for (i, conn) in held.iter_mut().enumerate() {
        conn.round_trip(&format!("{when} #{i}")).unwrap_or_else(|e| {
            let logs: Vec<String> = cluster.nodes.iter().map(|n| n.log_tail()).collect();
            panic!(
                "established connection {i} broke {when}: {e:#}\n{}\n{}",
                logs.join("\n"),
                cluster.control.log()
            )
        });
    }
}

#[test]
fn established_and_new_connections_survive_a_control_plane_crash_and_restart() {
    let Setup { mut cluster, clients, .. } = setup();
    let to = format!("{VIP}:80");
    for (node, client) in cluster.nodes.iter().zip(&clients) {
        eventually("each node reaches all three endpoints", Duration::from_secs(15), || {
            answered(node, client, &to) && endpoint_count(node, WEB) == 3
        });
    }
    // Six long-lived connections, three from each node: round robin puts them on local and
    // remote endpoints alike.
    let mut held: Vec<HeldConnection> = Vec::new();
    for client in &clients {
        for _ in 0..3 {
            held.push(HeldConnection::open(client, &to).unwrap());
        }
    }
    round_trip_all(&cluster, &mut held, "before the crash");
    for node in &cluster.nodes {
        assert!(proxied_open(node) >= 3.0, "the held connections go through the node proxy");
    }

    cluster.control.kill().unwrap();
    round_trip_all(&cluster, &mut held, "with mesh-control down");
    for (node, client) in cluster.nodes.iter().zip(&clients) {
        let counts = hello_counts(node, client, &to, 6);
        assert_eq!(counts.values().sum::<usize>(), 6, "new connections on the last config: {counts:?}");
    }
    // Long enough for the nodes' xDS clients to fail and back off a few times.
    std::thread::sleep(Duration::from_secs(2));
    round_trip_all(&cluster, &mut held, "while the nodes retry");

    let config_dir = cluster.config_dir.clone();
    cluster.control.start(&config_dir, &[]).unwrap();
    eventually("both nodes reconnect and resync", Duration::from_secs(30), || all_nodes_resynced(&cluster));
    round_trip_all(&cluster, &mut held, "after the resync");
    for (node, client) in cluster.nodes.iter().zip(&clients) {
        assert_eq!(endpoint_count(node, WEB), 3, "resynced to all three endpoints");
        let counts = hello_counts(node, client, &to, 6);
        assert_eq!(counts.len(), 3, "new connections use every endpoint again: {counts:?}");
    }
    for node in &cluster.nodes {
        assert!(proxied_open(node) >= 3.0, "the node proxy still carries the held connections");
    }
    for conn in held {
        assert_eq!(conn.close().unwrap(), 4, "every round on one connection, closed cleanly");
    }
}

#[test]
fn a_service_from_the_kubernetes_api_is_served_to_every_node() {
    // The API server listens inside the fabric, where mesh-control runs.
    let cluster = SimCluster::new(2).unwrap();
    let listener = netns::run_in(&cluster.fabric_netns, || Ok(TcpListener::bind("10.76.0.1:6443")?)).unwrap();
    let api = FakeApiServer::start(listener).unwrap();
    api.apply(
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": VIP, "clusterIPs": [VIP], "selector": {"app": "web"},
                 "ports": [{"name": "tcp-echo", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
    )
    .unwrap();
    let url = api.url();
    let Setup { cluster, clients, .. } = setup_on(cluster, &["--kube-api", &url]);
    let status = cluster.control.status_json().unwrap();
    assert_eq!(status["synced"], true, "{status}");

    let to = format!("{VIP}:80");
    for (node, client) in cluster.nodes.iter().zip(&clients) {
        eventually("the VIP from the API reaches all three endpoints", Duration::from_secs(15), || {
            answered(node, client, &to) && endpoint_count(node, WEB) == 3
        });
        let counts = hello_counts(node, client, &to, 30);
        assert!(counts.len() == 3 && counts.values().all(|c| (9..=11).contains(c)), "{counts:?}");
    }
    // Deleted in the API: gone from every node that held it.
    api.delete("v1", "Service", "shop", "web").unwrap();
    eventually("web is gone from both nodes", Duration::from_secs(10), || {
        cluster.nodes.iter().all(|n| endpoint_count(n, WEB) == 0)
    });
}
