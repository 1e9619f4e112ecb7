//! mesh-control as a test process: started in a given network namespace on a config directory,
//! killed like a crash, read through its admin endpoint and `mesh-control status`.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{bin, daemon_log, kube_api::FakeApiServer, netns, process, spawn_daemon};

/// mesh-control's admin endpoint, on loopback inside its netns (its default).
const ADMIN_ADDR: &str = "127.0.0.1:15014";
/// mesh-control's TLS port (xDS, reports and CSRs over TLS).
const TLS_PORT: u16 = 15012;

pub struct ControlPlane {
    netns: String,
    work_dir: PathBuf,
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    child: Option<Child>,
    /// The directory it watches, once started.
    config_dir: Option<PathBuf>,
    /// Barriers written so far (see [`ControlPlane::apply_and_wait`]).
    barriers: std::sync::atomic::AtomicU64,
}

impl ControlPlane {
    /// A control plane that will run in `netns`, serving xDS on `xds_addr`, logging to
    /// `<work_dir>/mesh-control.log`.
    pub fn new(netns: &str, work_dir: &Path, xds_addr: SocketAddr) -> ControlPlane {
        ControlPlane {
            netns: netns.into(),
            work_dir: work_dir.into(),
            xds_addr,
            admin_addr: ADMIN_ADDR.parse().expect("admin address"),
            child: None,
            config_dir: None,
            barriers: Default::default(),
        }
    }

    /// One of several replicas in one netns: each needs its own admin port.
    pub fn with_admin_addr(mut self, admin_addr: SocketAddr) -> ControlPlane {
        self.admin_addr = admin_addr;
        self
    }

