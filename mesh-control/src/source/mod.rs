//! Where the model's objects come from: a directory of YAML (the embedded default), the
//! Kubernetes API, and workloads that nodes report.

pub mod files;
pub mod kube;
