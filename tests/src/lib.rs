//! Simulated Nodemesh nodes on one machine, for tests, the demo and benchmarks.
//!
//! A [`SimNode`] is a *node* network namespace holding a bridge, and *pods*: each a network
//! namespace (veth `eth0` on that bridge) plus a cgroup v2 directory. Processes are started
//! into a pod's cgroup and netns. The node namespace has no link to the host and no route out,
//! so nothing a test sends — even through a capture bug — can leave the machine.
//!
//! Everything is removed when the `SimNode` is dropped, also when a test panics: processes we
//! started (by PID), namespaces, cgroups, the work directory. Leftovers of a run that was killed
//! outright are swept by [`sweep_stale`] (names carry the creating PID).
#![forbid(unsafe_code)]

pub mod browser;
mod cluster;
mod control;
pub mod envoy;
pub mod grpc_xds;
mod held;
pub mod kube_api;
pub mod kube_api_tls;
pub mod kubelet;
pub mod lifecycle;
pub mod link_capture;
pub mod mesh;
pub mod metrics;
pub mod netns;
mod process;
pub mod prometheus;
pub mod reviews;
pub mod service_vip;
pub mod trace_collectors;
pub mod tunnel_client;

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
pub use cluster::SimCluster;
pub use control::ControlPlane;
pub use held::{HeldConnection, ManyConnections};
pub use process::{run_checked, wait_with_timeout};

/// Every name we create starts with this, so sweeping never touches anything else.
pub const NAME_PREFIX: &str = "nmt";
const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Where mesh-control listens for xDS when it runs in a simulated node's netns.
pub const CONTROL_PLANE_URL: &str = "http://127.0.0.1:15010";
const LOCAL_XDS_ADDR: &str = "127.0.0.1:15010";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Points the harness at a directory of built binaries (xtask uses target/release).
pub fn set_bin_dir(dir: PathBuf) {
    let _ = BIN_DIR.set(dir);
}

/// Where the built binaries are: [`set_bin_dir`], `NODEMESH_BIN_DIR`, else the target dir this
/// binary runs from.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = BIN_DIR.get() {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("NODEMESH_BIN_DIR") {
        return dir.into();
    }
    // target/<profile>/deps/test-binary or target/<profile>/xtask
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") { dir.parent().expect("profile dir").to_path_buf() } else { dir.to_path_buf() }
}

pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.is_file() {
        bail!(
            "{} not found; build it first (`cargo xtask test` does: cargo build -p mesh-node -p mesh-control -p nodemesh-tests --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Same lookup as `mesh_node::cgroup2_mount`, kept separate on purpose: xtask depends on this
/// crate and must compile on a fresh machine *before* setup installs the eBPF toolchain that
/// building mesh-node requires.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup v2 filesystem mounted")
}

fn test_cgroup_base() -> anyhow::Result<PathBuf> {
    Ok(cgroup2_mount()?.join("nodemesh-test"))
}

/// Where simulated nodes pin their capture: each node a directory of its own under it.
const TEST_BPF_PIN_BASE: &str = "/sys/fs/bpf/nodemesh-test";

/// Removes namespaces and cgroups left by earlier runs whose process no longer exists.
pub fn sweep_stale() {
    let alive = |name: &str| -> bool {
        // nmt<pid>x<n>...
        let digits: String = name[NAME_PREFIX.len()..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().map(|pid| Path::new(&format!("/proc/{pid}")).exists()).unwrap_or(true)
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(NAME_PREFIX) && !alive(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Ok(entries) = fs::read_dir(TEST_BPF_PIN_BASE) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(NAME_PREFIX) && !alive(&name) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(base) = test_cgroup_base()
        && let Ok(entries) = fs::read_dir(&base)
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(NAME_PREFIX) && !alive(&name) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}

fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // A cgroup can be removed only once its last process has exited; give killed ones a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::remove_dir(path).is_err() && path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh name for a simulated node or cluster (root checked, stale leftovers swept first).
fn new_id() -> anyhow::Result<String> {
    if !nix::unistd::geteuid().is_root() {
        bail!("simulated nodes need root (network namespaces, cgroups, eBPF): run as root");
    }
    sweep_stale();
    Ok(format!("{NAME_PREFIX}{}x{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed)))
}

/// Starts one of our binaries in `netns` (optionally in `cgroup`), its output appended to
/// `<work_dir>/<program>.log`, logging at `log_filter`, with `env` added to its environment.
fn spawn_daemon(
    netns: &str,
    work_dir: &Path,
    program: &str,
    cgroup: Option<&Path>,
    args: &[String],
    log_filter: &str,
    env: &[(String, String)],
) -> anyhow::Result<Child> {
    let (stdout, stderr) = daemon_log(work_dir, program)?;
    let mut vars = vec![("NODEMESH_LOG", log_filter)];
    vars.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    process::spawn_in(netns, cgroup, &bin(program)?, args, &vars, stdout, stderr)
}

/// stdout and stderr of a daemon: appended to `<work_dir>/<program>.log`.
fn daemon_log(work_dir: &Path, program: &str) -> anyhow::Result<(Stdio, Stdio)> {
    let log =
        fs::OpenOptions::new().create(true).append(true).open(work_dir.join(format!("{program}.log")))?;
    Ok((Stdio::from(log.try_clone()?), Stdio::from(log)))
}

/// A pod: network namespace + cgroup + addresses, with Kubernetes-style identity.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip6, port))
    }
}

/// How a pod is registered with mesh-node.
#[derive(Clone, Debug, Default)]
pub struct Registration {
    /// Label the pod's namespace `nodemesh.io/enabled=true`.
    pub namespace_enabled: bool,
    pub pod_labels: Vec<(String, String)>,
    /// The pod's ServiceAccount (mesh-node's default: `default`).
    pub service_account: Option<String>,
}

impl Registration {
    pub fn meshed() -> Registration {
        Registration { namespace_enabled: true, ..Registration::default() }
    }
    pub fn unmeshed_namespace() -> Registration {
        Registration::default()
    }
    /// A meshed pod with these labels.
    pub fn labelled(labels: &[(&str, &str)]) -> Registration {
        Registration {
            namespace_enabled: true,
            pod_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            service_account: None,
        }
    }

    /// The same, running as ServiceAccount `account`.
    pub fn as_account(self, account: &str) -> Registration {
        Registration { service_account: Some(account.to_string()), ..self }
    }

    /// The same pod labels, its namespace no longer labelled for the mesh.
    pub fn namespace_unlabelled(self) -> Registration {
        Registration { namespace_enabled: false, ..self }
    }

    pub fn opted_out() -> Registration {
        Registration {
            namespace_enabled: true,
            pod_labels: vec![("nodemesh.io/enabled".into(), "false".into())],
            service_account: None,
        }
    }
}

struct MeshNodeProcess {
    child: Child,
}

impl MeshNodeProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Node `index` of a simulated cluster (0 for a lone node) owns pod subnets 10.77.<index>.0/24
/// and fd77:0:0:<index>::/64; its bridge is .1 of each, pods get .2 and up.
pub struct SimNode {
    pub id: String,
    pub index: u8,
    /// The node netns; also the node's name (mesh-node `--node-name`, `Node` objects).
    pub node_netns: String,
    pub cgroup_root: PathBuf,
    pub work_dir: PathBuf,
    pods: Vec<Pod>,
    /// Processes started in pods, by PID; killed on drop.
    children: Vec<Child>,
    mesh_node: Option<MeshNodeProcess>,
    /// mesh-node processes a newer one took over from, draining until stopped.
    retired: Vec<MeshNodeProcess>,
    mesh_node_args: Vec<String>,
    /// Environment mesh-node starts with (besides its log filter), kept for restarts.
    mesh_node_env: Vec<(String, String)>,
    control: ControlPlane,
}

impl SimNode {
    /// A lone node (index 0).
    pub fn new() -> anyhow::Result<SimNode> {
        SimNode::create(&new_id()?, 0)
    }

    pub(crate) fn create(id: &str, index: u8) -> anyhow::Result<SimNode> {
        let node_netns = format!("{id}-node");
        let cgroup_root = test_cgroup_base()?.join(id);
        let work_dir = std::env::temp_dir().join(id);
        let control = ControlPlane::new(&node_netns, &work_dir, LOCAL_XDS_ADDR.parse()?);
        let node = SimNode {
            id: id.to_string(),
            index,
            node_netns,
            cgroup_root,
            work_dir,
            pods: Vec::new(),
            children: Vec::new(),
            mesh_node: None,
            retired: Vec::new(),
            mesh_node_args: Vec::new(),
            mesh_node_env: Vec::new(),
            control,
        };
        // From here on, Drop cleans up whatever got created.
        fs::create_dir_all(&node.work_dir)?;
        fs::create_dir_all(node.cgroup_root.join("pods"))?;
        let n = node.node_netns.clone();
        run_checked("ip", &["netns", "add", &n])?;
        run_checked("ip", &["-n", &n, "link", "set", "lo", "up"])?;
        run_checked("ip", &["-n", &n, "link", "add", "br0", "type", "bridge"])?;
        run_checked("ip", &["-n", &n, "addr", "add", &format!("{}/24", node.pod_ip4(1)), "dev", "br0"])?;
        run_checked(
            "ip",
            &["-n", &n, "-6", "addr", "add", &format!("{}/64", node.pod_ip6(1)), "dev", "br0", "nodad"],
        )?;
        run_checked("ip", &["-n", &n, "link", "set", "br0", "up"])?;
        Ok(node)
    }

    /// Host `host` of this node's IPv4 pod subnet (1 is the bridge).
    pub fn pod_ip4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, host)
    }

    /// Host `host` of this node's IPv6 pod subnet (1 is the bridge).
    pub fn pod_ip6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, 0, 0, u16::from(self.index), 0, 0, 0, u16::from(host))
    }

    /// Adds a pod on the node bridge. `namespace` is the Kubernetes-style namespace.
    pub fn add_pod(&mut self, name: &str, namespace: &str) -> anyhow::Result<Pod> {
        let index = self.pods.len() + 2;
        anyhow::ensure!(index < 250, "too many pods on one simulated node");
        let netns = format!("{}-{name}", self.id);
        let pod = Pod {
            name: name.into(),
            namespace: namespace.into(),
            netns: netns.clone(),
            cgroup: self.cgroup_root.join("pods").join(name),
            ip: self.pod_ip4(index as u8),
            ip6: self.pod_ip6(index as u8),
        };
        run_checked("ip", &["netns", "add", &netns])?;
        self.pods.push(pod.clone());
        let node = &self.node_netns;
        let veth = format!("v{index}");
        run_checked("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        run_checked(
            "ip",
            &["-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns],
        )?;
        run_checked("ip", &["-n", node, "link", "set", &veth, "master", "br0", "up"])?;
        run_checked("ip", &["-n", &netns, "addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
        run_checked(
            "ip",
            &["-n", &netns, "-6", "addr", "add", &format!("{}/64", pod.ip6), "dev", "eth0", "nodad"],
        )?;
        run_checked("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
        // The default route points at the node bridge, which leads nowhere else.
        run_checked("ip", &["-n", &netns, "route", "add", "default", "via", &self.pod_ip4(1).to_string()])?;
        run_checked(
            "ip",
            &["-n", &netns, "-6", "route", "add", "default", "via", &self.pod_ip6(1).to_string()],
        )?;
        fs::create_dir_all(&pod.cgroup)?;
        Ok(pod)
    }

    pub fn api_socket(&self) -> PathBuf {
        self.work_dir.join("api.sock")
    }

    /// This node's bpffs directory for pinned capture (mesh-node `--bpf-pin-dir`).
    pub fn bpf_pin_dir(&self) -> PathBuf {
        Path::new(TEST_BPF_PIN_BASE).join(&self.id)
    }

    pub fn mesh_node_log(&self) -> PathBuf {
        self.work_dir.join("mesh-node.log")
    }

    /// Starts mesh-node in the node netns (extra args are kept for restarts) and waits until
    /// it reports ready.
    pub fn start_mesh_node(&mut self, extra_args: &[&str]) -> anyhow::Result<()> {
        self.mesh_node_args = extra_args.iter().map(|s| s.to_string()).collect();
        self.spawn_mesh_node(None)
    }

    /// Starts mesh-node with the same args, optionally inside `cgroup`.
    fn spawn_mesh_node(&mut self, cgroup: Option<&Path>) -> anyhow::Result<()> {
        anyhow::ensure!(self.mesh_node.is_none(), "mesh-node already running");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--node-name".into(),
            self.node_netns.clone(),
            "--cgroup-root".into(),
            self.cgroup_root.display().to_string(),
            "--admin-addr".into(),
            ADMIN_ADDR.into(),
            "--api-socket".into(),
            self.api_socket().display().to_string(),
            "--state-dir".into(),
            self.work_dir.join("state").display().to_string(),
            "--bpf-pin-dir".into(),
            self.bpf_pin_dir().display().to_string(),
        ];
        args.extend(self.mesh_node_args.iter().cloned());
        // mesh_ebpf=debug: the capture programs' aya-log records, forwarded into this log.
        let filter = "info,mesh_node=debug,mesh_ebpf=debug";
        let child = spawn_daemon(
            &self.node_netns,
            &self.work_dir,
            "mesh-node",
            cgroup,
            &args,
            filter,
            &self.mesh_node_env,
        )?;
        self.mesh_node = Some(MeshNodeProcess { child });
        self.wait_ready(Duration::from_secs(30))
    }

    /// Sets an environment variable for mesh-node's next starts (say, `KUBECONFIG`).
    pub fn set_mesh_node_env(&mut self, name: &str, value: &str) {
        self.mesh_node_env.retain(|(k, _)| k != name);
        self.mesh_node_env.push((name.to_string(), value.to_string()));
    }

    /// The extra arguments mesh-node was last started with.
    pub fn mesh_node_args(&self) -> &[String] {
        &self.mesh_node_args
    }

    /// Starts mesh-node inside `cgroup` (to test that its own sockets are never captured).
    pub fn start_mesh_node_in_cgroup(&mut self, cgroup: &Path, extra_args: &[&str]) -> anyhow::Result<()> {
        self.mesh_node_args = extra_args.iter().map(|s| s.to_string()).collect();
        self.spawn_mesh_node(Some(cgroup))
    }

    pub fn mesh_node_pid(&self) -> Option<u32> {
        self.mesh_node.as_ref().map(|m| m.child.id())
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.mesh_node.as_mut()
                && let Some(status) = m.child.try_wait()?
            {
                self.mesh_node = None;
                bail!("mesh-node exited with {status} before ready; log:\n{}", self.log_tail());
            }
            // The pid tells this process's answer from one a predecessor still gives.
            let expected = self.mesh_node.as_ref().map(|m| format!("ready (pid {})", m.pid()));
            if let Ok(body) = self.admin_get("/healthz/ready")
                && Some(body.trim()) == expected.as_deref()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("mesh-node not ready after {timeout:?}; log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.mesh_node_log()).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGKILL: no chance to clean up, like a crash or OOM kill.
    pub fn kill_mesh_node(&mut self) -> anyhow::Result<()> {
        if let Some(mut m) = self.mesh_node.take() {
            m.child.kill()?;
            m.child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop_mesh_node(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut m = self.mesh_node.take().context("mesh-node not running")?;
        sigterm(m.pid())?;
        wait_with_timeout(&mut m.child, Duration::from_secs(10))
    }

    /// SIGTERM without waiting: mesh-node starts draining.
    pub fn sigterm_mesh_node(&self) -> anyhow::Result<()> {
        sigterm(self.mesh_node_pid().context("mesh-node not running")?)
    }

    pub fn restart_mesh_node(&mut self) -> anyhow::Result<()> {
        self.spawn_mesh_node(None)
    }

    /// An upgrade: starts a new mesh-node (same arguments) while the running one serves; it
    /// takes the running one's listeners and capture over. Returns once the new one is ready;
    /// the old one drains until [`SimNode::stop_retired`].
    pub fn upgrade_mesh_node(&mut self) -> anyhow::Result<()> {
        let old = self.mesh_node.take().context("mesh-node not running")?;
        self.retired.push(old);
        self.spawn_mesh_node(None)
    }

    /// SIGTERM to every mesh-node a newer one took over from; waits (up to `timeout` each) for
    /// them to exit and returns their statuses.
    pub fn stop_retired(&mut self, timeout: Duration) -> anyhow::Result<Vec<std::process::ExitStatus>> {
        let mut statuses = Vec::new();
        for mut m in std::mem::take(&mut self.retired) {
            sigterm(m.pid())?;
            statuses.push(wait_with_timeout(&mut m.child, timeout)?);
        }
        Ok(statuses)
    }

    /// Registers a pod with mesh-node through its CLI and local API.
    pub fn register(&self, pod: &Pod, how: &Registration) -> anyhow::Result<serde_json::Value> {
        let mut extra = vec!["--ip".to_string(), pod.ip.to_string(), "--ip".into(), pod.ip6.to_string()];
        if how.namespace_enabled {
            extra.extend(["--namespace-label".into(), "nodemesh.io/enabled=true".into()]);
        }
        for (k, v) in &how.pod_labels {
            extra.extend(["--label".into(), format!("{k}={v}")]);
        }
        if let Some(account) = &how.service_account {
            extra.extend(["--service-account".into(), account.clone()]);
        }
        let out = self.workload_add(&pod.name, &pod.namespace, &pod.cgroup, &pod.netns_path(), &extra)?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `mesh-node workload add` with any cgroup/netns (also invalid ones); returns its stdout.
    pub fn workload_add(
        &self,
        name: &str,
        namespace: &str,
        cgroup: &Path,
        netns: &Path,
        extra: &[String],
    ) -> anyhow::Result<String> {
        let socket = self.api_socket().display().to_string();
        let (cgroup, netns) = (cgroup.display().to_string(), netns.display().to_string());
        let mut args = vec![
            "workload",
            "--api-socket",
            &socket,
            "add",
            "--name",
            name,
            "--namespace",
            namespace,
            "--cgroup",
            &cgroup,
            "--netns",
            &netns,
        ];
        args.extend(extra.iter().map(String::as_str));
        self.mesh_node_cli(&args)
    }

    /// Runs the mesh-node CLI; errors carry its stderr.
    pub fn mesh_node_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin("mesh-node")?).args(args).output()?;
        if !out.status.success() {
            bail!("mesh-node {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Starts a long-running process in a pod (cgroup first, then netns, then exec).
    pub fn spawn_in(&mut self, pod: &Pod, program: &Path, args: &[String]) -> anyhow::Result<u32> {
        let child = process::spawn_in(
            &pod.netns,
            Some(&pod.cgroup),
            program,
            args,
            &[],
            Stdio::null(),
            Stdio::inherit(),
        )?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Starts a program in the node netns (not in a pod; e.g. a reference proxy), output to
    /// `<work_dir>/<log_name>.log`; killed on drop like pod processes.
    pub fn spawn_in_node(&mut self, program: &Path, args: &[String], log_name: &str) -> anyhow::Result<u32> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work_dir.join(format!("{log_name}.log")))?;
        let child = process::spawn_in(
            &self.node_netns,
            None,
            program,
            args,
            &[],
            Stdio::from(log.try_clone()?),
            Stdio::from(log),
        )?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Kills a process this node started with [`SimNode::spawn_in`] or [`SimNode::serve`].
    pub fn kill_process(&mut self, pid: u32) -> anyhow::Result<()> {
        let i =
            self.children.iter().position(|c| c.id() == pid).context("not a process this node started")?;
        let mut child = self.children.remove(i);
        let killed = child.kill();
        child.wait()?;
        Ok(killed?)
    }

    /// Runs a process in a pod to completion and returns its stdout.
    pub fn run_in(
        &self,
        pod: &Pod,
        program: &Path,
        args: &[String],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        self.start_in(pod, program, args)?.finish(timeout)
    }

    /// Starts a process in a pod that runs while the test goes on (say, load during an
    /// upgrade); [`Background::finish`] collects its stdout.
    pub fn start_in(&self, pod: &Pod, program: &Path, args: &[String]) -> anyhow::Result<Background> {
        let child = process::spawn_in(
            &pod.netns,
            Some(&pod.cgroup),
            program,
            args,
            &[],
            Stdio::piped(),
            Stdio::inherit(),
        )?;
        Ok(Background {
            child: Some(child),
            what: format!("{} {args:?} in pod {}", program.display(), pod.name),
        })
    }

    /// Runs a process in the node netns (outside every pod) to completion, with `env` added,
    /// and returns its stdout.
    pub fn run_in_node(
        &self,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let child =
            process::spawn_in(&self.node_netns, None, program, args, env, Stdio::piped(), Stdio::inherit())?;
        run_to_end(child, timeout)
            .with_context(|| format!("{} {args:?} in the node netns", program.display()))
    }

    /// Runs nm-testapp in a pod and parses its JSON result.
    pub fn testapp(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = self.run_in(pod, &bin("nm-testapp")?, &args, Duration::from_secs(120))?;
        serde_json::from_str(out.trim()).with_context(|| format!("nm-testapp output: {out}"))
    }

    /// Starts an nm-testapp server in `pod` listening on each address, and waits until each
    /// accepts connections.
    /// Returns the server's PID.
    pub fn serve(&mut self, pod: &Pod, listen: &[SocketAddr]) -> anyhow::Result<u32> {
        self.serve_as(pod, "serve", listen)
    }

    /// [`SimNode::serve`] for nm-testapp's HTTP server (HTTP/1.x and h2c on each address).
    pub fn serve_http(&mut self, pod: &Pod, listen: &[SocketAddr]) -> anyhow::Result<u32> {
        self.serve_as(pod, "http-serve", listen)
    }

    /// An HTTP server that answers every request (but `/stats`) with `status`.
    pub fn serve_http_failing(
        &mut self,
        pod: &Pod,
        listen: &[SocketAddr],
        status: u16,
    ) -> anyhow::Result<u32> {
        let mode = format!("http-serve --status {status}");
        self.serve_as(pod, &mode, listen)
    }

    /// [`SimNode::serve`] for nm-testapp's gRPC server (the standard health service).
    pub fn serve_grpc(&mut self, pod: &Pod, listen: &[SocketAddr]) -> anyhow::Result<u32> {
        self.serve_as(pod, "grpc-serve", listen)
    }

    fn serve_as(&mut self, pod: &Pod, mode: &str, listen: &[SocketAddr]) -> anyhow::Result<u32> {
        let mut args: Vec<String> = mode.split(' ').map(String::from).collect();
        args.extend(["--name".into(), pod.name.clone()]);
        for a in listen {
            args.extend(["--listen".into(), a.to_string()]);
        }
        let pid = self.spawn_in(pod, &bin("nm-testapp")?, &args)?;
        for addr in listen {
            netns::wait_listening(&pod.netns, *addr, Duration::from_secs(10))?;
        }
        Ok(pid)
    }

    /// A node with mesh-control on `<work_dir>/config` holding `files` (name, YAML) and
    /// mesh-node connected to it; returns the node and that config directory.
    pub fn with_control_plane(files: &[(&str, &str)]) -> anyhow::Result<(SimNode, PathBuf)> {
        let mut node = SimNode::new()?;
        let config = node.work_dir.join("config");
        fs::create_dir_all(&config)?;
        for (name, yaml) in files {
            fs::write(config.join(name), yaml)?;
        }
        node.start_control_plane(&config)?;
        let token = node.write_own_node_token()?;
        node.start_mesh_node(&["--control-plane", CONTROL_PLANE_URL, "--token-file", &token])?;
        Ok((node, config))
    }

    /// [`SimNode::write_node_token`] with the node's own control plane.
    pub fn write_own_node_token(&self) -> anyhow::Result<String> {
        self.write_node_token(&self.control)
    }

    /// Mints this node's bootstrap token with `control`'s CA and writes it to a file in the
    /// node's work dir; returns the path (for mesh-node `--token-file`).
    pub fn write_node_token(&self, control: &ControlPlane) -> anyhow::Result<String> {
        let path = self.work_dir.join("node-token");
        fs::write(&path, control.node_token(&self.node_netns)?)?;
        Ok(path.display().to_string())
    }

    /// Starts mesh-control in the node netns on `config_dir` (xDS at [`CONTROL_PLANE_URL`]) and
    /// waits until its admin endpoint answers.
    pub fn start_control_plane(&mut self, config_dir: &Path) -> anyhow::Result<()> {
        self.control.start(config_dir, &[])
    }

    /// The node-local mesh-control of [`SimNode::start_control_plane`].
    pub fn control_plane(&mut self) -> &mut ControlPlane {
        &mut self.control
    }

    /// SIGKILL mesh-control (a crash).
    pub fn kill_control_plane(&mut self) -> anyhow::Result<()> {
        self.control.kill()
    }

    pub fn control_log(&self) -> String {
        self.control.log()
    }

    /// Waits until mesh-node applies every change made to mesh-control's directory so far.
    pub fn wait_for_config(&self) -> anyhow::Result<String> {
        self.control.wait_for_config()
    }

    /// GET on mesh-control's admin endpoint (inside the node netns).
    pub fn control_get(&self, path: &str) -> anyhow::Result<String> {
        self.control.get(path)
    }

    /// `mesh-control status` output, run inside the node netns.
    pub fn control_status(&self) -> anyhow::Result<String> {
        self.control.status()
    }

    /// Runs `change`, then returns once every connected node applies config that includes it
    /// ([`ControlPlane::apply_and_wait`]).
    pub fn apply_and_wait(&self, change: impl FnOnce()) -> anyhow::Result<String> {
        self.control.apply_and_wait(change)
    }

    /// What mesh-control refused (`/debug/config` → `rejected`): one line per object, naming
    /// file, object, field and reason.
    pub fn control_rejections(&self) -> anyhow::Result<Vec<String>> {
        let config: serde_json::Value = serde_json::from_str(&self.control.get("/debug/config")?)?;
        let rejected = config["rejected"].as_array().context("/debug/config has no `rejected`")?;
        Ok(rejected.iter().filter_map(|r| r.as_str().map(str::to_string)).collect())
    }

    /// mesh-node's `/config_dump` as JSON.
    pub fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.admin_get("/config_dump")?)?)
    }

    /// GET on mesh-node's admin endpoint (inside the node netns).
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        netns::http_get(&self.node_netns, ADMIN_ADDR.parse()?, path)
    }

    pub fn metrics(&self) -> anyhow::Result<metrics::Metrics> {
        Ok(metrics::Metrics::parse(&self.admin_get("/metrics")?))
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        for mut m in self.mesh_node.take().into_iter().chain(std::mem::take(&mut self.retired)) {
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
        // Killed, mesh-node leaves capture pinned: unpinning detaches it.
        let _ = fs::remove_dir_all(self.bpf_pin_dir());
        let _ = fs::remove_dir(TEST_BPF_PIN_BASE);
        let _ = self.control.kill();
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &pod.netns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.node_netns]).status();
        remove_cgroup_tree(&self.cgroup_root);
        // The shared parent goes too once the last simulated node is gone (fails while others live).
        if let Some(base) = self.cgroup_root.parent() {
            let _ = fs::remove_dir(base);
        }
        if std::env::var_os("NODEMESH_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.work_dir);
        }
    }
}

fn sigterm(pid: u32) -> anyhow::Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    Ok(nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?)
}

/// A process of [`SimNode::start_in`]; killed if dropped before [`Background::finish`].
pub struct Background {
    child: Option<Child>,
    what: String,
}

impl Background {
    /// Waits for it to end (up to `timeout`) and returns its stdout.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<String> {
        let child = self.child.take().context("already finished")?;
        run_to_end(child, timeout).with_context(|| self.what.clone())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` (stdout piped) and returns its stdout; an error, with that stdout, if it
/// fails or runs past `timeout`.
fn run_to_end(mut child: std::process::Child, timeout: Duration) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout));
    let status = wait_with_timeout(&mut child, timeout)?;
    let out = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    anyhow::ensure!(status.success(), "exited with {status}; stdout: {out}");
    Ok(out)
}
