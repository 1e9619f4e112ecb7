//! Who may use a tunnel, on a simulated two-node cluster: certificates are checked on both
//! sides of HBONE.
//!
//! - Server side: this test dials node 1's tunnel as a client with certificates it mints
//!   itself — from another CA, expired, or valid — and asks for pods of various identities.
//! - Client side: a fake node reports a meshed workload whose tunnel is a server run by this
//!   test; mesh-node on node 0 must refuse that server unless it proves the workload's identity
//!   with a trusted, unexpired certificate.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_tests::{
    Registration, SimCluster,
    mesh::{answered, eventually},
    netns,
    tunnel_client::{Minted, TestCa, connect_through, provider, spiffe},
};

#[test]
fn the_tunnel_server_refuses_untrusted_expired_and_misdirected_clients() {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.start(&[], &[]).unwrap();
    let node1 = &mut cluster.nodes[1];
    let web = node1.add_pod("web", "shop").unwrap();
    node1.register(&web, &Registration::meshed().as_account("web")).unwrap();
    node1.serve(&web, &[web.addr(8080)]).unwrap();
    let db = node1.add_pod("db", "shop").unwrap();
    node1.register(&db, &Registration::meshed().as_account("db")).unwrap();
    node1.serve(&db, &[db.addr(8080)]).unwrap();
    let tunnel: SocketAddr = "10.76.0.3:15008".parse().unwrap();
    let ca = TestCa::cluster(&cluster);
    let web_id = spiffe("shop", "web");
    let caller = spiffe("shop", "caller");
    let fabric = cluster.fabric_netns.clone();
    let try_as = |client: Minted, identity: &str, target: SocketAddr| {
        connect_through(&fabric, tunnel, client, identity, target)
    };

    // Baseline: a valid client, web's identity, web's address. (Node 1 gets web's certificate
    // shortly after web registers.)
    eventually("node 1's tunnel serves web", Duration::from_secs(10), || {
        try_as(ca.leaf(&caller, -60, 3600), &web_id, web.addr(8080)) == Ok(StatusCode::OK)
    });
    // web's identity, but db's address: the client verified web, so it must not reach db.
    assert_eq!(
        try_as(ca.leaf(&caller, -60, 3600), &web_id, db.addr(8080)),
        Ok(StatusCode::MISDIRECTED_REQUEST)
    );
    // Not a workload of this node.
    assert_eq!(
        try_as(ca.leaf(&caller, -60, 3600), &web_id, "10.77.2.99:8080".parse().unwrap()),
        Ok(StatusCode::NOT_FOUND)
    );
    // An identity that has no workload here: no certificate to present (after a bounded wait).
    let nobody = try_as(ca.leaf(&caller, -60, 3600), &spiffe("shop", "nobody"), web.addr(8080));
    assert!(nobody.as_ref().is_err_and(|e| e.starts_with("TLS")), "{nobody:?}");
    // A workload that arrives while a client is already dialling it (a node that just
    // started, a pod that just came): the handshake waits for its certificate rather than
    // fail, which the client would count against the endpoint.
    let node1 = &mut cluster.nodes[1];
    let late = node1.add_pod("late", "shop").unwrap();
    node1.serve(&late, &[late.addr(8080)]).unwrap();
    let dial = {
        let (fabric, client, target) = (fabric.clone(), ca.leaf(&caller, -60, 3600), late.addr(8080));
        std::thread::spawn(move || connect_through(&fabric, tunnel, client, &spiffe("shop", "late"), target))
    };
    std::thread::sleep(Duration::from_millis(500));
    node1.register(&late, &Registration::meshed().as_account("late")).unwrap();
    assert_eq!(dial.join().unwrap(), Ok(StatusCode::OK));
    // A pod of a known identity whose CONNECT arrives before the node registered it (a peer
    // learned of it from the API first): held until it registers, not answered 404.
    let web2 = node1.add_pod("web2", "shop").unwrap();
    node1.serve(&web2, &[web2.addr(8080)]).unwrap();
    let dial = {
        let (fabric, client, target) = (fabric.clone(), ca.leaf(&caller, -60, 3600), web2.addr(8080));
        let web_id = web_id.clone();
        std::thread::spawn(move || connect_through(&fabric, tunnel, client, &web_id, target))
    };
    std::thread::sleep(Duration::from_millis(500));
    node1.register(&web2, &Registration::meshed().as_account("web")).unwrap();
    assert_eq!(dial.join().unwrap(), Ok(StatusCode::OK));
    // Client certificates that must not get through. (In TLS 1.3 the client's side of the
    // handshake ends before the server has checked its certificate, so the refusal may only
    // show on the first request; either way no CONNECT is answered.)
    let refused = |r: &Result<StatusCode, String>| r.as_ref().is_err_and(|e| !e.contains("no answer"));
    let expired = try_as(ca.leaf(&caller, -7200, -3600), &web_id, web.addr(8080));
    assert!(refused(&expired), "{expired:?}");
    let foreign = try_as(TestCa::foreign().leaf(&caller, -60, 3600), &web_id, web.addr(8080));
    assert!(refused(&foreign), "{foreign:?}");
    let log = cluster.nodes[1].log();
    assert!(
        log.contains(
            "tunnel connection refused: TLS handshake failed: invalid peer certificate: certificate expired"
        ),
        "{log}"
    );
    assert!(
        log.contains(
            "tunnel connection refused: TLS handshake failed: invalid peer certificate: UnknownIssuer"
        ),
        "{log}"
    );
}

