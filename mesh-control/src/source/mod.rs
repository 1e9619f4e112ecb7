//! Where the model's objects come from: a directory of YAML (the embedded default), and
//! workloads that nodes report.

pub mod files;
