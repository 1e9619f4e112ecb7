//! A connection held open by `nm-testapp client --mode hold` in a pod, driven from the test:
//! to check that an established connection outlives an event, not just that new ones work.

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

pub struct HeldConnection {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// The client's own address on this connection.
    pub local: String,
    /// Where the client's socket thinks it is connected (the original destination).
    pub peername: String,
}

impl HeldConnection {
    /// Connects from `pod` to `to` and waits until the connection is up.
    pub fn open(pod: &Pod, to: &str) -> anyhow::Result<HeldConnection> {
        let args: Vec<String> =
            ["client", "--mode", "hold", "--to", to].iter().map(|s| s.to_string()).collect();
        let mut child = process::command_in(&pod.netns, Some(&pod.cgroup), &bin("nm-testapp")?, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting a held connection in pod {}", pod.name))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut held = HeldConnection {
            stdin: child.stdin.take(),
            child,
            lines,
            local: String::new(),
            peername: String::new(),
        };
        let first = held.next_reply()?;
        let connected = first.get("connected").with_context(|| format!("connecting to {to}: {first}"))?;
        held.local = connected["local"].as_str().unwrap_or_default().to_string();
        held.peername = connected["peername"].as_str().unwrap_or_default().to_string();
        Ok(held)
    }

    fn next_reply(&self) -> anyhow::Result<Value> {
        let line =
            self.lines.recv_timeout(REPLY_TIMEOUT).context("no reply from the held connection's client")?;
        serde_json::from_str(&line).with_context(|| format!("client said {line:?}"))
    }

    /// Sends `text` over the connection and checks it comes back unchanged.
    pub fn round_trip(&mut self, text: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("connection already closed")?;
        writeln!(stdin, "{text}")?;
        stdin.flush()?;
        let reply = self.next_reply()?;
        if reply["echoed"] != text {
            bail!("round trip {text:?} on {} failed: {reply}", self.local);
        }
        Ok(())
    }

    /// Closes the client's side and checks the connection ends cleanly; returns the rounds done.
    pub fn close(mut self) -> anyhow::Result<u64> {
        drop(self.stdin.take());
        let reply = self.next_reply()?;
        if reply["closed"] != true {
            bail!("closing {} failed: {reply}", self.local);
        }
        Ok(reply["rounds"].as_u64().unwrap_or_default())
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        // Our own child, by its handle: killing an exited child is harmless.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
