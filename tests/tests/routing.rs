//! VirtualService routing through the node proxy, on one simulated node with mesh-control:
//! weighted canaries to DestinationRule subsets, header matches (`end-user: jason`), routing
//! by source labels, rewrites with header changes, redirects, and a route change reaching a
//! connection that is already open.

use std::{path::PathBuf, time::Duration};

use nodemesh_tests::{
    Pod, Registration, SimNode,
    mesh::{eventually, served, write_config as write},
    reviews::{self, SERVICE_AND_SUBSETS as REVIEWS, VIP},
};
use serde_json::Value;

struct Setup {
    node: SimNode,
    config: PathBuf,
    client: Pod,
    sandbox_client: Pod,
    /// The reviews pods, named v1, v2, v3.
    versions: Vec<Pod>,
}

/// reviews v1, v2, v3 (one pod each, named after their version), a plain client and a client
/// labelled `branch: box-123`.
fn setup() -> Setup {
    let (mut node, config) = SimNode::with_control_plane(&[("reviews.yaml", REVIEWS)]).unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    node.register(&client, &Registration::meshed()).unwrap();
    let sandbox_client = node.add_pod("sandbox", "shop").unwrap();
    node.register(&sandbox_client, &Registration::labelled(&[("branch", "box-123")])).unwrap();
    let versions = reviews::serve_versions(&mut node).unwrap();
    eventually("reviews answers from all three versions", Duration::from_secs(15), || {
        node.testapp(&client, &["http-client", "--to", &format!("{VIP}:80"), "--requests", "6"])
            .is_ok_and(|r| r["servers"].as_object().is_some_and(|s| s.len() == 3))
    });
    Setup { node, config, client, sandbox_client, versions }
}

fn get(node: &SimNode, client: &Pod, args: &[&str]) -> Value {
    nodemesh_tests::mesh::http_get(node, client, &format!("{VIP}:80"), args)
}

/// Writes the VirtualService and waits until the node routes by it (probe: `probe_args` from
/// the plain client reach only `server`).
fn apply_routes(s: &Setup, yaml: &str, probe_args: &[&str], server: &str) {
    write(&s.config, "reviews-vs.yaml", yaml);
    eventually("the node routes by the new VirtualService", Duration::from_secs(15), || {
        let mut args = vec!["http-client", "--to", "10.96.0.20:80", "--requests", "10"];
        args.extend_from_slice(probe_args);
        s.node.testapp(&s.client, &args).is_ok_and(|r| served(&r, server) == 10)
    });
}

