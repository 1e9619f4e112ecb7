//! The service graph in a real headless Chromium: two nodes with mTLS between them, mesh-control
//! scraping both nodes' metrics endpoints, and the page at mesh-control's `/graph` loaded the way
//! a user would open it. The test sends known traffic and reads the page back: each edge it
//! drew, with the count, rate, error rate, p99 and mTLS the traffic must give. A screenshot of
//! the page is saved to the test's output (`target/tmp/service-graph.png`). The nodes fold
//! their own metrics into edges (`/graph/edges`), which is what mesh-control reads.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use nodemesh_tests::{
    Registration, SimCluster,
    browser::Browser,
    mesh::{answered, eventually, http_service_yaml, labelled, service_yaml},
};
use serde_json::Value;

const WEB_VIP: &str = "10.96.0.50";
const SLOW_VIP: &str = "10.96.0.51";
const DB_VIP: &str = "10.96.0.52";
const PLAIN_VIP: &str = "10.96.0.53";
const METRICS_ADDR: &str = "0.0.0.0:15020";

/// The page's edge table, one object per row (its `data-*` attributes), plus what the SVG drew
/// for each edge, the vertices and the sources list.
const READ_PAGE: &str = r#"
const rows = [...document.querySelectorAll('#edge-table tbody tr')].map(tr => ({...tr.dataset}));
const drawn = [...document.querySelectorAll('#edges g.edge')].map(g =>
  ({source: g.dataset.source, destination: g.dataset.destination, label: g.querySelector('text').textContent,
    class: g.getAttribute('class')}));
const vertices = [...document.querySelectorAll('#vertices g.vertex')].map(g => g.dataset.id);
const sources = [...document.querySelectorAll('#sources li')].map(li => ({text: li.textContent, failed: li.className === 'failed'}));
return {rows, drawn, vertices, sources, span: Number(document.body.dataset.span || 0),
        summary: document.getElementById('summary').textContent};
"#;

fn row<'a>(page: &'a Value, from: &str, to: &str) -> Option<&'a Value> {
    page["rows"]
        .as_array()?
        .iter()
        .find(|r| r["source"] == format!("shop/{from}") && r["destination"] == format!("shop/{to}"))
}

fn number(row: &Value, field: &str) -> f64 {
    row[field].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{field} of {row}"))
}

fn label(page: &Value, from: &str, to: &str) -> String {
    page["drawn"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["source"] == format!("shop/{from}") && e["destination"] == format!("shop/{to}"))
        .and_then(|e| e["label"].as_str())
        .unwrap_or_else(|| panic!("no edge drawn from {from} to {to}: {page}"))
        .to_string()
}

