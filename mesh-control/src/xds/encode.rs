//! Protobuf encoding helpers every resource builder shares.

use std::{net::IpAddr, time::Duration};

use envoy_types::pb::{envoy::config::core::v3 as envoy_core, google::protobuf as pbuf};
use prost::Message;

pub fn pb_duration(d: Duration) -> pbuf::Duration {
    pbuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

pub fn string_value(s: String) -> pbuf::Value {
    pbuf::Value { kind: Some(pbuf::value::Kind::StringValue(s)) }
}

pub fn socket_address(ip: IpAddr, port: u16) -> envoy_core::Address {
    envoy_core::Address {
        address: Some(envoy_core::address::Address::SocketAddress(envoy_core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(envoy_core::socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// Content hash, used as the resource version: equal content ⇒ equal version, also across a
/// control-plane restart (so a reconnecting node is not resent what it has).
pub fn content_version(bytes: &[u8]) -> String {
    format!("{:016x}", crate::hash::fnv1a64(bytes))
}

/// Encodes a message as the `Any` a DiscoveryResponse carries.
pub fn to_any(type_url: &str, msg: &impl Message) -> pbuf::Any {
    pbuf::Any { type_url: type_url.to_string(), value: msg.encode_to_vec() }
}
