//! Service VIPs through mesh-control and xDS, on one simulated node (mesh-control runs in the
//! node netns): load balancing per DestinationRule, config changes from the watched directory,
//! scoping, egress policy, NACKs, and a control-plane outage.

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use nodemesh_tests::{
    CONTROL_PLANE_URL, Pod, Registration, SimNode,
    mesh::{
        answered_by, dumped_cluster as cluster, eventually, hello_counts, labelled, rule_yaml, service_yaml,
        write_config as write,
    },
};

const VIP: &str = "10.96.0.10";

const WEB: &str = "outbound|80||web.shop.svc.cluster.local";

struct Setup {
    node: SimNode,
    config: PathBuf,
    client: Pod,
    servers: Vec<Pod>,
}

/// A node with mesh-control on `config`, a meshed client, and three `app=web` servers on 8080.
fn setup(extra_node_args: &[&str]) -> Setup {
    let mut node = SimNode::new().unwrap();
    let config = node.work_dir.join("config");
    fs::create_dir_all(&config).unwrap();
    write(&config, "web.yaml", &service_yaml("web", VIP, "web"));
    node.start_control_plane(&config).unwrap();
    let token = node.write_own_node_token().unwrap();
    let mut args = vec!["--control-plane", CONTROL_PLANE_URL, "--token-file", &token];
    args.extend_from_slice(extra_node_args);
    node.start_mesh_node(&args).unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    node.register(&client, &Registration::meshed()).unwrap();
    let mut servers = Vec::new();
    for i in 0..3 {
        let s = node.add_pod(&format!("web{i}"), "shop").unwrap();
        node.register(&s, &labelled("web")).unwrap();
        node.serve(&s, &[s.addr(8080)]).unwrap();
        servers.push(s);
    }
    // Registration → report → generation → push: wait until all three serve through the VIP.
    let vip = format!("{VIP}:80");
    eventually("the VIP reaches all three endpoints", Duration::from_secs(10), || {
        answered_by(&node, &client, &vip, 6).is_ok_and(|counts| counts.len() == 3)
    });
    Setup { node, config, client, servers }
}

#[test]
fn service_vip_is_balanced_per_destination_rule_and_changes_apply_from_the_directory() {
    let Setup { node, config, client, servers } = setup(&[]);
    let to = format!("{VIP}:80");

    // Default (no DestinationRule): round robin, even within ±1.
    let counts = hello_counts(&node, &client, &to, 30);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|c| (9..=11).contains(c)), "round robin not even: {counts:?}");

    // Consistent hash on source IP: one client always lands on the same endpoint.
    let changed = Instant::now();
    write(&config, "rule.yaml", &rule_yaml("{loadBalancer: {consistentHash: {useSourceIp: true}}}"));
    eventually("the ring-hash cluster reaches the node", Duration::from_secs(10), || {
        node.config_dump().is_ok_and(|d| {
            cluster(&d, WEB)
                .is_some_and(|c| c["lb_policy"].as_str().unwrap_or_default().starts_with("RingHash"))
        })
    });
    eprintln!("DestinationRule change applied on the node after {:?}", changed.elapsed());
    let counts = hello_counts(&node, &client, &to, 20);
    assert_eq!(counts.len(), 1, "consistent hash must be sticky per source: {counts:?}");

    // Random and least request spread over every endpoint.
    for lb in ["{simple: RANDOM}", "{simple: LEAST_REQUEST}"] {
        write(&config, "rule.yaml", &rule_yaml(&format!("{{loadBalancer: {lb}}}")));
        let want = if lb.contains("RANDOM") { "Random" } else { "LeastRequest" };
        eventually(&format!("{want} reaches the node"), Duration::from_secs(10), || {
            node.config_dump().is_ok_and(|d| cluster(&d, WEB).is_some_and(|c| c["lb_policy"] == want))
        });
        let counts = hello_counts(&node, &client, &to, 60);
        assert_eq!(counts.len(), 3, "{want} must reach every endpoint: {counts:?}");
    }

    // An endpoint removed from config (its workload's label changes) stops receiving traffic.
    node.register(&servers[2], &labelled("retired")).unwrap();
    eventually("two endpoints left", Duration::from_secs(10), || {
        node.config_dump().is_ok_and(|d| {
            cluster(&d, WEB).is_some_and(|c| c["endpoints"].as_array().is_some_and(|e| e.len() == 2))
        })
    });
    let counts = hello_counts(&node, &client, &to, 20);
    assert!(!counts.contains_key("web2"), "{counts:?}");

    // A broken file dropped into the directory changes nothing that works. Waited for until
    // mesh-control has read the directory past it and every node applied the result, so the
    // traffic below runs on config that had its chance to break.
    node.apply_and_wait(|| {
        write(
            &config,
            "broken.yaml",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad}\nspec: {host: web, trafficPolicy: {loadBalancer: {simple: FASTEST}}}\n",
        )
    })
    .unwrap();
    let rejected = node.control_rejections().unwrap();
    assert!(
        rejected.iter().any(|r| r.contains("broken.yaml") && r.contains("FASTEST")),
        "the rejection is reported, naming the file: {rejected:?}"
    );
    let counts = hello_counts(&node, &client, &to, 10);
    assert_eq!(counts.values().sum::<usize>(), 10, "the last good config still serves: {counts:?}");
    assert!(!counts.contains_key("web2"), "{counts:?}");
}