#[test]
fn the_graph_page_draws_each_edge_with_the_rate_errors_p99_and_mtls_of_the_traffic_sent() {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.write_config("web.yaml", &http_service_yaml("web", "shop", WEB_VIP, "web"));
    cluster.write_config("slow.yaml", &http_service_yaml("slow", "shop", SLOW_VIP, "slow"));
    cluster.write_config("db.yaml", &service_yaml("db", DB_VIP, "db"));
    cluster.write_config("plain.yaml", &http_service_yaml("plain", "shop", PLAIN_VIP, "plain"));
    // Calls to `plain` leave the mesh's mTLS: the graph must show that edge as plaintext.
    cluster.write_config(
        "plain-rule.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: plain, namespace: shop}\n\
         spec:\n  host: plain\n  trafficPolicy: {tls: {mode: DISABLE}}\n",
    );
    // Scraped every 500 ms; a window longer than the test, so every request sent stays in it.
    cluster
        .start(
            &["--graph-scrape-interval-ms", "500", "--graph-window-secs", "600"],
            &["--metrics-addr", METRICS_ADDR],
        )
        .unwrap();

    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0].register(&client, &labelled("client")).unwrap();
    // The probe proves the routes are in place before the client sends what the test counts.
    let probe = cluster.nodes[0].add_pod("probe", "shop").unwrap();
    cluster.nodes[0].register(&probe, &labelled("probe")).unwrap();
    for app in ["web", "slow", "plain"] {
        let pod = cluster.nodes[1].add_pod(&format!("{app}0"), "shop").unwrap();
        // slow's pod carries a version: the versioned graph shows it.
        let how = if app == "slow" {
            Registration::labelled(&[("app", app), ("version", "v1")])
        } else {
            labelled(app)
        };
        cluster.nodes[1].register(&pod, &how).unwrap();
        cluster.nodes[1].serve_http(&pod, &[pod.addr(8080)]).unwrap();
    }
    let db = cluster.nodes[1].add_pod("db0", "shop").unwrap();
    cluster.nodes[1].register(&db, &labelled("db")).unwrap();
    cluster.nodes[1].serve(&db, &[db.addr(8080)]).unwrap();

    let node0 = &cluster.nodes[0];
    let to = |vip: &str| format!("{vip}:80");
    for vip in [WEB_VIP, SLOW_VIP, PLAIN_VIP] {
        eventually(&format!("the probe reaches {vip}"), Duration::from_secs(20), || {
            node0.testapp(&probe, &["http-client", "--to", &to(vip)]).is_ok_and(|r| r["statuses"]["200"] == 1)
        });
    }
    eventually("the probe reaches db", Duration::from_secs(20), || answered(node0, &probe, &to(DB_VIP)));

    let browser = Browser::start(&cluster.fabric_netns, &cluster.work_dir).unwrap();
    browser.navigate(&format!("http://{}/graph", cluster.control.admin_addr())).unwrap();
    // Both nodes scraped, and node 0 at least twice since the probe's requests: from here on
    // the window holds every request the client sends.
    browser
        .wait_for("the probe's edges on the page", READ_PAGE, Duration::from_secs(30), |page| {
            ["web", "slow", "plain", "db"].iter().all(|to| row(page, "probe", to).is_some())
        })
        .unwrap();

    let http = |vip: &str, requests: &str, path: &str| {
        let r = node0
            .testapp(&client, &["http-client", "--to", &to(vip), "--requests", requests, "--path", path])
            .unwrap();
        assert!(r.get("error").is_none(), "{r}");
        r
    };
    assert_eq!(http(WEB_VIP, "30", "/")["statuses"]["200"], 30);
    assert_eq!(http(WEB_VIP, "10", "/status/503")["statuses"]["503"], 10);
    assert_eq!(http(SLOW_VIP, "10", "/delay/600")["statuses"]["200"], 10);
    assert_eq!(http(PLAIN_VIP, "5", "/")["statuses"]["200"], 5);
    let r = node0.testapp(&client, &["client", "--to", &to(DB_VIP), "--connections", "4"]).unwrap();
    assert!(r.get("error").is_none(), "{r}");

    let expected: BTreeMap<&str, u64> = [("web", 40), ("slow", 10), ("plain", 5), ("db", 4)].into();
    let page = browser
        .wait_for("the client's traffic on the page", READ_PAGE, Duration::from_secs(30), |page| {
            expected
                .iter()
                .all(|(to, n)| row(page, "client", to).is_some_and(|r| number(r, "count") == *n as f64))
        })
        .unwrap();
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("service-graph.png");
    browser.screenshot(&shot).unwrap();
    eprintln!("screenshot of the service graph: {}", shot.display());

    // Exactly the edges the traffic made, between the apps that made it.
    let mut edges: Vec<String> = page["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} -> {}", r["source"].as_str().unwrap(), r["destination"].as_str().unwrap()))
        .collect();
    edges.sort();
    let mut want: Vec<String> = ["client", "probe"]
        .iter()
        .flat_map(|from| ["db", "plain", "slow", "web"].map(|to| format!("shop/{from} -> shop/{to}")))
        .collect();
    // The serving node cannot tell who sent plaintext (nothing proves it), so it reports those
    // connections from `unknown`, as Istio does: the page shows plaintext arriving at `plain`.
    want.push("unknown -> shop/plain".into());
    want.sort();
    assert_eq!(edges, want, "{page:#}");
    let mut vertices: Vec<&str> =
        page["vertices"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    vertices.sort();
    assert_eq!(
        vertices,
        ["shop/client", "shop/db", "shop/plain", "shop/probe", "shop/slow", "shop/web", "unknown"]
    );

    // web: 40 requests, 10 of them 503s, fast, over mTLS; the rate is the count over the span.
    let web = row(&page, "client", "web").unwrap();
    assert_eq!(web["protocol"], "http");
    assert_eq!(number(web, "errorRate"), 0.25, "{web}");
    assert_eq!(web["mtls"], "mutual_tls");
    assert!(number(web, "p99") < 500.0, "the fast edge's p99: {web}");
    let span = page["span"].as_f64().unwrap();
    let per_second = 40.0 / span;
    assert!(
        (number(web, "rate") - per_second).abs() <= per_second * 0.1,
        "rate {} for 40 requests over {span} s: {web}",
        number(web, "rate")
    );
    let drawn = label(&page, "client", "web");
    assert!(drawn.contains("25.0% err") && drawn.contains("✓ mTLS") && drawn.contains("rps"), "{drawn}");

    // slow: every request took 600 ms, so its p99 is in Istio's (500, 1000] ms bucket.
    let slow = row(&page, "client", "slow").unwrap();
    let p99 = number(slow, "p99");
    assert!(p99 > 500.0 && p99 <= 1000.0, "p99 of 600 ms requests: {slow}");
    assert_eq!(number(slow, "errorRate"), 0.0);
    assert!(label(&page, "client", "slow").contains(&format!("p99 {p99:.0} ms")), "{page:#}");

    // plain: the DestinationRule's DISABLE is drawn as plaintext.
    let plain = row(&page, "client", "plain").unwrap();
    assert_eq!(plain["mtls"], "none", "{plain}");
    assert!(label(&page, "client", "plain").contains("plaintext"), "{page:#}");
    let unattributed = page["rows"].as_array().unwrap().iter().find(|r| r["source"] == "unknown").unwrap();
    assert_eq!(
        (unattributed["protocol"].as_str(), unattributed["mtls"].as_str()),
        (Some("tcp"), Some("none"))
    );

    // db: TCP, four connections over mTLS.
    let db = row(&page, "client", "db").unwrap();
    assert_eq!((db["protocol"].as_str(), db["mtls"].as_str()), (Some("tcp"), Some("mutual_tls")), "{db}");
    assert!(label(&page, "client", "db").starts_with("tcp "), "{page:#}");

    // The client's node folded those numbers itself: its /graph/edges, which mesh-control
    // reads instead of the whole /metrics page.
    let report: Value = serde_json::from_str(&cluster.nodes[0].admin_get("/graph/edges").unwrap()).unwrap();
    let folded = report["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["source"]["name"] == "client" && e["destination"]["name"] == "web")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(
        (folded["totals"]["requests"].as_f64(), folded["totals"]["errors"].as_f64()),
        (Some(40.0), Some(10.0))
    );

    // A box per version of each app: slow's edge ends at `slow:v1`, the others unchanged.
    browser.execute("document.getElementById('versions').click(); return true;").unwrap();
    let versioned = browser
        .wait_for("the versioned graph", READ_PAGE, Duration::from_secs(10), |page| {
            row(page, "client", "slow:v1").is_some()
        })
        .unwrap();
    assert_eq!(number(row(&versioned, "client", "slow:v1").unwrap(), "count"), 10.0, "{versioned:#}");
    assert!(row(&versioned, "client", "slow").is_none(), "{versioned:#}");
    assert_eq!(number(row(&versioned, "client", "web").unwrap(), "count"), 40.0, "{versioned:#}");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("service-graph-versions.png");
    browser.screenshot(&shot).unwrap();

    // Both nodes listed as scraped, none failing; mesh-control counts its scrapes.
    let sources = page["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "{page:#}");
    assert!(sources.iter().all(|s| s["failed"] == false), "{page:#}");
    let metrics = cluster.control.get("/metrics").unwrap();
    assert!(metrics.contains("nodemesh_control_graph_scrapes_total{result=\"ok\"}"), "{metrics}");
    assert!(!metrics.contains("nodemesh_control_graph_scrapes_total{result=\"failed\"}"), "{metrics}");
}