const CANARY: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{sourceLabels: {branch: box-123}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - match: [{uri: {prefix: /api/}, method: {exact: GET}}]
    rewrite: {uri: /v2/}
    headers: {request: {set: {x-routed: api}}, response: {add: {x-served-by: nodemesh}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v3}, weight: 10}
"#;

#[test]
fn a_virtual_service_splits_by_weight_and_routes_by_header_source_and_path() {
    let s = setup();
    let Setup { node, client, sandbox_client, .. } = &s;
    apply_routes(&s, CANARY, &["--header", "end-user: jason"], "v2");

    // 90/10 over 1,000 requests on one keep-alive connection, and none to v2.
    let r = get(node, client, &["--requests", "1000"]);
    let (v1, v3) = (served(&r, "v1"), served(&r, "v3"));
    assert!((870..=930).contains(&v1) && (70..=130).contains(&v3), "90/10 within 3 points: {r}");
    assert_eq!(served(&r, "v2"), 0, "only jason goes to v2: {r}");
    eprintln!("90/10 split over 1000 requests: v1 {v1}, v3 {v3}");

    // Every one of jason's requests goes to v2, over HTTP/1.1 and h2c alike.
    for extra in [&[][..], &["--h2"][..]] {
        let mut args = vec!["--requests", "100", "--header", "end-user: jason"];
        args.extend_from_slice(extra);
        let r = get(node, client, &args);
        assert_eq!(served(&r, "v2"), 100, "jason → v2 always: {r}");
    }
    // A header that merely looks like jason's does not match an exact rule.
    let r = get(node, client, &["--requests", "20", "--header", "end-user: jason2"]);
    assert_eq!(served(&r, "v2"), 0, "{r}");

    // Sandbox routing by the caller's labels: box-123 callers go to v3, everyone else not.
    let r = get(node, sandbox_client, &["--requests", "20"]);
    assert_eq!(served(&r, "v3"), 20, "branch=box-123 → v3: {r}");

    // Redirect answered by the proxy.
    let r = get(node, client, &["--path", "/old/page"]);
    assert_eq!(r["statuses"]["302"], 1, "{r}");

    // Prefix rewrite plus request and response header changes.
    let r = get(node, client, &["--path", "/api/books?id=7"]);
    assert_eq!(r["first"]["server"], "v1", "{r}");
    assert_eq!(r["first"]["path"], "/v2/books", "{r}");
    assert_eq!(r["first"]["query"], "id=7", "{r}");
    assert_eq!(r["first"]["headers"]["x-routed"], "api", "{r}");
}

#[test]
fn a_route_change_applies_to_the_next_request_on_an_open_connection() {
    let s = setup();
    let all_v1 = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
spec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews, subset: v1}}]}]\n";
    apply_routes(&s, all_v1, &[], "v1");
    let r = get(&s.node, &s.client, &["--requests", "50", "--h2"]);
    assert_eq!(served(&r, "v1"), 50, "{r}");

    // Moving everything to v2 reaches the node, and new requests follow it.
    let all_v2 = all_v1.replace("subset: v1", "subset: v2");
    apply_routes(&s, &all_v2, &[], "v2");
    let r = get(&s.node, &s.client, &["--requests", "50"]);
    assert_eq!(served(&r, "v2"), 50, "{r}");

    // A VirtualService that cannot be enforced is rejected whole: the last good one stays.
    // Waited for until mesh-control has read the file and every node applied the result.
    let with_cors = all_v2
        .replace("subset: v2}}]}]", "subset: v3}}], corsPolicy: {allowOrigins: [{exact: a.example}]}}]");
    s.node.apply_and_wait(|| write(&s.config, "reviews-vs.yaml", &with_cors)).unwrap();
    let rejected = s.node.control_rejections().unwrap();
    assert!(
        rejected.iter().any(|r| r.contains("reviews-vs.yaml") && r.contains("corsPolicy")),
        "the rejection names the file and the field: {rejected:?}"
    );
    let r = get(&s.node, &s.client, &["--requests", "20"]);
    assert_eq!(served(&r, "v2"), 20, "the rejected change must not apply: {r}");
}

#[test]
fn a_virtual_service_exported_to_its_own_namespace_routes_only_callers_there() {
    let mut s = setup();
    let outsider = s.node.add_pod("outsider", "other").unwrap();
    s.node.register(&outsider, &Registration::meshed()).unwrap();
    let private = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
spec:\n  hosts: [reviews]\n  exportTo: [.]\n  http: [{route: [{destination: {host: reviews, subset: v2}}]}]\n";
    apply_routes(&s, private, &[], "v2");
    // shop's callers follow the VirtualService…
    let r = get(&s.node, &s.client, &["--requests", "30"]);
    assert_eq!(served(&r, "v2"), 30, "{r}");
    // …a caller in another namespace does not see it: the Service's own balancing.
    let r = get(&s.node, &outsider, &["--requests", "30"]);
    for v in ["v1", "v2", "v3"] {
        assert_eq!(served(&r, v), 10, "round robin for callers the VirtualService is not exported to: {r}");
    }
    // Exported to `other` as well: now the outsider follows it too.
    let shared = private.replace("exportTo: [.]", "exportTo: [., other]");
    s.node.apply_and_wait(|| write(&s.config, "reviews-vs.yaml", &shared)).unwrap();
    let r = get(&s.node, &outsider, &["--requests", "30"]);
    assert_eq!(served(&r, "v2"), 30, "{r}");
}

