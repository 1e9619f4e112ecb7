//! A config file as mesh-control reads it from its directory: YAML documents, each parsed into
//! a typed object (or refused with a field path), applied to the store, and translated into the
//! xDS snapshot every node would be sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_control::{
    model::store::{Origin, Store},
    source::files::parse_documents,
    xds::translate::snapshot,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let documents = parse_documents(text);
    let mut store = Store::default();
    store.replace_source(&Origin::File("fuzz.yaml".into()), documents);
    for e in store.errors() {
        assert!(!e.to_string().is_empty());
    }
    let _ = snapshot(&store);
});
