//! Builds the eBPF object from `mesh-ebpf/` and leaves it in OUT_DIR for `include_bytes_aligned!`.
//!
//! We use aya-build from build.rs (rather than an xtask step) so that a plain `cargo build`,
//! `cargo test` or `cargo install` produces a mesh-node whose embedded programs always match
//! the sources: there is no separate artifact to forget to rebuild. It needs the nightly
//! toolchain with rust-src and bpf-linker; `cargo xtask setup` installs both.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../mesh-ebpf").canonicalize()?;
    let root_dir = ebpf_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "mesh-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             (needs the nightly toolchain with rust-src and bpf-linker: run `cargo xtask setup`)"
        )
    })
}
