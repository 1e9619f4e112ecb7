//! Envoy `RouteConfiguration`s compiled for per-request use: the first route whose match holds
//! wins (Envoy's and Istio's order), then a weighted pick among its clusters.
//!
//! Compiled once when the resource arrives — regexes included, so a bad one is a NACK naming the
//! route, never a failure at request time. Weighted picks are smooth weighted round robin
//! ([`super::weights`]).

use std::time::Duration;

use envoy_types::pb::envoy::{
    config::{
        core::v3::{HeaderValueOption, header_value_option::HeaderAppendAction},
        route::v3::{self as route, RouteConfiguration, redirect_action, route_action},
    },
    extensions::filters::{
        common::fault::v3::fault_delay,
        http::fault::v3::{HttpFault, fault_abort},
    },
    r#type::v3::{FractionalPercent, fractional_percent},
};
use hyper::{
    HeaderMap,
    header::{HeaderName, HeaderValue},
    http::request::Parts,
};
use nodemesh_api::proto::{self, mesh};
use prost::Message;
use regex::Regex;

use super::{
    rate_limit::{self, BucketRegistry, RateLimit},
    request_match::{RequestMatch, RequestSource, compile_match, regex},
    retry::RetryPolicy,
    weights::SmoothWeights,
};

pub struct RouteTable {
    pub name: String,
    routes: Vec<Route>,
    /// The port's local rate limits (RateLimitPolicy), checked before any route.
    pub limits: Vec<RateLimit>,
}

pub struct Route {
    pub name: String,
    matcher: RequestMatch,
    pub action: Action,
    pub request_ops: HeaderOps,
    pub response_ops: HeaderOps,
    /// Fault injection (Envoy's fault filter, configured on the route).
    pub fault: Option<Fault>,
}

/// Per-million chances, so that Istio's fractional percentages survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chance(pub u32);

impl Chance {
    pub fn hit(self) -> bool {
        self.0 >= 1_000_000 || fastrand::u32(0..1_000_000) < self.0
    }

    fn from_fraction(f: Option<&FractionalPercent>) -> Chance {
        let Some(f) = f else { return Chance(1_000_000) };
        let scale = match fractional_percent::DenominatorType::try_from(f.denominator) {
            Ok(fractional_percent::DenominatorType::Hundred) => 10_000,
            Ok(fractional_percent::DenominatorType::TenThousand) => 100,
            _ => 1,
        };
        Chance(f.numerator.saturating_mul(scale).min(1_000_000))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(Duration, Chance)>,
    pub abort: Option<(Abort, Chance)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

pub enum Action {
    Forward(Box<Forward>),
    Redirect(Redirect),
}

pub struct Forward {
    pub targets: Vec<Target>,
    /// Over `targets`, by their weights.
    weights: SmoothWeights,
    /// None: no timeout.
    pub timeout: Option<Duration>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub authority_rewrite: Option<String>,
    pub retry: RetryPolicy,
    /// Clusters that get a copy of each request (fire and forget), with their chance.
    pub mirrors: Vec<(String, Chance)>,
    /// Consistent hashing for this route (Envoy hashes per route), replacing the port's.
    pub hash_policy: Option<mesh::HashPolicy>,
}

pub struct Target {
    pub cluster: String,
    weight: u32,
    pub request_ops: HeaderOps,
    pub response_ops: HeaderOps,
}

pub struct Redirect {
    pub status: u16,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    pub path: Option<String>,
}

#[derive(Default)]
pub struct HeaderOps {
    /// (name, value, overwrite)
    add: Vec<(HeaderName, HeaderValue, bool)>,
    remove: Vec<HeaderName>,
}

impl RouteTable {
    /// Compiles `config`; rate-limit buckets come from `buckets`, so a limit that survives a
    /// config change keeps its state.
    pub fn compile(config: &RouteConfiguration, buckets: &BucketRegistry) -> Result<RouteTable, String> {
        let mut routes = Vec::new();
        let mut limits = Vec::new();
        for vh in &config.virtual_hosts {
            for (i, r) in vh.routes.iter().enumerate() {
                let at = format!("RouteConfiguration {} route {} ({i})", config.name, r.name);
                routes.push(compile_route(r).map_err(|e| format!("{at}: {e}"))?);
            }
            if let Some(any) = vh.typed_per_filter_config.get(proto::RATE_LIMIT_FILTER) {
                let at = format!("RouteConfiguration {} rate limits", config.name);
                limits.extend(rate_limit::compile(any, buckets).map_err(|e| format!("{at}: {e}"))?);
            }
        }
        Ok(RouteTable { name: config.name.clone(), routes, limits })
    }

    /// Whether any route or limit depends on the caller's labels or namespace.
    pub fn matches_source(&self) -> bool {
        self.routes.iter().any(|r| r.matcher.source.is_some())
            || self.limits.iter().any(RateLimit::matches_source)
    }

    /// The first route matching the request.
    pub fn select(&self, req: &Parts, source: &RequestSource<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req, source))
    }
}

