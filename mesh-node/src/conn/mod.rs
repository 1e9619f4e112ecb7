//! Connection building blocks every listener shares (outbound, inbound, tunnel): protocol
//! sniffing ([`sniff`]), the L4 byte relay ([`relay`]), HTTP/1.1 upgrades ([`upgrade`]) and
//! the pool of upstream HTTP connections each workload reuses ([`pool`]).

pub mod pool;
pub mod relay;
pub mod sniff;
pub mod upgrade;
