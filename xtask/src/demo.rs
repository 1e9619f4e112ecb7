//! `cargo xtask demo`: a simulated cluster of two nodes and mesh-control on `examples/config`;
//! Service VIP traffic balanced across pods on both nodes, and a readable account of what the
//! proxies and the control plane saw; then the bookshop sample and its route files, one at a
//! time (`bookshop`).

use std::{collections::BTreeMap, time::Duration};

use nodemesh_tests::{Pod, Registration, SimCluster, SimNode, mesh, metrics::Metrics};

use crate::{bookshop, setup, util};

const REVIEWS: &str = "10.96.0.20:9080";
const RATINGS: &str = "10.96.0.30:9080";
const NODE_METRICS_ADDR: &str = "0.0.0.0:15020";
/// Where the demo forwards mesh-control's admin endpoint on the host, for a browser.
const GRAPH_ON_HOST: &str = "127.0.0.1:15014";

pub(crate) fn run(keep: bool) -> anyhow::Result<()> {
    setup::run()?;
    util::build_release()?;
    util::step("creating a simulated cluster: 2 nodes + a fabric netns, no route off this machine");
    let mut cluster = SimCluster::new(2)?;
    // mesh-control watches the cluster's own config directory: examples/config now, the
    // bookshop and its route files as the walk-through goes.
    let config = cluster.config_dir.clone();
    for entry in std::fs::read_dir(util::workspace_root()?.join("examples/config"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), config.join(entry.file_name()))?;
    }
    // Nodes serve their metrics off-node (as the DaemonSet does) so mesh-control's service
    // graph can scrape them.
    cluster.start(&["--graph-scrape-interval-ms", "1000"], &["--metrics-addr", NODE_METRICS_ADDR])?;
    println!(
        "  mesh-control watches {} (nodes dial its TLS port, {})",
        config.display(),
        cluster.control.tls_url()
    );

    // (node, pod, namespace, labels) — reviews runs on both nodes.
    let layout: [(usize, &str, &str, Registration); 6] = [
        (0, "frontend", "shop", Registration::meshed()),
        (0, "reviews-v1", "shop", mesh::labelled("reviews")),
        (1, "reviews-v2", "shop", mesh::labelled("reviews")),
        (1, "reviews-v3", "shop", mesh::labelled("reviews")),
        (1, "ratings", "shop", mesh::labelled("ratings")),
        (1, "postgres", "data", Registration::unmeshed_namespace()),
    ];
    println!("\n  {:<8} {:<12} {:<10} {:<12} MESH", "NODE", "POD", "NAMESPACE", "IP");
    let mut pods: BTreeMap<&str, (usize, Pod)> = BTreeMap::new();
    for (n, name, ns, how) in &layout {
        let node = &mut cluster.nodes[*n];
        let pod = node.add_pod(name, ns)?;
        let status = node.register(&pod, how)?;
        let decision = status["decision"].as_str().unwrap_or("?").replace('_', " ");
        println!("  node-{:<3} {:<12} {:<10} {:<12} {decision}", n + 1, pod.name, pod.namespace, pod.ip);
        if *name != "frontend" {
            let port = if *name == "postgres" { 5432 } else { 9080 };
            node.serve(&pod, &[pod.addr(port)])?;
        }
        pods.insert(name, (*n, pod));
    }
    let (node0, frontend) = (&cluster.nodes[0], &pods["frontend"].1);
    wait_for_endpoints(node0, frontend)?;

    println!("\nSending traffic from shop/frontend (node-1):");
    let counts = mesh::answered_by(node0, frontend, REVIEWS, 30)?;
    println!("  -> reviews VIP {REVIEWS}, 30 connections, round robin across both nodes:");
    for (server, count) in &counts {
        let node = pods.get(server.as_str()).map_or(0, |p| p.0 + 1);
        println!("       {server:<12} on node-{node}: {count}");
    }
    let counts = mesh::answered_by(node0, frontend, RATINGS, 10)?;
    println!("  -> ratings VIP {RATINGS}, 10 connections, consistent hash on source IP: {counts:?}");
    let postgres = pods["postgres"].1.addr(5432);
    let counts = mesh::answered_by(node0, frontend, &postgres.to_string(), 2)?;
    println!("  -> postgres {postgres} (not meshed, no Service): passed through, {counts:?}");
    std::thread::sleep(Duration::from_millis(300));

    print_report(&node0.metrics()?);
    println!("\nWhat each node holds (scoping: only what its own pods dial):");
    for (i, node) in cluster.nodes.iter().enumerate() {
        let dump = node.config_dump()?;
        let clusters: Vec<&String> =
            dump["xds"]["config"]["clusters"].as_object().map(|m| m.keys().collect()).unwrap_or_default();
        println!("  node-{}: {clusters:?}", i + 1);
    }
    identity_and_policy(&cluster, &config, &pods)?;
    util::step("the bookshop sample (examples/bookshop): L7 routing, one route file at a time");
    let shop = bookshop::start(&mut cluster, &config)?;
    bookshop::walk(&cluster, &config, &shop)?;
    service_graph(&cluster)?;
    crate::demo_discovery::run()?;

    println!("\nmesh-control status:");
    for line in cluster.control.status()?.lines() {
        println!("  {line}");
    }
    if keep {
        keep_running(&cluster, frontend)?;
    }
    util::step("cleaning up the simulated cluster");
    Ok(())
}

