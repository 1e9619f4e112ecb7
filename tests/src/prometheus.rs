//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) run in a
//! simulated cluster's fabric netns with the scrape config a test gives it, and asked PromQL
//! through its HTTP API as a dashboard would.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Deserialize;

use crate::netns;

/// Where Prometheus answers inside the netns it runs in.
const LISTEN: &str = "127.0.0.1:19090";

pub struct Prometheus {
    netns: String,
    child: Child,
    dir: PathBuf,
}

/// One series of a query's answer.
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Prometheus {
    /// Starts Prometheus in `netns` with `config` (YAML, or JSON, which is YAML too); data
    /// under `work_dir`.
    pub fn start_with_config(netns_name: &str, work_dir: &Path, config: &str) -> anyhow::Result<Prometheus> {
        let binary = Path::new("/usr/bin/prometheus");
        anyhow::ensure!(
            binary.is_file(),
            "prometheus is not installed at {} (cargo xtask setup installs Debian's prometheus)",
            binary.display()
        );
        let dir = work_dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let args: Vec<String> = vec![
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={LISTEN}"),
            "--log.level=warn".into(),
        ];
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = crate::process::spawn_in(
            netns_name,
            None,
            binary,
            &args,
            &[],
            Stdio::from(log.try_clone()?),
            Stdio::from(log),
        )?;
        let prometheus = Prometheus { netns: netns_name.to_string(), child, dir };
        // Listening comes first; queries are answered (not 503) once its storage is ready.
        let deadline = Instant::now() + Duration::from_secs(30);
        while netns::http_get(netns_name, LISTEN.parse()?, "/-/ready").is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "Prometheus was not ready after 30 s; see {}",
                prometheus.log().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(prometheus)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("prometheus.log")
    }

    /// An instant PromQL query.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<Series>> {
        let body =
            netns::http_get(&self.netns, LISTEN.parse()?, &format!("/api/v1/query?query={}", encode(promql)))
                .with_context(|| format!("query {promql}"))?;
        let answer: Answer =
            serde_json::from_str(&body).with_context(|| format!("answer to {promql}: {body}"))?;
        anyhow::ensure!(answer.status == "success", "query {promql}: {body}");
        answer
            .data
            .result
            .into_iter()
            .map(|r| {
                let value =
                    r.value.1.parse().with_context(|| format!("value {:?} of {promql}", r.value.1))?;
                Ok(Series { labels: r.metric, value })
            })
            .collect()
    }

    /// The single value of `promql` (the sum, if it has several series; 0 if none).
    pub fn value(&self, promql: &str) -> anyhow::Result<f64> {
        Ok(self.query(promql)?.iter().map(|s| s.value).sum())
    }

    /// Waits until `promql`'s value satisfies `done`, returning the last value.
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(f64) -> bool,
    ) -> anyhow::Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.value(promql)?;
            if done(value) {
                return Ok(value);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{promql} is still {value} after {timeout:?}; targets: {}",
                self.targets().unwrap_or_else(|e| e.to_string())
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Each target's scrape health, for failure messages.
    pub fn targets(&self) -> anyhow::Result<String> {
        netns::http_get(&self.netns, LISTEN.parse()?, "/api/v1/targets?state=active")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    result: Vec<Result>,
}

#[derive(Deserialize)]
struct Result {
    metric: std::collections::BTreeMap<String, String>,
    value: (f64, String),
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_promql() {
        assert_eq!(super::encode(r#"sum(x{a="b"})"#), "sum%28x%7Ba%3D%22b%22%7D%29");
    }
}
