//! The node's xDS client: one ADS stream to the control plane ([`client`]) and what it learnt
//! ([`cache`]): every resource decoded into the [`crate::policy`] types the data path uses, a
//! bad one refused (NACKed) by name while the rest apply.

pub mod cache;
pub mod client;
pub mod resources;
