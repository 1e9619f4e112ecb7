//! `cargo xtask image`: the two container images as OCI archives, built without a Docker daemon.
//!
//! For each binary: stage a build context (rootfs/ with the binary, the shared libraries `ldd`
//! says it loads, an /etc/passwd), build `deploy/images/<bin>.Containerfile` with buildah (vfs
//! storage under target/image, chroot isolation: the Containerfiles run nothing, they only
//! copy), push it to `target/image/<bin>-<version>.oci.tar`, then check the archive without
//! buildah: read its index, manifest and config as a runtime would, verify every blob's digest,
//! unpack the layers into a fresh rootfs and run the binary there (chroot, as the image's user) with `--help`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::util::{self, output, step};

/// The images: binary, the user its Containerfile runs it as.
const IMAGES: &[(&str, &str)] = &[("mesh-node", "0:0"), ("mesh-control", "65532:65532")];
/// What the deploy manifests reference: `nodemesh/<bin>:<version>`.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// distroless's users: root for mesh-node, "nonroot" (65532) for mesh-control.
const PASSWD: &str =
    "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";

/// `cargo xtask image [--debug]`: setup, build the binaries, then [`build_and_check`].
pub(crate) fn run(debug: bool) -> anyhow::Result<()> {
    crate::setup::run()?;
    let profile = if debug { "debug" } else { "release" };
    step(&format!("building mesh-node and mesh-control ({profile})"));
    let mut args = vec!["build", "-p", "mesh-node", "-p", "mesh-control", "--bins"];
    if !debug {
        args.push("--release");
    }
    util::cargo(&args)?;
    build_and_check(profile)
}

/// Both images from the binaries already built in target/<profile>, each checked.
pub(crate) fn build_and_check(profile: &str) -> anyhow::Result<()> {
    let root = util::workspace_root()?;
    let out = root.join("target/image");
    let store = Store::new(&out)?;
    let result = IMAGES.iter().try_for_each(|(bin, user)| {
        let binary = root.join("target").join(profile).join(bin);
        let archive = build(&root, &store, &binary, bin)?;
        check(&archive, &out, bin, user)
    });
    store.remove();
    result
}

/// buildah's own image store for this run: under target/, removed afterwards, so nothing is
/// left in /var/lib/containers and a killed run leaves only files under target/.
struct Store {
    root: PathBuf,
    run: PathBuf,
}

impl Store {
    fn new(out: &Path) -> anyhow::Result<Store> {
        let store = Store { root: out.join("storage"), run: out.join("run") };
        store.remove();
        fs::create_dir_all(&store.root)?;
        Ok(store)
    }

    fn buildah(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec![
            "--storage-driver",
            "vfs",
            "--root",
            self.root.to_str().context("store path")?,
            "--runroot",
            self.run.to_str().context("run path")?,
        ];
        all.extend_from_slice(args);
        output("buildah", &all).context("buildah (installed by `cargo xtask setup`)")
    }

    fn remove(&self) {
        // vfs layers can hold read-only directories; buildah's own cleanup is not needed.
        let _ = fs::remove_dir_all(&self.root);
        let _ = fs::remove_dir_all(&self.run);
    }
}

/// Stages the context, builds the image and writes its OCI archive; returns the archive.
fn build(root: &Path, store: &Store, binary: &Path, bin: &str) -> anyhow::Result<PathBuf> {
    let out = root.join("target/image");
    let context = out.join(bin).join("context");
    let _ = fs::remove_dir_all(&context);
    let rootfs = context.join("rootfs");
    copy_into(binary, &rootfs.join("usr/local/bin").join(bin))?;
    for lib in linked_libraries(binary)? {
        copy_into(&lib, &rootfs.join(lib.strip_prefix("/").unwrap_or(&lib)))?;
    }
    fs::create_dir_all(rootfs.join("etc"))?;
    fs::write(rootfs.join("etc/passwd"), PASSWD)?;
    fs::write(rootfs.join("etc/group"), GROUP)?;
    fs::create_dir_all(rootfs.join("tmp"))?;

    let tag = format!("nodemesh/{bin}:{VERSION}");
    let containerfile = root.join("deploy/images").join(format!("{bin}.Containerfile"));
    step(&format!("buildah: {tag} from {}", containerfile.display()));
    store.buildah(&[
        "build",
        "--isolation",
        "chroot",
        "--timestamp",
        "0",
        "--file",
        containerfile.to_str().context("path")?,
        "--tag",
        &tag,
        context.to_str().context("path")?,
    ])?;
    let archive = out.join(format!("{bin}-{VERSION}.oci.tar"));
    let _ = fs::remove_file(&archive);
    store.buildah(&["push", &tag, &format!("oci-archive:{}:{tag}", archive.display())])?;
    Ok(archive)
}