#[test]
fn a_node_holds_only_what_its_workloads_use() {
    let Setup { mut node, config, client, .. } = setup(&[]);
    write(&config, "other.yaml", &service_yaml("other", "10.96.0.20", "other"));
    let other = node.add_pod("other0", "shop").unwrap();
    node.register(&other, &labelled("other")).unwrap();
    hello_counts(&node, &client, &format!("{VIP}:80"), 3);
    eventually("control plane built the other service", Duration::from_secs(10), || {
        node.control_get("/debug/config")
            .is_ok_and(|c| c.contains("outbound|80||other.shop.svc.cluster.local"))
    });
    let dump = node.config_dump().unwrap();
    assert!(cluster(&dump, WEB).is_some(), "{dump}");
    assert!(
        cluster(&dump, "outbound|80||other.shop.svc.cluster.local").is_none(),
        "service `other` is never dialled from this node, so it must hold none of it: {dump}"
    );
}

#[test]
fn registry_only_egress_is_refused_at_once_with_the_reason_and_allow_any_passes() {
    let Setup { mut node, config, client, .. } = setup(&[]);
    // A server no Service or ServiceEntry knows of, and not registered with the mesh.
    let outside = node.add_pod("outside", "ext").unwrap();
    node.serve(&outside, &[outside.addr(7000)]).unwrap();
    let target = outside.addr(7000).to_string();
    let v = node.testapp(&client, &["client", "--to", &target, "--mode", "hello"]).unwrap();
    assert_eq!(v["connections"][0]["reply"]["server"], "outside", "ALLOW_ANY passes through: {v}");

    write(
        &config,
        "mesh.yaml",
        "apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    );
    eventually("REGISTRY_ONLY reaches the node", Duration::from_secs(10), || {
        node.config_dump().is_ok_and(|d| d.to_string().contains("REGISTRY_ONLY"))
    });
    let started = Instant::now();
    let v = node.testapp(&client, &["client", "--to", &target, "--mode", "hello"]).unwrap();
    let elapsed = started.elapsed();
    assert!(v["connections"][0]["reply"].get("server").is_none(), "must be refused: {v}");
    eprintln!("REGISTRY_ONLY refusal took {elapsed:?} (including process start)");
    let metrics = node.admin_get("/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("nodemesh_egress_denied_total") && l.contains(&target)),
        "the metric names the destination:\n{metrics}"
    );
    assert!(node.log().contains("no ServiceEntry"), "the log says why");
    // Registered services still work.
    assert_eq!(hello_counts(&node, &client, &format!("{VIP}:80"), 3).values().sum::<usize>(), 3);

    // A Sidecar's egress hosts narrow that further: a service outside them is refused, naming
    // the hosts; listing its namespace lets it through again.
    let sidecar = |hosts: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: shop}}\n\
             spec: {{egress: [{{hosts: [{hosts}]}}]}}\n"
        )
    };
    node.apply_and_wait(|| write(&config, "sidecar.yaml", &sidecar("\"istio-system/*\""))).unwrap();
    let to = format!("{VIP}:80");
    let v = node.testapp(&client, &["client", "--to", &to, "--mode", "hello"]).unwrap();
    assert!(v["connections"][0]["reply"].get("server").is_none(), "outside the egress hosts: {v}");
    assert!(node.log().contains("is not among the egress hosts of the workload's Sidecar (istio-system/*)"));
    let metrics = node.admin_get("/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nodemesh_egress_denied_total") && l.contains("not_in_sidecar_egress")),
        "{metrics}"
    );
    node.apply_and_wait(|| write(&config, "sidecar.yaml", &sidecar("\"istio-system/*\", \"./*\""))).unwrap();
    assert_eq!(hello_counts(&node, &client, &to, 3).values().sum::<usize>(), 3);
}

