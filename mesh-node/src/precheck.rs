//! `mesh-node precheck`: what this host lacks for capture, and what already hooks the same
//! cgroup events, each with a fix. Read-only: it loads nothing, attaches nothing, changes no
//! rule (the program-type probes load a two-instruction program and drop it at once).
//!
//! Exit status 0 when mesh-node can run here, 1 when something is missing or conflicts;
//! warnings (things that limit, not block) do not change it.

use std::{fmt, fs::File, path::Path};

use aya::programs::ProgramType;
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

use crate::{capture::is_capture_program, sys};

/// The oldest kernel the capture programs load on: bpf_get_netns_cookie in sockops (5.15).
const MIN_KERNEL: (u32, u32) = (5, 15);

/// Capabilities by number (linux/capability.h), each with what mesh-node needs it for.
const CAPABILITIES: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "load the capture programs and create their maps (5.8+; CAP_SYS_ADMIN before)"),
    (38, "CAP_PERFMON", "eBPF programs that read kernel pointers (5.8+)"),
    (12, "CAP_NET_ADMIN", "attach cgroup and sk_lookup programs; policy routing in pod netns"),
    (21, "CAP_SYS_ADMIN", "setns() into pod network namespaces"),
    (19, "CAP_SYS_PTRACE", "read /proc/<pid>/ns/net of pod processes"),
    (2, "CAP_DAC_READ_SEARCH", "read other users' /proc entries and cgroup.procs"),
];
const CAP_SYS_RESOURCE: u32 = 24;

/// The cgroup hooks a connect-time load balancer uses (bpf_attach_type numbers), and whether a
/// foreign program there competes with capture (rewrites the destination the way
/// connect4/6 do) or only runs beside it.
const HOOKS: &[(u32, &str, bool)] = &[
    (10, "connect4", true),
    (11, "connect6", true),
    (14, "sendmsg4", true),
    (15, "sendmsg6", true),
    (19, "recvmsg4", true),
    (20, "recvmsg6", true),
    (29, "getpeername4", true),
    (30, "getpeername6", true),
    (3, "sock_ops", false),
];

/// The report line of [`attached`].
const HOOKS_ITEM: &str = "programs on the capture hooks";

#[derive(Debug, PartialEq)]
pub enum Outcome {
    Ok(String),
    /// Blocks mesh-node: what is missing, and the fix.
    Missing(String, String),
    /// Another program on the same hook: what, and the fix.
    Conflict(String, String),
    /// Runs, but limited: what, and the fix.
    Warn(String, String),
}

#[derive(Debug)]
pub struct Check {
    pub item: &'static str,
    pub outcome: Outcome,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (tag, text, fix) = match &self.outcome {
            Outcome::Ok(t) => ("ok", t, None),
            Outcome::Missing(t, fix) => ("MISSING", t, Some(fix)),
            Outcome::Conflict(t, fix) => ("CONFLICT", t, Some(fix)),
            Outcome::Warn(t, fix) => ("WARN", t, Some(fix)),
        };
        write!(f, "  {tag:<9} {}: {text}", self.item)?;
        if let Some(fix) = fix {
            write!(f, "\n  {:<9} fix: {fix}", "")?;
        }
        Ok(())
    }
}

