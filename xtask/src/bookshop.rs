//! The demo's second act: the bookshop sample (`examples/bookshop`) on the simulated cluster,
//! and a walk through its route files — each applied in turn, waited for on every node, and
//! shown by what a reader of the product page gets. Every step checks its own outcome, so a
//! regression makes the demo fail instead of printing something plausible.

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use anyhow::{Context, ensure};
use nodemesh_tests::{Pod, Registration, SimCluster, netns};
use serde_json::Value;

use crate::util;

const PRODUCTPAGE: &str = "10.96.1.10:9080";
const DETAILS: &str = "10.96.1.11:9080";
const REVIEWS: &str = "10.96.1.12:9080";
const RATINGS: &str = "10.96.1.13:9080";

/// (node, pod, labels, app role and version); `reader` runs no app. Pod names differ from the
/// first act's (`shop`) pods: a simulated pod's netns is named after the node and pod.
const LAYOUT: [PodPlan; 9] = [
    (0, "reader", &[], None),
    (0, "productpage", &[("app", "productpage"), ("version", "v1")], Some(("productpage", "v1"))),
    (0, "productpage-dev", &[("app", "productpage-dev"), ("track", "sandbox")], Some(("productpage", "dev"))),
    (0, "details", &[("app", "details"), ("version", "v1")], Some(("details", "v1"))),
    (0, "reviews-1", &[("app", "reviews"), ("version", "v1")], Some(("reviews", "v1"))),
    (1, "reviews-2", &[("app", "reviews"), ("version", "v2")], Some(("reviews", "v2"))),
    (1, "reviews-3", &[("app", "reviews"), ("version", "v3")], Some(("reviews", "v3"))),
    (1, "ratings-1", &[("app", "ratings"), ("version", "v1")], Some(("ratings", "v1"))),
    (1, "ratings-2", &[("app", "ratings"), ("version", "v1")], Some(("ratings", "v1"))),
];

/// Node index, pod name, its labels, and the app it runs (role, version), if any.
type PodPlan =
    (usize, &'static str, &'static [(&'static str, &'static str)], Option<(&'static str, &'static str)>);

pub(crate) struct Bookshop {
    pods: BTreeMap<&'static str, (usize, Pod)>,
}

/// Starts the bookshop's pods and apps; `config` is the directory mesh-control watches.
pub(crate) fn start(cluster: &mut SimCluster, config: &Path) -> anyhow::Result<Bookshop> {
    let root = util::workspace_root()?.join("examples/bookshop");
    fs::copy(root.join("bookshop.yaml"), config.join("bookshop.yaml"))?;
    let app = nodemesh_tests::bin("bookshop")?;
    let mut pods = BTreeMap::new();
    println!("\n  {:<8} {:<16} {:<12} APP", "NODE", "POD", "IP");
    for (n, name, labels, role) in LAYOUT {
        let node = &mut cluster.nodes[n];
        let pod = node.add_pod(name, "bookshop")?;
        let how = if labels.is_empty() { Registration::meshed() } else { Registration::labelled(labels) };
        node.register(&pod, &how)?;
        let mut shown = "-".to_string();
        if let Some((role, version)) = role {
            let listen = pod.addr(9080).to_string();
            let args: Vec<String> = [
                role,
                "--listen",
                &listen,
                "--version",
                version,
                "--details",
                DETAILS,
                "--reviews",
                REVIEWS,
                "--ratings",
                RATINGS,
            ]
            .map(String::from)
            .to_vec();
            node.spawn_in(&pod, &app, &args)?;
            netns::wait_listening(&pod.netns, pod.addr(9080), Duration::from_secs(10))
                .with_context(|| format!("bookshop {role} did not start in {name}"))?;
            shown = format!("{role} {version}");
        }
        println!("  node-{:<3} {:<16} {:<12} {shown}", n + 1, pod.name, pod.ip);
        pods.insert(name, (n, pod));
    }
    Ok(Bookshop { pods })
}

impl Bookshop {
    /// Runs the bookshop binary in the reader pod with `args` and parses its JSON report.
    fn run_reader(&self, cluster: &SimCluster, args: &[&str]) -> anyhow::Result<Value> {
        let (n, reader) = &self.pods["reader"];
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let app = nodemesh_tests::bin("bookshop")?;
        let out = cluster.nodes[*n].run_in(reader, &app, &args, Duration::from_secs(120))?;
        Ok(serde_json::from_str(out.trim())?)
    }

