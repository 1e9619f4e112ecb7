//! Access logs: which workloads of this node are logged and how (from their control-plane
//! records, switched at runtime), and the writers lines go to.
//!
//! The data path never waits on a log: a line is handed to its file's writer thread through a
//! bounded queue, and dropped (and counted) if the queue is full. With no workload logged, a
//! request pays one atomic load.

use std::{
    collections::HashMap,
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, mpsc},
    time::{Instant, SystemTime},
};

use hyper::{HeaderMap, Method, Request, Uri, Version, header::HeaderName, http::request::Parts};
use nodemesh_api::{
    access_log::{LogSpec, Record, RequestFacts},
    proto::mesh,
    workload::WorkloadKey,
};
use prometheus_client::metrics::counter::Counter;

use super::per_workload::PerWorkload;

/// Lines a writer may fall behind by before new ones are dropped.
const QUEUE_LINES: usize = 8192;

/// Which side of a request a log entry is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The workload sent it (logged at its node's outbound proxy).
    Client,
    /// The workload served it (logged where it was delivered).
    Server,
}

/// Every logged workload of this node and the writers their lines go to.
#[derive(Default)]
pub struct AccessLogs {
    by_workload: PerWorkload<WorkloadLogs>,
    writers: Mutex<HashMap<String, Arc<Writer>>>,
    /// Lines dropped because a writer fell behind (`nodemesh_access_log_dropped_lines`).
    pub dropped: Counter,
}

/// One workload's logs, compiled.
pub struct WorkloadLogs {
    logs: Vec<(LogSpec, Arc<Writer>)>,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
}

impl std::fmt::Debug for AccessLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let logged = self.by_workload.len();
        f.debug_struct("AccessLogs").field("logged_workloads", &logged).finish_non_exhaustive()
    }
}

impl AccessLogs {
    /// The logs of workload `uid` (`namespace/name`) for `side`, if any is on.
    pub fn for_workload(&self, uid: &str, side: Side) -> Option<Arc<WorkloadLogs>> {
        self.by_workload.get(uid).filter(|logs| logs.logs.iter().any(|(spec, _)| logs_side(spec, side)))
    }

    /// [`AccessLogs::for_workload`] by key: nothing is formatted unless some workload is logged.
    pub fn for_key(&self, key: &WorkloadKey, side: Side) -> Option<Arc<WorkloadLogs>> {
        self.by_workload.get_key(key).filter(|logs| logs.logs.iter().any(|(spec, _)| logs_side(spec, side)))
    }

    /// Checks the access logs of `workloads` without changing anything: an `Err` names the
    /// workload and what is wrong (the response is NACKed and the old logs stay).
    pub fn compile(
        &self,
        workloads: &[mesh::Workload],
    ) -> Result<Vec<(String, Option<WorkloadLogs>)>, String> {
        workloads
            .iter()
            .map(|w| {
                if w.access_logs.is_empty() {
                    return Ok((w.uid.clone(), None));
                }
                let specs = w
                    .access_logs
                    .iter()
                    .map(LogSpec::compile)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("Workload {}: {e}", w.uid))?;
                Ok((w.uid.clone(), Some(self.workload_logs(specs)?)))
            })
            .collect()
    }

    fn workload_logs(&self, specs: Vec<LogSpec>) -> Result<WorkloadLogs, String> {
        let (mut request, mut response) = (Vec::new(), Vec::new());
        for spec in &specs {
            let (req, resp) = spec.headers();
            request.extend(req);
            response.extend(resp);
        }
        let names = |mut v: Vec<String>| -> Result<Vec<HeaderName>, String> {
            v.sort();
            v.dedup();
            v.iter()
                .map(|n| HeaderName::try_from(n.as_str()).map_err(|_| format!("`{n}` is not a header name")))
                .collect()
        };
        let (request_headers, response_headers) = (names(request)?, names(response)?);
        let logs = specs.into_iter().map(|spec| {
            let writer = self.writer(&spec.path);
            (spec, writer)
        });
        Ok(WorkloadLogs { logs: logs.collect(), request_headers, response_headers })
    }

    /// Applies compiled logs and removes those of `removed` workloads.
    pub fn apply(&self, compiled: Vec<(String, Option<WorkloadLogs>)>, removed: &[String]) {
        self.by_workload.apply(compiled, removed);
    }

    /// The writer for `path`, started on first use and kept for the process's life (one per
    /// file, however many workloads log to it).
    fn writer(&self, path: &str) -> Arc<Writer> {
        let mut writers = self.writers.lock().expect("writers lock");
        let writer =
            writers.entry(path.to_string()).or_insert_with(|| Writer::start(path, self.dropped.clone()));
        Arc::clone(writer)
    }
}

/// The head of a request, whether still whole or taken apart.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub version: Version,
    pub headers: &'a HeaderMap,
}

