//! A pod's network namespace, found from the processes in its cgroup.
//!
//! The container runtime creates the netns, runs the sandbox's pause process in it and joins
//! every container to it. So: every process under the pod cgroup (the container scopes
//! included), oldest first; the first whose netns holds one of the pod's addresses (as the API
//! server reports them in `status.podIPs`) names it. The oldest wins because the pause process
//! starts before any container and lives as long as the pod; a process that moved itself to
//! another netns (say, a debugging tool) never has the pod's address there.
//!
//! The path handed to the registry is the runtime's bind mount (`/var/run/netns/cni-…`) when
//! one matches, which outlives any one process, else `/proc/<pid>/ns/net` of that process.

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetnsError {
    #[error("no process in cgroup {0} yet")]
    NoProcesses(PathBuf),
    #[error("none of the {processes} processes in cgroup {cgroup} is in a network namespace holding {ips:?}")]
    AddressNotFound { cgroup: PathBuf, processes: usize, ips: Vec<IpAddr> },
}

/// Where the host's processes and bind-mounted namespaces are (mesh-node's DaemonSet mounts
/// the host's `/proc` and `/var/run/netns`; with hostPID the first is its own).
#[derive(Clone, Debug)]
pub struct HostPaths {
    pub proc: PathBuf,
    pub netns_dir: PathBuf,
}

/// The pod's netns file (see the module docs).
pub fn find(host: &HostPaths, pod_cgroup: &Path, ips: &[IpAddr]) -> Result<PathBuf, NetnsError> {
    let mut processes: Vec<(u64, u32)> = Vec::new();
    collect_pids(pod_cgroup, &mut processes, host);
    if processes.is_empty() {
        return Err(NetnsError::NoProcesses(pod_cgroup.to_path_buf()));
    }
    processes.sort_unstable();
    let mut tried = BTreeSet::new();
    for &(_, pid) in &processes {
        let ns = host.proc.join(pid.to_string()).join("ns/net");
        let Ok(meta) = fs::metadata(&ns) else { continue };
        if !tried.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if holds_any(&host.proc.join(pid.to_string()).join("net"), ips) {
            return Ok(bind_mount_of(&host.netns_dir, meta.dev(), meta.ino()).unwrap_or(ns));
        }
    }
    Err(NetnsError::AddressNotFound {
        cgroup: pod_cgroup.to_path_buf(),
        processes: processes.len(),
        ips: ips.to_vec(),
    })
}

/// (start time, pid) of every process in `cgroup` and the cgroups below it. Processes that
/// exit meanwhile are skipped.
fn collect_pids(cgroup: &Path, out: &mut Vec<(u64, u32)>, host: &HostPaths) {
    if let Ok(text) = fs::read_to_string(cgroup.join("cgroup.procs")) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if let Some(start) = start_time(&host.proc, pid) {
                out.push((start, pid));
            }
        }
    }
    let Ok(children) = fs::read_dir(cgroup) else { return };
    for child in children.flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&child.path(), out, host);
        }
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_time(proc: &Path, pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; count after it.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the netns seen through `net_dir` (`/proc/<pid>/net`) has one of `ips` as a local
/// address.
fn holds_any(net_dir: &Path, ips: &[IpAddr]) -> bool {
    let v4 = fs::read_to_string(net_dir.join("fib_trie")).map(|t| local_ipv4(&t)).unwrap_or_default();
    let v6 = fs::read_to_string(net_dir.join("if_inet6")).map(|t| local_ipv6(&t)).unwrap_or_default();
    ips.iter().any(|ip| match ip {
        IpAddr::V4(a) => v4.contains(a),
        IpAddr::V6(a) => v6.contains(a),
    })
}

/// Local IPv4 addresses from `fib_trie`: each `|-- <addr>` leaf followed by a `/32 host LOCAL`
/// line.
fn local_ipv4(fib_trie: &str) -> BTreeSet<Ipv4Addr> {
    let mut found = BTreeSet::new();
    let mut leaf = None;
    for line in fib_trie.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Ok(addr) = line.parse::<Ipv4Addr>() {
            leaf = Some(addr);
        } else if line.starts_with("/32 host LOCAL")
            && let Some(addr) = leaf
        {
            found.insert(addr);
        }
    }
    found
}

/// IPv6 addresses from `if_inet6`: the first column, 32 hex digits.
fn local_ipv6(if_inet6: &str) -> BTreeSet<Ipv6Addr> {
    if_inet6
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 32))
        .map(Ipv6Addr::from)
        .collect()
}

/// The file in `dir` that is a bind mount of the namespace (dev, ino).
fn bind_mount_of(dir: &Path, dev: u64, ino: u64) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| fs::metadata(p).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.77.0.0/24 2 0 2
        +-- 10.77.0.0/30 2 0 2
           |-- 10.77.0.0
              /24 link UNICAST
           |-- 10.77.0.2
              /32 host LOCAL
        |-- 10.77.0.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.77.0.2
        /32 host LOCAL
";

    #[test]
    fn reads_local_addresses_not_routes_or_broadcasts() {
        let found = local_ipv4(FIB_TRIE);
        let want: BTreeSet<Ipv4Addr> =
            ["10.77.0.2", "127.0.0.1"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(found, want);
        let v6 = local_ipv6(
            "fd770000000000000000000000000002 03 40 00 80     eth0\n\
             00000000000000000000000000000001 01 80 10 80       lo\n",
        );
        assert!(v6.contains(&"fd77::2".parse::<Ipv6Addr>().unwrap()));
        assert!(v6.contains(&Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn finds_this_process_netns_by_its_loopback_address_and_reports_misses() {
        // This test's own cgroup and netns: it holds 127.0.0.1 (the netns is up, lo included,
        // wherever cargo runs tests) and no process there holds TEST-NET-1.
        let host = HostPaths { proc: "/proc".into(), netns_dir: "/nonexistent".into() };
        let own = fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup v2");
        let mounts = fs::read_to_string("/proc/self/mounts").expect("mounts");
        let mount = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .expect("this test needs a cgroup v2 mount");
        let cgroup = mount.join(rel.trim_start_matches('/'));
        let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
        let found = find(&host, &cgroup, &[lo]).expect("found");
        assert!(found.starts_with("/proc/") && found.ends_with("ns/net"), "{found:?}");
        let unused: IpAddr = "192.0.2.77".parse().unwrap();
        assert!(matches!(find(&host, &cgroup, &[unused]), Err(NetnsError::AddressNotFound { .. })));
        let missing = find(&host, Path::new("/nonexistent/cgroup"), &[lo]);
        assert_eq!(missing, Err(NetnsError::NoProcesses("/nonexistent/cgroup".into())));
    }
}