impl Forward {
    /// The next target of a weighted split.
    pub fn pick(&self) -> &Target {
        &self.targets[self.weights.pick()]
    }
}

impl HeaderOps {
    fn compile(add: &[HeaderValueOption], remove: &[String]) -> Result<HeaderOps, String> {
        let mut ops = HeaderOps::default();
        for o in add {
            let Some(h) = &o.header else { continue };
            let name = HeaderName::from_bytes(h.key.as_bytes())
                .map_err(|_| format!("header name `{}` is not valid", h.key))?;
            let value = HeaderValue::from_str(&h.value)
                .map_err(|_| format!("header `{}`: value is not valid", h.key))?;
            let overwrite = o.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32
                || o.append_action == HeaderAppendAction::OverwriteIfExists as i32;
            ops.add.push((name, value, overwrite));
        }
        for r in remove {
            ops.remove.push(
                HeaderName::from_bytes(r.as_bytes())
                    .map_err(|_| format!("header name `{r}` is not valid"))?,
            );
        }
        Ok(ops)
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value, overwrite) in &self.add {
            if *overwrite {
                headers.insert(name.clone(), value.clone());
            } else {
                headers.append(name.clone(), value.clone());
            }
        }
    }
}

fn compile_route(r: &route::Route) -> Result<Route, String> {
    let mut matcher = compile_match(&r.r#match.clone().unwrap_or_default())?;
    matcher.source =
        match r.metadata.as_ref().and_then(|md| md.typed_filter_metadata.get(proto::METADATA_KEY)) {
            Some(any) => Some(
                mesh::RouteSource::decode(any.value.as_slice())
                    .map_err(|e| format!("route source metadata: {e}"))?,
            ),
            None => None,
        };

    let action = match &r.action {
        Some(route::route::Action::Route(a)) => Action::Forward(Box::new(forward(a)?)),
        Some(route::route::Action::Redirect(rd)) => Action::Redirect(redirect(rd)),
        other => return Err(format!("action {other:?} is not supported")),
    };
    let fault = match r.typed_per_filter_config.get(FAULT_FILTER) {
        Some(any) => Some(fault(
            &HttpFault::decode(any.value.as_slice()).map_err(|e| format!("fault filter config: {e}"))?,
        )?),
        None => None,
    };
    Ok(Route {
        fault,
        name: r.name.clone(),
        matcher,
        action,
        request_ops: HeaderOps::compile(&r.request_headers_to_add, &r.request_headers_to_remove)?,
        response_ops: HeaderOps::compile(&r.response_headers_to_add, &r.response_headers_to_remove)?,
    })
}

/// The per-route name of Envoy's HTTP fault filter.
const FAULT_FILTER: &str = "envoy.filters.http.fault";

fn fault(f: &HttpFault) -> Result<Fault, String> {
    let delay = match &f.delay {
        Some(d) => match &d.fault_delay_secifier {
            Some(fault_delay::FaultDelaySecifier::FixedDelay(fixed)) => Some((
                Duration::new(fixed.seconds.max(0) as u64, fixed.nanos.max(0) as u32),
                Chance::from_fraction(d.percentage.as_ref()),
            )),
            other => return Err(format!("fault delay {other:?} is not supported (fixed delays only)")),
        },
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            let kind = match &a.error_type {
                Some(fault_abort::ErrorType::HttpStatus(c)) => Abort::Http(
                    u16::try_from(*c)
                        .ok()
                        .filter(|c| (200..600).contains(c))
                        .ok_or(format!("abort status {c}"))?,
                ),
                Some(fault_abort::ErrorType::GrpcStatus(c)) => Abort::Grpc(*c),
                other => return Err(format!("fault abort {other:?} is not supported")),
            };
            Some((kind, Chance::from_fraction(a.percentage.as_ref())))
        }
        None => None,
    };
    Ok(Fault { delay, abort })
}