impl<'a> From<&'a Parts> for Head<'a> {
    fn from(p: &'a Parts) -> Head<'a> {
        Head { method: &p.method, uri: &p.uri, version: p.version, headers: &p.headers }
    }
}

impl<'a, B> From<&'a Request<B>> for Head<'a> {
    fn from(r: &'a Request<B>) -> Head<'a> {
        Head { method: r.method(), uri: r.uri(), version: r.version(), headers: r.headers() }
    }
}

impl WorkloadLogs {
    /// The request line and the headers some format or filter reads.
    pub fn capture(&self, head: Head<'_>) -> RequestFacts {
        let authority = head
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                head.headers.get(hyper::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
            })
            .unwrap_or_default();
        RequestFacts {
            method: head.method.as_str().to_string(),
            path: head.uri.path_and_query().map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            protocol: protocol(head.version),
            authority,
            headers: captured(&self.request_headers, head.headers),
        }
    }

    /// The response headers some format or filter reads.
    pub fn capture_response(&self, headers: &HeaderMap) -> Vec<(String, String)> {
        captured(&self.response_headers, headers)
    }

    /// Writes `record` to every log on for `side` whose filter takes it.
    pub fn write(&self, side: Side, record: &Record) {
        for (spec, writer) in self.logs.iter().filter(|(spec, _)| logs_side(spec, side)) {
            if let Some(line) = spec.line(record) {
                writer.send(line);
            }
        }
    }
}

/// Whether `spec` logs requests on `side`.
fn logs_side(spec: &LogSpec, side: Side) -> bool {
    match side {
        Side::Client => spec.client,
        Side::Server => spec.server,
    }
}

