//! mesh-control gone for several certificate lifetimes, under load, on a two-node mTLS
//! cluster: the nodes keep serving with their last config, the tunnel connections both sides
//! proved keep carrying new streams (a retired one is replaced only once a replacement is
//! up), no request fails, and certificates are renewed once mesh-control is back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodemesh_tests::{
    bin,
    lifecycle::{steady_args, web_cluster},
    mesh::{eventually, held_certificates},
};
use serde_json::Value;

/// Six-second certificates, renewed at half-life: an 18 s outage is three lifetimes.
const CERT_TTL: &str = "6";
const OUTAGE: Duration = Duration::from_secs(18);

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn with_mesh_control_gone_for_three_certificate_lifetimes_no_request_fails_and_renewal_resumes() {
    let (mut cluster, client) = web_cluster(&["--cert-ttl-secs", CERT_TTL], &[]).unwrap();
    let load = cluster.nodes[0].start_in(&client, &bin("nm-testapp").unwrap(), &steady_args(32)).unwrap();
    std::thread::sleep(Duration::from_secs(4));

    cluster.control.kill().unwrap();
    std::thread::sleep(OUTAGE);
    // Every certificate the nodes hold has expired by now.
    let now = now_secs();
    for node in &cluster.nodes {
        for (identity, _, not_after) in held_certificates(node) {
            assert!(
                not_after <= now,
                "{identity} should have expired during the outage ({not_after} > {now})"
            );
        }
    }
    let config_dir = cluster.config_dir.clone();
    cluster.control.start(&config_dir, &["--cert-ttl-secs", CERT_TTL]).unwrap();
    let back = now_secs();
    for node in &cluster.nodes {
        eventually("certificates renewed after mesh-control returns", Duration::from_secs(15), || {
            let held = held_certificates(node);
            !held.is_empty() && held.iter().all(|(_, _, not_after)| *not_after > back)
        });
    }

    let load: Value =
        serde_json::from_str(load.finish(Duration::from_secs(60)).unwrap().trim()).expect("steady output");
    eprintln!("load across the outage: {load}");
    for kind in ["keepalive", "fresh", "streams", "fresh_tcp"] {
        assert_eq!(load[kind]["failed"], 0, "{kind} failures: {}", load[kind]["errors"]);
    }
    for second in load["per_second"].as_array().unwrap().iter().take(32) {
        assert!(second["requests"].as_u64().unwrap() > 0, "a second without requests: {load}");
    }
}
