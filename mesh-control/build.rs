//! Generates Rust for Nodemesh's own protos (the compact mesh resources and the node
//! registration service) and for Istio's certificate-signing API. Envoy's types come
//! pre-generated from the envoy-types crate.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    if std::process::Command::new(std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into()))
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("protoc not found: run `cargo xtask setup` (installs protobuf-compiler)".into());
    }
    tonic_prost_build::configure()
        // Ordered maps: a resource's version is the hash of its encoding, which must not
        // depend on hash-map iteration order.
        .btree_map(".")
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/nodemesh/mesh/v1/mesh.proto", "proto/istio/v1/auth/ca.proto"], &["proto"])
        .map_err(|e| {
            format!("{e}\n(google/protobuf/*.proto come with libprotobuf-dev: run `cargo xtask setup`)")
        })?;
    Ok(())
}
