//! `cargo xtask fuzz [--seconds N] [TARGET…]`: runs each libFuzzer target of `fuzz/` (all by
//! default) for N seconds with cargo-fuzz on the nightly toolchain, starting from the seeds in
//! `fuzz/corpus/<target>` (left untouched: what libFuzzer learns goes to
//! `target/fuzz-corpus/<target>`). A crash fails the command, naming the input that caused it
//! (in `fuzz/artifacts/<target>/`) and how to replay it.

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{bench, setup, util};

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
    // Before the first row is written: the rows themselves would make the tree dirty.
    let commit = bench::commit()?;
    for target in chosen {
        util::step(&format!("fuzzing {target} for {seconds} s"));
        let learned = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&learned)?;
        let seeds = fuzz_dir.join("corpus").join(target);
        let mut child = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&learned)
            .arg(&seeds)
            .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"])
            .current_dir(&fuzz_dir)
            .stderr(Stdio::piped())
            .spawn()
            .context("running cargo fuzz")?;
        // libFuzzer reports on stderr: passed through, and read for the results row.
        let mut report = Report::default();
        for line in BufReader::new(child.stderr.take().context("fuzzer stderr")?).lines() {
            let line = line?;
            eprintln!("{line}");
            report.read(&line);
        }
        let status = child.wait()?;
        if !status.success() {
            crashed.push(target);
        }
        let result = match (&report.crash, status.success()) {
            (_, true) => "no crash".to_string(),
            (Some(input), false) => format!("**crash**: {input}"),
            (None, false) => format!("**failed** ({status})"),
        };
        let row = format!(
            "| {} | {} | {target} | {seconds} | {} | {} | {} | {result} |",
            util::output("date", &["-u", "+%Y-%m-%d %H:%M"])?,
            commit,
            report.runs.as_deref().unwrap_or("?"),
            report.coverage.as_deref().unwrap_or("?"),
            report.corpus.as_deref().unwrap_or("?"),
        );
        let path = root.join("bench/RESULTS.md");
        let text = fs::read_to_string(&path)?;
        fs::write(&path, bench::insert_row(&text, FUZZ_TABLE, &row))?;
    }
    println!("\nrows written to {}", root.join("bench/RESULTS.md").display());
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

const FUZZ_TABLE: &str =
    "| date (UTC) | commit | target | seconds | runs | coverage (edges) | corpus (inputs/bytes) | result |";

/// What libFuzzer's closing lines say of one run.
#[derive(Default)]
struct Report {
    runs: Option<String>,
    coverage: Option<String>,
    corpus: Option<String>,
    /// Where libFuzzer wrote the input that crashed.
    crash: Option<String>,
}

impl Report {
    fn read(&mut self, line: &str) {
        let after = |key: &str| line.split_once(key).and_then(|(_, rest)| rest.split_whitespace().next());
        if let Some(runs) = line.strip_prefix("stat::number_of_executed_units:") {
            self.runs = Some(runs.trim().to_string());
        } else if line.starts_with('#') && line.contains("cov: ") {
            // Progress lines (`#1234  NEW  cov: 56 ft: 78 corp: 9/10b …`): the last one counts.
            self.coverage = after("cov: ").map(str::to_string);
            self.corpus = after("corp: ").map(str::to_string);
        } else if let Some(input) = after("Test unit written to ") {
            self.crash = Some(input.to_string());
        }
    }
}

/// cargo-fuzz from crates.io, once.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if util::output("cargo", &["+nightly", "fuzz", "--version"]).is_ok() {
        return Ok(());
    }
    util::step("installing cargo-fuzz (crates.io)");
    util::run("cargo", &["install", "cargo-fuzz", "--locked"], &[]).context("cargo install cargo-fuzz")
}