const STRICT_SHOP: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
     metadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
const RATINGS_FROM_SHOP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
     metadata: {name: ratings-from-shop, namespace: shop}\n\
     spec:\n  selector: {matchLabels: {app: ratings}}\n  rules: [{from: [{source: {namespaces: [shop]}}]}]\n";

/// Workload certificates, the tunnel between the nodes, and what PeerAuthentication and
/// AuthorizationPolicy do to a caller outside the mesh (postgres, namespace `data`).
fn identity_and_policy(
    cluster: &SimCluster,
    config: &std::path::Path,
    pods: &BTreeMap<&str, (usize, Pod)>,
) -> anyhow::Result<()> {
    util::step(
        "identity: workload certificates, mTLS between the nodes, PeerAuthentication, AuthorizationPolicy",
    );
    for (i, node) in cluster.nodes.iter().enumerate() {
        let dump = node.config_dump()?;
        let ids: Vec<&str> = dump["identity"]["certificates"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["identity"].as_str()).collect())
            .unwrap_or_default();
        println!("  node-{} holds certificates (keys made on the node, never sent) for {ids:?}", i + 1);
        for t in dump["tunnels"].as_array().into_iter().flatten() {
            println!(
                "    HBONE to {}: {} mTLS connection(s) as {} -> {}, {} stream(s) open",
                t["tunnel"], t["connections"], t["source"], t["destination"], t["streams"]
            );
        }
    }
    let (postgres_node, postgres) = (&cluster.nodes[pods["postgres"].0], &pods["postgres"].1);
    let reviews = pods["reviews-v1"].1.addr(9080).to_string();
    let ratings = pods["ratings"].1.addr(9080).to_string();
    let frontend_node = &cluster.nodes[pods["frontend"].0];
    let frontend = &pods["frontend"].1;
    let show =
        |what: &str, ok: bool| println!("  {what:<74} {}", if ok { "answered" } else { "refused (reset)" });
    show(
        "data/postgres (outside the mesh, plaintext) -> shop/reviews-v1, PERMISSIVE:",
        mesh::answered(postgres_node, postgres, &reviews),
    );
    mesh::write_config(config, "strict-shop.yaml", STRICT_SHOP);
    let refused = mesh::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        !mesh::answered(postgres_node, postgres, &reviews)
    });
    println!("  $ cp strict-shop.yaml <config>   (PeerAuthentication: shop is STRICT)");
    show("data/postgres -> shop/reviews-v1:", refused.is_err());
    show(
        "shop/frontend (meshed, through the tunnel) -> shop/reviews-v1:",
        mesh::answered(frontend_node, frontend, &reviews),
    );
    std::fs::remove_file(config.join("strict-shop.yaml"))?;
    mesh::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        mesh::answered(postgres_node, postgres, &reviews)
    })
    .map_err(|e| anyhow::anyhow!("PERMISSIVE never came back after STRICT was removed: {e}"))?;
    mesh::write_config(config, "ratings-from-shop.yaml", RATINGS_FROM_SHOP);
    let denied = mesh::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        !mesh::answered(postgres_node, postgres, &ratings)
    });
    println!(
        "  $ rm strict-shop.yaml; cp ratings-from-shop.yaml <config>   (AuthorizationPolicy: ratings only from namespace shop)"
    );
    show("data/postgres -> shop/ratings (plaintext has no namespace to be allowed by):", denied.is_err());
    show("shop/frontend -> shop/ratings:", mesh::answered(frontend_node, frontend, &ratings));
    std::fs::remove_file(config.join("ratings-from-shop.yaml"))?;
    let mut counted = [0.0; 2];
    for node in &cluster.nodes {
        let m = node.metrics()?;
        counted[0] += m.sum("nodemesh_inbound_denied_total", &[("reason", "mtls_required")]);
        counted[1] += m.sum("nodemesh_inbound_denied_total", &[("reason", "not_allowed")]);
    }
    println!(
        "  the servers' nodes counted in nodemesh_inbound_denied_total: {} for STRICT (reason mtls_required), \
         {} allowed by no ALLOW policy (not_allowed)",
        counted[0], counted[1]
    );
    anyhow::ensure!(
        refused.is_ok() && denied.is_ok(),
        "STRICT or the AuthorizationPolicy did not take effect"
    );
    Ok(())
}