#[test]
fn each_caller_gets_the_destination_rule_exported_to_its_namespace() {
    let mut s = setup();
    let outsider = s.node.add_pod("outsider", "other").unwrap();
    s.node.register(&outsider, &Registration::meshed()).unwrap();
    // Every caller routes to subset v2; shop's rule (with the subsets) is exported to shop only.
    let to_v2 = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\n\
spec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews, subset: v2}}]}]\n";
    apply_routes(&s, to_v2, &[], "v2");
    let private = REVIEWS.replace("  host: reviews\n", "  host: reviews\n  exportTo: [.]\n");
    assert_ne!(private, REVIEWS);
    s.node.apply_and_wait(|| write(&s.config, "reviews.yaml", &private)).unwrap();
    let r = get(&s.node, &s.client, &["--requests", "10"]);
    assert_eq!(served(&r, "v2"), 10, "shop sees its rule and its subsets: {r}");
    // Outside shop no rule applies, so there is no subset v2 to route to (Istio: 503).
    let r = get(&s.node, &outsider, &["--requests", "3"]);
    assert_eq!(r["statuses"]["503"], 3, "no DestinationRule, no subset: {r}");

    // A client-side rule in `other`, exported to `other` only, whose v2 is the v3 pods: its
    // callers follow it, shop's do not.
    let client_side = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: other}\n\
spec:\n  host: reviews.shop.svc.cluster.local\n  exportTo: [.]\n  subsets: [{name: v2, labels: {version: v3}}]\n";
    s.node.apply_and_wait(|| write(&s.config, "other-rule.yaml", client_side)).unwrap();
    let r = get(&s.node, &outsider, &["--requests", "10"]);
    assert_eq!(served(&r, "v3"), 10, "other's own rule: {r}");
    let r = get(&s.node, &s.client, &["--requests", "10"]);
    assert_eq!(served(&r, "v2"), 10, "shop's rule still applies to shop: {r}");
    let dump = s.node.config_dump().unwrap();
    let base =
        nodemesh_tests::mesh::dumped_cluster(&dump, "outbound|80|v2|reviews.shop.svc.cluster.local").unwrap();
    assert_eq!(
        base["caller_variants"].as_array().map(Vec::len),
        Some(2),
        "shop's and other's clusters: {base}"
    );
}

/// A rollout step: its name, the subsets defined, and the route's weights per subset.
type Step<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, u32)]);

/// The Service, a DestinationRule with `subsets` and a VirtualService splitting `weights`
/// (subset → percent) in one file, so each rollout step is one atomic change that the control
/// plane itself must order.
fn rollout_step(subsets: &[&str], weights: &[(&str, u32)]) -> String {
    let service = REVIEWS.split("---").next().unwrap();
    let subsets: Vec<String> =
        subsets.iter().map(|s| format!("  - {{name: {s}, labels: {{version: {s}}}}}\n")).collect();
    let routes: Vec<String> = weights
        .iter()
        .map(|(s, w)| format!("    - {{destination: {{host: reviews, subset: {s}}}, weight: {w}}}\n"))
        .collect();
    format!(
        "{service}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: shop}}\n\
         spec:\n  host: reviews\n  subsets:\n{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: reviews, namespace: shop}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n{}",
        subsets.concat(),
        routes.concat()
    )
}

