//! `cargo xtask fuzz [--seconds N] [TARGET…]`: runs each libFuzzer target of `fuzz/` (all by
//! default) for N seconds with cargo-fuzz on the nightly toolchain, starting from the seeds in
//! `fuzz/corpus/<target>` (left untouched: what libFuzzer learns goes to
//! `target/fuzz-corpus/<target>`). A crash fails the command, naming the input that caused it
//! (in `fuzz/artifacts/<target>/`) and how to replay it.

use std::process::Command;

use anyhow::{Context, bail};

use crate::{setup, util};

pub(crate) const TARGETS: [&str; 6] =
    ["sniff", "http_head", "hbone_connect", "api_body", "config_yaml", "xds_resource"];

pub(crate) fn run(seconds: u64, targets: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    for t in targets {
        anyhow::ensure!(
            TARGETS.contains(&t.as_str()),
            "no fuzz target {t}; there are {}",
            TARGETS.join(", ")
        );
    }
    let chosen: Vec<&str> =
        if targets.is_empty() { TARGETS.to_vec() } else { targets.iter().map(String::as_str).collect() };
    ensure_cargo_fuzz()?;
    let root = util::workspace_root()?;
    let fuzz_dir = root.join("fuzz");
    let mut crashed = Vec::new();
    for target in chosen {
        util::step(&format!("fuzzing {target} for {seconds} s"));
        let learned = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&learned)?;
        let seeds = fuzz_dir.join("corpus").join(target);
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&learned)
            .arg(&seeds)
            .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"])
            .current_dir(&fuzz_dir)
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            crashed.push(target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {} — the inputs are in fuzz/artifacts/<target>/; replay one with \
             `cd fuzz && cargo +nightly fuzz run <target> <file>`, fix, and add a regression test",
            crashed.join(", ")
        );
    }
    println!("\nno crash in {seconds} s per target");
    Ok(())
}

/// cargo-fuzz from crates.io, once.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if util::output("cargo", &["+nightly", "fuzz", "--version"]).is_ok() {
        return Ok(());
    }
    util::step("installing cargo-fuzz (crates.io)");
    util::run("cargo", &["install", "cargo-fuzz", "--locked"], &[]).context("cargo install cargo-fuzz")
}
