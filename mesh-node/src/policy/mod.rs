//! Runtime policy, as the data path consults it per connection and per request: decoded from
//! xDS resources by [`crate::xds::cache`], with no knowledge of streams or sockets.
//!
//! How a cluster picks an endpoint ([`lb`]) within its connection limits ([`conn_limits`]) and
//! connection settings ([`connection_settings`]); retries and their budget ([`retry`]); the
//! route tables of HTTP requests ([`http_route`], matching in [`request_match`]) and of other
//! connections ([`l4_route`]); local rate limits ([`rate_limit`]); which callers see another
//! DestinationRule ([`caller_variants`]); smooth weighted picks ([`weights`]).

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