#[test]
fn a_canary_walk_under_continuous_load_answers_every_request() {
    let s = setup();
    // The walk of the issue, then an abrupt rollback in one change (v1 back, v2 gone at
    // once), where only the control plane's ordering keeps requests off a removed subset.
    let steps: [Step<'_>; 7] = [
        ("v1 only", &["v1"], &[("v1", 100)]),
        ("add v2", &["v1", "v2"], &[("v1", 100), ("v2", 0)]),
        ("50/50", &["v1", "v2"], &[("v1", 50), ("v2", 50)]),
        ("all to v2", &["v1", "v2"], &[("v1", 0), ("v2", 100)]),
        ("remove v1", &["v2"], &[("v2", 100)]),
        ("roll back to v1 at once", &["v1"], &[("v1", 100)]),
        ("forward to v2 at once", &["v2"], &[("v2", 100)]),
    ];
    s.node
        .apply_and_wait(|| write(&s.config, "reviews.yaml", &rollout_step(steps[0].1, steps[0].2)))
        .unwrap();
    std::thread::scope(|scope| {
        // Two clients, HTTP/1.1 and h2c, each one connection sending back to back.
        let loads: Vec<_> = [&[][..], &["--h2"][..]]
            .into_iter()
            .map(|extra| {
                let (node, client) = (&s.node, &s.client);
                scope.spawn(move || {
                    let mut args = vec!["--duration-ms", "7000"];
                    args.extend_from_slice(extra);
                    get(node, client, &args)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        for (name, subsets, weights) in &steps[1..] {
            let waited = s
                .node
                .apply_and_wait(|| write(&s.config, "reviews.yaml", &rollout_step(subsets, weights)))
                .unwrap_or_else(|e| panic!("step {name}: {e:#}"));
            eprintln!("step {name}: {}", waited.trim());
            std::thread::sleep(Duration::from_millis(300));
        }
        for load in loads {
            let r = load.join().unwrap();
            let statuses = r["statuses"].as_object().unwrap();
            assert_eq!(statuses.keys().collect::<Vec<_>>(), ["200"], "every request answered 200: {r}");
            assert!(served(&r, "v1") > 0 && served(&r, "v2") > 0, "{r}");
            assert_eq!(served(&r, "v3"), 0, "{r}");
            eprintln!("canary walk load: {}", r["servers"]);
        }
    });
}

#[test]
fn retries_recover_occasional_failures_and_never_multiply_a_failing_upstream() {
    let s = setup();
    let retrying = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
    retries: {attempts: 3, retryOn: 5xx}
"#;
    apply_routes(&s, retrying, &[], "v1");
    let v1_served = || {
        let r = get(&s.node, &s.client, &["--path", "/stats"]);
        r["first"]["served"].as_u64().unwrap()
    };

    // v1 fails one request in ten: each failure is retried, the client sees only 200s.
    let r = get(&s.node, &s.client, &["--requests", "500", "--path", "/flaky/10"]);
    assert_eq!(r["statuses"]["200"], 500, "every occasional 503 retried away: {r}");

    // v1 fails everything: the client gets the 503s, and v1 sees at most 1.25x the requests
    // although the route asks for 3 retries each (the budget holds them to ~20%).
    let before = v1_served();
    let r = get(&s.node, &s.client, &["--requests", "1000", "--path", "/status/503"]);
    assert_eq!(r["statuses"]["503"], 1000, "{r}");
    let seen = v1_served() - before;
    eprintln!("a failing upstream saw {seen} requests for the client's 1000");
    assert!(seen <= 1250, "retries multiplied the load on a failing upstream: {seen} for 1000");
    assert!(seen > 1000, "some retries must happen: {seen}");
}

#[test]
fn a_route_timeout_answers_504_and_a_per_try_timeout_retries_on_another_endpoint() {
    let s = setup();
    let timeouts = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /delay/}}]
    timeout: 300ms
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /slow-on/}}]
    retries: {attempts: 2, perTryTimeout: 200ms, retryOn: gateway-error}
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews, subset: v2}}]
"#;
    apply_routes(&s, timeouts, &[], "v2");

    // The route's timeout: v1 would answer 200 after 3 s; the client gets 504 after 300 ms.
    let r = get(&s.node, &s.client, &["--path", "/delay/3000"]);
    assert_eq!(r["statuses"]["504"], 1, "the route timeout must answer 504: {r}");
    let elapsed = r["elapsed_ms"].as_u64().unwrap();
    assert!((300..3000).contains(&elapsed), "504 after the 300 ms timeout, not the answer: {elapsed} ms");

    // perTryTimeout: v1 takes 3 s on this path, v2 and v3 answer at once. Round robin sends
    // every third request to v1 first; each of those times out after 200 ms and is retried on
    // another endpoint, so all 9 succeed and none is answered by v1.
    let r = get(&s.node, &s.client, &["--requests", "9", "--path", "/slow-on/v1/3000"]);
    assert_eq!(r["statuses"]["200"], 9, "every request answered within its retries: {r}");
    assert_eq!(served(&r, "v1"), 0, "v1's tries timed out: {r}");
    assert_eq!(served(&r, "v2") + served(&r, "v3"), 9, "{r}");
    let elapsed = r["elapsed_ms"].as_u64().unwrap();
    assert!(elapsed >= 3 * 200, "three requests met v1 and waited out their try: {elapsed} ms");
    assert!(elapsed < 3000, "a slow try must not be waited out to its end: {elapsed} ms");
}

