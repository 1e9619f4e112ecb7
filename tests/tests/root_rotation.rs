//! Rotating the mesh's root CA under continuous cross-node traffic, in Istio's three steps, on
//! a simulated two-node cluster (10 s certificates, so every step reaches every node within
//! seconds):
//!
//! 1. `root-cert.pem` holds the old root *and* a new one: certificates come with both in their
//!    trust bundle, so every node trusts both;
//! 2. the CA issues from a new intermediate under the new root: nodes' certificates now chain
//!    to it, and peers still holding old-root certificates are trusted too;
//! 3. the old root leaves the bundle: it is no longer trusted.
//!
//! Not one connection fails throughout.

use std::{
    fs,
    path::Path,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use hyper::StatusCode;
use nodemesh_tests::{
    ControlPlane, Registration, SimCluster,
    mesh::{answered_by, eventually, labelled},
    tunnel_client::{TestCa, connect_through, spiffe},
};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};

/// A new root and an intermediate under it: (root PEM, intermediate PEM, intermediate key PEM).
fn new_root_and_intermediate() -> (String, String, String) {
    let ca = |name: &str, constraint: BasicConstraints| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(constraint);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca("Rotation test root R2", BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate().unwrap();
    let intermediate = ca("Rotation test intermediate I2", BasicConstraints::Constrained(0))
        .signed_by(&key, &root_issuer)
        .unwrap();
    (root.pem(), intermediate.pem(), key.serialize_pem())
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Restarts mesh-control after `change` to its CA directory, then waits for more than a
/// certificate lifetime's worth of renewals.
fn restart_with(control: &mut ControlPlane, config_dir: &Path, args: &[&str], change: impl FnOnce(&Path)) {
    control.kill().unwrap();
    change(&control.ca_dir());
    control.start(config_dir, args).unwrap();
    std::thread::sleep(Duration::from_secs(12));
}

#[test]
fn the_root_ca_rotates_under_traffic_without_a_failed_connection() {
    let args = ["--cert-ttl-secs", "10"];
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.start(&args, &[]).unwrap();
    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0].register(&client, &Registration::meshed()).unwrap();
    let node1 = &mut cluster.nodes[1];
    let web = node1.add_pod("web", "shop").unwrap();
    node1.register(&web, &labelled("web")).unwrap();
    node1.serve(&web, &[web.addr(8080)]).unwrap();
    let to = web.addr(8080).to_string();
    eventually("web answers through the tunnel", Duration::from_secs(10), || {
        answered_by(&cluster.nodes[0], &client, &to, 1).is_ok()
    });
    let old_ca = TestCa::cluster(&cluster);
    let (fabric, config_dir, ca_dir) =
        (cluster.fabric_netns.clone(), cluster.config_dir.clone(), cluster.control.ca_dir());
    let SimCluster { nodes, control, .. } = &mut cluster;
    let node0 = &nodes[0];
    let stop = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        // A failed step must stop the traffic too, or the scope would wait for it forever.
        let _stop_traffic = StopOnDrop(&stop);
        // Traffic throughout: new connections (new tunnel streams, and new tunnel connections as
        // certificates renew) from node 0 to node 1, back to back.
        let traffic = scope.spawn(|| {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = answered_by(node0, &client, &to, 5) {
                    errors.push(e.to_string());
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            errors
        });

        let (new_root, new_intermediate, new_key) = new_root_and_intermediate();
        // 1: trust both roots.
        restart_with(control, &config_dir, &args, |dir| {
            let old = fs::read_to_string(dir.join("root-cert.pem")).unwrap();
            fs::write(dir.join("root-cert.pem"), format!("{}\n{new_root}", old.trim_end())).unwrap();
        });
        // 2: issue under the new root.
        restart_with(control, &config_dir, &args, |dir| {
            fs::write(dir.join("ca-cert.pem"), &new_intermediate).unwrap();
            fs::write(dir.join("ca-key.pem"), &new_key).unwrap();
            fs::write(dir.join("cert-chain.pem"), format!("{new_intermediate}{new_root}")).unwrap();
        });
        let tunnel = "10.76.0.3:15008".parse().unwrap();
        let web_id = spiffe("shop", "default");
        let caller = spiffe("shop", "caller");
        let new_ca = TestCa::from_dir(&ca_dir);
        assert_eq!(
            connect_through(&fabric, tunnel, new_ca.leaf(&caller, -60, 3600), &web_id, web.addr(8080)),
            Ok(StatusCode::OK),
            "node 1 does not trust the new root"
        );
        assert_eq!(
            connect_through(&fabric, tunnel, old_ca.leaf(&caller, -60, 3600), &web_id, web.addr(8080)),
            Ok(StatusCode::OK),
            "node 1 dropped the old root during the overlap"
        );
        // 3: the old root goes.
        restart_with(control, &config_dir, &args, |dir| {
            fs::write(dir.join("root-cert.pem"), &new_root).unwrap()
        });
        let old = connect_through(&fabric, tunnel, old_ca.leaf(&caller, -60, 3600), &web_id, web.addr(8080));
        assert!(old.is_err(), "node 1 still trusts the retired root: {old:?}");

        stop.store(true, Ordering::Relaxed);
        let errors = traffic.join().unwrap();
        let rounds = rounds.load(Ordering::Relaxed);
        assert!(rounds > 50, "only {rounds} rounds of traffic");
        assert!(errors.is_empty(), "{} of {rounds} rounds failed: {errors:?}", errors.len());
    });
}
