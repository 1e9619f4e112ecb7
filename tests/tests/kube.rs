//! The Kubernetes source against an in-test API server speaking real Kubernetes JSON (list,
//! watch from a resourceVersion, bookmarks, 410 Gone): it must yield the same model as the same
//! objects in a config directory, follow watch events, resume from bookmarks and relist after
//! a 410. Runs on loopback; needs no root.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_control::{
    model::{Kind, Object, store::Store},
    source::{
        files::DirectorySource,
        kube::{self, Connection},
    },
    xds::translate,
};
use nodemesh_tests::kube_api::{API_AUDIENCE, FakeApiServer, secret_object};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// Objects of every kind the model reads, as a user would write them.
fn objects() -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"nodemesh.io/enabled": "true"}}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a",
            "labels": {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "r1-a"}}}),
        pod("web-0", "10.77.1.3"),
        pod("web-1", "10.77.1.4"),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc12", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.77.1.3"], "conditions": {"ready": true}, "nodeName": "node-a",
                 "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "shop"}},
                {"addresses": ["10.77.1.4"], "conditions": {"ready": true}, "nodeName": "node-a",
                 "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}}]}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "payments", "namespace": "shop"},
            "spec": {"hosts": ["payments.example.com"], "addresses": ["192.0.2.10"], "location": "MESH_EXTERNAL",
                     "resolution": "STATIC", "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                     "endpoints": [{"address": "192.0.2.11"}]}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "vm-1", "namespace": "shop"},
            "spec": {"address": "10.77.2.9", "labels": {"app": "web"}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"host": "web", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": {"name": "default", "namespace": "shop"},
            "spec": {"egress": [{"hosts": ["./*"]}]}}),
        // Rejected on both sides, with the same reason.
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"host": "web", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}}),
    ]
}

fn find<'a>(objects: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    objects.iter_mut().find(|o| o["kind"] == kind && o["metadata"]["name"] == name).unwrap()
}

