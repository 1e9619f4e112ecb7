//! `cargo xtask <command>`: everything a newcomer or CI runs.
#![forbid(unsafe_code)]

mod bench;
mod bench_control;
mod bench_discovery;
mod bench_graph;
mod bench_http;
mod bench_mtls;
mod bench_upgrade;
mod bookshop;
mod demo;
mod demo_discovery;
mod fuzz;
mod image;
mod lint;
mod module_cycles;
mod setup;
mod soak;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install and check everything the build, demo and tests need (idempotent).
    Setup,
    /// Setup, build, then run the whole test suite (unit + simulated-node integration tests).
    Test {
        /// Extra arguments for the test binaries, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Formatting, clippy (warnings are errors), module import cycles, mesh-node's dependencies.
    Lint,
    /// Setup, build, run a simulated node with pods, show what the proxy saw, clean up.
    Demo {
        /// Leave the node running until Ctrl-C and print how to poke it.
        #[arg(long)]
        keep: bool,
    },
    /// Setup, build (release), then the mesh-node and mesh-control container images as OCI
    /// archives in target/image (buildah, no Docker daemon), each checked by running its
    /// binary from the unpacked image.
    Image {
        /// From debug binaries (quicker; what `cargo xtask test` checks).
        #[arg(long)]
        debug: bool,
    },
    /// Setup, build (release), benchmark direct vs through mesh-node; append to bench/RESULTS.md.
    Bench {
        /// Only the service-graph benchmark (its table alone).
        #[arg(long)]
        graph_only: bool,
    },
    /// Setup, build (release), then N minutes of traffic on two simulated nodes while pods and
    /// config churn; failed requests, mesh-node RSS and open fds at start and end, appended
    /// to bench/RESULTS.md.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Run the libFuzzer targets of fuzz/ (all, or those named) for a bounded time each with
    /// cargo-fuzz (installed on first use); fails on any crash, naming the input.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        targets: Vec<String>,
    },
    /// Remove simulated-node leftovers of runs that were killed (only our own `nmt*` names).
    Clean,
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Test { args } => test(&args),
        Cmd::Lint => lint::run(),
        Cmd::Demo { keep } => demo::run(keep),
        Cmd::Image { debug } => image::run(debug),
        Cmd::Bench { graph_only } => bench::run(graph_only),
        Cmd::Soak { minutes } => soak::run(minutes),
        Cmd::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Cmd::Clean => {
            nodemesh_tests::sweep_stale();
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The test command README.md and .ci/run use: the lint, the container images (from the debug
/// binaries), then every test. A red lint or image does not stop the tests; all are reported at
/// the end.
fn test(args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    let lint = lint::run();
    util::step("building mesh-node, mesh-control and the test apps");
    util::cargo(&["build", "-p", "mesh-node", "-p", "mesh-control", "-p", "nodemesh-tests", "--bins"])?;
    util::step("building and checking the container images (debug binaries)");
    let images = image::build_and_check("debug");
    util::step("running the test suite (simulated nodes need root; 2 test threads)");
    let bin_dir = util::workspace_root()?.join("target/debug");
    // --no-fail-fast: one red binary must not hide the tests of the binaries after it.
    let mut cargo_args =
        vec!["test", "--workspace", "--exclude", "mesh-ebpf", "--no-fail-fast", "--", "--test-threads", "2"];
    cargo_args.extend(args.iter().map(String::as_str));
    let tests = util::cargo_env(&cargo_args, &[("NODEMESH_BIN_DIR", bin_dir.to_str().unwrap_or_default())]);
    let failed: Vec<String> =
        [lint, images, tests].into_iter().filter_map(Result::err).map(|e| format!("{e:#}")).collect();
    if failed.is_empty() { Ok(()) } else { anyhow::bail!("{}", failed.join("\n")) }
}