fn captured(names: &[HeaderName], headers: &HeaderMap) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|n| {
            let v = headers.get(n)?;
            Some((n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        })
        .collect()
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// A file's writer: a thread that drains the queue into the file, flushing when it is empty.
struct Writer {
    queue: mpsc::SyncSender<String>,
    dropped: Counter,
}

impl Writer {
    fn start(path: &str, dropped: Counter) -> Arc<Writer> {
        let (queue, lines) = mpsc::sync_channel::<String>(QUEUE_LINES);
        let path = path.to_string();
        let spawned = std::thread::Builder::new().name("access-log".into()).spawn({
            let dropped = dropped.clone();
            move || write_lines(&path, &lines, &dropped)
        });
        if let Err(e) = spawned {
            tracing::error!("starting an access-log writer: {e}; its lines are dropped");
        }
        Arc::new(Writer { queue, dropped })
    }

    fn send(&self, line: String) {
        if self.queue.try_send(line).is_err() && self.dropped.inc().is_multiple_of(10_000) {
            tracing::warn!(
                "access-log writer behind: lines dropped (nodemesh_access_log_dropped_lines_total)"
            );
        }
    }
}

fn write_lines(path: &str, lines: &mpsc::Receiver<String>, dropped: &Counter) {
    let out: Box<dyn Write> = match path {
        "/dev/stdout" => Box::new(std::io::stdout()),
        "/dev/stderr" => Box::new(std::io::stderr()),
        file => match std::fs::OpenOptions::new().create(true).append(true).open(file) {
            Ok(f) => Box::new(f),
            Err(e) => {
                tracing::error!(path = file, "opening the access log: {e}; its lines are dropped");
                for _ in lines.iter() {
                    dropped.inc();
                }
                return;
            }
        },
    };
    let mut out = std::io::BufWriter::new(out);
    while let Ok(line) = lines.recv() {
        let mut result = out.write_all(line.as_bytes());
        while let Ok(more) = lines.try_recv() {
            result = result.and_then(|()| out.write_all(more.as_bytes()));
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::warn!(path, "writing the access log: {e}");
        }
    }
}

/// Envoy's name for the cluster that delivers into a pod's `port`.
pub fn inbound_cluster(port: u16) -> String {
    format!("inbound|{port}||")
}

/// Envoy's name for the cluster of Service `host` on `port`.
pub fn outbound_cluster(port: u16, host: &str) -> String {
    format!("outbound|{port}||{host}")
}

/// What a connection's requests share in their log lines: addresses and the cluster.
#[derive(Clone, Debug, Default)]
pub struct ConnectionFacts {
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    /// Where requests go when the answer does not say (the pod, at the serving node).
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: String,
}

/// Whose a connection's requests are (the workload and the side it is on): its access logs
/// and tracing are looked up again for every request, so that a Telemetry change applies to
/// open connections too.
pub struct LogSubject {
    pub logs: Arc<AccessLogs>,
    /// The workload's `namespace/name`.
    pub workload: String,
    pub side: Side,
    pub facts: ConnectionFacts,
}

/// A request whose line will be written when its answer ends.
#[derive(Clone)]
pub struct Pending {
    pub logs: Arc<WorkloadLogs>,
    pub side: Side,
    pub start_time: SystemTime,
    pub request: RequestFacts,
}

impl LogSubject {
    /// The workload's logs, if they are on for this side now.
    pub fn logs_now(&self) -> Option<Arc<WorkloadLogs>> {
        self.logs.for_workload(&self.workload, self.side)
    }
}

impl Pending {
    /// A request of the workload that `logs` are for, logged on `side`.
    pub fn start(logs: Arc<WorkloadLogs>, side: Side, head: Head<'_>) -> Pending {
        let request = logs.capture(head);
        Pending { logs, side, start_time: SystemTime::now(), request }
    }
}

/// A TCP connection's line (not proxied as HTTP), written when it ends.
pub struct ConnectionLog {
    logs: Arc<WorkloadLogs>,
    side: Side,
    began: Instant,
    record: Record,
}

impl ConnectionLog {
    /// The line of a connection logged on `side` to `logs`.
    pub fn start(logs: Arc<WorkloadLogs>, side: Side, facts: ConnectionFacts) -> ConnectionLog {
        let record = Record {
            start_time: SystemTime::now(),
            upstream_host: facts.upstream_host,
            upstream_cluster: facts.upstream_cluster,
            downstream_local: facts.downstream_local,
            downstream_remote: facts.downstream_remote,
            ..Record::default()
        };
        ConnectionLog { logs, side, began: Instant::now(), record }
    }

    /// The line of a connection whose requests would go to `subject`, if its logs are on now.
    pub fn of(subject: &LogSubject) -> Option<ConnectionLog> {
        let logs = subject.logs_now()?;
        Some(ConnectionLog::start(logs, subject.side, subject.facts.clone()))
    }

    /// Writes the line: Envoy's `flags` (`-`: none), the upstream reached and whether over
    /// mTLS, and the bytes `from_downstream` and `to_downstream`.
    pub fn finish(
        mut self,
        flags: &'static str,
        upstream: Option<(SocketAddr, bool)>,
        (from_downstream, to_downstream): (u64, u64),
    ) {
        self.record.duration = self.began.elapsed();
        self.record.response_flags = flags;
        if let Some((host, mtls)) = upstream {
            self.record.upstream_host = Some(host);
            self.record.mtls = mtls;
        }
        self.record.bytes_received = from_downstream;
        self.record.bytes_sent = to_downstream;
        self.logs.write(self.side, &self.record);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn workload(uid: &str, logs: Vec<mesh::AccessLog>) -> mesh::Workload {
        mesh::Workload { uid: uid.into(), access_logs: logs, ..Default::default() }
    }

    fn json_log(path: &str, filter: &str, mode: mesh::access_log::Mode) -> mesh::AccessLog {
        mesh::AccessLog {
            provider: "file".into(),
            path: path.into(),
            json: true,
            labels: [("code".to_string(), "%RESPONSE_CODE%".to_string())].into(),
            filter: filter.into(),
            mode: mode as i32,
            ..Default::default()
        }
    }

    fn read_until(path: &std::path::Path, lines: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= lines || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn logs_switch_per_workload_and_side_and_a_bad_one_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("nm-access-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("access.json");
        let path = file.display().to_string();
        let logs = AccessLogs::default();
        assert!(logs.for_workload("shop/web", Side::Client).is_none(), "off by default");

        let server_errors = json_log(&path, "response.code >= 500", mesh::access_log::Mode::Server);
        let compiled = logs.compile(&[workload("shop/web", vec![server_errors])]).unwrap();
        logs.apply(compiled, &[]);
        assert!(logs.for_workload("shop/web", Side::Client).is_none(), "server side only");
        assert!(logs.for_workload("shop/cart", Side::Server).is_none(), "that workload only");
        let web = logs.for_workload("shop/web", Side::Server).expect("on for web's server side");
        for code in [200, 503] {
            let request = Some(RequestFacts { method: "GET".into(), ..RequestFacts::default() });
            web.write(Side::Server, &Record { response_code: code, request, ..Record::default() });
        }
        assert_eq!(read_until(&file, 1), "{\"code\":503}\n", "the filter keeps errors only");

        // A broken filter is refused as a whole, naming the workload; what was on stays on.
        let broken = json_log(&path, "response.cod > 1", mesh::access_log::Mode::ClientAndServer);
        let e = logs.compile(&[workload("shop/web", vec![broken])]).err().unwrap();
        assert!(e.contains("shop/web") && e.contains("response.cod"), "{e}");
        assert!(logs.for_workload("shop/web", Side::Server).is_some());

        // Removed: off, and a request pays only the `any` check again.
        logs.apply(Vec::new(), &["shop/web".to_string()]);
        assert!(logs.for_workload("shop/web", Side::Server).is_none());
        assert!(logs.by_workload.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