fn pod(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "app", "image": "web"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// What a model amounts to: every object, the rejection reasons, and every xDS resource version.
#[derive(Debug, PartialEq)]
struct Model {
    objects: Vec<Object>,
    errors: Vec<String>,
    resources: BTreeMap<String, String>,
}

fn model(store: &Store) -> Model {
    let objects = Kind::ALL.iter().flat_map(|k| store.of_kind(*k).cloned()).collect();
    // The reason, without the origin and location (a file path vs. a Kubernetes resource).
    let mut errors: Vec<String> = store
        .errors()
        .map(|e| e.message.split_once(": ").map_or(e.message.clone(), |m| m.1.to_string()))
        .collect();
    errors.sort();
    let snap = translate::snapshot(store);
    let mut resources = BTreeMap::new();
    for (kind, map) in [("cluster", &snap.clusters), ("endpoint", &snap.endpoints)] {
        resources.extend(map.values().map(|r| (format!("{kind} {}", r.name), r.version.clone())));
    }
    resources.extend(snap.addresses.values().map(|r| (format!("address {}", r.name), r.version.clone())));
    for (node, list) in &snap.workloads_by_node {
        resources.extend(list.iter().map(|r| (format!("workload {node} {}", r.name), r.version.clone())));
    }
    Model { objects, errors, resources }
}

/// The model of `objects` written as files into a fresh directory.
fn directory_model(objects: &[Value]) -> Model {
    let dir = std::env::temp_dir().join(format!("nm-kube-test-{}-{}", std::process::id(), unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, o) in objects.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:02}.json")), o.to_string()).unwrap();
    }
    let store = Arc::new(Mutex::new(Store::default()));
    DirectorySource::new(dir.clone(), Arc::clone(&store), Arc::new(Notify::new())).load_all().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let store = store.lock().unwrap();
    model(&store)
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Waits until the kube-fed store's model equals `want`.
async fn converges(store: &Arc<Mutex<Store>>, want: &Model, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = model(&store.lock().unwrap());
        if &got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the Kubernetes model never matched the directory's.\n got: {got:#?}\nwant: {want:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_yields_the_directory_model_and_follows_watch_bookmarks_and_410() {
    let api = FakeApiServer::start(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    // A CRD that is not installed counts as empty and does not hold up the first sync.
    api.not_served("nodemesh.io/v1alpha1", "MeshConfig");
    let mut objects = objects();
    for o in &objects {
        api.apply(o).unwrap();
    }

    let store = Arc::new(Mutex::new(Store::default()));
    let client = kube::client(&Connection::Url(api.url())).await.unwrap();
    kube::start(client, Arc::clone(&store), Arc::new(Notify::new()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !kube::synced(&store.lock().unwrap()) {
        assert!(Instant::now() < deadline, "first list");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want = directory_model(&objects);
    assert!(want.objects.len() >= 10 && want.errors.len() == 1 && !want.resources.is_empty(), "{want:#?}");
    assert_eq!(model(&store.lock().unwrap()), want, "the same objects must give the same model");

    // Watch events: a modified Service, a deleted pod, a new WorkloadEntry.
    let service = find(&mut objects, "Service", "web");
    service["spec"]["ports"][0]["port"] = 8000.into();
    let service = service.clone();
    api.apply(&service).unwrap();
    api.delete("v1", "Pod", "shop", "web-1").unwrap();
    objects.retain(|o| o["metadata"]["name"] != "web-1");
    let vm2 = json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "vm-2", "namespace": "shop"},
        "spec": {"address": "10.77.2.10", "labels": {"app": "web"}}});
    api.apply(&vm2).unwrap();
    objects.push(vm2);
    converges(&store, &directory_model(&objects), "after watch events").await;

    // Bookmarks: other resources move the revision on; an idle pods watch is told by a
    // bookmark, and when the server ends the watch, the client resumes from that revision.
    api.apply(&service).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    api.end_watches();
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.watches_resumed_from_bookmarks("v1", "Pod") == 0 {
        assert!(Instant::now() < deadline, "the pods watch never resumed from a bookmark's resourceVersion");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 410 Gone: while watches are down, objects change and history is compacted; resuming
    // fails with Expired and the client relists, catching up with what it missed.
    let lists_before = api.lists("v1", "Pod");
    api.hold_watches(true);
    api.end_watches();
    api.delete("v1", "Pod", "shop", "web-0").unwrap();
    objects.retain(|o| o["metadata"]["name"] != "web-0");
    let web2 = pod("web-2", "10.77.1.5");
    api.apply(&web2).unwrap();
    objects.push(web2);
    let rule = find(&mut objects, "DestinationRule", "web");
    rule["spec"]["trafficPolicy"] = json!({"loadBalancer": {"simple": "RANDOM"}});
    let rule = rule.clone();
    api.apply(&rule).unwrap();
    api.compact();
    api.hold_watches(false);
    converges(&store, &directory_model(&objects), "after 410 and relist").await;
    assert!(api.expired_sent() > 0, "the server must have answered a resumed watch with 410");
    assert!(api.lists("v1", "Pod") > lists_before, "410 must lead to a fresh list");
}

/// On Kubernetes a node proxy proves its node with its ServiceAccount token: mesh-control asks
/// A `cacerts` Secret in istio-system (Istio's four keys) for a new root and intermediate;
/// returns the intermediate's PEM too.
fn cacerts_secret() -> (String, Value) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca = |constraint| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(constraint);
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca(BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate().unwrap();
    let mut params = ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(rcgen::DnType::CommonName, "cacerts test intermediate");
    let intermediate = params.signed_by(&key, &root_issuer).unwrap();
    let data = [
        ("ca-cert.pem", intermediate.pem()),
        ("ca-key.pem", key.serialize_pem()),
        ("cert-chain.pem", format!("{}{}", intermediate.pem(), root.pem())),
        ("root-cert.pem", root.pem()),
    ]
    .map(|(k, v)| (k.to_string(), v.into_bytes()));
    let value = secret_object("istio-system", "cacerts", data);
    (intermediate.pem(), value)
}

/// TokenReview, accepts only the node proxies' ServiceAccount, and takes the node from the
/// token's pod binding. Identities then follow the Pods the API schedules on that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_nodes_prove_themselves_with_service_account_tokens() {
    use mesh_control::{
        proto::istio_ca::{
            IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
        },
        run::{CaSettings, Settings, run},
    };
    let api = FakeApiServer::start(TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    for o in objects() {
        api.apply(&o).unwrap();
    }
    // The CA comes from the cluster's cacerts Secret (a root and an intermediate of our own).
    let (intermediate_pem, secret) = cacerts_secret();
    api.apply(&secret).unwrap();
    // Node proxies present their projected tokens (audience nodemesh, as the DaemonSet mounts).
    api.add_token("node-a-proxy", "nodemesh-system", "mesh-node", "node-a", "nodemesh");
    api.add_token("node-b-proxy", "nodemesh-system", "mesh-node", "node-b", "nodemesh");
    api.add_token("some-app", "shop", "web", "node-a", "nodemesh");
    // The node proxy's default token, minted for the API server, is not a node credential.
    api.add_token("node-a-api-token", "nodemesh-system", "mesh-node", "node-a", API_AUDIENCE);
    let free = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (xds, admin) = (free(), free());
    let ca_dir = std::env::temp_dir().join(format!("nm-kube-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ca_dir);
    let settings = Settings {
        config_dir: None,
        xds_addr: xds,
        admin_addr: admin,
        debounce: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        resync_grace: Duration::ZERO,
        kubernetes: Some(Connection::Url(api.url())),
        ca: Some(CaSettings {
            dir: ca_dir.clone(),
            trust_domain: "cluster.local".into(),
            cluster: "c1".into(),
            max_ttl: Duration::from_secs(3600),
            node_account: "nodemesh-system/mesh-node".into(),
            node_token_audience: "nodemesh".into(),
            secret_namespace: "istio-system".into(),
            require_secret: true,
            tls_addr: "127.0.0.1:0".parse().unwrap(),
            tls_names: vec!["localhost".into()],
        }),
        graph: None,
    };
    let server = tokio::spawn(run(settings));
    let ask = |token: &'static str, identity: &'static str| async move {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let mut client = loop {
            match IstioCertificateServiceClient::connect(format!("http://{xds}")).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let mut request =
            tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 0, metadata: None });
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        client.create_certificate(request).await
    };
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    // Pods web-0/web-1 (ServiceAccount web) run on node-a: node-a's proxy gets the identity
    // once the first list is in.
    let deadline = Instant::now() + Duration::from_secs(15);
    let chain = loop {
        match ask("node-a-proxy", web).await {
            Ok(r) => break r.into_inner().cert_chain,
            Err(e) => {
                assert!(Instant::now() < deadline, "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[1].trim(), intermediate_pem.trim(), "not signed by the cacerts Secret's intermediate");
    // node-b's proxy does not run web.
    let e = ask("node-b-proxy", web).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node node-b may not obtain"), "{e:?}");
    // An application's own token is not a node credential.
    let e = ask("some-app", web).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("belongs to system:serviceaccount:shop:web, not the node proxy's"), "{e:?}");
    // A genuine token of the node proxy, but for another audience (TokenReview asked for
    // nodemesh): refused like an unknown one.
    let e = ask("node-a-api-token", web).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A token TokenReview does not know.
    let e = ask("forged", web).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    server.abort();
    std::fs::remove_dir_all(&ca_dir).unwrap();
}
