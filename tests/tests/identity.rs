//! The workload CA over Istio's CSR API (`IstioCertificateService/CreateCertificate`), on a
//! simulated node with mesh-control: a node obtains certificates only for workloads scheduled
//! on it, only with its own token, and only for the identity its CSR names; keys are made by the
//! caller and never sent.

use std::time::Duration;

use mesh_control::proto::istio_ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use nodemesh_tests::{CONTROL_PLANE_URL, Registration, SimNode, mesh::held_certificates, netns};
use rcgen::{CertificateParams, KeyPair, SanType};

/// A CSR for `uri` with a fresh key (the key stays here, as it stays on a node).
fn csr(uri: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Asks mesh-control (from inside the node netns) to sign `csr` for `identity`, with `token`.
fn create(
    node: &SimNode,
    token: Option<&str>,
    csr: String,
    identity: Option<&str>,
    ttl_secs: i64,
) -> Result<Vec<String>, tonic::Status> {
    let token = token.map(str::to_string);
    let identity = identity.map(str::to_string);
    netns::run_in(&node.node_netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(rt.block_on(async move {
            let mut client = IstioCertificateServiceClient::connect(CONTROL_PLANE_URL).await.unwrap();
            let metadata = identity.map(|id| prost_types::Struct {
                fields: [(
                    "ImpersonatedIdentity".to_string(),
                    prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id)) },
                )]
                .into(),
            });
            let mut request =
                tonic::Request::new(IstioCertificateRequest { csr, validity_duration: ttl_secs, metadata });
            if let Some(t) = token {
                request.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            client.create_certificate(request).await.map(|r| r.into_inner().cert_chain)
        }))
    })
    .unwrap()
}

/// Reports one workload (`namespace/name` running as `account`) for `node_name`, as a node does.
fn report(
    node: &SimNode,
    token: Option<&str>,
    node_name: &str,
    workload: (&str, &str, &str),
) -> Result<(), tonic::Status> {
    report_labelled(node, token, node_name, workload, &[])
}

/// [`report`] with the workload's labels, at 10.77.0.200.
fn report_labelled(
    node: &SimNode,
    token: Option<&str>,
    node_name: &str,
    workload: (&str, &str, &str),
    labels: &[(&str, &str)],
) -> Result<(), tonic::Status> {
    use mesh_control::proto::mesh::{
        ReportedWorkload, WorkloadReport, node_registration_client::NodeRegistrationClient,
    };
    let token = token.map(str::to_string);
    let report = WorkloadReport {
        node: node_name.to_string(),
        workloads: vec![ReportedWorkload {
            namespace: workload.0.into(),
            name: workload.1.into(),
            service_account: workload.2.into(),
            addresses: vec!["10.77.0.200".into()],
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            namespace_labels: [("nodemesh.io/enabled".to_string(), "true".to_string())].into(),
        }],
        ..Default::default()
    };
    netns::run_in(&node.node_netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(rt.block_on(async move {
            let mut client = NodeRegistrationClient::connect(CONTROL_PLANE_URL).await.unwrap();
            let mut request = tonic::Request::new(report);
            if let Some(t) = token {
                request.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            client.report_workloads(request).await.map(|_| ())
        }))
    })
    .unwrap()
}

