//! A real headless Chromium (Debian's `chromium`, driven by its `chromedriver` over the W3C
//! WebDriver protocol), run inside a test's netns so the pages it loads are the simulated
//! cluster's and nothing it does leaves the machine. The four WebDriver calls a page test needs
//! (new session, navigate, run a script, screenshot) are plain JSON over HTTP/1.1.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use base64::Engine;
use serde_json::{Value, json};

use crate::netns;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Where chromedriver listens inside the netns.
const DRIVER: &str = "127.0.0.1:19515";

/// Chromium's switches for a closed machine: no sandbox (root), no GPU, and none of its
/// background connections to Google's hosts (the netns has no route to them anyway).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1400,1000",
];

pub struct Browser {
    netns: String,
    driver: Child,
    session: String,
    dir: PathBuf,
}

impl Browser {
    /// Starts chromedriver in `netns` and opens a Chromium session (profile under
    /// `work_dir`).
    pub fn start(netns_name: &str, work_dir: &Path) -> anyhow::Result<Browser> {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            anyhow::ensure!(
                Path::new(binary).is_file(),
                "{binary} is not installed (cargo xtask setup installs Debian's chromium and chromium-driver)"
            );
        }
        let dir = work_dir.join("browser");
        std::fs::create_dir_all(dir.join("profile"))?;
        let log = std::fs::File::create(dir.join("chromedriver.log"))?;
        let port = DRIVER.rsplit(':').next().expect("port");
        let args =
            vec![format!("--port={port}"), format!("--log-path={}", dir.join("chromedriver.log").display())];
        let driver = crate::process::spawn_in(
            netns_name,
            None,
            Path::new(CHROMEDRIVER),
            &args,
            &[("HOME", &dir.display().to_string())],
            Stdio::from(log.try_clone()?),
            Stdio::from(log),
        )?;
        let mut browser = Browser { netns: netns_name.to_string(), driver, session: String::new(), dir };
        netns::wait_listening(netns_name, DRIVER.parse()?, Duration::from_secs(20))
            .with_context(|| format!("chromedriver did not start; see {}", browser.log().display()))?;
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", browser.dir.join("profile").display()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let session =
            browser.call("POST", "/session", Some(capabilities)).context("opening a Chromium session")?;
        browser.session = session["sessionId"].as_str().context("WebDriver gave no sessionId")?.to_string();
        Ok(browser)
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("chromedriver.log")
    }

    pub fn navigate(&self, url: &str) -> anyhow::Result<()> {
        self.call("POST", &format!("/session/{}/url", self.session), Some(json!({"url": url})))?;
        Ok(())
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub fn execute(&self, script: &str) -> anyhow::Result<Value> {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Runs `script` until `done` accepts its result; the last result.
    pub fn wait_for(
        &self,
        what: &str,
        script: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.execute(script)?;
            if done(&value) {
                return Ok(value);
            }
            anyhow::ensure!(Instant::now() < deadline, "{what}: still {value} after {timeout:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The visible page as PNG, written to `file`.
    pub fn screenshot(&self, file: &Path) -> anyhow::Result<()> {
        let shot = self.call("GET", &format!("/session/{}/screenshot", self.session), None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().context("screenshot: no image in the answer")?)
            .context("screenshot: not base64")?;
        std::fs::write(file, png).with_context(|| format!("writing {}", file.display()))
    }

    /// One WebDriver command; its `value`, or the error WebDriver reported.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (method, path) = (method.to_string(), path.to_string());
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let addr: SocketAddr = DRIVER.parse()?;
        let answer = netns::run_in(&self.netns, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            read_response(&mut s)
        })?;
        let (head, body) = answer.split_once("\r\n\r\n").context("malformed WebDriver answer")?;
        let value: Value =
            serde_json::from_str(body).with_context(|| format!("WebDriver answer: {head}\n{body}"))?;
        anyhow::ensure!(
            head.split_whitespace().nth(1) == Some("200"),
            "WebDriver {}: {}",
            head.lines().next().unwrap_or(""),
            value["value"]["message"].as_str().unwrap_or(body)
        );
        Ok(value["value"].clone())
    }
}

/// One HTTP/1.1 answer, read to its `Content-Length` (chromedriver keeps the connection open
/// whatever the request says, so reading to the end would wait for its idle timeout).
fn read_response(s: &mut TcpStream) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "WebDriver closed the connection before answering");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .with_context(|| format!("WebDriver answer without Content-Length: {head}"))?;
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "WebDriver closed the connection mid-answer");
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf[..head_end + length]).to_string())
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Ends Chromium; chromedriver itself is ours to kill.
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // A session that failed half-way leaves Chromium running once chromedriver is gone:
        // end the processes started with this browser's own profile directory.
        for pid in started_with(&self.dir.join("profile")) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Processes whose command line names `profile` (`--user-data-dir=<profile>`): this test's
/// Chromium and its helpers, and no one else's (the directory is the test's own).
fn started_with(profile: &Path) -> Vec<i32> {
    let needle = format!("--user-data-dir={}", profile.display());
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
        })
        .collect()
}