/// Every check, in the order a reader fixes them.
pub async fn run(cgroup_root: &Path, bpffs: &Path) -> Vec<Check> {
    let mut checks = vec![
        Check {
            item: "kernel",
            outcome: kernel(
                &nix::sys::utsname::uname()
                    .map(|u| u.release().to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        },
        Check { item: "BTF", outcome: btf(Path::new("/sys/kernel/btf/vmlinux")) },
        Check { item: "cgroup v2", outcome: cgroup2(cgroup_root) },
        Check { item: "bpffs", outcome: bpffs_mount(bpffs) },
    ];
    checks.extend(capabilities(&std::fs::read_to_string("/proc/self/status").unwrap_or_default()));
    checks.extend(program_types());
    checks.extend(policy_routing().await);
    checks.extend(attached(cgroup_root));
    checks
}

/// Prints the report; the exit status (0: can run, 1: something blocks or conflicts).
pub fn report(cgroup_root: &Path, bpffs: &Path, checks: &[Check]) -> u8 {
    println!("mesh-node precheck (cgroup root {}, bpffs {})", cgroup_root.display(), bpffs.display());
    for check in checks {
        println!("{check}");
    }
    let count = |f: fn(&Outcome) -> bool| checks.iter().filter(|c| f(&c.outcome)).count();
    let missing = count(|o| matches!(o, Outcome::Missing(..)));
    let conflicts = count(|o| matches!(o, Outcome::Conflict(..)));
    let warnings = count(|o| matches!(o, Outcome::Warn(..)));
    println!("{missing} missing, {conflicts} conflicting, {warnings} warnings");
    u8::from(missing + conflicts > 0)
}

fn kernel(release: &str) -> Outcome {
    let mut parts = release.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_KERNEL => Outcome::Ok(release.to_string()),
        (Some(_), Some(_)) => Outcome::Missing(
            format!("{release} is older than {}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
            format!(
                "upgrade the node's kernel to {}.{}+ (the sockops program reads the netns cookie)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        _ => Outcome::Warn(
            format!("cannot read a version from {release:?}"),
            "check `uname -r` by hand".into(),
        ),
    }
}

fn btf(vmlinux: &Path) -> Outcome {
    if vmlinux.exists() {
        Outcome::Ok(vmlinux.display().to_string())
    } else {
        Outcome::Missing(
            format!("{} is missing", vmlinux.display()),
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's since 2021)".into(),
        )
    }
}

fn cgroup2(root: &Path) -> Outcome {
    match statfs(root) {
        Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Outcome::Ok(root.display().to_string()),
        Ok(_) => Outcome::Missing(
            format!("{} is not a cgroup v2 directory", root.display()),
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1; kubelet cgroupDriver either) and \
             point --cgroup-root at its mount (DaemonSet: hostPath /sys/fs/cgroup at /host/sys/fs/cgroup)"
                .into(),
        ),
        Err(e) => Outcome::Missing(
            format!("{}: {e}", root.display()),
            "mount the host's cgroup2 root there (DaemonSet: hostPath /sys/fs/cgroup)".into(),
        ),
    }
}

fn bpffs_mount(dir: &Path) -> Outcome {
    match statfs(dir) {
        Ok(fs) if fs.filesystem_type() == BPF_FS_MAGIC => Outcome::Ok(dir.display().to_string()),
        Ok(_) | Err(_) => Outcome::Missing(
            format!("no bpf filesystem at {}", dir.display()),
            format!("mount -t bpf bpf {} (DaemonSet: hostPath /sys/fs/bpf)", dir.display()),
        ),
    }
}

/// From `CapEff:` of /proc/self/status.
fn capabilities(status: &str) -> Vec<Check> {
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| effective & (1 << bit) != 0;
    let missing: Vec<String> = CAPABILITIES
        .iter()
        .filter(|(bit, name, _)| {
            // Before 5.8 CAP_SYS_ADMIN carried what CAP_BPF and CAP_PERFMON now do.
            let covered = matches!(*name, "CAP_BPF" | "CAP_PERFMON") && has(21);
            !has(*bit) && !covered
        })
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect();
    let mut checks = vec![Check {
        item: "capabilities",
        outcome: if missing.is_empty() {
            Outcome::Ok("BPF, PERFMON, NET_ADMIN, SYS_ADMIN, SYS_PTRACE, DAC_READ_SEARCH".into())
        } else {
            Outcome::Missing(
                format!("lacks {}", missing.join(", ")),
                "run as root with these capabilities (the DaemonSet's securityContext lists them)".into(),
            )
        },
    }];
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
    if !has(CAP_SYS_RESOURCE) {
        checks.push(Check {
            item: "open files",
            outcome: Outcome::Warn(
                format!(
                    "no CAP_SYS_RESOURCE: the limit stays at {hard} (soft {soft}), about {} proxied connections",
                    hard / 2
                ),
                "add CAP_SYS_RESOURCE, or raise the container runtime's LimitNOFILE".into(),
            ),
        });
    }
    checks
}

fn program_types() -> Vec<Check> {
    [
        ("cgroup sock_addr programs", ProgramType::CgroupSockAddr, "connect4/6 capture", "CONFIG_CGROUP_BPF=y"),
        ("sock_ops programs", ProgramType::SockOps, "connection tracking", "CONFIG_CGROUP_BPF=y"),
        ("sk_lookup programs", ProgramType::SkLookup, "inbound delivery (5.9+)", "CONFIG_BPF_SYSCALL=y on 5.9+"),
    ]
    .into_iter()
    .map(|(item, kind, what, fix)| Check {
        item,
        outcome: match aya::sys::is_program_supported(kind) {
            Ok(true) => Outcome::Ok(format!("supported ({what})")),
            Ok(false) => Outcome::Missing(format!("the kernel refuses them ({what})"), fix.into()),
            Err(e) => Outcome::Missing(
                format!("cannot probe: {e}"),
                "run as root with CAP_BPF (or CAP_SYS_ADMIN); check that the bpf() syscall is not filtered by seccomp"
                    .into(),
            ),
        },
    })
    .collect()
}

/// Policy routing: the rules that bring answers back to delivery sockets. A rule dump fails
/// with EAFNOSUPPORT when the kernel lacks multiple routing tables for that family.
async fn policy_routing() -> Vec<Check> {
    use tokio_stream::StreamExt;
    let Ok((connection, handle, _)) = rtnetlink::new_connection() else {
        return vec![Check {
            item: "policy routing",
            outcome: Outcome::Missing(
                "no netlink socket".into(),
                "CONFIG_NETLINK (every kernel has it)".into(),
            ),
        }];
    };
    let task = tokio::spawn(connection);
    let mut checks = Vec::new();
    for (item, version, option) in [
        ("policy routing (IPv4)", rtnetlink::IpVersion::V4, "CONFIG_IP_MULTIPLE_TABLES=y"),
        ("policy routing (IPv6)", rtnetlink::IpVersion::V6, "CONFIG_IPV6_MULTIPLE_TABLES=y"),
    ] {
        let dump: Result<Vec<_>, _> = handle.rule().get(version.clone()).execute().collect().await;
        let outcome = match dump {
            Ok(rules) => Outcome::Ok(format!("{} rules", rules.len())),
            Err(e) if matches!(version, rtnetlink::IpVersion::V6) => Outcome::Warn(
                format!("rule dump failed ({e}): IPv6 pods get no delivery routing"),
                format!("{option}, or IPv6 enabled (ipv6.disable=0)"),
            ),
            Err(e) => Outcome::Missing(format!("rule dump failed ({e})"), option.into()),
        };
        checks.push(Check { item, outcome });
    }
    task.abort();
    checks
}

/// Programs other than ours that run on the capture hooks for cgroups under `root` (attached
/// there or on an ancestor: the effective list).
fn attached(root: &Path) -> Vec<Check> {
    let cgroup = match File::open(root) {
        Ok(f) => f,
        Err(e) => {
            return unlisted(format!("cannot open {}: {e}", root.display()));
        }
    };
    let names: std::collections::BTreeMap<u32, String> = aya::programs::loaded_programs()
        .flatten()
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_string()))
        .collect();
    let mut checks = Vec::new();
    let mut ours = Vec::new();
    for &(attach_type, hook, competes) in HOOKS {
        let ids = match sys::cgroup_effective_programs(&cgroup, attach_type) {
            Ok(ids) => ids,
            // A hook this kernel does not know has nothing on it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => {
                return unlisted(format!("cannot list the programs on {hook} of {}: {e}", root.display()));
            }
        };
        for id in ids {
            let name = names.get(&id).cloned().unwrap_or_default();
            if is_capture_program(&name) {
                ours.push(format!("{hook} {name} (id {id})"));
                continue;
            }
            checks.push(foreign(root, hook, &name, id, competes));
        }
    }
    if checks.is_empty() {
        let text = if ours.is_empty() {
            "none".to_string()
        } else {
            format!("only Nodemesh's own (its pinned capture): {}", ours.join(", "))
        };
        checks.push(Check { item: HOOKS_ITEM, outcome: Outcome::Ok(text) });
    }
    checks
}

