//! The mesh as deploy/daemonset runs it, on two simulated nodes, with everything from the API
//! server and nothing from a config directory or `workload add`:
//! - the API server over HTTPS with a cluster CA, as pods reach it;
//! - mesh-control as the Deployment's two replicas, each configured as its container is (no
//!   kubeconfig: KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount volume — token, ca.crt,
//!   namespace — mounted at /var/run/secrets/kubernetes.io/serviceaccount in a mount namespace
//!   of its own), its ServiceAccount bound to its ClusterRole and Role (enforced); the CA from
//!   the `cacerts` Secret made by `mesh-control ca-init`, as README's install does; reached
//!   through a Service address;
//! - mesh-node on each node discovering its pods (laid out as kubelet + containerd do) as the
//!   DaemonSet's ServiceAccount, and proving its node to mesh-control with a projected token
//!   of audience `nodemesh`.
//!
//! Checked: Service traffic balanced across pods on both nodes, over mTLS with the identities
//! of the Pods' ServiceAccounts; the replica serving the nodes killed, the nodes move to the
//! other one, which serves a pod added afterwards (its endpoint, its certificate from the same
//! CA); a replica refuses to start without the Secret. Root (eBPF, netns, cgroups).

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

use nodemesh_tests::{
    ControlPlane, SimCluster, SimNode,
    kube_api::{API_AUDIENCE, FakeApiServer, secret_object},
    kubelet::{CgroupDriver, KubePod, Qos, namespace_object},
    mesh::{answered, answered_by, dumped_cluster, endpoint_count, eventually, hello_counts},
    netns, run_checked,
    service_vip::ServiceVip,
};
use serde_json::{Value, json};

const VIP: &str = "10.96.0.10";
const WEB: &str = "outbound|80||web.shop.svc.cluster.local";
/// The mesh-control Service's address, on the fabric (a ClusterIP).
const CONTROL_SERVICE_IP: &str = "10.76.0.10";
const CONTROL_ACCOUNT_TOKEN: &str = "token-of-nodemesh-system-mesh-control";
const WEB_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/client";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset/base").join(path)
}

/// The `cacerts` Secret from a `mesh-control ca-init` directory, as `kubectl create secret
/// generic cacerts --from-file=…` makes it.
fn cacerts_secret(ca_dir: &Path) -> Value {
    let files = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"];
    secret_object(
        "nodemesh-system",
        "cacerts",
        files.map(|f| (f.to_string(), std::fs::read(ca_dir.join(f)).unwrap())),
    )
}

/// One mesh-control replica with the Deployment's flags, in the fabric (its own ports there,
/// its own empty CA directory like the Deployment's emptyDir), configured as its container
/// is: in-cluster config from its ServiceAccount volume, nothing else.
fn replica(cluster: &SimCluster, api: &FakeApiServer, n: u16) -> (ControlPlane, SocketAddr) {
    let (mut control, args, tls) = replica_args(cluster, n);
    match control.start_as_pod(&args, api, "nodemesh-system", CONTROL_ACCOUNT_TOKEN) {
        Ok(()) => (control, tls),
        Err(e) => panic!("replica {n}: {e:#}"),
    }
}