/// The shared libraries the dynamic loader maps for `binary`, the loader itself included.
fn linked_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let listing = output("ldd", &[binary.to_str().context("path")?])?;
    let mut libs = Vec::new();
    for line in listing.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)",
        // "linux-vdso.so.1 (0x…)" (in the kernel, nothing to copy).
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim(),
            None => line.trim(),
        };
        let path = path.split(" (").next().unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {line}", binary.display());
        }
    }
    Ok(libs)
}

/// Copies a file (following symlinks: the image holds the file under the name the loader asks
/// for) with its mode.
fn copy_into(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to.parent().context("path has no parent")?)?;
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Reads the archive as a runtime would and runs the binary from the unpacked rootfs.
fn check(archive: &Path, out: &Path, bin: &str, user: &str) -> anyhow::Result<()> {
    let dir = out.join(bin).join("unpacked");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    untar(archive, &dir)?;
    let read = |digest: &str| -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(&fs::read(blob(&dir, digest)?)?)?)
    };
    let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let manifest = read(index["manifests"][0]["digest"].as_str().context("index.json: no manifest")?)?;
    let config = read(manifest["config"]["digest"].as_str().context("manifest: no config")?)?;
    ensure!(config["os"] == "linux" && config["architecture"] == "amd64", "{bin}: not a linux/amd64 image");
    let entrypoint = format!("/usr/local/bin/{bin}");
    ensure!(
        config["config"]["Entrypoint"] == serde_json::json!([entrypoint]),
        "{bin}: entrypoint is {}, not [{entrypoint}]",
        config["config"]["Entrypoint"]
    );
    ensure!(config["config"]["User"] == user, "{bin}: user is {}, not {user}", config["config"]["User"]);

    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    let mut size = 0;
    for layer in manifest["layers"].as_array().context("manifest: no layers")? {
        let digest = layer["digest"].as_str().context("layer without digest")?;
        let path = blob(&dir, digest)?;
        size += fs::metadata(&path)?.len();
        untar(&path, &rootfs)?;
    }

    // The binary, from the image's own files only: a missing library fails here.
    // By path: with the environment cleared there is no PATH to search.
    let run = Command::new("/usr/sbin/chroot")
        .arg(format!("--userspec={user}"))
        .arg(&rootfs)
        .args([&entrypoint, "--help"])
        .env_clear()
        .output()
        .context("chroot")?;
    let help = String::from_utf8_lossy(&run.stdout);
    ensure!(
        run.status.success() && help.contains("Usage"),
        "{bin} --help in the image's rootfs failed ({}): {}",
        run.status,
        String::from_utf8_lossy(&run.stderr).trim()
    );
    step(&format!(
        "{}: {} layer(s), {:.1} MiB, entrypoint {entrypoint}, user {user}; `{bin} --help` runs from its rootfs",
        archive.display(),
        manifest["layers"].as_array().map_or(0, Vec::len),
        size as f64 / (1024.0 * 1024.0)
    ));
    Ok(())
}

/// A blob of the unpacked archive, after checking its content against its digest.
fn blob(dir: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex = digest.strip_prefix("sha256:").with_context(|| format!("digest {digest}: not sha256"))?;
    let path = dir.join("blobs/sha256").join(hex);
    let sum = output("sha256sum", &[path.to_str().context("path")?])?;
    ensure!(sum.split_whitespace().next() == Some(hex), "blob {digest}: content does not match its digest");
    Ok(path)
}

/// GNU tar, which tells gzip and zstd layers from plain ones by itself.
fn untar(archive: &Path, into: &Path) -> anyhow::Result<()> {
    util::run("tar", &["-xf", archive.to_str().context("path")?, "-C", into.to_str().context("path")?], &[])
}