#[test]
fn a_service_exported_to_some_namespaces_is_unknown_to_workloads_elsewhere() {
    let Setup { mut node, config, client, .. } = setup(&[]);
    let outsider = node.add_pod("outsider", "other").unwrap();
    node.register(&outsider, &Registration::meshed()).unwrap();
    // An external server that a ServiceEntry in shop exports to `other` only.
    let api = node.add_pod("api", "ext").unwrap();
    node.serve(&api, &[api.addr(7000)]).unwrap();
    let entry = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: shop}}\n\
         spec: {{hosts: [api.example.com], addresses: [10.99.0.5], ports: [{{number: 7000, name: tcp, protocol: TCP}}], \
         resolution: STATIC, endpoints: [{{address: {}}}], exportTo: [other]}}\n",
        api.ip
    );
    let registry_only = "apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n\
                         spec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";
    node.apply_and_wait(|| {
        write(&config, "api.yaml", &entry);
        write(&config, "mesh.yaml", registry_only);
    })
    .unwrap();
    let to_web = format!("{VIP}:80");
    assert_eq!(
        hello_counts(&node, &outsider, &to_web, 3).values().sum::<usize>(),
        3,
        "web is exported everywhere"
    );
    assert_eq!(
        hello_counts(&node, &outsider, "10.99.0.5:7000", 2).get("api"),
        Some(&2),
        "api is exported to other"
    );
    let refused = |pod: &Pod, to: &str| {
        let v = node.testapp(pod, &["client", "--to", to]).unwrap();
        v["connections"][0]["reply"].get("server").is_none()
    };
    assert!(refused(&client, "10.99.0.5:7000"), "shop does not see a ServiceEntry exported to other");
    assert!(
        node.log().contains("service api.example.com is exported only to namespaces [other], not to shop")
    );

    // The Service annotation Istio uses: web exported to its own namespace only.
    let private = service_yaml("web", VIP, "web")
        .replace("namespace: shop}", "namespace: shop, annotations: {networking.istio.io/exportTo: .}}");
    node.apply_and_wait(|| write(&config, "web.yaml", &private)).unwrap();
    assert!(refused(&outsider, &to_web), "other no longer sees web");
    assert_eq!(hello_counts(&node, &client, &to_web, 3).values().sum::<usize>(), 3, "shop still does");
    let metrics = node.metrics().unwrap();
    assert!(
        metrics.sum(
            "nodemesh_egress_denied_total",
            &[("source_workload", "outsider"), ("reason", "no_service_entry")]
        ) >= 1.0
    );
}

#[test]
fn control_plane_outage_keeps_traffic_flowing_and_a_nack_is_reported() {
    let Setup { mut node, config, client, .. } = setup(&["--max-endpoints-per-cluster", "3"]);
    let to = format!("{VIP}:80");
    assert_eq!(hello_counts(&node, &client, &to, 6).len(), 3);

    node.kill_control_plane().unwrap();
    assert_eq!(hello_counts(&node, &client, &to, 6).values().sum::<usize>(), 6, "last good config serves on");

    // A restarted control plane holds a node that comes back with config until every node
    // could report (the resync grace): the node keeps all three endpoints meanwhile, and is
    // never resynced to a view that lacks them.
    node.start_control_plane(&config).unwrap();
    eventually("node reconnects", Duration::from_secs(20), || {
        node.control_status()
            .is_ok_and(|s| s.lines().any(|l| l.contains(&node.node_netns) && l.contains(" yes ")))
    });
    assert_eq!(hello_counts(&node, &client, &to, 6).len(), 3, "still all three while reconnected");
    eventually("resync grace ends", Duration::from_secs(20), || {
        node.control_status().is_ok_and(|s| !s.contains("resync grace"))
    });
    assert_eq!(hello_counts(&node, &client, &to, 6).len(), 3, "resynced to all three");

    // A fourth endpoint exceeds this node's limit: the node NACKs, keeps the three, says why.
    let extra = node.add_pod("web3", "shop").unwrap();
    node.register(&extra, &labelled("web")).unwrap();
    eventually("status shows the NACK reason", Duration::from_secs(20), || {
        node.control_status().is_ok_and(|s| s.contains("--max-endpoints-per-cluster"))
    });
    let counts = hello_counts(&node, &client, &to, 6);
    assert_eq!(counts.len(), 3, "previous endpoints keep serving: {counts:?}");
    eprintln!("{}", node.control_status().unwrap());
}
