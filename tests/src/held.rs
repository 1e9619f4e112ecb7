//! Clients that keep connections open while the test drives them: `nm-testapp client --mode
//! hold` (one connection, line by line) and `nm-testapp many-connect` (thousands at once) —
//! to check that established connections outlive an event, or are all open at the same time.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Stdio},
    sync::mpsc::{Receiver, channel},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{Pod, bin, process};

/// The client gives up on a silent socket after 30 s; wait a little longer than that for its
/// verdict.
const REPLY_TIMEOUT: Duration = Duration::from_secs(40);

/// `nm-testapp` in a pod with its stdin held by the test and its stdout read line by line
/// (one JSON document per line).
struct PipedClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl PipedClient {
    fn spawn(pod: &Pod, args: &[&str]) -> anyhow::Result<PipedClient> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut child = process::command_in(&pod.netns, Some(&pod.cgroup), &bin("nm-testapp")?, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting nm-testapp {args:?} in pod {}", pod.name))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(PipedClient { stdin: child.stdin.take(), child, lines })
    }

    fn next_reply(&self, timeout: Duration) -> anyhow::Result<Value> {
        let line = self.lines.recv_timeout(timeout).context("no reply from the client in the pod")?;
        serde_json::from_str(&line).with_context(|| format!("client said {line:?}"))
    }
}

impl Drop for PipedClient {
    fn drop(&mut self) {
        // Our own child, by its handle: killing an exited child is harmless.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct HeldConnection {
    client: PipedClient,
    /// The client's own address on this connection.
    pub local: String,
    /// Where the client's socket thinks it is connected (the original destination).
    pub peername: String,
}

impl HeldConnection {
    /// Connects from `pod` to `to` and waits until the connection is up.
    pub fn open(pod: &Pod, to: &str) -> anyhow::Result<HeldConnection> {
        let client = PipedClient::spawn(pod, &["client", "--mode", "hold", "--to", to])?;
        let first = client.next_reply(REPLY_TIMEOUT)?;
        let connected = first.get("connected").with_context(|| format!("connecting to {to}: {first}"))?;
        Ok(HeldConnection {
            local: connected["local"].as_str().unwrap_or_default().to_string(),
            peername: connected["peername"].as_str().unwrap_or_default().to_string(),
            client,
        })
    }

    /// Sends `text` over the connection and checks it comes back unchanged.
    pub fn round_trip(&mut self, text: &str) -> anyhow::Result<()> {
        let stdin = self.client.stdin.as_mut().context("connection already closed")?;
        writeln!(stdin, "{text}")?;
        stdin.flush()?;
        let reply = self.client.next_reply(REPLY_TIMEOUT)?;
        if reply["echoed"] != text {
            bail!("round trip {text:?} on {} failed: {reply}", self.local);
        }
        Ok(())
    }

    /// Closes the client's side and checks the connection ends cleanly; returns the rounds done.
    pub fn close(mut self) -> anyhow::Result<u64> {
        drop(self.client.stdin.take());
        let reply = self.client.next_reply(REPLY_TIMEOUT)?;
        if reply["closed"] != true {
            bail!("closing {} failed: {reply}", self.local);
        }
        Ok(reply["rounds"].as_u64().unwrap_or_default())
    }
}

/// `nm-testapp many-connect`: many connections from one pod, held open together.
pub struct ManyConnections {
    client: PipedClient,
}

impl ManyConnections {
    /// Starts opening `count` connections from `pod` to `to` (a PING/PONG `many-serve`).
    pub fn start(pod: &Pod, to: &str, count: usize) -> anyhow::Result<ManyConnections> {
        let count = count.to_string();
        let client = PipedClient::spawn(pod, &["many-connect", "--to", to, "--connections", &count])?;
        Ok(ManyConnections { client })
    }

    /// Waits until every connection has been tried: `{"open": n, "errors": {error: count}}`;
    /// the open ones stay open.
    pub fn opened(&self, timeout: Duration) -> anyhow::Result<Value> {
        self.client.next_reply(timeout)
    }

    /// Closes them all.
    pub fn close(mut self) -> anyhow::Result<Value> {
        drop(self.client.stdin.take());
        self.client.next_reply(REPLY_TIMEOUT)
    }
}