#[test]
fn faults_abort_and_delay_a_share_of_requests_and_mirrors_copy_them() {
    let s = setup();
    let chaos = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {x-chaos: {exact: abort}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{headers: {x-chaos: {exact: half}}}]
    fault: {abort: {httpStatus: 500, percentage: {value: 50}}}
    route: [{destination: {host: reviews, subset: v1}}]
    retries: {attempts: 0}
  - match: [{headers: {x-chaos: {exact: slow}}}]
    fault: {delay: {fixedDelay: 300ms}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /mirrored}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100}
  - route: [{destination: {host: reviews, subset: v1}}]
"#;
    apply_routes(&s, chaos, &[], "v1");
    // A version's own counters, read from its pod directly (not through the VIP).
    let stats = |version: &str| {
        let pod = s.versions.iter().find(|p| p.name == version).unwrap();
        let to = pod.addr(9080).to_string();
        let r = s.node.testapp(&s.client, &["http-client", "--to", &to, "--path", "/stats"]).unwrap();
        r["first"].clone()
    };

    // An abort for everyone with the header, answered by the proxy: the upstream never sees it.
    let before = stats("v1")["served"].as_u64().unwrap();
    let r = get(&s.node, &s.client, &["--requests", "20", "--header", "x-chaos: abort"]);
    assert_eq!(r["statuses"]["418"], 20, "{r}");
    assert_eq!(stats("v1")["served"].as_u64().unwrap(), before, "aborted requests must not reach v1");

    // An abort for half: 1,000 requests, about 500 of them 500 (binomial, 6 sigma either way).
    let r = get(&s.node, &s.client, &["--requests", "1000", "--header", "x-chaos: half"]);
    let aborted = r["statuses"]["500"].as_u64().unwrap_or(0);
    assert!((400..=600).contains(&aborted), "50% abort gave {aborted} of 1000: {r}");
    assert_eq!(aborted + r["statuses"]["200"].as_u64().unwrap_or(0), 1000, "{r}");

    // A delay for everyone with the header: three requests take at least three delays.
    let r = get(&s.node, &s.client, &["--requests", "3", "--header", "x-chaos: slow"]);
    assert_eq!(r["statuses"]["200"], 3, "{r}");
    assert!(r["elapsed_ms"].as_u64().unwrap() >= 900, "each request delayed 300 ms: {r}");

    // Mirroring: the client sees only v1; v2 gets a copy of each request, marked -shadow.
    let v2_before = stats("v2")["served"].as_u64().unwrap();
    let r = get(&s.node, &s.client, &["--requests", "50", "--path", "/mirrored/x"]);
    assert_eq!(served(&r, "v1"), 50, "{r}");
    eventually("v2 received all 50 copies", Duration::from_secs(10), || {
        let v2 = stats("v2");
        v2["served"].as_u64() == Some(v2_before + 50) && v2["last_host"] == "10.96.0.20-shadow:80"
    });
}

