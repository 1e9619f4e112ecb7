//! Starting processes inside a pod, and waiting for them with a bound.

use std::{
    ffi::OsStr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Runs a command and fails with its stderr if it does not succeed.
pub fn run_checked(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A command that runs `program` in `cgroup` and `netns` from its first instruction: a shell
/// moves itself into the cgroup, then `nsenter` enters the netns and execs the program (same PID
/// all the way, so the spawned child is the program itself). Not `ip netns exec`: it remounts
/// /sys, which hides the cgroup v2 mount from the program. Stdin is null unless the caller sets
/// it; the caller also chooses stdout, stderr and environment, then spawns.
pub(crate) fn command_in(netns: &str, cgroup: Option<&Path>, program: &Path, args: &[String]) -> Command {
    let script = match cgroup {
        Some(_) => r#"echo $$ > "$0/cgroup.procs" && ns="$1" && shift && exec nsenter --net="$ns" -- "$@""#,
        None => r#"ns="$1" && shift && exec nsenter --net="$ns" -- "$@""#,
    };
    let cgroup_arg = cgroup.map(|c| c.as_os_str()).unwrap_or(OsStr::new("-"));
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(script)
        .arg(cgroup_arg)
        .arg(crate::netns::path(netns))
        .arg(program)
        .args(args)
        .stdin(Stdio::null());
    command
}

/// Where kubelet mounts a pod's ServiceAccount token, CA and namespace.
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A command that runs `program` in `netns` as a container sees its ServiceAccount: in a
/// mount namespace of its own where `volume` (token, ca.crt, namespace) is mounted at
/// /var/run/secrets/kubernetes.io/serviceaccount, on a tmpfs laid over /run (/var/run's
/// target) inside that namespace only, so the host is not touched. nsenter and unshare exec
/// in turn: the spawned child is the program itself. The caller sets KUBERNETES_SERVICE_HOST
/// and _PORT, as kubelet does.
pub(crate) fn command_as_pod(netns: &str, volume: &Path, program: &Path, args: &[String]) -> Command {
    let script = format!(
        r#"mount -t tmpfs tmpfs "$(readlink -f /var/run)" && mkdir -p {SERVICE_ACCOUNT_MOUNT} && mount --bind "$0" {SERVICE_ACCOUNT_MOUNT} && exec "$@""#
    );
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", crate::netns::path(netns).display()))
        .args(["--", "unshare", "--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(volume)
        .arg(program)
        .args(args)
        .stdin(Stdio::null());
    command
}

/// Spawns a [`command_in`] command with the given output streams.
pub(crate) fn spawn_in(
    netns: &str,
    cgroup: Option<&Path>,
    program: &Path,
    args: &[String],
    env: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
) -> anyhow::Result<Child> {
    command_in(netns, cgroup, program, args)
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {} in {netns}", program.display()))
}

/// Waits for `child`; kills it (by its PID) if it runs past `timeout`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} still running after {timeout:?}; killed", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
