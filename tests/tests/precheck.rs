//! `mesh-node precheck` on this host: what it reports when everything is there, when another
//! product's program sits on a capture hook (here or on an ancestor cgroup), and when the
//! cgroup root is not a cgroup. Root (bpf, cgroups).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use nodemesh_tests::{NAME_PREFIX, bin, cgroup2_mount};

/// `mesh-node precheck --cgroup-root <root>`: (exit code, output).
fn precheck(root: &Path) -> (i32, String) {
    let out = Command::new(bin("mesh-node").unwrap())
        .args(["precheck", "--cgroup-root"])
        .arg(root)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn precheck_reports_a_foreign_connect_program_with_a_fix_and_passes_without_it() {
    let base = cgroup2_mount().unwrap().join("nodemesh-test");
    let parent = base.join(format!("{NAME_PREFIX}{}xprecheck", std::process::id()));
    let child = parent.join("kubepods.slice");
    std::fs::create_dir_all(&child).unwrap();

    // Everything this host has: kernel, BTF, cgroup v2, bpffs, program types, policy routing.
    let (code, out) = precheck(&child);
    assert_eq!(code, 0, "{out}");
    for item in [
        "kernel",
        "BTF",
        "cgroup v2",
        "bpffs",
        "cgroup sock_addr programs",
        "sk_lookup programs",
        "policy routing (IPv4)",
    ] {
        assert!(out.contains(&format!("ok        {item}: ")), "{item} not ok:\n{out}");
    }
    assert!(!out.contains("CONFLICT"), "{out}");

    // Another product's connect-time load balancer on the parent cgroup: it runs for the
    // child too, so the check of the child must name it.
    let mut foreign = Command::new(bin("nm-foreign-prog").unwrap())
        .arg(&parent)
        .arg("lb_sock4_conn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(foreign.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let id: u32 =
        line.trim().strip_prefix("attached ").unwrap_or_else(|| panic!("{line:?}")).parse().unwrap();
    let (code, out) = precheck(&child);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "CONFLICT  programs on the capture hooks: program \"lb_sock4_conn\" (id {id}) runs on connect4"
        )),
        "{out}"
    );
    assert!(
        out.contains("fix: keep it to the host namespace: Cilium `socketLB.hostNamespaceOnly=true`"),
        "{out}"
    );
    assert!(out.contains("0 missing, 1 conflicting"), "{out}");

    // Its link goes with its process: the host passes again.
    drop(foreign.stdin.take());
    foreign.wait().unwrap();
    let (code, out) = precheck(&child);
    assert_eq!(code, 0, "{out}");

    // A directory that is not a cgroup: named, with the fix, and the exit code says so.
    let (code, out) = precheck(Path::new("/tmp"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MISSING   cgroup v2: /tmp is not a cgroup v2 directory"), "{out}");
    assert!(out.contains("fix: boot with cgroup v2"), "{out}");

    std::fs::remove_dir(&child).unwrap();
    std::fs::remove_dir(&parent).unwrap();
}