/// A tunnel server run by the test: presents `cert`, counts handshakes that completed and
/// CONNECTs that arrived, answers each CONNECT 200.
struct FakeTunnel {
    addr: SocketAddr,
    connects: Arc<AtomicUsize>,
}

fn fake_tunnel(fabric: &str, port: u16, cert: Minted) -> FakeTunnel {
    let addr: SocketAddr = format!("10.76.0.1:{port}").parse().unwrap();
    let listener = netns::run_in(fabric, move || Ok(std::net::TcpListener::bind(addr)?)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let connects = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connects);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(cert.chain, cert.key)
                .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), Arc::clone(&counted));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    });
    FakeTunnel { addr, connects }
}

#[test]
fn mesh_node_refuses_a_tunnel_that_does_not_prove_the_destination_identity() {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.start(&[], &[]).unwrap();
    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0].register(&client, &Registration::meshed()).unwrap();
    let ca = TestCa::cluster(&cluster);
    let web_id = spiffe("shop", "web");
    let ghost: SocketAddr = "10.77.9.9:8080".parse().unwrap();
    let token = cluster.control.node_token("fake-node").unwrap();
    let fabric = cluster.fabric_netns.clone();

    // Each case: a fresh fake server (a fresh tunnel address, so no pooled connection is
    // reused), reported by a fake node as the tunnel of a meshed workload `ghost` running as
    // shop/web.
    let cases: [(&str, Minted, bool); 4] = [
        ("valid", ca.leaf(&web_id, -60, 3600), true),
        ("wrong identity", ca.leaf(&spiffe("shop", "other"), -60, 3600), false),
        ("expired", ca.leaf(&web_id, -7200, -3600), false),
        ("untrusted", TestCa::foreign().leaf(&web_id, -60, 3600), false),
    ];
    for (i, (case, cert, accepted)) in cases.into_iter().enumerate() {
        let fake = fake_tunnel(&fabric, 16000 + i as u16, cert);
        report_ghost(&cluster, &token, ghost, fake.addr);
        let node0 = &cluster.nodes[0];
        if accepted {
            // Once node 0 holds the new tunnel address, connects reach the fake server.
            eventually("the fake tunnel receives a CONNECT", Duration::from_secs(15), || {
                let _ = answered(node0, &client, &ghost.to_string());
                fake.connects.load(Ordering::SeqCst) > 0
            });
        } else {
            let refusal = "tunnel 10.76.0.1:";
            eventually(&format!("{case}: node 0 refuses the fake tunnel"), Duration::from_secs(15), || {
                assert!(!answered(node0, &client, &ghost.to_string()), "{case}: a connection was answered");
                node0.log().contains(&format!("{refusal}{}", fake.addr.port()))
            });
            assert_eq!(fake.connects.load(Ordering::SeqCst), 0, "{case}: a CONNECT reached the fake tunnel");
        }
    }
    let log = cluster.nodes[0].log();
    assert!(log.contains(&format!("is {}, not {web_id}", spiffe("shop", "other"))), "{log}");
}

/// Reports, as node `fake-node`, a meshed workload at `ip` running as shop/web whose node's
/// tunnel is `tunnel`.
fn report_ghost(cluster: &SimCluster, token: &str, ip: SocketAddr, tunnel: SocketAddr) {
    use mesh_control::proto::mesh::{
        ReportedWorkload, WorkloadReport, node_registration_client::NodeRegistrationClient,
    };
    let report = WorkloadReport {
        node: "fake-node".into(),
        workloads: vec![ReportedWorkload {
            namespace: "shop".into(),
            name: "ghost".into(),
            service_account: "web".into(),
            addresses: vec![ip.ip().to_string()],
            namespace_labels: [("nodemesh.io/enabled".to_string(), "true".to_string())].into(),
            ..Default::default()
        }],
        tunnel_address: tunnel.to_string(),
    };
    let (url, token) = (cluster.control.plaintext_url(), token.to_string());
    netns::run_in(&cluster.fabric_netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let mut client = NodeRegistrationClient::connect(url).await?;
            let mut request = tonic::Request::new(report);
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
            client.report_workloads(request).await?;
            Ok(())
        })
    })
    .unwrap();
}