    /// `requests` product-page loads by the reader (as `user`), or from `via` instead of the
    /// productpage Service.
    fn browse(
        &self,
        cluster: &SimCluster,
        requests: usize,
        user: Option<&str>,
        via: Option<&str>,
    ) -> anyhow::Result<Value> {
        let requests = requests.to_string();
        let mut args = vec!["user", "--to", via.unwrap_or(PRODUCTPAGE), "--requests", &requests];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        self.run_reader(cluster, &args)
    }

    /// How many requests reviews v3 has served (mirrored copies included).
    fn v3_served(&self, cluster: &SimCluster) -> anyhow::Result<u64> {
        let v3 = self.pods["reviews-3"].1.addr(9080).to_string();
        let stats = self.run_reader(cluster, &["fetch", "--to", &v3, "--path", "/stats"])?;
        stats["served"].as_u64().context("v3 /stats without `served`")
    }
}

fn count(r: &Value, group: &str, key: &str) -> u64 {
    r[group][key].as_u64().unwrap_or(0)
}

fn show(label: &str, r: &Value) {
    let join = |group: &str| {
        r[group]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    println!(
        "      {label:<34} reviews: {:<22} stars: {:<26} {} ms/page{}",
        join("reviews"),
        join("stars"),
        r["mean_ms"],
        if r["failed"].as_u64().unwrap_or(0) > 0 {
            format!(", {} failed", r["failed"])
        } else {
            String::new()
        }
    );
}

/// Makes `file` (under examples/bookshop/routes) the routes in force, or none, and waits until
/// every node has applied it.
fn apply(cluster: &SimCluster, config: &Path, file: Option<&str>) -> anyhow::Result<()> {
    let target = config.join("bookshop-routes.yaml");
    match file {
        Some(f) => {
            let path = util::workspace_root()?.join("examples/bookshop/routes").join(f);
            let text = fs::read_to_string(&path)?;
            println!("\n  $ cp examples/bookshop/routes/{f} <config>/");
            for line in text.lines().take_while(|l| l.starts_with('#')) {
                println!("    {line}");
            }
            fs::write(&target, text)?;
        }
        None => {
            fs::remove_file(&target)?;
            println!("\n  $ rm <config>/bookshop-routes.yaml   (back to plain round robin)");
        }
    }
    cluster.control.wait_for_config()?;
    Ok(())
}

/// Errors-only access logs for the namespace, switched on while jason's faults happen and off
/// again: the lines name the fault (`FI`) where it was injected.
fn access_logs(cluster: &SimCluster, config: &Path, shop: &Bookshop) -> anyhow::Result<()> {
    let target = config.join("bookshop-telemetry.yaml");
    let text =
        fs::read_to_string(util::workspace_root()?.join("examples/bookshop/telemetry/errors-only.yaml"))?;
    println!("\n  $ cp examples/bookshop/telemetry/errors-only.yaml <config>/");
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        println!("    {line}");
    }
    let logged_before: Vec<usize> = cluster.nodes.iter().map(|n| n.log().len()).collect();
    fs::write(&target, text)?;
    cluster.control.wait_for_config()?;
    let jason = shop.browse(cluster, 2, Some("jason"), None)?;
    show("2 pages as jason", &jason);
    let mut lines = Vec::new();
    for _ in 0..50 {
        lines = cluster
            .nodes
            .iter()
            .zip(&logged_before)
            .enumerate()
            .flat_map(|(i, (node, from))| {
                let log = node.log();
                let new = log.get(*from..).unwrap_or_default().to_string();
                new.lines()
                    .filter(|l| l.starts_with("[20"))
                    .map(|l| format!("node-{}: {l}", i + 1))
                    .collect::<Vec<_>>()
            })
            .collect();
        if lines.iter().any(|l| l.contains(" 503 FI fault_filter_abort ")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("      access-log lines (mesh-node stdout):");
    for line in lines.iter().take(4) {
        println!("        {line}");
    }
    ensure!(
        lines.iter().any(|l| l.contains(" 503 FI fault_filter_abort ")),
        "the injected faults should be logged with flag FI: {lines:#?}"
    );
    fs::remove_file(&target)?;
    println!("\n  $ rm <config>/bookshop-telemetry.yaml   (access logs off)");
    cluster.control.wait_for_config()?;
    Ok(())
}

/// The walk through the route files.
pub(crate) fn walk(cluster: &SimCluster, config: &Path, shop: &Bookshop) -> anyhow::Result<()> {
    println!(
        "\nThe reader loads http://{PRODUCTPAGE}/productpage (productpage → details, reviews → ratings):"
    );
    // The first loads subscribe the nodes to the services on demand; wait until pages come
    // back whole and every version of reviews answers (the endpoints on the other node may
    // arrive a moment after the first).
    let mut ready = false;
    for _ in 0..100 {
        let r = shop.browse(cluster, 6, None, None)?;
        if ["v1", "v2", "v3"].iter().all(|v| count(&r, "reviews", v) > 0) && r["failed"] == 0 {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(ready, "the product page never came back whole from every version of reviews");
    let r = shop.browse(cluster, 30, None, None)?;
    show("no routes, 30 pages", &r);
    ensure!(
        ["v1", "v2", "v3"].iter().all(|v| count(&r, "reviews", v) >= 5),
        "round robin over v1–v3 expected: {r}"
    );

    apply(cluster, config, Some("1-all-v1.yaml"))?;
    let r = shop.browse(cluster, 30, None, None)?;
    show("30 pages", &r);
    ensure!(count(&r, "reviews", "v1") == 30, "all to v1 expected: {r}");

    apply(cluster, config, Some("2-canary-90-10.yaml"))?;
    let r = shop.browse(cluster, 100, None, None)?;
    show("100 pages", &r);
    ensure!(
        (85..=95).contains(&count(&r, "reviews", "v1")) && count(&r, "reviews", "v2") == 0,
        "90/10 expected: {r}"
    );

    apply(cluster, config, Some("3-jason-v2.yaml"))?;
    let jason = shop.browse(cluster, 20, Some("jason"), None)?;
    show("20 pages as jason", &jason);
    let anon = shop.browse(cluster, 20, None, None)?;
    show("20 pages, anonymous", &anon);
    ensure!(
        count(&jason, "reviews", "v2") == 20 && count(&anon, "reviews", "v1") == 20,
        "jason → v2 only: {jason} {anon}"
    );

    apply(cluster, config, Some("4-sandbox.yaml"))?;
    let prod = shop.browse(cluster, 10, None, None)?;
    show("10 pages from productpage", &prod);
    let dev = shop.pods["productpage-dev"].1.addr(9080).to_string();
    let sandbox = shop.browse(cluster, 10, None, Some(&dev))?;
    show("10 pages from productpage-dev", &sandbox);
    ensure!(
        count(&prod, "reviews", "v1") == 10 && count(&sandbox, "reviews", "v3") == 10,
        "sandbox → v3: {prod} {sandbox}"
    );

    apply(cluster, config, Some("5-fault.yaml"))?;
    let jason = shop.browse(cluster, 3, Some("jason"), None)?;
    show("3 pages as jason", &jason);
    let anon = shop.browse(cluster, 10, None, None)?;
    show("10 pages, anonymous", &anon);
    ensure!(
        count(&jason, "stars", "ratings error") == 3 && jason["mean_ms"].as_u64().unwrap_or(0) >= 1000,
        "jason's ratings should fail after 1 s: {jason}"
    );
    ensure!(count(&anon, "stars", "none") == 10 && anon["failed"] == 0, "others untouched: {anon}");

    access_logs(cluster, config, shop)?;

    apply(cluster, config, Some("6-mirror.yaml"))?;
    let before = shop.v3_served(cluster)?;
    let r = shop.browse(cluster, 20, None, None)?;
    show("20 pages", &r);
    let mut mirrored = 0;
    for _ in 0..20 {
        mirrored = shop.v3_served(cluster)? - before;
        if mirrored >= 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("      reviews v3 meanwhile served {mirrored} mirrored copies that no reader saw");
    ensure!(count(&r, "reviews", "v1") == 20 && mirrored >= 20, "mirror to v3 expected: {r}, v3 +{mirrored}");

    // A second team's object for the same host composes with the routes in force.
    let layer = config.join("chaos-reviews.yaml");
    let text =
        fs::read_to_string(util::workspace_root()?.join("examples/bookshop/layers/chaos-reviews.yaml"))?;
    println!(
        "\n  $ cp examples/bookshop/layers/chaos-reviews.yaml <config>/   (kept alongside the routes above)"
    );
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        println!("    {line}");
    }
    fs::write(&layer, text)?;
    cluster.control.wait_for_config()?;
    let jason = shop.browse(cluster, 10, Some("jason"), None)?;
    show("10 pages as jason", &jason);
    let anon = shop.browse(cluster, 10, None, None)?;
    show("10 pages, anonymous", &anon);
    ensure!(
        count(&jason, "reviews", "unavailable") == 10 && count(&anon, "reviews", "v1") == 10,
        "the chaos layer fails jason's reviews only, over the mirror routes: {jason} {anon}"
    );
    fs::remove_file(&layer)?;
    println!("\n  $ rm <config>/chaos-reviews.yaml");
    cluster.control.wait_for_config()?;

    apply(cluster, config, None)?;
    Ok(())
}
