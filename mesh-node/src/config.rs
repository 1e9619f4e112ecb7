//! Command line and environment: parsed in one place, every error reported at once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::control_plane::ControlPlane;

pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_API_SOCKET: &str = "/run/nodemesh/mesh-node.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nodemesh";
/// `SO_MARK` on the proxy's own sockets; the capture programs never redirect marked sockets.
pub const DEFAULT_PROXY_MARK: u32 = 0x4e4d;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Where capture's programs, links and maps are pinned, so they outlive the process.
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/nodemesh";
/// Below the DaemonSet's terminationGracePeriodSeconds (30), so a drain ends on its own terms
/// before the kubelet's SIGKILL.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 25;
/// Exit status for bad configuration (sysexits EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Parser, Debug)]
#[command(name = "mesh-node", version, about = "Nodemesh node proxy")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start; the size of the largest variant costs nothing"
)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node proxy: load and attach capture, serve workloads, admin and local API.
    Run(RunArgs),
    /// Check this host for what capture needs (kernel, BTF, cgroup v2, bpffs, capabilities,
    /// program types, policy routing) and for programs already on the capture hooks (a CNI's
    /// socket load balancer); prints a fix per item. Exit 1 if anything blocks or conflicts.
    Precheck {
        /// The cgroup v2 directory capture would attach to. Default: the cgroup v2 mount.
        #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
        cgroup_root: Option<PathBuf>,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Take Nodemesh's capture off this node for good (after removing the DaemonSet): unpins
    /// the programs and maps a mesh-node left under --bpf-pin-dir, so meshed pods connect
    /// directly again, fail-closed ones too.
    Uninstall {
        #[arg(long, env = "NODEMESH_BPF_PIN_DIR", default_value = DEFAULT_BPF_PIN_DIR)]
        bpf_pin_dir: PathBuf,
    },
    /// Add, remove or list workloads through a running mesh-node's local API.
    Workload {
        #[arg(long, env = "NODEMESH_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
        api_socket: PathBuf,
        #[command(subcommand)]
        action: WorkloadAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum WorkloadAction {
    /// Register (or replace) a workload; prints its status as JSON.
    Add(WorkloadAddArgs),
    /// Remove a workload by `namespace/name`.
    Remove { key: String },
    /// List workloads as JSON.
    List,
}

#[derive(Args, Debug)]
pub struct WorkloadAddArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub namespace: String,
    #[arg(long, default_value = "default")]
    pub service_account: String,
    #[arg(long)]
    pub cgroup: PathBuf,
    #[arg(long)]
    pub netns: PathBuf,
    #[arg(long = "ip")]
    pub ips: Vec<std::net::IpAddr>,
    /// Pod label, `key=value`; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Label of the workload's namespace, `key=value`; repeatable.
    #[arg(long = "namespace-label", value_parser = parse_label)]
    pub namespace_labels: Vec<(String, String)>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// This node's name, as telemetry and (later) the control plane know it.
    #[arg(long, env = "NODEMESH_NODE_NAME")]
    pub node_name: Option<String>,
    /// cgroup v2 directory the capture programs attach to; every meshed workload's cgroup must
    /// be inside it. Default: the cgroup v2 mount.
    #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    #[arg(long, env = "NODEMESH_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Also serve `/metrics` (and `/healthz/ready`) here, for Prometheus to scrape from off
    /// the node (the DaemonSet: `0.0.0.0:15020`); the admin endpoint's config dump stays on
    /// loopback. Unset: metrics on the admin endpoint only.
    #[arg(long, env = "NODEMESH_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[arg(long, env = "NODEMESH_API_SOCKET", default_value = DEFAULT_API_SOCKET)]
    pub api_socket: PathBuf,
    /// Where registered workloads are remembered across restarts, and where a new mesh-node
    /// finds the running one to take over from (`handover.sock`).
    #[arg(long, env = "NODEMESH_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// bpffs directory where capture stays pinned across restarts and upgrades; one per
    /// node (per --cgroup-root).
    #[arg(long, env = "NODEMESH_BPF_PIN_DIR", default_value = DEFAULT_BPF_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// How long a draining mesh-node (SIGTERM, or taken over by a new one) keeps connections
    /// that are still open before it closes them.
    #[arg(long, env = "NODEMESH_DRAIN_TIMEOUT_SECS", default_value_t = DEFAULT_DRAIN_TIMEOUT_SECS)]
    pub drain_timeout_secs: u64,
    /// Destination port never captured; repeatable or comma-separated.
    #[arg(long = "exclude-port", env = "NODEMESH_EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<String>,
    /// Destination CIDR never captured; repeatable or comma-separated.
    #[arg(long = "exclude-cidr", env = "NODEMESH_EXCLUDE_CIDRS", value_delimiter = ',')]
    pub exclude_cidrs: Vec<String>,
    /// SO_MARK put on the proxy's own sockets (decimal or 0x hex).
    #[arg(long, env = "NODEMESH_PROXY_MARK", default_value_t = format!("{DEFAULT_PROXY_MARK:#x}"))]
    pub proxy_mark: String,
    #[arg(long, env = "NODEMESH_CONNECT_TIMEOUT_MS", default_value_t = DEFAULT_CONNECT_TIMEOUT_MS)]
    pub connect_timeout_ms: u64,
    /// mesh-control: its TLS port, e.g. `https://10.0.0.5:15012` (with --control-plane-root),
    /// or plaintext xDS on loopback, `http://127.0.0.1:15010`. Without it the node proxies
    /// every connection to where it was dialled (no services, no load balancing).
    #[arg(long, env = "NODEMESH_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// For an https:// control plane: the PEM roots its certificate must chain to
    /// (mesh-control's `<ca-dir>/root-cert.pem`; on Kubernetes, Istio's root-cert.pem mount).
    #[arg(long, env = "NODEMESH_CONTROL_PLANE_ROOT", requires = "control_plane")]
    pub control_plane_root: Option<PathBuf>,
    /// The name the control plane's certificate must carry, if not the URL's host.
    #[arg(long, env = "NODEMESH_CONTROL_PLANE_NAME", requires = "control_plane")]
    pub control_plane_name: Option<String>,
    /// A cluster with more endpoints than this is rejected (NACKed), protecting node memory.
    #[arg(long, env = "NODEMESH_MAX_ENDPOINTS_PER_CLUSTER", default_value_t = 100_000)]
    pub max_endpoints_per_cluster: usize,
    /// How long the first connect to an IP the node knows nothing about waits for the control
    /// plane to say what it is.
    #[arg(long, env = "NODEMESH_LOOKUP_TIMEOUT_MS", default_value_t = 2_000)]
    pub lookup_timeout_ms: u64,
    /// How long a connection to a Service port may stay silent before it is taken to speak a
    /// server-first protocol and is relayed as TCP; 0 turns protocol detection off (all L4).
    /// Ports declared tcp, tls, mysql, … are never sniffed.
    #[arg(long, env = "NODEMESH_SNIFF_TIMEOUT_MS", default_value_t = 100)]
    pub sniff_timeout_ms: u64,
    /// This node's bootstrap token (`mesh-control node-token <node>`): with it, the node
    /// obtains certificates for its workloads' identities from mesh-control's CA.
    #[arg(long, env = "NODEMESH_TOKEN_FILE", requires = "control_plane")]
    pub token_file: Option<PathBuf>,
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The cluster this node belongs to, as metrics name it (`source_cluster`,
    /// `destination_cluster`); Istio's default cluster name.
    #[arg(long, env = "NODEMESH_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Where the HBONE tunnel listens (with `--token-file`: the node has workload identities).
    #[arg(long, env = "NODEMESH_TUNNEL_LISTEN", default_value = "[::]:15008")]
    pub tunnel_listen: SocketAddr,
    /// The address other nodes reach this node at; its tunnel is advertised as
    /// `<node-ip>:<tunnel port>`. Without it, meshed pods elsewhere reach this node's pods in
    /// plaintext. Kubernetes: the pod's `status.hostIP`.
    #[arg(long, env = "NODEMESH_NODE_IP")]
    pub node_ip: Option<std::net::IpAddr>,
    /// SO_MARK on sockets that deliver inbound connections into pods (decimal or 0x hex);
    /// pods route answers to marked sockets back to mesh-node. Must differ from the proxy mark.
    #[arg(long, env = "NODEMESH_DELIVERY_MARK", default_value_t = format!("{:#x}", crate::inbound::DEFAULT_DELIVERY_MARK))]
    pub delivery_mark: String,
    /// Discover this node's pods from the Kubernetes API (pods with `spec.nodeName` =
    /// --node-name, namespaces for the opt-in label) and register them without the local API,
    /// which then only lists. --cgroup-root is then kubelet's cgroup root (where
    /// `kubepods.slice` or `kubepods` is).
    #[arg(long, env = "NODEMESH_KUBERNETES")]
    pub kubernetes: bool,
    /// With --kubernetes: the API server at a URL without credentials (`kubectl proxy`, tests)
    /// instead of the in-cluster ServiceAccount (or KUBECONFIG).
    #[arg(long, env = "NODEMESH_KUBE_API", requires = "kubernetes")]
    pub kube_api: Option<String>,
    /// With --kubernetes: the host's /proc (pod processes and their netns); the DaemonSet runs
    /// with hostPID, so its own /proc is the host's.
    #[arg(long, env = "NODEMESH_HOST_PROC", default_value = "/proc", requires = "kubernetes")]
    pub host_proc: PathBuf,
    /// With --kubernetes: where the container runtime bind-mounts pod network namespaces.
    #[arg(long, env = "NODEMESH_NETNS_DIR", default_value = "/var/run/netns", requires = "kubernetes")]
    pub netns_dir: PathBuf,
}

/// A CIDR in its canonical form (host bits cleared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use std::net::IpAddr;
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("`{s}`: not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Cidr { addr, prefix_len })
    }
}

/// Validated settings for `mesh-node run`.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub cgroup_root: PathBuf,
    pub admin_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub api_socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub drain_timeout: Duration,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    pub proxy_mark: u32,
    pub connect_timeout: Duration,
    pub control_plane: Option<ControlPlane>,
    pub max_endpoints_per_cluster: usize,
    pub lookup_timeout: Duration,
    pub sniff_timeout: Duration,
    /// The node token (`--token-file`, re-read before each use); `None`: no workload
    /// certificates.
    pub token: Option<crate::control_plane::NodeToken>,
    pub trust_domain: String,
    pub cluster_id: String,
    pub tunnel_listen: SocketAddr,
    /// Advertised to the control plane: `--node-ip` with the tunnel's port.
    pub tunnel_address: Option<SocketAddr>,
    pub delivery_mark: u32,
    /// `--kubernetes`: pods come from the API server.
    pub kubernetes: Option<KubernetesDiscovery>,
}

