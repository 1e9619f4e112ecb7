//! Routing one request: the first VirtualService route that matches picks the cluster, and
//! may redirect, rewrite, set headers or inject a fault on the way.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{
    Response, StatusCode,
    header::{self, HeaderValue},
    http::request::Parts,
};
use nodemesh_api::proto::mesh::{self};

use super::{
    Target, error_response,
    headers::{request_authority, set_authority},
};
use crate::{
    conn::pool::{Body, full},
    policy::{
        http_route::{Abort, Action, Fault, Forward, Redirect, Route, RouteTable, Target as RouteTarget},
        lb::Balancer,
        request_match::RequestSource,
        retry::RetryPolicy,
    },
    proxy::local_reply::{flagged, grpc_trailers_only},
    workload::Source,
};

/// What routing decided for one request.
pub(super) struct Plan<'t> {
    pub balancer: Arc<Balancer>,
    pub hash_policy: Option<mesh::HashPolicy>,
    /// The route's `timeout`: over every try.
    pub timeout: Option<std::time::Duration>,
    pub retry: RetryPolicy,
    /// Clusters this request is copied to.
    pub mirrors: Vec<String>,
    /// The route and weighted target taken, whose response headers apply to the answer.
    pub chosen: Option<(&'t Route, &'t RouteTarget)>,
}

/// Routes the request by `table` (none: the port's own cluster `balancer`), applying the
/// route's request changes to `parts`. `Err` is the answer already decided: no route (404),
/// a redirect, an injected abort, a cluster this node lacks (503).
pub(super) async fn plan<'t>(
    table: Option<&'t RouteTable>,
    target: &Target,
    source: &Source,
    from: &RequestSource<'_>,
    parts: &mut Parts,
    balancer: Arc<Balancer>,
    hash_policy: Option<mesh::HashPolicy>,
) -> Result<Plan<'t>, Response<Body>> {
    let mut plan = Plan {
        balancer,
        hash_policy,
        timeout: None,
        retry: RetryPolicy::istio_default(),
        mirrors: Vec::new(),
        chosen: None,
    };
    let (Some(table), Some(cache)) = (table, &target.cache) else { return Ok(plan) };
    let Some(route) = table.select(parts, from) else {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            "NR",
            &format!("{}: no route matches {} {}", target.service, parts.method, parts.uri),
        ));
    };
    let f = match &route.action {
        Action::Redirect(r) => return Err(redirect_response(r, parts)),
        Action::Forward(f) => f,
    };
    let t = f.pick();
    route.request_ops.apply(&mut parts.headers);
    t.request_ops.apply(&mut parts.headers);
    rewrite(parts, f, route);
    if let Some(fault) = &route.fault
        && let Some(abort) = inject(fault).await
    {
        return Err(fault_response(abort));
    }
    plan.timeout = f.timeout;
    plan.retry = f.retry.clone();
    if f.hash_policy.is_some() {
        plan.hash_policy = f.hash_policy.clone();
    }
    plan.mirrors = f.mirrors.iter().filter(|(_, chance)| chance.hit()).map(|(c, _)| c.clone()).collect();
    plan.balancer = cache.cluster_for(&t.cluster, &source.key.namespace).ok_or_else(|| {
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "NC",
            &format!(
                "{}: route {} sends to cluster {}, which this node does not have (is the DestinationRule subset defined?)",
                target.service, route.name, t.cluster
            ),
        )
    })?;
    plan.chosen = Some((route, t));
    Ok(plan)
}

/// Applies a route's fault: waits out a delay that hits; returns the abort that hits, if any.
async fn inject(fault: &Fault) -> Option<Abort> {
    if let Some((delay, chance)) = fault.delay
        && chance.hit()
    {
        tokio::time::sleep(delay).await;
    }
    fault.abort.filter(|(_, chance)| chance.hit()).map(|(abort, _)| abort)
}

/// The answer to an injected abort: the HTTP status, or for gRPC a trailers-only response
/// carrying the gRPC status (what a gRPC client reads as that error).
fn fault_response(abort: Abort) -> Response<Body> {
    tracing::debug!(?abort, "fault injected");
    let mut response = Response::new(full(Bytes::from_static(b"fault filter abort")));
    match abort {
        Abort::Http(code) => {
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
        Abort::Grpc(code) => response = grpc_trailers_only(code, "fault filter abort"),
    }
    flagged(response, "FI")
}

/// A route's rewrite: the matched prefix (or the whole path) replaced, or a regex substitution;
/// the authority replaced. The query string stays.
fn rewrite(parts: &mut hyper::http::request::Parts, f: &Forward, route: &Route) {
    let path = parts.uri.path().to_string();
    let new_path = if let Some(replacement) = &f.prefix_rewrite {
        let matched = route.matched_prefix().filter(|p| path.starts_with(p)).unwrap_or(&path);
        Some(format!("{replacement}{}", &path[matched.len()..]))
    } else {
        f.regex_rewrite.as_ref().map(|(re, with)| re.replace_all(&path, with.as_str()).into_owned())
    };
    if let Some(new_path) = new_path {
        let with_query = match parts.uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let mut uri = hyper::http::uri::Builder::new();
        if let Some(scheme) = parts.uri.scheme() {
            uri = uri.scheme(scheme.clone());
        }
        if let Some(authority) = parts.uri.authority() {
            uri = uri.authority(authority.clone());
        }
        if let Ok(u) = uri.path_and_query(with_query).build() {
            parts.uri = u;
        }
    }
    if let Some(authority) = &f.authority_rewrite {
        set_authority(parts, authority);
    }
}

/// A redirect answered by the proxy: `Location` from the route's parts and the request's.
fn redirect_response(r: &Redirect, parts: &hyper::http::request::Parts) -> Response<Body> {
    let host = request_authority(parts)
        .and_then(|a| a.parse::<hyper::http::uri::Authority>().ok())
        .map(|a| a.host().to_string())
        .unwrap_or_default();
    let authority = r.authority.clone().unwrap_or(host);
    let authority = match r.port {
        Some(p) => format!("{}:{p}", authority.split(':').next().unwrap_or(&authority)),
        None => authority,
    };
    let path =
        r.path.clone().unwrap_or_else(|| parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string());
    let location = format!("{}://{authority}{path}", r.scheme.as_deref().unwrap_or("http"));
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}
