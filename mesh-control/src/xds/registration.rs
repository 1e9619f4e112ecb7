//! `NodeRegistration/ReportWorkloads`: in local mode the node is the only one that knows its
//! workloads (there is no Kubernetes API to list pods from). A report replaces the node's set
//! in the store like a file replaces its objects; a bad entry is refused with its reason and
//! the rest apply.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::{
    ca::node_tokens::NodeCredentials,
    model::{
        FieldError, Labels, Meta, Object, ParseError,
        core::{NodeProxy, Pod},
        parse_ips,
        store::{Document, Origin, Store},
    },
    proto::mesh::{self, node_registration_server::NodeRegistration},
};

pub struct Registration {
    pub store: Arc<Mutex<Store>>,
    pub changed: Arc<Notify>,
    /// Node tokens: a report with one proves the node (see [`NodeCredentials`]).
    pub nodes: Arc<NodeCredentials>,
}

#[tonic::async_trait]
impl NodeRegistration for Registration {
    async fn report_workloads(
        &self,
        request: Request<mesh::WorkloadReport>,
    ) -> Result<Response<mesh::WorkloadReportReply>, Status> {
        let metadata = request.metadata().clone();
        let report = request.into_inner();
        if report.node.is_empty() {
            return Err(Status::invalid_argument("report.node: the reporting node's name is required"));
        }
        if let Err(refused) = self.nodes.admit_report(&report.node, &metadata).await {
            tracing::warn!(node = report.node, "workload report refused: {}", refused.message());
            return Err(refused);
        }
        let origin = Origin::Node(report.node.clone());
        let proxy = Document { location: "tunnel_address".into(), result: node_proxy(&report) };
        let docs = std::iter::once(proxy)
            .chain(report.workloads.into_iter().enumerate().map(|(i, w)| Document {
                location: format!("workloads[{i}]"),
                result: workload(&report.node, w),
            }))
            .collect();
        let mut store = self.store.lock().expect("store lock");
        let applied = store.replace_source(&origin, docs);
        let errors: Vec<String> =
            store.errors().filter(|e| e.origin == origin).map(ToString::to_string).collect();
        let generation = store.generation();
        drop(store);
        if applied.changed > 0 {
            self.changed.notify_one();
        }
        tracing::info!(
            node = report.node,
            changed = applied.changed,
            rejected = applied.rejected,
            "workload report"
        );
        if !errors.is_empty() {
            return Err(Status::invalid_argument(errors.join("; ")));
        }
        Ok(Response::new(mesh::WorkloadReportReply { generation }))
    }
}

/// The reporting node itself: where its tunnel listens.
fn node_proxy(report: &mesh::WorkloadReport) -> Result<Object, ParseError> {
    let meta = Meta { name: report.node.clone(), ..Meta::default() };
    let tunnel = match report.tunnel_address.as_str() {
        "" => None,
        a => Some(a.parse::<std::net::SocketAddr>().map_err(|e| ParseError {
            key: None,
            object: format!("node {}", report.node),
            errors: vec![FieldError::new("tunnel_address", format!("`{a}` is not ip:port: {e}"))],
        })?),
    };
    Ok(Object::NodeProxy(NodeProxy { meta, tunnel }))
}

fn workload(node: &str, w: mesh::ReportedWorkload) -> Result<Object, ParseError> {
    let mut errors = Vec::new();
    let ips = parse_ips("addresses", &w.addresses, &mut errors);
    if w.name.is_empty() || w.namespace.is_empty() {
        errors.push(FieldError::new("name", "name and namespace are required"));
    }
    let meta = Meta { name: w.name, namespace: w.namespace, labels: w.labels.into_iter().collect() };
    if !errors.is_empty() {
        return Err(ParseError {
            key: None,
            object: format!("workload {}/{}", meta.namespace, meta.name),
            errors,
        });
    }
    Ok(Object::NodeWorkload(Pod {
        // A node names what it runs; it knows no owner.
        workload_name: meta.name.clone(),
        meta,
        ips,
        node: node.to_string(),
        service_account: if w.service_account.is_empty() { "default".into() } else { w.service_account },
        ready: true,
        namespace_labels: w.namespace_labels.into_iter().collect::<Labels>(),
        // The reporting node's tunnel is known from its own report.
        host_ip: None,
    }))
}
