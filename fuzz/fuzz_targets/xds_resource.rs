//! One xDS resource as mesh-control sends it to mesh-node: protobuf bytes of a type picked by
//! the first input byte (Cluster, ClusterLoadAssignment, RouteConfiguration, Workload,
//! Address, RateLimit…), decoded, checked and applied to a node's cache — or refused with a
//! reason (the NACK), leaving the cache as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::xds::{cache::Cache, resources::Incoming};
use nodemesh_api::proto;

const TYPES: [&str; 5] =
    [proto::CLUSTER_TYPE, proto::ENDPOINT_TYPE, proto::ROUTE_TYPE, proto::WORKLOAD_TYPE, proto::ADDRESS_TYPE];

fuzz_target!(|data: &[u8]| {
    let Some((&which, value)) = data.split_first() else { return };
    let type_url = TYPES[usize::from(which) % TYPES.len()];
    let cache = Cache::new(1000);
    let incoming = Incoming { name: "fuzzed".into(), version: "1".into(), value: value.to_vec() };
    if let Err(reason) = cache.apply(type_url, 1, vec![incoming], &[]) {
        assert!(!reason.is_empty());
    }
    let _ = cache.dump();
});