/// Several VirtualServices for one host compose (module `layering`): the host's own namespace
/// before others, `nodemesh.io/precedence` before that, and a chaos tool's fault-only routes
/// laid over the owner's routes without replacing them. What cannot take effect is reported.
#[test]
fn virtual_services_for_one_host_compose_by_precedence_and_fault_layers() {
    let s = setup();
    let platform = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#;
    apply_routes(&s, platform, &["--header", "end-user: jason"], "v2");
    let team = |precedence: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: team-b, namespace: team{precedence}}}\n\
             spec:\n  hosts: [reviews.shop.svc.cluster.local]\n  http:\n\
             \x20 - match: [{{headers: {{x-team: {{exact: b}}}}}}]\n\
             \x20   route: [{{destination: {{host: reviews.shop.svc.cluster.local, subset: v3}}}}]\n"
        )
    };
    let conflicts = || -> Vec<String> {
        let config: Value = serde_json::from_str(&s.node.control_get("/debug/config").unwrap()).unwrap();
        serde_json::from_value(config["conflicts"].clone()).unwrap()
    };

    // Another namespace's route goes after the owner's catch-all: it never matches, and says so.
    s.node.apply_and_wait(|| write(&s.config, "team-b.yaml", &team(""))).unwrap();
    let r = get(&s.node, &s.client, &["--requests", "20", "--header", "x-team: b"]);
    assert_eq!(served(&r, "v1"), 20, "the owner's catch-all comes first: {r}");
    let reported = conflicts();
    assert!(
        reported.iter().any(|c| c.contains("VirtualService team/team-b spec.http[0] never matches")
            && c.contains("VirtualService shop/reviews spec.http[1] comes first")),
        "{reported:?}"
    );

    // With a higher precedence its route goes first; everyone else is routed as before.
    let annotated = team(", annotations: {nodemesh.io/precedence: \"10\"}");
    s.node.apply_and_wait(|| write(&s.config, "team-b.yaml", &annotated)).unwrap();
    let r = get(&s.node, &s.client, &["--requests", "20", "--header", "x-team: b"]);
    assert_eq!(served(&r, "v3"), 20, "precedence 10 goes first: {r}");
    assert_eq!(served(&get(&s.node, &s.client, &["--requests", "20"]), "v1"), 20);
    assert_eq!(
        served(&get(&s.node, &s.client, &["--requests", "20", "--header", "end-user: jason"]), "v2"),
        20
    );
    assert!(conflicts().is_empty(), "{:?}", conflicts());

    // A chaos tool's fault layer: aborts what it matches whichever route takes it, and leaves the
    // routing of everything else alone.
    s.node.apply_and_wait(|| write(&s.config, "chaos.yaml", reviews::CHAOS_LAYER)).unwrap();
    for header in ["end-user: jason", "x-team: b", "x-other: 1"] {
        let r =
            get(&s.node, &s.client, &["--requests", "10", "--header", "x-chaos: abort", "--header", header]);
        assert_eq!(r["statuses"]["418"], 10, "the layer aborts over the route taking `{header}`: {r}");
    }
    let r = get(&s.node, &s.client, &["--requests", "20", "--header", "end-user: jason"]);
    assert_eq!(served(&r, "v2"), 20, "without the chaos header, routing is unchanged: {r}");
    let r = get(&s.node, &s.client, &["--requests", "20", "--header", "x-team: b", "--h2"]);
    assert_eq!(served(&r, "v3"), 20, "{r}");

    // The chaos tool withdraws: no more aborts.
    s.node.apply_and_wait(|| std::fs::remove_file(s.config.join("chaos.yaml")).unwrap()).unwrap();
    let r = get(&s.node, &s.client, &["--requests", "10", "--header", "x-chaos: abort"]);
    assert_eq!(served(&r, "v1"), 10, "{r}");
}