fn replica_args(cluster: &SimCluster, n: u16) -> (ControlPlane, Vec<String>, SocketAddr) {
    let work_dir = cluster.work_dir.join(format!("mesh-control-{n}"));
    std::fs::create_dir_all(&work_dir).unwrap();
    let tls: SocketAddr = format!("10.76.0.1:{}", 25012 + n).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", 25014 + 10 * n).parse().unwrap();
    let xds: SocketAddr = format!("127.0.0.1:{}", 25010 + 10 * n).parse().unwrap();
    let control = ControlPlane::new(&cluster.fabric_netns, &work_dir, xds).with_admin_addr(admin);
    let args: Vec<String> = [
        "run",
        "--kubernetes",
        "--xds-addr",
        &xds.to_string(),
        "--admin-addr",
        &admin.to_string(),
        "--ca-dir",
        &work_dir.join("ca").display().to_string(),
        "--ca-secret-namespace",
        "nodemesh-system",
        "--require-ca-secret",
        "--tls-addr",
        &tls.to_string(),
        "--tls-name",
        CONTROL_SERVICE_IP,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    (control, args, tls)
}

/// The tunnels (node addresses) behind node's endpoints of web; an endpoint reached without a
/// tunnel counts as "direct".
fn tunnelled_endpoints(node: &SimNode) -> BTreeSet<String> {
    let dump = node.config_dump().unwrap_or_default();
    dumped_cluster(&dump, WEB)
        .and_then(|c| c["endpoints"].as_array())
        .into_iter()
        .flatten()
        .map(|e| e["tunnel"].as_str().unwrap_or("direct").to_string())
        .collect()
}

/// The nodes whose xDS stream a replica holds now.
fn connected(control: &ControlPlane) -> BTreeSet<String> {
    let Ok(report) = control.get("/debug/nodes") else { return BTreeSet::new() };
    let report: Value = serde_json::from_str(&report).unwrap_or_default();
    report["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["connected"] == true)
        .filter_map(|n| n["node"].as_str().map(String::from))
        .collect()
}

/// A pod of namespace shop on `node` with ServiceAccount `account`, its object in the API.
fn pod(cluster: &mut SimCluster, api: &FakeApiServer, node: usize, name: &str, account: &str) -> KubePod {
    let host_ip = cluster.node_ip(node).to_string();
    let mut pod =
        cluster.nodes[node].add_kube_pod(name, "shop", CgroupDriver::Systemd, Qos::Burstable).unwrap();
    pod.service_account = account.into();
    let pod = if account == "web" { pod.with_labels(&[("app", "web")]) } else { pod };
    let mut object = pod.object();
    object["status"]["hostIP"] = host_ip.into();
    api.apply(&object).unwrap();
    pod
}

#[test]
fn two_replicas_serve_discovered_pods_across_nodes_and_nodes_move_when_one_goes() {
    let mut cluster = SimCluster::new(2).unwrap();
    let fabric = cluster.fabric_netns.clone();
    // The API server as pods reach it: HTTPS, certificate from the cluster CA in their ca.crt.
    let listener = netns::run_in(&fabric, || Ok(TcpListener::bind("10.76.0.1:6443")?)).unwrap();
    let api = FakeApiServer::start_tls(listener).unwrap();

    // The install: the CA Secret (README step 1), RBAC of both components, then the user's
    // namespace (opted in) and Service.
    let ca_dir = cluster.work_dir.join("cacerts");
    run_checked(
        nodemesh_tests::bin("mesh-control").unwrap().to_str().unwrap(),
        &["ca-init", "--ca-dir", ca_dir.to_str().unwrap()],
    )
    .unwrap();
    api.apply(&cacerts_secret(&ca_dir)).unwrap();
    api.apply_file(&deploy("mesh-control/rbac.yaml")).unwrap();
    api.apply_file(&deploy("mesh-node/rbac.yaml")).unwrap();
    api.apply(&namespace_object("nodemesh-system", &[])).unwrap();
    api.apply(&namespace_object("shop", &[("nodemesh.io/enabled", "true")])).unwrap();
    api.apply(
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": VIP, "clusterIPs": [VIP], "selector": {"app": "web"},
                 "ports": [{"name": "tcp-echo", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
    )
    .unwrap();
    api.add_token(CONTROL_ACCOUNT_TOKEN, "nodemesh-system", "mesh-control", "control-node", API_AUDIENCE);
    api.enforce_rbac();

    // Two replicas behind the Service address nodes dial.
    let (mut replica_a, tls_a) = replica(&cluster, &api, 0);
    let (replica_b, tls_b) = replica(&cluster, &api, 1);
    for n in 0..2 {
        let served =
            std::fs::read(cluster.work_dir.join(format!("mesh-control-{n}/ca/ca-cert.pem"))).unwrap();
        assert_eq!(
            served,
            std::fs::read(ca_dir.join("ca-cert.pem")).unwrap(),
            "replica {n} serves another CA"
        );
    }
    run_checked("ip", &["-n", &fabric, "addr", "add", &format!("{CONTROL_SERVICE_IP}/32"), "dev", "fab0"])
        .unwrap();
    let service: SocketAddr = format!("{CONTROL_SERVICE_IP}:15012").parse().unwrap();
    let _control_service = ServiceVip::start(&fabric, service, vec![tls_a, tls_b]).unwrap();

    // Pods first (they existed before the mesh), then mesh-node on each node as the DaemonSet
    // runs it.
    let client = pod(&mut cluster, &api, 0, "client0", "client");
    let web0 = pod(&mut cluster, &api, 0, "web0", "web");
    let web1 = pod(&mut cluster, &api, 1, "web1", "web");
    cluster.nodes[0].serve(&web0.pod, &[web0.pod.addr(8080)]).unwrap();
    cluster.nodes[1].serve(&web1.pod, &[web1.pod.addr(8080)]).unwrap();
    let root = ca_dir.join("root-cert.pem").display().to_string();
    let url = format!("https://{service}");
    for i in 0..2 {
        let node_ip = cluster.node_ip(i).to_string();
        let node = &mut cluster.nodes[i];
        let (api_token, projected) = (format!("api-token-{i}"), format!("projected-token-{i}"));
        api.add_token(&api_token, "nodemesh-system", "mesh-node", &node.node_netns, API_AUDIENCE);
        api.add_token(&projected, "nodemesh-system", "mesh-node", &node.node_netns, "nodemesh");
        let token_file = node.work_dir.join("node-token");
        std::fs::write(&token_file, &projected).unwrap();
        let kubeconfig = node.work_dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, "mesh-node", &api_token).unwrap();
        node.set_mesh_node_env("KUBECONFIG", &kubeconfig.display().to_string());
        let token_file = token_file.display().to_string();
        node.start_mesh_node(&[
            "--kubernetes",
            "--control-plane",
            &url,
            "--control-plane-root",
            &root,
            "--token-file",
            &token_file,
            "--node-ip",
            &node_ip,
        ])
        .unwrap();
    }
    let node0 = &cluster.nodes[0];
    let to = format!("{VIP}:80");

    // Balanced across both nodes' pods, over mTLS as the Pods' ServiceAccounts.
    // Traffic right away: a node's tunnel holds a handshake until the certificate it asks
    // for has arrived, so the first connections do not fail and get an endpoint ejected.
    // Converged once node 0 holds both endpoints, each behind its node's tunnel (node 1 joins
    // after node 0: until it has reported, its pods' tunnel is unknown).
    let node_ips = [cluster.node_ip(0), cluster.node_ip(1)];
    eventually("client0 reaches both web pods through the tunnels", Duration::from_secs(20), || {
        // A connection first: the node asks for the Service's address on demand.
        answered(node0, &client.pod, &to)
            && tunnelled_endpoints(node0) == BTreeSet::from(node_ips.map(|ip| format!("{ip}:15008")))
    });
    let counts = hello_counts(node0, &client.pod, &to, 20);
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.values().all(|c| (9..=11).contains(c)), "round robin not even: {counts:?}");
    let tunnels = node0.config_dump().unwrap()["tunnels"].as_array().cloned().unwrap_or_default();
    assert!(
        tunnels.iter().any(|t| t["source"] == CLIENT_IDENTITY && t["destination"] == WEB_IDENTITY),
        "no mTLS tunnel from client to web: {tunnels:?}"
    );

    // The Service keeps each node on one replica (ClientIP affinity): node 0 on the first,
    // node 1 on the second. So each replica heard only one node's reports, and still gave
    // node 0 the tunnel of node 1's pod, from the Pod's hostIP.
    let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.node_netns.clone()).collect();
    assert_eq!(connected(&replica_a), BTreeSet::from([nodes[0].clone()]));
    assert_eq!(connected(&replica_b), BTreeSet::from([nodes[1].clone()]));

    // The first replica goes; node 0 moves to the second, which then serves a pod added now:
    // only it can give node 1 that pod's certificate and node 0 its endpoint.
    replica_a.kill().unwrap();
    let (nodes, remaining): (BTreeSet<String>, _) = (nodes.into_iter().collect(), &replica_b);
    eventually("both nodes reconnected to the remaining replica", Duration::from_secs(30), || {
        connected(remaining) == nodes
    });
    let web2 = pod(&mut cluster, &api, 1, "web2", "web");
    cluster.nodes[1].serve(&web2.pod, &[web2.pod.addr(8080)]).unwrap();
    let node0 = &cluster.nodes[0];
    eventually("web2 served from the remaining replica", Duration::from_secs(30), || {
        endpoint_count(node0, WEB) == 3 && answered_by(node0, &client.pod, &to, 3).is_ok_and(|c| c.len() == 3)
    });
    let counts = hello_counts(node0, &client.pod, &to, 30);
    assert_eq!(counts.get("web2").copied().unwrap_or(0), 10, "{counts:?}");

    // Without the Secret, a replica refuses to make a CA of its own.
    api.delete("v1", "Secret", "nodemesh-system", "cacerts").unwrap();
    let (mut third, args, _) = replica_args(&cluster, 2);
    let e = third.start_as_pod(&args, &api, "nodemesh-system", CONTROL_ACCOUNT_TOKEN).unwrap_err();
    assert!(
        format!("{e:#}").contains("Secret nodemesh-system/cacerts not found, and --require-ca-secret is set"),
        "{e:#}"
    );

    // Every call both components made was within their roles.
    assert_eq!(api.forbidden(), Vec::<String>::new());
}