fn leaf_facts(pem: &str) -> (Vec<String>, i64) {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = der.parse_x509().unwrap();
    let sans = cert
        .subject_alternative_name()
        .unwrap()
        .map(|s| s.value.general_names.iter().map(|n| n.to_string()).collect())
        .unwrap_or_default();
    (sans, cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
}

#[test]
fn a_node_gets_certificates_only_for_its_own_workloads() {
    let (mut node, _config) = SimNode::with_control_plane(&[]).unwrap();
    let reviews = node.add_pod("reviews", "shop").unwrap();
    node.register(&reviews, &Registration::meshed().as_account("reviews")).unwrap();
    let name = node.node_netns.clone();
    let token = node.control_plane().node_token(&name).unwrap();
    let id = "spiffe://cluster.local/ns/shop/sa/reviews";
    // The workload report reaches mesh-control asynchronously.
    let mut issued = Err(tonic::Status::unknown("not asked yet"));
    for _ in 0..100 {
        issued = create(&node, Some(&token), csr(id), Some(id), 600);
        if issued.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let chain = issued.unwrap_or_else(|e| panic!("{e:?}\n{}", node.control_log()));
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let (sans, lifetime) = leaf_facts(&chain[0]);
    assert_eq!(sans, [format!("URI({id})")]);
    assert_eq!(lifetime, 600 + 60, "the TTL asked for (plus a minute of clock skew)");
    // The identity from the CSR alone, and the CA's ceiling (24 h) on a longer request.
    let chain = create(&node, Some(&token), csr(id), None, 10 * 24 * 3600).unwrap();
    assert_eq!(leaf_facts(&chain[0]).1, 24 * 3600 + 60);

    // An identity no workload on this node has: refused, saying why.
    let admin = "spiffe://cluster.local/ns/shop/sa/admin";
    let e = create(&node, Some(&token), csr(admin), Some(admin), 600).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(&format!("node {name} may not obtain {admin}")), "{e:?}");
    // Another node's token does not speak for this node's workloads.
    let other = node.control_plane().node_token("some-other-node").unwrap();
    let e = create(&node, Some(&other), csr(id), Some(id), 600).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node some-other-node may not obtain"), "{e:?}");
    // A CSR naming another identity than the one asked for.
    let e = create(&node, Some(&token), csr(admin), Some(id), 600).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("the CSR asks for spiffe://cluster.local/ns/shop/sa/admin"), "{e:?}");
    // No token, a forged token, another trust domain.
    let e = create(&node, None, csr(id), Some(id), 600).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let forged = format!("{name}.{}", "0".repeat(64));
    let e = create(&node, Some(&forged), csr(id), Some(id), 600).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let foreign = "spiffe://other.org/ns/shop/sa/reviews";
    let e = create(&node, Some(&token), csr(foreign), Some(foreign), 600).unwrap_err();
    assert!(e.message().contains("outside this CA's trust domain cluster.local"), "{e:?}");

    // Workload reports: this node reported with its token, so nobody may replace its workloads
    // without it, nor with another node's token.
    let e = report(&node, None, &name, ("shop", "fake", "admin")).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = report(&node, Some(&other), &name, ("shop", "fake", "admin")).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("the token of node some-other-node cannot report workloads"), "{e:?}");
    // With a CA, a node that never proved itself cannot report without its token either.
    let e = report(&node, None, "some-other-node", ("shop", "claimed", "admin")).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("carries no node token"), "{e:?}");
    let e = create(&node, Some(&other), csr(admin), Some(admin), 600).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Once it reports with its token, its workloads' identities are its to obtain.
    report(&node, Some(&other), "some-other-node", ("shop", "claimed", "admin")).unwrap();
    create(&node, Some(&other), csr(admin), Some(admin), 600).unwrap();
}

