//! The bookshop sample: four small HTTP services in one binary, one role per process.
//!
//! ```text
//! productpage ──> details
//!      └────────> reviews v1           (no stars)
//!                 reviews v2 ──> ratings (black stars)
//!                 reviews v3 ──> ratings (red stars)
//! ```
//!
//! `bookshop ROLE --listen ADDR [--version V] [--details ADDR] [--reviews ADDR] [--ratings ADDR]`,
//! plus two client roles: `user` (a reader loading the product page, tallying which reviews
//! version and stars came back) and `fetch` (one GET).
//!
//! Each answers JSON saying who answered, so a caller sees which version served it. Like any
//! app in a mesh, the services forward the headers tracing and routing rely on (`end-user`,
//! `x-request-id`) on their own calls: that is what lets a route on `end-user: jason` apply
//! two hops down. `GET /stats` reports how many requests a process served (mirrored copies
//! included), so a demo can show traffic the callers never see.

mod serve;
mod user;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Headers each service copies from its request onto the requests it makes.
const PROPAGATED: [&str; 2] = ["end-user", "x-request-id"];

#[derive(Clone, Debug)]
pub struct Config {
    role: String,
    version: String,
    details: Option<String>,
    reviews: Option<String>,
    ratings: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let Some(role) = args.first().cloned() else {
        bail!(
            "usage: bookshop productpage|details|reviews|ratings --listen ADDR [--version V] [--details ADDR] [--reviews ADDR] [--ratings ADDR]\n\
             \x20      bookshop user --to ADDR [--requests N] [--user NAME]   (GET /productpage N times, tally what came back)\n\
             \x20      bookshop fetch --to ADDR [--path P]                   (one GET, print the JSON)"
        )
    };
    if role == "user" || role == "fetch" {
        let to = opt("--to").context("--to ADDR is required")?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let report = runtime.block_on(async {
            if role == "fetch" {
                let (_, body) = serve::get(&to, &opt("--path").unwrap_or_else(|| "/".into()), &[]).await?;
                return Ok::<_, anyhow::Error>(serde_json::from_slice(&body)?);
            }
            let requests = opt("--requests").map_or(Ok(1), |n| n.parse())?;
            user::browse(&to, requests, opt("--user")).await
        })?;
        println!("{report}");
        return Ok(());
    }
    if !["productpage", "details", "reviews", "ratings"].contains(&role.as_str()) {
        bail!("unknown role `{role}`: productpage, details, reviews, ratings, user or fetch");
    }
    let listen: SocketAddr = opt("--listen").context("--listen ADDR is required")?.parse()?;
    let config = Config {
        role,
        version: opt("--version").unwrap_or_else(|| "v1".into()),
        details: opt("--details"),
        reviews: opt("--reviews"),
        ratings: opt("--ratings"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve::run(listen, config))
}

/// What `path` answers for this role, calling the services downstream of it.
pub async fn answer(config: &Config, path: &str, headers: &hyper::HeaderMap) -> (u16, Value) {
    let forward: Vec<(&str, String)> =
        PROPAGATED.iter().filter_map(|h| Some((*h, headers.get(*h)?.to_str().ok()?.to_string()))).collect();
    let who = json!({"service": config.role, "version": config.version});
    match config.role.as_str() {
        "details" => (200, json!({"from": who, "book": {"id": 0, "pages": 200, "year": 1595}})),
        "ratings" => (200, json!({"from": who, "stars": {"reviewer1": 5, "reviewer2": 4}})),
        "reviews" => {
            let mut body =
                json!({"from": who, "reviews": ["An extremely entertaining play.", "Absolutely fun."]});
            // v1 shows no stars; v2 black and v3 red ones, from ratings.
            if config.version != "v1" {
                let color = if config.version == "v2" { "black" } else { "red" };
                body["ratings"] = match call(config.ratings.as_deref(), "/ratings/0", &forward).await {
                    Ok(r) => json!({"color": color, "answer": r}),
                    Err(e) => json!({"error": format!("ratings unavailable: {e}")}),
                };
            }
            (200, body)
        }
        _ if path.starts_with("/productpage") => {
            let details = call(config.details.as_deref(), "/details/0", &forward).await;
            let reviews = call(config.reviews.as_deref(), "/reviews/0", &forward).await;
            let show = |r: anyhow::Result<Value>, what: &str| {
                r.unwrap_or_else(|e| json!({"error": format!("{what} unavailable: {e}")}))
            };
            (
                200,
                json!({"from": who, "details": show(details, "details"), "reviews": show(reviews, "reviews")}),
            )
        }
        _ => (404, json!({"from": who, "error": format!("no page {path}: try /productpage")})),
    }
}

/// GET `path` from `to` (`ip:port`) with the propagated headers; the JSON answer, or why not.
async fn call(to: Option<&str>, path: &str, headers: &[(&str, String)]) -> anyhow::Result<Value> {
    let to = to.context("no address configured")?;
    let exchange = serve::get(to, path, headers);
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(5), exchange).await.context("timed out after 5s")??;
    let value: Value =
        serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
    if status >= 400 {
        bail!(
            "status {status}: {}",
            value.as_str().map_or_else(|| value.to_string(), |s| s.trim().to_string())
        );
    }
    Ok(value)
}
