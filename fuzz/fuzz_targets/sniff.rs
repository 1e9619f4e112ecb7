//! Protocol detection on a pod's first bytes: HTTP/1 request line, h2c preface, TLS
//! ClientHello (the SNI parser), or opaque. Must never panic or read past what it was given.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_node::conn::sniff::{Protocol, read_prefix};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let (protocol, prefix) = runtime.block_on(async {
        let mut stream = data;
        read_prefix(&mut stream, Duration::from_millis(10)).await
    });
    // What was read is replayed to whoever handles the connection: it must be the input's
    // own start, byte for byte.
    assert!(data.starts_with(&prefix));
    if let Protocol::Tls { sni: Some(name) } = protocol {
        assert!(!name.is_empty());
    }
});
