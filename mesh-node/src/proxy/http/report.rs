//! `reporter="source"` request metrics for one client connection: the caller's and the
//! Service's labels are resolved once per connection, the answering endpoint's once per
//! endpoint; the rest is [`RequestReport`]'s.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use hyper::Response;
use nodemesh_api::workload::WorkloadNames;

use super::Target;
use crate::{
    conn::pool::Body,
    proxy::Outbound,
    telemetry::{
        access_log::{ConnectionFacts, LogSubject, Side, outbound_cluster},
        labels::{DestinationLabels, Peer, Shared},
        metrics::{Reporter, SecurityPolicy},
        requests::{Arrived, RequestReport},
    },
};

/// The upstream workload that answered (`namespace/name`), how its endpoint names it and how
/// it was reached, kept on the response for metrics.
#[derive(Clone)]
pub(super) struct AnsweredBy {
    pub(super) workload: String,
    pub(super) names: Option<Arc<WorkloadNames>>,
    pub(super) security: SecurityPolicy,
    /// A pod of this node whose requests nothing else reports (delivered as bytes, not
    /// judged per request): this report counts its `reporter="destination"` series too.
    pub(super) delivered_here: bool,
}

/// How many answering endpoints a connection remembers the labels of.
const REMEMBERED_DESTINATIONS: usize = 16;

pub(super) struct SourceReport {
    report: RequestReport,
    destinations: Mutex<Vec<(String, Arc<DestinationLabels>)>>,
}

impl SourceReport {
    /// The report of `workload`'s connection from `client` to `target`.
    pub(super) fn new(
        outbound: &Outbound,
        target: &Target,
        workload: String,
        client: Option<SocketAddr>,
    ) -> SourceReport {
        let access = LogSubject {
            logs: Arc::clone(&outbound.metrics.access_logs),
            workload,
            side: Side::Client,
            facts: ConnectionFacts {
                downstream_remote: client,
                downstream_local: Some(target.vip),
                upstream_host: None,
                upstream_cluster: outbound_cluster(target.vip.port(), &target.service),
            },
        };
        SourceReport {
            report: RequestReport {
                metrics: Arc::clone(&outbound.metrics),
                reporter: Reporter::source,
                source: Shared(Arc::clone(&target.caller.source)),
                service: Shared(Arc::clone(&target.caller.service)),
                access: Some(access),
            },
            destinations: Mutex::default(),
        }
    }

    /// The labels of workload `uid` (`namespace/name`; empty: the proxy answered), named as
    /// its endpoint's `names` say.
    fn destination(&self, uid: &str, names: Option<&WorkloadNames>) -> Arc<DestinationLabels> {
        let mut remembered = self.destinations.lock().expect("destinations lock");
        if let Some((_, labels)) = remembered.iter().find(|(u, _)| u == uid) {
            return Arc::clone(labels);
        }
        let labels = Peer::of_endpoint(uid, names, &self.report.metrics.naming).as_destination();
        if remembered.len() == REMEMBERED_DESTINATIONS {
            remembered.remove(0);
        }
        remembered.push((uid.to_string(), Arc::clone(&labels)));
        labels
    }

    /// `request` has arrived: see [`RequestReport::arrived`].
    pub(super) fn arrived<B>(&self, request: &mut hyper::Request<B>) -> Arrived {
        self.report.arrived(request)
    }

    /// `response` to the request that `arrived`, counted when its body ends.
    pub(super) fn meter(&self, arrived: Arrived, response: Response<Body>) -> Response<Body> {
        let (destination, security, delivered_here) = match response.extensions().get::<AnsweredBy>() {
            Some(a) => (self.destination(&a.workload, a.names.as_deref()), a.security, a.delivered_here),
            None => (self.destination("", None), SecurityPolicy::none, false),
        };
        self.report.meter(arrived, response, destination, security, delivered_here)
    }
}