/// The service graph mesh-control drew from the nodes' metrics: its address (forwarded to the
/// host's loopback), and its edges as text.
fn service_graph(cluster: &SimCluster) -> anyhow::Result<()> {
    util::step("the service graph: mesh-control scrapes every node's metrics and draws the edges");
    let admin = cluster.control.admin_addr();
    let address = match nodemesh_tests::netns::forward(GRAPH_ON_HOST.parse()?, &cluster.fabric_netns, admin) {
        Ok(()) => format!("http://{GRAPH_ON_HOST}/graph"),
        Err(e) => {
            println!("  (cannot forward {GRAPH_ON_HOST} to mesh-control: {e:#})");
            format!("http://{admin}/graph inside netns {}", cluster.fabric_netns)
        }
    };
    println!("  Service graph: {address}  (open it in a browser; --keep leaves it up)");
    // The bookshop's requests, once two scrapes of each node have seen them, per version.
    let mut edges = Vec::new();
    for _ in 0..50 {
        // A box per version: the bookshop's reviews v1, v2 and v3 each get their edge.
        let data: serde_json::Value =
            serde_json::from_str(&cluster.control.get("/graph/data?versions=true")?)?;
        edges = data["edges"].as_array().cloned().unwrap_or_default();
        if edges.iter().any(|e| e["destination"].as_str().is_some_and(|d| d.starts_with("bookshop/ratings")))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let name = |e: &serde_json::Value, side: &str| e[side].as_str().unwrap_or("?").to_string();
    let width = |side: &str| edges.iter().map(|e| name(e, side).len()).max().unwrap_or(0).max(4);
    let (from_w, to_w) = (width("source"), width("destination"));
    println!(
        "  {:<from_w$} {:<to_w$} {:>6} {:>8} {:>7} {:>10}  MTLS",
        "FROM", "TO", "COUNT", "RATE/S", "ERRORS", "P99"
    );
    for e in &edges {
        let p99 = e["p99_ms"].as_f64().map_or("-".to_string(), |v| format!("{v:.1} ms"));
        println!(
            "  {:<from_w$} {:<to_w$} {:>6} {:>8.2} {:>6.1}% {:>10}  {} {}",
            name(e, "source"),
            name(e, "destination"),
            e["count"].as_u64().unwrap_or(0),
            e["rate"].as_f64().unwrap_or(0.0),
            e["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            p99,
            e["protocol"].as_str().unwrap_or("?"),
            e["mtls"].as_str().unwrap_or("?"),
        );
    }
    anyhow::ensure!(!edges.is_empty(), "the service graph shows no edges after the bookshop's traffic");
    Ok(())
}

/// Registration → report → generation → push: wait until both VIPs answer from node 0.
fn wait_for_endpoints(node: &SimNode, from: &Pod) -> anyhow::Result<()> {
    // The first connect to each VIP subscribes the node to it (on demand).
    mesh::wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        mesh::answered(node, from, REVIEWS)
            && mesh::answered(node, from, RATINGS)
            && mesh::endpoint_count(node, "outbound|9080||reviews.shop.svc.cluster.local") == 3
    })
    .map_err(|e| anyhow::anyhow!("the VIPs never reached node-1 ({e}):\n{}", node.log_tail()))
}

