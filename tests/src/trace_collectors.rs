//! Span collectors for the tracing tests (`py/trace_collectors.py`): OTLP/gRPC served by the
//! OpenTelemetry Python protocol code and grpcio, and a Zipkin v2 JSON receiver, run in a
//! simulated cluster's fabric netns; every span they take is kept in a file the test reads.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;

use crate::netns;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/trace_collectors.py");

pub struct TraceCollectors {
    child: Child,
    dir: PathBuf,
    pub otlp: SocketAddr,
    pub zipkin: SocketAddr,
}

/// A collector's spans.
#[derive(Clone, Copy, Debug)]
pub enum Collector {
    Otlp,
    Zipkin,
}

impl TraceCollectors {
    /// Starts both collectors in `netns` on `ip` (OTLP on 4317, Zipkin on 9411, their usual
    /// ports); spans are kept under `work_dir`.
    pub fn start(netns_name: &str, ip: std::net::IpAddr, work_dir: &Path) -> anyhow::Result<TraceCollectors> {
        let dir = work_dir.join("spans");
        std::fs::create_dir_all(&dir)?;
        let (otlp, zipkin) = (SocketAddr::new(ip, 4317), SocketAddr::new(ip, 9411));
        let args = [
            SCRIPT.to_string(),
            "--otlp".into(),
            otlp.to_string(),
            "--zipkin".into(),
            zipkin.to_string(),
            "--out".into(),
            dir.display().to_string(),
        ];
        let log = std::fs::File::create(dir.join("collectors.log"))?;
        let child = crate::process::spawn_in(
            netns_name,
            None,
            Path::new("python3"),
            &args,
            &[],
            Stdio::from(log.try_clone()?),
            Stdio::from(log),
        )?;
        let collectors = TraceCollectors { child, dir, otlp, zipkin };
        for addr in [otlp, zipkin] {
            netns::wait_listening(netns_name, addr, Duration::from_secs(30)).with_context(|| {
                format!(
                    "trace collector did not listen on {addr} (are grpcio and opentelemetry-proto installed?): {}",
                    std::fs::read_to_string(collectors.dir.join("collectors.log")).unwrap_or_default()
                )
            })?;
        }
        Ok(collectors)
    }

    /// Every span `collector` has taken so far.
    pub fn spans(&self, collector: Collector) -> Vec<Value> {
        let file = match collector {
            Collector::Otlp => "otlp.jsonl",
            Collector::Zipkin => "zipkin.jsonl",
        };
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The collectors' own log (a rejected Zipkin body says why there).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("collectors.log")).unwrap_or_default()
    }
}

impl Drop for TraceCollectors {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
