//! Runtime policy, as the data path consults it per connection and per request: decoded from
//! xDS resources by [`crate::xds::cache`], with no knowledge of streams or sockets.
//!
//! How a cluster picks an endpoint ([`lb`]) within its connection limits ([`conn_limits`]) and
//! connection settings ([`connection_settings`]); retries and their budget ([`retry`]); the
//! route tables of HTTP requests ([`http_route`], matching in [`request_match`]) and of other
//! connections ([`l4_route`]); local rate limits ([`rate_limit`]); which callers see another
//! DestinationRule ([`caller_variants`]); smooth weighted picks ([`weights`]).

use std::time::Duration;

/// A protobuf duration as a std one (negative parts read as zero).
pub fn std_duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// A protobuf duration that is set and not zero (Envoy's "unset" for timeouts).
pub fn nonzero_duration(d: Option<&envoy_types::pb::google::protobuf::Duration>) -> Option<Duration> {
    d.map(std_duration).filter(|d| !d.is_zero())
}

pub mod caller_variants;
pub mod conn_limits;
pub mod connection_settings;
pub mod http_route;
pub mod l4_route;
pub mod lb;
pub mod rate_limit;
pub mod request_match;
pub mod retry;
pub mod weights;