fn print_report(m: &Metrics) {
    println!("\nWhat mesh-node saw (from its /metrics):");
    println!(
        "  {:<26} {:<26} {:>7} {:>7} {:>12} {:>12}",
        "SOURCE", "DESTINATION", "OPENED", "CLOSED", "SENT", "RECEIVED"
    );
    let mut pairs: Vec<(String, String)> = m
        .samples
        .iter()
        .filter(|s| {
            s.name == "istio_tcp_connections_opened_total"
                && s.labels.get("reporter").map(String::as_str) == Some("source")
        })
        .map(|s| {
            let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            (
                format!("{}/{}", l("source_workload_namespace"), l("source_workload")),
                format!("{}/{}", l("destination_workload_namespace"), l("destination_workload")),
            )
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    for (src, dst) in &pairs {
        let (sns, sname) = src.split_once('/').unwrap_or_default();
        let (dns, dname) = dst.split_once('/').unwrap_or_default();
        // The client's side: same-node connections are counted by both reporters.
        let labels = [
            ("reporter", "source"),
            ("source_workload", sname),
            ("source_workload_namespace", sns),
            ("destination_workload", dname),
            ("destination_workload_namespace", dns),
        ];
        println!(
            "  {:<26} {:<26} {:>7} {:>7} {:>12} {:>12}",
            src,
            dst,
            m.sum("istio_tcp_connections_opened_total", &labels),
            m.sum("istio_tcp_connections_closed_total", &labels),
            human_bytes(m.sum("istio_tcp_sent_bytes_total", &labels)),
            human_bytes(m.sum("istio_tcp_received_bytes_total", &labels)),
        );
    }
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1048576.0 => format!("{:.1} MiB", b / 1048576.0),
        b if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        b => format!("{b} B"),
    }
}

fn keep_running(cluster: &SimCluster, frontend: &Pod) -> anyhow::Result<()> {
    let testapp = nodemesh_tests::bin("nm-testapp")?;
    let node = &cluster.nodes[0];
    println!("\nThe cluster stays up until you press Ctrl-C (everything is removed then). Try:");
    println!(
        "  # mesh-control watches {}: edit shop.yaml there (say, drop the",
        cluster.config_dir.display()
    );
    println!(
        "  # DestinationRule), or copy in a route file from examples/bookshop/routes/, and watch it apply"
    );
    println!("  # node-1's config dump and metrics (admin endpoint inside the node netns)");
    println!("  nsenter --net=/var/run/netns/{} curl -s 127.0.0.1:15000/config_dump", node.node_netns);
    println!("  nsenter --net=/var/run/netns/{} curl -s 127.0.0.1:15000/metrics", node.node_netns);
    println!("  # what every node applied");
    println!(
        "  nsenter --net=/var/run/netns/{} {} status",
        cluster.fabric_netns,
        nodemesh_tests::bin("mesh-control")?.display()
    );
    println!("  # a connection from the meshed frontend pod (joins its cgroup, then its netns)");
    println!(
        "  sh -c 'echo $$ > {}/cgroup.procs; exec nsenter --net=/var/run/netns/{} {} client --to {REVIEWS} --mode hello'",
        frontend.cgroup.display(),
        frontend.netns,
        testapp.display(),
    );
    println!(
        "  # logs: {} and {}",
        node.mesh_node_log().display(),
        cluster.work_dir.join("mesh-control.log").display()
    );
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block()?;
    let signal = signals.wait()?;
    println!("\n[xtask] got {signal}");
    Ok(())
}