/// The hooks could not be read: a warning (cgroup v2 or capabilities above say why).
fn unlisted(why: String) -> Vec<Check> {
    vec![Check {
        item: HOOKS_ITEM,
        outcome: Outcome::Warn(why, "see cgroup v2 and capabilities above".into()),
    }]
}

fn foreign(root: &Path, hook: &str, name: &str, id: u32, competes: bool) -> Check {
    let what = format!("program {name:?} (id {id}) runs on {hook} for every cgroup under {}", root.display());
    let outcome = if competes {
        Outcome::Conflict(
            format!(
                "{what}: a connect-time load balancer (a CNI's socket LB) rewrites Service addresses to \
                 pod addresses before or after capture, so Service routing and L7 policy are bypassed"
            ),
            "keep it to the host namespace: Cilium `socketLB.hostNamespaceOnly=true` \
             (--bpf-lb-sock-hostns-only); Calico eBPF `bpfConnectTimeLoadBalancing: Disabled`; \
             else detach it (bpftool cgroup detach)"
                .into(),
        )
    } else {
        Outcome::Warn(
            format!("{what}: runs beside capture (sockops programs chain)"),
            "none needed; listed because it sees the same connections".into(),
        )
    };
    Check { item: HOOKS_ITEM, outcome }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert!(matches!(kernel("6.1.0-40-cloud-amd64"), Outcome::Ok(_)));
        assert!(matches!(kernel("5.15.0"), Outcome::Ok(_)));
        let Outcome::Missing(what, fix) = kernel("5.10.0-28-amd64") else { panic!() };
        assert!(what.contains("older than 5.15") && fix.contains("5.15+"), "{what} / {fix}");
        assert!(matches!(kernel("weird"), Outcome::Warn(..)));
    }

    #[test]
    fn capabilities_name_what_is_missing_and_accept_sys_admin_for_bpf_before_5_8() {
        let all: u64 = [39u32, 38, 12, 21, 19, 2, 24].iter().map(|b| 1u64 << b).sum();
        let status = |mask: u64| format!("Name:\tx\nCapEff:\t{mask:016x}\n");
        let checks = capabilities(&status(all));
        assert!(matches!(checks.as_slice(), [Check { outcome: Outcome::Ok(_), .. }]), "{checks:?}");
        // 5.4: no CAP_BPF/CAP_PERFMON bits; CAP_SYS_ADMIN covers them.
        let checks = capabilities(&status(all & !(1 << 39) & !(1 << 38)));
        assert!(matches!(checks[0].outcome, Outcome::Ok(_)), "{checks:?}");
        let checks = capabilities(&status(all & !(1 << 12) & !(1 << 24)));
        let Outcome::Missing(what, _) = &checks[0].outcome else { panic!("{checks:?}") };
        assert!(what.contains("CAP_NET_ADMIN") && !what.contains("CAP_BPF"), "{what}");
        assert!(matches!(checks[1].outcome, Outcome::Warn(..)), "no SYS_RESOURCE: {checks:?}");
    }

    #[test]
    fn own_programs_by_truncated_name() {
        assert!(is_capture_program("sock4_getpeerna"));
        assert!(is_capture_program("sock_ops_establ"));
        assert!(!is_capture_program("cil_sock4_conne"));
        assert!(!is_capture_program(""));
    }

    #[test]
    fn a_foreign_connect_program_conflicts_and_a_sockops_one_does_not() {
        let root = Path::new("/sys/fs/cgroup");
        let c = foreign(root, "connect4", "cil_sock4_conne", 7, true);
        let Outcome::Conflict(what, fix) = c.outcome else { panic!() };
        assert!(what.contains("\"cil_sock4_conne\" (id 7) runs on connect4"), "{what}");
        assert!(fix.contains("hostNamespaceOnly"), "{fix}");
        assert!(matches!(foreign(root, "sock_ops", "x", 8, false).outcome, Outcome::Warn(..)));
    }
}