#[test]
fn a_report_without_a_token_cannot_inject_a_service_endpoint() {
    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n";
    let (mut node, _config) = SimNode::with_control_plane(&[("web.yaml", WEB)]).unwrap();
    let web = node.add_pod("web", "shop").unwrap();
    node.register(&web, &nodemesh_tests::mesh::labelled("web")).unwrap();
    node.serve(&web, &[web.addr(8080)]).unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    node.register(&client, &Registration::meshed()).unwrap();
    let cluster = "outbound|80||web.shop.svc.cluster.local";
    // The client's traffic makes the node subscribe to web's cluster.
    nodemesh_tests::mesh::eventually("web answers through the mesh", Duration::from_secs(15), || {
        nodemesh_tests::mesh::answered(&node, &client, "10.96.0.10:80")
            && nodemesh_tests::mesh::endpoint_count(&node, cluster) == 1
    });
    // A workload labelled app=web at an address of the attacker's choosing, for a node name
    // that never proved itself, with no token: refused, and nothing of it enters the model.
    let e =
        report_labelled(&node, None, "intruder", ("shop", "evil", "default"), &[("app", "web")]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let config = node.control_get("/debug/config").unwrap();
    assert!(!config.contains("evil"), "the refused report reached the model: {config}");
    // The barrier proves mesh-control pushed a generation after the refusal.
    node.apply_and_wait(|| ()).unwrap();
    let dump = node.config_dump().unwrap();
    let endpoints = nodemesh_tests::mesh::dumped_cluster(&dump, cluster).unwrap()["endpoints"].to_string();
    assert!(
        !endpoints.contains("10.77.0.200"),
        "an unauthenticated report injected an endpoint: {endpoints}"
    );
    assert_eq!(nodemesh_tests::mesh::endpoint_count(&node, cluster), 1, "{endpoints}");
}

#[test]
fn mesh_node_keeps_a_renewed_certificate_for_each_identity_of_its_workloads() {
    let mut node = SimNode::new().unwrap();
    let config = node.work_dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    // Six-second certificates: renewed every three.
    node.control_plane().start(&config, &["--cert-ttl-secs", "6"]).unwrap();
    let token = node.write_own_node_token().unwrap();
    node.start_mesh_node(&["--control-plane", CONTROL_PLANE_URL, "--token-file", &token]).unwrap();
    let pod = node.add_pod("reviews", "shop").unwrap();
    node.register(&pod, &Registration::meshed().as_account("reviews")).unwrap();
    let id = "spiffe://cluster.local/ns/shop/sa/reviews";

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(c) = held_certificates(&node).into_iter().find(|c| c.0 == id) {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "no certificate for {id}:\n{}", node.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(first.2 > first.1 && first.2 <= first.1 + 7, "about six seconds of life: {first:?}");
    let dump = node.config_dump().unwrap().to_string();
    assert!(!dump.contains("PRIVATE KEY"), "keys never leave mesh-node, not even to its admin endpoint");

    // Renewed at half-life, before it expires.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = held_certificates(&node).into_iter().find(|c| c.0 == id);
        if let Some(c) = now.as_ref().filter(|c| c.1 > first.1) {
            assert!(c.1 < first.2, "renewed before the old one expired: {first:?} → {c:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not renewed: {now:?}\n{}", node.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }

    // The workload leaves: its identity's certificate (and key) go with it.
    node.mesh_node_cli(&[
        "workload",
        "--api-socket",
        &node.api_socket().display().to_string(),
        "remove",
        "shop/reviews",
    ])
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while held_certificates(&node).iter().any(|c| c.0 == id) {
        assert!(std::time::Instant::now() < deadline, "certificate kept after the workload left");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_token_file_replaced_while_mesh_node_runs_is_used_without_a_restart() {
    let mut node = SimNode::new().unwrap();
    let config = node.work_dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    node.start_control_plane(&config).unwrap();
    // mesh-node starts with a token that is not its node's (a stale one, say): every report,
    // stream and CSR is refused, and it holds no certificate.
    let token_file = node.work_dir.join("node-token");
    let stale = node.control_plane().node_token("some-other-node").unwrap();
    std::fs::write(&token_file, &stale).unwrap();
    let path = token_file.display().to_string();
    node.start_mesh_node(&["--control-plane", CONTROL_PLANE_URL, "--token-file", &path]).unwrap();
    let pod = node.add_pod("reviews", "shop").unwrap();
    node.register(&pod, &Registration::meshed().as_account("reviews")).unwrap();
    nodemesh_tests::mesh::eventually("the stale token is refused", Duration::from_secs(15), || {
        node.control_log().contains("the token of node some-other-node cannot report workloads")
    });
    assert!(held_certificates(&node).is_empty(), "a certificate was issued on a stale token");

    // Replaced the way the kubelet rotates a projected token: a new file renamed over it.
    let name = node.node_netns.clone();
    let fresh = node.control_plane().node_token(&name).unwrap();
    let staged = node.work_dir.join("node-token.new");
    std::fs::write(&staged, fresh).unwrap();
    std::fs::rename(&staged, &token_file).unwrap();
    let id = "spiffe://cluster.local/ns/shop/sa/reviews";
    nodemesh_tests::mesh::eventually("a certificate on the new token", Duration::from_secs(30), || {
        held_certificates(&node).iter().any(|c| c.0 == id)
    });
    assert!(node.log().contains("the node token file changed"), "{}", node.log_tail());
}
