//! Small helpers shared by the xtask commands.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail};

pub(crate) fn step(what: &str) {
    println!("[xtask] {what}");
}

pub(crate) fn workspace_root() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir.parent().context("xtask has no parent dir")?.to_path_buf())
}

pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_env(args, &[])
}

pub(crate) fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root()?)
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs a command; returns trimmed stdout, or an error with its stderr.
pub(crate) fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds release binaries and points the harness at them.
pub(crate) fn build_release() -> anyhow::Result<()> {
    step("building mesh-node, mesh-control, nm-testapp and the bookshop (release)");
    cargo(&[
        "build",
        "--release",
        "-p",
        "mesh-node",
        "-p",
        "mesh-control",
        "-p",
        "nodemesh-tests",
        "-p",
        "bookshop",
        "--bins",
    ])?;
    nodemesh_tests::set_bin_dir(workspace_root()?.join("target/release"));
    Ok(())
}
