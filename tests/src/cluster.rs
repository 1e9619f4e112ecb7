//! A simulated cluster: several [`SimNode`]s joined by a *fabric* network namespace, and one
//! mesh-control in the fabric.
//!
//! ```text
//!   fabric netns: bridge fab0 10.76.0.1/24 fd76::1/64   ← mesh-control (xDS on 10.76.0.1:15010, TLS 15012)
//!     ├─ veth ─ node 1 netns: up0 10.76.0.2, br0 10.77.1.1/24 ─ pods 10.77.1.N
//!     └─ veth ─ node 2 netns: up0 10.76.0.3, br0 10.77.2.1/24 ─ pods 10.77.2.N
//! ```
//! Each node forwards between its pods and the fabric and routes every other node's pod subnet
//! via that node's fabric address. The fabric has no link to the host and no default route:
//! nothing leaves the machine.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
};

use crate::{ControlPlane, SimNode, new_id, run_checked};

const FABRIC_NET4: [u8; 3] = [10, 76, 0];
const XDS_PORT: u16 = 15010;

pub struct SimCluster {
    pub id: String,
    pub fabric_netns: String,
    pub work_dir: PathBuf,
    /// The directory mesh-control watches.
    pub config_dir: PathBuf,
    /// Node `i` has index `i + 1` (pod subnet 10.77.<i+1>.0/24).
    pub nodes: Vec<SimNode>,
    pub control: ControlPlane,
}

fn fabric_ip4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(FABRIC_NET4[0], FABRIC_NET4[1], FABRIC_NET4[2], host)
}

fn fabric_ip6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd76, 0, 0, 0, 0, 0, 0, u16::from(host))
}

impl SimCluster {
    /// Creates the fabric and `node_count` nodes (nothing started yet).
    pub fn new(node_count: usize) -> anyhow::Result<SimCluster> {
        anyhow::ensure!((1..=200).contains(&node_count), "1 to 200 nodes");
        let id = new_id()?;
        let fabric_netns = format!("{id}-fabric");
        let work_dir = std::env::temp_dir().join(&id);
        let config_dir = work_dir.join("config");
        let xds = SocketAddr::from((fabric_ip4(1), XDS_PORT));
        let mut cluster = SimCluster {
            control: ControlPlane::new(&fabric_netns, &work_dir, xds),
            id,
            fabric_netns,
            work_dir,
            config_dir,
            nodes: Vec::new(),
        };
        // From here on, Drop cleans up whatever got created.
        fs::create_dir_all(&cluster.config_dir)?;
        let f = cluster.fabric_netns.clone();
        run_checked("ip", &["netns", "add", &f])?;
        run_checked("ip", &["-n", &f, "link", "set", "lo", "up"])?;
        run_checked("ip", &["-n", &f, "link", "add", "fab0", "type", "bridge"])?;
        run_checked("ip", &["-n", &f, "addr", "add", &format!("{}/24", fabric_ip4(1)), "dev", "fab0"])?;
        run_checked(
            "ip",
            &["-n", &f, "-6", "addr", "add", &format!("{}/64", fabric_ip6(1)), "dev", "fab0", "nodad"],
        )?;
        run_checked("ip", &["-n", &f, "link", "set", "fab0", "up"])?;
        for i in 0..node_count {
            let index = u8::try_from(i + 1)?;
            let node = SimNode::create(&format!("{}n{index}", cluster.id), index)?;
            cluster.nodes.push(node);
            cluster.uplink(index)?;
        }
        for node in &cluster.nodes {
            for other in cluster.nodes.iter().filter(|o| o.index != node.index) {
                let n = &node.node_netns;
                let (net4, net6) = (format!("{}/24", other.pod_ip4(0)), format!("{}/64", other.pod_ip6(0)));
                let (via4, via6) =
                    (fabric_ip4(other.index + 1).to_string(), fabric_ip6(other.index + 1).to_string());
                run_checked("ip", &["-n", n, "route", "add", &net4, "via", &via4])?;
                run_checked("ip", &["-n", n, "-6", "route", "add", &net6, "via", &via6])?;
            }
        }
        Ok(cluster)
    }

    /// Joins node `index` to the fabric (its address there is .<index + 1>) and lets it forward.
    fn uplink(&self, index: u8) -> anyhow::Result<()> {
        let node = &self.nodes[usize::from(index) - 1].node_netns;
        let (f, peer) = (&self.fabric_netns, format!("n{index}"));
        run_checked(
            "ip",
            &["-n", node, "link", "add", "up0", "type", "veth", "peer", "name", &peer, "netns", f],
        )?;
        run_checked("ip", &["-n", f, "link", "set", &peer, "master", "fab0", "up"])?;
        let host = index + 1;
        run_checked("ip", &["-n", node, "addr", "add", &format!("{}/24", fabric_ip4(host)), "dev", "up0"])?;
        run_checked(
            "ip",
            &["-n", node, "-6", "addr", "add", &format!("{}/64", fabric_ip6(host)), "dev", "up0", "nodad"],
        )?;
        run_checked("ip", &["-n", node, "link", "set", "up0", "up"])?;
        run_checked(
            "ip",
            &[
                "netns",
                "exec",
                node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )
    }

    /// Starts mesh-control on [`SimCluster::config_dir`], then mesh-node on every node pointed at
    /// it (`node_args` added to each).
    pub fn start(&mut self, control_args: &[&str], node_args: &[&str]) -> anyhow::Result<()> {
        let config_dir = self.config_dir.clone();
        self.control.start(&config_dir, control_args)?;
        let url = self.control.tls_url();
        let root = self.control.root_file().display().to_string();
        for node in &mut self.nodes {
            let token = node.write_node_token(&self.control)?;
            // Other nodes open tunnels to this node's fabric address.
            let node_ip = fabric_ip4(node.index + 1).to_string();
            let mut args = vec![
                "--control-plane",
                url.as_str(),
                "--control-plane-root",
                root.as_str(),
                "--token-file",
                token.as_str(),
                "--node-ip",
                node_ip.as_str(),
            ];
            args.extend_from_slice(node_args);
            node.start_mesh_node(&args)?;
        }
        Ok(())
    }

    /// The fabric netns's own address (mesh-control's; collectors a test runs there too).
    pub fn fabric_ip(&self) -> Ipv4Addr {
        fabric_ip4(1)
    }

    /// Node `i`'s address on the fabric (what other nodes tunnel to: its `--node-ip`).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        fabric_ip4(self.nodes[i].index + 1)
    }

    /// Makes mesh-control watch `dir` instead of the cluster's own config dir (call before
    /// [`SimCluster::start`]). `dir` is not removed on drop.
    pub fn use_config_dir(&mut self, dir: PathBuf) {
        self.config_dir = dir;
    }

    /// See [`crate::mesh::write_config`].
    pub fn write_config(&self, file: &str, text: &str) {
        crate::mesh::write_config(&self.config_dir, file, text);
    }

    pub fn remove_config(&self, file: &str) -> anyhow::Result<()> {
        Ok(fs::remove_file(self.config_dir.join(file))?)
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        // Nodes first (their processes and pods), then the control plane, then the fabric.
        self.nodes.clear();
        let _ = self.control.kill();
        let _ = Command::new("ip").args(["netns", "del", &self.fabric_netns]).status();
        if std::env::var_os("NODEMESH_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.work_dir);
        }
    }
}
