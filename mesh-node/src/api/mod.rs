//! The local workload API: a Unix socket speaking HTTP/JSON.
//!
//! In local mode this is how workloads join and leave the mesh; Kubernetes pod discovery will
//! drive the same [`crate::registry::Registry`] calls. The socket is created mode 0600: only
//! root on the node may change what is captured.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/workloads` | | list of workload statuses |
//! | POST | `/v1/workloads` | a `WorkloadSpec` | the workload's status (400 with every error) |
//! | DELETE | `/v1/workloads/{namespace}/{name}` | | 204, or 404 |

pub mod client;
pub mod server;