fn forward(a: &route::RouteAction) -> Result<Forward, String> {
    let targets = match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => {
            vec![Target {
                cluster: c.clone(),
                weight: 1,
                request_ops: HeaderOps::default(),
                response_ops: HeaderOps::default(),
            }]
        }
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .map(|c| {
                Ok(Target {
                    cluster: c.name.clone(),
                    weight: c.weight.as_ref().map_or(0, |w| w.value),
                    request_ops: HeaderOps::compile(&c.request_headers_to_add, &c.request_headers_to_remove)?,
                    response_ops: HeaderOps::compile(
                        &c.response_headers_to_add,
                        &c.response_headers_to_remove,
                    )?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?,
        other => return Err(format!("cluster specifier {other:?} is not supported")),
    };
    if targets.is_empty() {
        return Err("a route with no clusters".into());
    }
    let weights = SmoothWeights::new(targets.iter().map(|t| t.weight).collect())?;
    let timeout = super::nonzero_duration(a.timeout.as_ref());
    let regex_rewrite = match &a.regex_rewrite {
        Some(rr) => Some((
            regex(&rr.pattern.as_ref().map(|p| p.regex.clone()).unwrap_or_default())?,
            rr.substitution.clone(),
        )),
        None => None,
    };
    let authority_rewrite = match &a.host_rewrite_specifier {
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
        _ => None,
    };
    let retry = match &a.retry_policy {
        Some(p) => RetryPolicy::from_envoy(p)?,
        None => RetryPolicy::default(),
    };
    let mirrors = a
        .request_mirror_policies
        .iter()
        .map(|m| {
            (
                m.cluster.clone(),
                Chance::from_fraction(m.runtime_fraction.as_ref().and_then(|r| r.default_value.as_ref())),
            )
        })
        .collect();
    let hash_policy = a.hash_policy.iter().find_map(|h| {
        use route_action::hash_policy::PolicySpecifier;
        let key = match h.policy_specifier.as_ref()? {
            PolicySpecifier::Header(hd) => {
                mesh::hash_policy::Key::Header(hd.header_name.to_ascii_lowercase())
            }
            PolicySpecifier::Cookie(c) => mesh::hash_policy::Key::Cookie(c.name.clone()),
            PolicySpecifier::QueryParameter(q) => mesh::hash_policy::Key::QueryParameter(q.name.clone()),
            PolicySpecifier::ConnectionProperties(c) if c.source_ip => mesh::hash_policy::Key::SourceIp(true),
            _ => return None,
        };
        Some(mesh::HashPolicy { key: Some(key) })
    });
    Ok(Forward {
        hash_policy,
        mirrors,
        retry,
        targets,
        weights,
        timeout,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        regex_rewrite,
        authority_rewrite,
    })
}

fn redirect(r: &route::RedirectAction) -> Redirect {
    use redirect_action::RedirectResponseCode as Code;
    let status = match Code::try_from(r.response_code) {
        Ok(Code::Found) => 302,
        Ok(Code::SeeOther) => 303,
        Ok(Code::TemporaryRedirect) => 307,
        Ok(Code::PermanentRedirect) => 308,
        _ => 301,
    };
    Redirect {
        status,
        authority: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port: u16::try_from(r.port_redirect).ok().filter(|p| *p != 0),
        scheme: match &r.scheme_rewrite_specifier {
            Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
            Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
            _ => None,
        },
        path: match &r.path_rewrite_specifier {
            Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => Some(p.clone()),
            _ => None,
        },
    }
}

impl Route {
    /// For a prefix match: the prefix (what `prefix_rewrite` replaces).
    pub fn matched_prefix(&self) -> Option<&str> {
        self.matcher.path_prefix()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward_of(weights: &[u32]) -> Forward {
        Forward {
            targets: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Target {
                    cluster: format!("c{i}"),
                    weight: *w,
                    request_ops: HeaderOps::default(),
                    response_ops: HeaderOps::default(),
                })
                .collect(),
            weights: SmoothWeights::new(weights.to_vec()).unwrap(),
            timeout: None,
            prefix_rewrite: None,
            regex_rewrite: None,
            authority_rewrite: None,
            retry: RetryPolicy::default(),
            mirrors: Vec::new(),
            hash_policy: None,
        }
    }

    #[test]
    fn weighted_picks_are_exact_per_cycle_and_interleaved() {
        let f = forward_of(&[90, 10]);
        let picks: Vec<String> = (0..1000).map(|_| f.pick().cluster.clone()).collect();
        assert_eq!(picks.iter().filter(|c| *c == "c1").count(), 100);
        // Interleaved: at most 9 in a row to the larger side.
        let longest_run = picks.chunk_by(|a, b| a == b).map(<[String]>::len).max().unwrap();
        assert!(longest_run <= 9, "longest run {longest_run}");
        let f = forward_of(&[50, 50, 0]);
        let picks: Vec<String> = (0..100).map(|_| f.pick().cluster.clone()).collect();
        assert_eq!(picks.iter().filter(|c| *c == "c2").count(), 0);
        assert_eq!(picks.iter().filter(|c| *c == "c0").count(), 50);
    }
}