/// Settings of pod discovery (`--kubernetes`).
#[derive(Debug, Clone)]
pub struct KubernetesDiscovery {
    /// `--kube-api`; `None`: in-cluster ServiceAccount, else KUBECONFIG.
    pub api_url: Option<String>,
    pub host_proc: PathBuf,
    pub netns_dir: PathBuf,
}

impl Config {
    /// Turns raw arguments into a config, collecting every problem instead of stopping at the
    /// first one. `cgroup_mount` supplies the default cgroup root.
    pub fn from_args(
        args: RunArgs,
        cgroup_mount: impl FnOnce() -> Result<PathBuf, String>,
    ) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let exclude_ports = args
            .exclude_ports
            .iter()
            .filter_map(|p| match p.trim().parse::<u16>() {
                Ok(port) if port != 0 => Some(port),
                _ => {
                    errors.push(format!("--exclude-port `{p}`: must be a port number 1-65535"));
                    None
                }
            })
            .collect();
        let exclude_cidrs = args
            .exclude_cidrs
            .iter()
            .filter_map(|c| {
                c.trim().parse::<Cidr>().map_err(|e| errors.push(format!("--exclude-cidr {e}"))).ok()
            })
            .collect();
        let proxy_mark = parse_mark("--proxy-mark", &args.proxy_mark, &mut errors);
        let delivery_mark = parse_mark("--delivery-mark", &args.delivery_mark, &mut errors);
        if proxy_mark != 0 && proxy_mark == delivery_mark {
            errors.push(format!("--delivery-mark {delivery_mark:#x}: must differ from --proxy-mark"));
        }
        let cgroup_root = match args.cgroup_root {
            Some(p) if p.is_dir() => p,
            Some(p) => {
                errors.push(format!("--cgroup-root {}: not a directory", p.display()));
                p
            }
            None => cgroup_mount().unwrap_or_else(|e| {
                errors.push(format!("--cgroup-root not given and {e}"));
                PathBuf::new()
            }),
        };
        let node_name = args.node_name.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "node".to_string())
        });
        let control_plane = args.control_plane.map(|url| ControlPlane {
            url,
            root_file: args.control_plane_root,
            server_name: args.control_plane_name,
        });
        if let Some(cp) = &control_plane
            && let Err(e) = cp.check(args.token_file.is_some())
        {
            errors.push(e);
        }
        if args.max_endpoints_per_cluster == 0 {
            errors.push("--max-endpoints-per-cluster: must be greater than 0".to_string());
        }
        if args.connect_timeout_ms == 0 {
            errors.push("--connect-timeout-ms: must be greater than 0".to_string());
        }
        if args.kubernetes && !cfg!(feature = "kubernetes") {
            errors
                .push("--kubernetes: this mesh-node was built without its `kubernetes` feature".to_string());
        }
        let kubernetes = args.kubernetes.then(|| {
            if !args.host_proc.join("self").exists() {
                errors.push(format!("--host-proc {}: not a proc filesystem", args.host_proc.display()));
            }
            KubernetesDiscovery {
                api_url: args.kube_api,
                host_proc: args.host_proc,
                netns_dir: args.netns_dir,
            }
        });
        let token = args.token_file.as_ref().and_then(|path| {
            crate::control_plane::NodeToken::load(path.clone()).map_err(|e| errors.push(e)).ok()
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            node_name,
            cgroup_root,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            api_socket: args.api_socket,
            state_dir: args.state_dir,
            bpf_pin_dir: args.bpf_pin_dir,
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            exclude_ports,
            exclude_cidrs,
            proxy_mark,
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            control_plane,
            max_endpoints_per_cluster: args.max_endpoints_per_cluster,
            lookup_timeout: Duration::from_millis(args.lookup_timeout_ms),
            sniff_timeout: Duration::from_millis(args.sniff_timeout_ms),
            token,
            trust_domain: args.trust_domain,
            cluster_id: args.cluster_id,
            tunnel_listen: args.tunnel_listen,
            tunnel_address: args.node_ip.map(|ip| SocketAddr::new(ip, args.tunnel_listen.port())),
            delivery_mark,
            kubernetes,
        })
    }
}

