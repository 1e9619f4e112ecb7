//! The body of `POST /v1/workloads` on mesh-node's local API: a WorkloadSpec as JSON, then the
//! checks the API runs before anything is registered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh_api::workload::WorkloadSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<WorkloadSpec>(data) else { return };
    if let Err(errors) = spec.validate() {
        assert!(!errors.is_empty());
        for e in errors {
            assert!(!e.to_string().is_empty());
        }
        return;
    }
    let _ = spec.mesh_decision();
    let _ = spec.key().to_string();
});
