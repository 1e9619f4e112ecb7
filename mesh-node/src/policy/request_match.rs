//! What a request must look like: Envoy `RouteMatch`es (path, headers, query parameters)
//! compiled once, regexes included, plus the caller a route is restricted to. Shared by HTTP
//! routes and the rate limits that match requests the same way.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::{
    config::route::v3::{
        self as route, header_matcher::HeaderMatchSpecifier,
        query_parameter_matcher::QueryParameterMatchSpecifier, route_match::PathSpecifier,
    },
    r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern},
};
use hyper::http::request::Parts;
use nodemesh_api::proto::{self, mesh};
use regex::Regex;

/// What a request must look like: an Envoy `RouteMatch` plus, from route metadata, the caller.
pub struct RequestMatch {
    path: PathMatch,
    headers: Vec<HeaderMatch>,
    query: Vec<(String, StrMatch)>,
    pub(super) source: Option<mesh::RouteSource>,
}

enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
    Present,
}

struct HeaderMatch {
    name: String,
    m: StrMatch,
    invert: bool,
}

/// The source of a request, for routes restricted by sourceLabels / sourceNamespace.
pub struct RequestSource<'a> {
    pub namespace: &'a str,
    pub labels: Option<&'a BTreeMap<String, String>>,
}

impl RequestSource<'_> {
    /// Is the caller in `s`'s namespace (if set), among the namespaces the route is exported
    /// to (if it says), none it excludes, and does it carry every label of `s`?
    pub fn is(&self, s: &mesh::RouteSource) -> bool {
        let ns = self.namespace;
        (s.namespace.is_empty() || s.namespace == ns)
            && (!s.only_namespaces || s.namespaces.iter().any(|n| n == ns))
            && !s.not_namespaces.iter().any(|n| n == ns)
            && s.labels.iter().all(|(k, v)| self.labels.is_some_and(|l| l.get(k) == Some(v)))
    }
}

impl RequestMatch {
    /// For a prefix match: the prefix.
    pub fn path_prefix(&self) -> Option<&str> {
        match &self.path {
            PathMatch::Prefix(p) => Some(p),
            _ => None,
        }
    }

    pub fn matches(&self, req: &Parts, source: &RequestSource<'_>) -> bool {
        let path = req.uri.path();
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
        };
        if !path_ok {
            return false;
        }
        if !self.headers.iter().all(|h| h.matches(req)) {
            return false;
        }
        let query = req.uri.query().unwrap_or_default();
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        if !self.query.iter().all(|(name, m)| param(name).is_some_and(|v| m.matches(v))) {
            return false;
        }
        self.source.as_ref().is_none_or(|s| source.is(s))
    }
}

impl HeaderMatch {
    fn matches(&self, req: &Parts) -> bool {
        let value = match self.name.as_str() {
            ":method" => Some(req.method.as_str().to_string()),
            ":authority" => req.uri.authority().map(|a| a.to_string()).or_else(|| {
                req.headers.get(hyper::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
            }),
            ":path" => req.uri.path_and_query().map(|p| p.to_string()),
            name => {
                let values: Vec<&str> =
                    req.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
                (!values.is_empty()).then(|| values.join(","))
            }
        };
        let matched = value.is_some_and(|v| self.m.matches(&v));
        matched != self.invert
    }
}

impl StrMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Contains(c) => v.contains(c.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
            StrMatch::Present => true,
        }
    }
}

pub(super) fn regex(r: &str) -> Result<Regex, String> {
    // Envoy's safe_regex matches the whole value.
    Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("regex `{r}`: {e}"))
}

fn str_match(m: &StringMatcher) -> Result<StrMatch, String> {
    let case = |s: &String| if m.ignore_case { s.to_lowercase() } else { s.clone() };
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(e)) if !m.ignore_case => StrMatch::Exact(e.clone()),
        Some(MatchPattern::Exact(e)) => StrMatch::Regex(regex(&format!("(?i){}", regex::escape(&case(e))))?),
        Some(MatchPattern::Prefix(p)) if !m.ignore_case => StrMatch::Prefix(p.clone()),
        Some(MatchPattern::Prefix(p)) => StrMatch::Regex(regex(&format!("(?i){}.*", regex::escape(p)))?),
        Some(MatchPattern::Suffix(s)) => StrMatch::Suffix(s.clone()),
        Some(MatchPattern::Contains(c)) => StrMatch::Contains(c.clone()),
        Some(MatchPattern::SafeRegex(r)) => StrMatch::Regex(regex(&r.regex)?),
        Some(other) => return Err(format!("string match {other:?} is not supported")),
        None => StrMatch::Present,
    })
}

/// An Envoy `RouteMatch`, compiled (regexes included).
pub fn compile_match(m: &route::RouteMatch) -> Result<RequestMatch, String> {
    let case_sensitive = m.case_sensitive.as_ref().is_none_or(|b| b.value);
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) if case_sensitive => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Prefix(p)) => PathMatch::Regex(regex(&format!("(?i){}.*", regex::escape(p)))?),
        Some(PathSpecifier::Path(p)) if case_sensitive => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Regex(regex(&format!("(?i){}", regex::escape(p)))?),
        Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(regex(&r.regex)?),
        None => PathMatch::Prefix("/".into()),
        Some(other) => return Err(format!("path match {other:?} is not supported")),
    };
    let mut headers = Vec::new();
    // The source-scoped marker is for other xDS clients; mesh-node checks the route metadata.
    for h in m.headers.iter().filter(|h| h.name != proto::SOURCE_SCOPED_HEADER) {
        #[allow(
            deprecated,
            reason = "the deprecated one-field forms are still what many control planes send"
        )]
        let matcher = match &h.header_match_specifier {
            Some(HeaderMatchSpecifier::StringMatch(s)) => str_match(s)?,
            Some(HeaderMatchSpecifier::ExactMatch(e)) => StrMatch::Exact(e.clone()),
            Some(HeaderMatchSpecifier::PrefixMatch(p)) => StrMatch::Prefix(p.clone()),
            Some(HeaderMatchSpecifier::SuffixMatch(s)) => StrMatch::Suffix(s.clone()),
            Some(HeaderMatchSpecifier::ContainsMatch(c)) => StrMatch::Contains(c.clone()),
            Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => StrMatch::Regex(regex(&r.regex)?),
            Some(HeaderMatchSpecifier::PresentMatch(true)) | None => StrMatch::Present,
            Some(other) => return Err(format!("header `{}`: match {other:?} is not supported", h.name)),
        };
        headers.push(HeaderMatch { name: h.name.to_ascii_lowercase(), m: matcher, invert: h.invert_match });
    }
    let mut query = Vec::new();
    for q in &m.query_parameters {
        let matcher = match &q.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => str_match(s)?,
            Some(QueryParameterMatchSpecifier::PresentMatch(_)) | None => StrMatch::Present,
        };
        query.push((q.name.clone(), matcher));
    }
    Ok(RequestMatch { path, headers, query, source: None })
}
