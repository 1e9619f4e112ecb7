//! Generates Rust for Nodemesh's own protos (the compact mesh resources and the node
//! registration service) and for Istio's certificate-signing API. Envoy's types come
//! pre-generated from the envoy-types crate. protox parses the protos in Rust (it carries
//! google/protobuf's well-known types), so no build needs protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["nodemesh/mesh/v1/mesh.proto", "istio/v1/auth/ca.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // Ordered maps: a resource's version is the hash of its encoding, which must not
        // depend on hash-map iteration order.
        .btree_map(".")
        .build_server(true)
        .build_client(true)
        .compile_fds(files)?;
    Ok(())
}