/// A non-zero socket mark, decimal or `0x` hex.
fn parse_mark(flag: &str, text: &str, errors: &mut Vec<String>) -> u32 {
    let mark = text.trim();
    match mark.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => mark.parse(),
    }
    .ok()
    .filter(|m| *m != 0)
    .unwrap_or_else(|| {
        errors.push(format!("{flag} `{mark}`: must be a non-zero 32-bit number"));
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["mesh-node", "run", "--cgroup-root", "/"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cidrs_are_canonicalised() {
        let c: Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c.addr.to_string(), "10.1.0.0");
        assert_eq!(c.prefix_len, 16);
        let c: Cidr = "fd00::1".parse().unwrap();
        assert_eq!(c.prefix_len, 128);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn all_errors_are_reported_together() {
        let args =
            run_args(&["--exclude-port", "0,80,http", "--exclude-cidr", "10.0.0.0/99", "--proxy-mark", "0"]);
        let errors = Config::from_args(args, || Ok("/".into())).unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(errors.iter().any(|e| e.contains("`http`")));
        assert!(errors.iter().any(|e| e.contains("10.0.0.0/99")));
    }

    #[test]
    fn good_config_parses() {
        let args = run_args(&["--exclude-port", "22,9999", "--proxy-mark", "0x10"]);
        let cfg = Config::from_args(args, || Ok("/".into())).unwrap();
        assert_eq!(cfg.exclude_ports, vec![22, 9999]);
        assert_eq!(cfg.proxy_mark, 0x10);
    }
}
