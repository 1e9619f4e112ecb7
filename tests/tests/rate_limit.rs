//! Local rate limits (RateLimitPolicy, nodemesh.io) through the node proxy, on one simulated
//! node: a client-side limit on the callers a selector picks, per route match; a server-side
//! limit per serving pod; refills; the 429 answer and `x-ratelimit-*` headers a client sees;
//! the metric naming the limit.

use std::{fs, time::Duration};

use nodemesh_tests::{
    Pod, Registration, SimNode,
    mesh::{eventually, http_get, write_config as write},
    reviews::{self, SERVICE_AND_SUBSETS as REVIEWS, VIP},
};
use serde_json::Value;

/// productpage may send 20 requests, of which 5 POSTs, per hour: a bucket that never refills
/// during the test, so every count is exact.
const CALLER_LIMITS: &str = r#"apiVersion: nodemesh.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: reviews-callers, namespace: shop}
spec:
  host: reviews
  workloadSelector: {labels: {app: productpage}}
  limits:
  - name: writes
    match: [{method: {exact: POST}}]
    maxTokens: 5
    fillInterval: 1h
  - name: all
    maxTokens: 20
    fillInterval: 1h
"#;

/// Each reviews pod accepts 4 requests, then 2 more every 3 s: long enough that a burst of
/// requests fits inside one interval, so the counts below are exact.
const SERVER_LIMIT: &str = r#"apiVersion: nodemesh.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: reviews-pods, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  side: Server
  limits:
  - {maxTokens: 4, tokensPerFill: 2, fillInterval: 3s}
"#;
const FILL_INTERVAL: Duration = Duration::from_secs(3);

fn status(r: &Value, code: u16) -> u64 {
    r["statuses"][code.to_string()].as_u64().unwrap_or(0)
}

fn get(node: &SimNode, client: &Pod, args: &[&str]) -> Value {
    http_get(node, client, &format!("{VIP}:80"), args)
}

#[test]
fn rate_limits_answer_429_per_caller_or_per_serving_pod_and_refill() {
    let (mut node, config) = SimNode::with_control_plane(&[("reviews.yaml", REVIEWS)]).unwrap();
    let productpage = node.add_pod("productpage", "shop").unwrap();
    node.register(&productpage, &Registration::labelled(&[("app", "productpage")])).unwrap();
    let other = node.add_pod("other", "shop").unwrap();
    node.register(&other, &Registration::meshed()).unwrap();
    reviews::serve_versions(&mut node).unwrap();
    eventually("reviews answers", Duration::from_secs(15), || {
        node.testapp(&other, &["http-client", "--to", &format!("{VIP}:80"), "--requests", "3"])
            .is_ok_and(|r| status(&r, 200) == 3)
    });

    // Client side: productpage's own buckets; the unselected caller is not limited.
    node.apply_and_wait(|| write(&config, "limits.yaml", CALLER_LIMITS)).unwrap();
    let r = get(&node, &productpage, &["--requests", "8", "--method", "POST"]);
    assert_eq!((status(&r, 200), status(&r, 429)), (5, 3), "5 POSTs pass, then 429: {r}");
    assert_eq!(r["rate_limit"]["limit"], 5, "the 429 names the tightest bucket: {r}");
    assert_eq!(r["rate_limit"]["remaining"], 0, "{r}");
    assert!(r["rate_limit"]["reset"].as_u64().is_some_and(|s| s > 0 && s <= 3600), "{r}");
    // The POSTs that passed also drew from `all` (20): 15 GETs are left.
    let r = get(&node, &productpage, &["--requests", "20"]);
    assert_eq!((status(&r, 200), status(&r, 429)), (15, 5), "{r}");
    let r = get(&node, &productpage, &["--requests", "1", "--h2"]);
    assert_eq!(status(&r, 429), 1, "h2c is limited by the same bucket: {r}");
    let r = get(&node, &other, &["--requests", "30", "--method", "POST"]);
    assert_eq!(status(&r, 200), 30, "a caller the selector does not pick is not limited: {r}");
    assert!(r["rate_limit"].is_null(), "nor told about a limit: {r}");

    // A limited response under the limit says how much is left.
    node.apply_and_wait(|| fs::remove_file(config.join("limits.yaml")).unwrap()).unwrap();
    node.apply_and_wait(|| write(&config, "limits.yaml", SERVER_LIMIT)).unwrap();
    // The buckets start full when their pod is first picked, from here on.
    let burst = std::time::Instant::now();
    let r = get(&node, &other, &["--requests", "1"]);
    assert_eq!(
        (status(&r, 200), &r["rate_limit"]["limit"], &r["rate_limit"]["remaining"]),
        (1, &4.into(), &3.into()),
        "{r}"
    );
    let first = r["first"]["server"].as_str().unwrap().to_string();

    // Server side: a bucket per serving pod, whoever calls. Round robin gives each of the
    // three pods 10 of the 30 requests; each pod passes its 4 tokens (the first one's 3 left)
    // and refuses the rest: exactly 11 pass and 19 get 429.
    let r = get(&node, &productpage, &["--requests", "30"]);
    assert!(
        burst.elapsed() < FILL_INTERVAL,
        "the exact counts below need the burst inside one fill interval ({FILL_INTERVAL:?}); it took {:?}",
        burst.elapsed()
    );
    assert_eq!((status(&r, 200), status(&r, 429)), (11, 19), "{r}");
    for v in ["v1", "v2", "v3"] {
        let want = if v == first { 3 } else { 4 };
        assert_eq!(r["servers"][v].as_u64().unwrap_or(0), want, "{v} served its own bucket: {r}");
    }
    // Refill: every bucket was made during the burst, which ended before this wait; after one
    // interval (and before two) exactly one fill (2 tokens) per pod: 6 of 9 pass.
    std::thread::sleep(FILL_INTERVAL + Duration::from_millis(200));
    let r = get(&node, &other, &["--requests", "9"]);
    assert!(burst.elapsed() < 2 * FILL_INTERVAL, "one fill only needs this inside two intervals");
    assert_eq!((status(&r, 200), status(&r, 429)), (6, 3), "the buckets refilled by tokensPerFill: {r}");

    let metrics = node.admin_get("/metrics").unwrap();
    for (limit, side) in [
        ("shop/reviews-callers/writes", "client"),
        ("shop/reviews-callers/all", "client"),
        ("shop/reviews-pods/0", "server"),
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with("nodemesh_rate_limited_requests_total{")
                && l.contains(&format!("limit=\"{limit}\",side=\"{side}\""))),
            "metric for {limit}: {metrics}"
        );
    }
}