    /// The CA directory of this control plane (created on its first start).
    /// Where its admin endpoint (and `/metrics`) listens, in its netns.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn ca_dir(&self) -> std::path::PathBuf {
        self.work_dir.join("ca")
    }

    /// The bootstrap token of `node`, from `mesh-control node-token`.
    pub fn node_token(&self, node: &str) -> anyhow::Result<String> {
        let ca_dir = self.ca_dir().display().to_string();
        Ok(self.cli(&["node-token", node, "--ca-dir", &ca_dir])?.trim().to_string())
    }

    /// Plaintext xDS (what test clients in the fabric dial).
    pub fn plaintext_url(&self) -> String {
        format!("http://{}", self.xds_addr)
    }

    /// The TLS port, on the xDS address's IP: what nodes pass as `--control-plane`.
    pub fn tls_url(&self) -> String {
        format!("https://{}", self.tls_addr())
    }

    fn tls_addr(&self) -> SocketAddr {
        SocketAddr::new(self.xds_addr.ip(), TLS_PORT)
    }

    /// The roots the TLS port's certificate chains to (nodes' `--control-plane-root`).
    pub fn root_file(&self) -> PathBuf {
        self.ca_dir().join("root-cert.pem")
    }

    /// Starts mesh-control on `config_dir` (plus `extra_args`) and waits until it answers.
    pub fn start(&mut self, config_dir: &Path, extra_args: &[&str]) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "mesh-control already running");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--config-dir".into(),
            config_dir.display().to_string(),
            "--xds-addr".into(),
            self.xds_addr.to_string(),
            // Every test control plane runs the workload CA (a fresh root in its work dir).
            "--ca-dir".into(),
            self.ca_dir().display().to_string(),
            "--tls-addr".into(),
            self.tls_addr().to_string(),
        ];
        args.extend(extra_args.iter().map(ToString::to_string));
        self.config_dir = Some(config_dir.to_path_buf());
        self.start_with(&args, &[])
    }

    /// Starts `mesh-control <args>` with `env` as given (no config dir, CA or ports of its own:
    /// a replica reading Kubernetes, say) and waits until it is ready.
    pub fn start_with(&mut self, args: &[String], env: &[(String, String)]) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "mesh-control already running");
        let child = spawn_daemon(
            &self.netns,
            &self.work_dir,
            "mesh-control",
            None,
            args,
            "info,mesh_control=debug",
            env,
        )?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Starts `mesh-control <args>` as the Deployment's container runs it: in-cluster config
    /// only (the ServiceAccount volume with `token` of ServiceAccount `namespace/…` and the
    /// cluster CA of `api`, KUBERNETES_SERVICE_HOST/PORT pointing at it, no kubeconfig), then
    /// waits until it is ready.
    pub fn start_as_pod(
        &mut self,
        args: &[String],
        api: &FakeApiServer,
        namespace: &str,
        token: &str,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "mesh-control already running");
        let volume = self.work_dir.join("serviceaccount");
        api.write_service_account_volume(&volume, namespace, token)?;
        let (stdout, stderr) = daemon_log(&self.work_dir, "mesh-control")?;
        let child = process::command_as_pod(&self.netns, &volume, &bin("mesh-control")?, args)
            .env("NODEMESH_LOG", "info,mesh_control=debug")
            .env("KUBERNETES_SERVICE_HOST", api.addr.ip().to_string())
            .env("KUBERNETES_SERVICE_PORT", api.addr.port().to_string())
            // No ~/.kube/config or KUBECONFIG to fall back on: in-cluster config or nothing.
            .env("HOME", &self.work_dir)
            .env_remove("KUBECONFIG")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .context("starting mesh-control as a pod")?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Until the admin endpoint says ready; fails at once if the process exits.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.get("/healthz/ready").is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("mesh-control exited ({status}); log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("mesh-control not ready; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.work_dir.join("mesh-control.log")).unwrap_or_default()
    }

    /// GET on the admin endpoint.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        netns::http_get(&self.netns, self.admin_addr, path)
    }

    /// `mesh-control status` output, run inside the control plane's netns.
    pub fn status(&self) -> anyhow::Result<String> {
        self.cli(&["status"])
    }

    /// `mesh-control status --json`.
    pub fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli(&["status", "--json"])?)?)
    }

    /// Runs `change` (to files in the watched directory), then waits until every connected node
    /// applies config that includes it. "The next generation" would not do: an unrelated change
    /// (a node reporting a workload) can take that number first. So after `change` a barrier —
    /// a Namespace with a fresh name, in a file of its own — is written; once mesh-control's
    /// model holds it, the directory was read after `change`, and that generation is awaited.
    pub fn apply_and_wait(&self, change: impl FnOnce()) -> anyhow::Result<String> {
        change();
        self.wait_for_config()
    }

    /// Waits until every connected node applies config that includes every change made to the
    /// watched directory so far (see [`ControlPlane::apply_and_wait`]).
    pub fn wait_for_config(&self) -> anyhow::Result<String> {
        let dir = self.config_dir.as_ref().context("mesh-control is not running")?;
        let n = self.barriers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let barrier = format!("nm-barrier-{n}");
        fs::write(
            dir.join("zz-nm-barrier.yaml"),
            format!(
                "# Written by the test harness to learn when mesh-control has read this directory.\n\
                 apiVersion: v1\nkind: Namespace\nmetadata: {{name: {barrier}}}\n"
            ),
        )?;
        let wanted = serde_json::Value::String(format!("Namespace {barrier}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let generation = loop {
            let config: serde_json::Value = serde_json::from_str(&self.get("/debug/config")?)?;
            if config["objects"].as_array().is_some_and(|o| o.contains(&wanted)) {
                break config["store_generation"].as_u64().context("no store_generation")?;
            }
            if Instant::now() > deadline {
                bail!("mesh-control never read the barrier {barrier}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.wait_applied(generation)
    }

    /// `mesh-control wait`: until every connected node has applied `generation`.
    pub fn wait_applied(&self, generation: u64) -> anyhow::Result<String> {
        self.cli(&["wait", "--generation", &generation.to_string(), "--timeout-secs", "30"])
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns::path(&self.netns).display()))
            .arg(bin("mesh-control")?)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mesh-control {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
