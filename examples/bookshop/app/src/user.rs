//! The reader: loads the product page again and again and tallies what came back.

use std::{collections::BTreeMap, time::Instant};

use serde_json::{Value, json};

/// `requests` loads of `/productpage` from `to`, as `user` if given (the `end-user` header).
/// Reports which reviews version answered, which stars (or ratings error) the page showed, and
/// the mean page time.
pub(crate) async fn browse(to: &str, requests: usize, user: Option<String>) -> anyhow::Result<Value> {
    let headers: Vec<(&str, String)> = user.into_iter().map(|u| ("end-user", u)).collect();
    let mut reviews: BTreeMap<String, u64> = BTreeMap::new();
    let mut stars: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed = 0u64;
    let mut last_error = None;
    let started = Instant::now();
    for _ in 0..requests {
        let page: Value = match crate::serve::get(to, "/productpage", &headers).await {
            Ok((200, body)) => serde_json::from_slice(&body).unwrap_or(Value::Null),
            Ok((status, _)) => {
                failed += 1;
                last_error = Some(format!("status {status}"));
                continue;
            }
            Err(e) => {
                failed += 1;
                last_error = Some(e.to_string());
                continue;
            }
        };
        let version = page["reviews"]["from"]["version"].as_str().unwrap_or("unavailable");
        *reviews.entry(version.to_string()).or_default() += 1;
        let shown = match &page["reviews"]["ratings"] {
            Value::Null => "none",
            r if r.get("error").is_some() => "ratings error",
            r => r["color"].as_str().unwrap_or("?"),
        };
        *stars.entry(shown.to_string()).or_default() += 1;
    }
    let mean_ms = started.elapsed().as_millis() as u64 / requests.max(1) as u64;
    Ok(
        json!({"reviews": reviews, "stars": stars, "failed": failed, "last_error": last_error, "mean_ms": mean_ms}),
    )
}
