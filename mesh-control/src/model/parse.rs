//! One document (already decoded from YAML or JSON) → one model object, or every problem with
//! it: the field path and the reason.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Kind, Labels, Meta, Object, ObjectKey, core, istio};

/// One problem at one field.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.trafficPolicy.loadBalancer.simple`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), reason: reason.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// Why a document is not a valid object. `key` is set when the document at least names an
/// object, so the store can keep that object's last good version in force.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParseError {
    pub key: Option<ObjectKey>,
    /// `Kind namespace/name` as far as it could be read, for messages.
    pub object: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.object)?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

const ISTIO_NETWORKING: &[&str] =
    &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];
const ISTIO_SECURITY: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const ISTIO_TELEMETRY: &[&str] = &["telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"];
const NOT_YET: &[&str] = &["Gateway", "EnvoyFilter", "RequestAuthentication", "HTTPRoute", "GRPCRoute"];

/// Parses one object. Every source (files, the Kubernetes API, node reports) goes through here.
pub fn object_from_value(value: Value) -> Result<Object, ParseError> {
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    let kind_name = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let (meta, meta_errors) = read_meta(&value);
    let described = |kind: &str, meta: &Meta| {
        if meta.namespace.is_empty() {
            format!("{kind} {}", meta.name)
        } else {
            format!("{kind} {}/{}", meta.namespace, meta.name)
        }
    };
    let fail = |kind: Option<Kind>, meta: &Meta, errors: Vec<FieldError>| ParseError {
        key: kind.filter(|_| !meta.name.is_empty()).map(|kind| ObjectKey {
            kind,
            namespace: if kind.is_namespaced() { meta.namespace.clone() } else { String::new() },
            name: meta.name.clone(),
        }),
        object: described(if kind_name.is_empty() { "object" } else { &kind_name }, meta),
        errors,
    };
    let kind = match (api_version.as_str(), kind_name.as_str()) {
        ("", _) => return Err(fail(None, &meta, vec![FieldError::new("apiVersion", "missing")])),
        (_, "") => return Err(fail(None, &meta, vec![FieldError::new("kind", "missing")])),
        ("v1", "Namespace") => Kind::Namespace,
        ("v1", "Node") => Kind::Node,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        (v, "ServiceEntry") if ISTIO_NETWORKING.contains(&v) => Kind::ServiceEntry,
        (v, "WorkloadEntry") if ISTIO_NETWORKING.contains(&v) => Kind::WorkloadEntry,
        (v, "DestinationRule") if ISTIO_NETWORKING.contains(&v) => Kind::DestinationRule,
        (v, "Sidecar") if ISTIO_NETWORKING.contains(&v) => Kind::Sidecar,
        (v, "VirtualService") if ISTIO_NETWORKING.contains(&v) => Kind::VirtualService,
        (v, "PeerAuthentication") if ISTIO_SECURITY.contains(&v) => Kind::PeerAuthentication,
        (v, "AuthorizationPolicy") if ISTIO_SECURITY.contains(&v) => Kind::AuthorizationPolicy,
        (v, "Telemetry") if ISTIO_TELEMETRY.contains(&v) => Kind::Telemetry,
        ("nodemesh.io/v1alpha1", "MeshConfig") => Kind::MeshConfig,
        ("nodemesh.io/v1alpha1", "RateLimitPolicy") => Kind::RateLimitPolicy,
        (v, k) => {
            let reason = if NOT_YET.contains(&k) {
                format!("{k} ({v}) is not supported yet by this version of Nodemesh; it is ignored")
            } else {
                format!(
                    "unknown kind {k} ({v}); supported: v1 Namespace/Node/Pod/Service, discovery.k8s.io/v1 \
                     EndpointSlice, networking.istio.io ServiceEntry/WorkloadEntry/DestinationRule/Sidecar/VirtualService, \
                     security.istio.io PeerAuthentication/AuthorizationPolicy, telemetry.istio.io Telemetry, \
                     nodemesh.io/v1alpha1 MeshConfig/RateLimitPolicy"
                )
            };
            return Err(fail(None, &meta, vec![FieldError::new("kind", reason)]));
        }
    };
    let mut meta = meta;
    let errors = meta_errors;
    if kind.is_namespaced() {
        if meta.namespace.is_empty() {
            meta.namespace = "default".into();
        }
    } else {
        meta.namespace.clear();
    }
    if !errors.is_empty() {
        return Err(fail(Some(kind), &meta, errors));
    }
    let result = match kind {
        Kind::Namespace => typed(value).and_then(|v| core::namespace(meta.clone(), v)).map(Object::Namespace),
        Kind::Node => typed(value).and_then(|v| core::node(meta.clone(), v)).map(Object::Node),
        Kind::Pod => typed(value).and_then(|v| core::pod(meta.clone(), v)).map(Object::Pod),
        Kind::Service => typed(value).and_then(|v| core::service(meta.clone(), v)).map(Object::Service),
        Kind::EndpointSlice => {
            typed(value).and_then(|v| core::endpoint_slice(meta.clone(), v)).map(Object::EndpointSlice)
        }
        Kind::ServiceEntry => spec::<istio::ServiceEntrySpec>(&value).and_then(|spec| {
            checked(|e| spec.check(e))?;
            Ok(Object::ServiceEntry(istio::ServiceEntry { meta: meta.clone(), spec }))
        }),
        Kind::WorkloadEntry => spec::<istio::WorkloadEntrySpec>(&value).and_then(|spec| {
            checked(|e| spec.check("spec.", e))?;
            Ok(Object::WorkloadEntry(istio::WorkloadEntry { meta: meta.clone(), spec }))
        }),
        Kind::DestinationRule => spec::<istio::DestinationRuleSpec>(&value).and_then(|spec| {
            checked(|e| spec.check(e))?;
            Ok(Object::DestinationRule(istio::DestinationRule { meta: meta.clone(), spec }))
        }),
        Kind::PeerAuthentication => spec::<super::peer_authentication::PeerAuthenticationSpec>(&value)
            .and_then(|spec| {
                checked(|e| spec.check(e))?;
                Ok(Object::PeerAuthentication(super::peer_authentication::PeerAuthentication {
                    meta: meta.clone(),
                    spec,
                }))
            }),
        Kind::AuthorizationPolicy => {
            spec::<super::authorization::AuthorizationPolicySpec>(&value).and_then(|spec| {
                checked(|e| spec.check(e))?;
                Ok(Object::AuthorizationPolicy(super::authorization::AuthorizationPolicy {
                    meta: meta.clone(),
                    spec,
                }))
            })
        }
        Kind::Sidecar => spec::<istio::SidecarSpec>(&value).and_then(|spec| {
            checked(|e| spec.check(e))?;
            Ok(Object::Sidecar(istio::Sidecar { meta: meta.clone(), spec }))
        }),
        Kind::VirtualService => spec::<super::virtual_service::VirtualServiceSpec>(&value).and_then(|spec| {
            let precedence = super::virtual_service::precedence(&value);
            checked(|e| {
                spec.check(e);
                e.extend(precedence.clone().err());
            })?;
            Ok(Object::VirtualService(super::virtual_service::VirtualService {
                meta: meta.clone(),
                precedence: precedence.unwrap_or_default(),
                spec,
            }))
        }),
        Kind::RateLimitPolicy => spec::<super::rate_limit::RateLimitPolicySpec>(&value).and_then(|spec| {
            checked(|e| spec.check(e))?;
            Ok(Object::RateLimitPolicy(super::rate_limit::RateLimitPolicy { meta: meta.clone(), spec }))
        }),
        Kind::MeshConfig => spec::<istio::MeshConfigSpec>(&value).and_then(|spec| {
            checked(|e| spec.check(e))?;
            Ok(Object::MeshConfig(istio::MeshConfig { meta: meta.clone(), spec }))
        }),
        Kind::Telemetry => spec::<super::telemetry::TelemetrySpec>(&value).and_then(|spec| {
            checked(|e| spec.check(e))?;
            Ok(Object::Telemetry(super::telemetry::Telemetry { meta: meta.clone(), spec }))
        }),
        Kind::NodeWorkload | Kind::NodeProxy => {
            unreachable!("node reports are not parsed from documents")
        }
    };
    result.map_err(|errors| fail(Some(kind), &meta, errors))
}

fn checked(f: impl FnOnce(&mut Vec<FieldError>)) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    f(&mut errors);
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

fn read_meta(value: &Value) -> (Meta, Vec<FieldError>) {
    let mut errors = Vec::new();
    let m = value.get("metadata");
    let text = |k: &str| m.and_then(|m| m.get(k)).and_then(Value::as_str).unwrap_or_default().to_string();
    let name = text("name");
    if name.is_empty() {
        errors.push(FieldError::new("metadata.name", "missing"));
    } else if !is_dns_subdomain(&name) {
        errors.push(FieldError::new("metadata.name", format!("`{name}` is not a DNS subdomain name")));
    }
    let namespace = text("namespace");
    if !namespace.is_empty() && !is_dns_subdomain(&namespace) {
        errors.push(FieldError::new("metadata.namespace", format!("`{namespace}` is not a DNS label")));
    }
    let labels = match m.and_then(|m| m.get("labels")) {
        None | Some(Value::Null) => Labels::new(),
        Some(v) => serde_json::from_value::<Labels>(v.clone()).unwrap_or_else(|e| {
            errors.push(FieldError::new("metadata.labels", format!("must map strings to strings: {e}")));
            Labels::new()
        }),
    };
    (Meta { name, namespace, labels }, errors)
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// The whole document into a k8s-openapi type, with the failing field's path.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, Vec<FieldError>> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| vec![path_error(e)])
}

/// `spec` into an Istio spec type, with the failing field's path (prefixed `spec.`).
/// The `spec` of a kind whose whole content lives there (Istio kinds, MeshConfig). Any other
/// top-level field is an error: a mis-indented `trafficPolicy` must not vanish silently.
fn spec<T: DeserializeOwned>(value: &Value) -> Result<T, Vec<FieldError>> {
    const TOP_LEVEL: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];
    if let Some(map) = value.as_object() {
        let stray: Vec<FieldError> = map
            .keys()
            .filter(|k| !TOP_LEVEL.contains(&k.as_str()))
            .map(|k| FieldError::new(k.clone(), "unknown top-level field (is it indented under `spec`?)"))
            .collect();
        if !stray.is_empty() {
            return Err(stray);
        }
    }
    let Some(spec) = value.get("spec") else {
        return Err(vec![FieldError::new("spec", "missing")]);
    };
    serde_path_to_error::deserialize::<_, T>(spec.clone()).map_err(|e| {
        let mut err = path_error(e);
        err.field = if err.field.is_empty() { "spec".into() } else { format!("spec.{}", err.field) };
        vec![err]
    })
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let path = e.path().to_string();
    let field = if path == "." { String::new() } else { path };
    FieldError::new(field, e.into_inner().to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn service_parses_with_defaults() {
        let o = object_from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "reviews"},
                     "ports": [{"port": 9080, "name": "http"}]}
        }))
        .unwrap();
        let Object::Service(s) = o else { panic!() };
        assert_eq!(s.meta.namespace, "default");
        assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(s.ports[0].target_port, core::TargetPort::Number(9080));
    }

    #[test]
    fn bad_field_is_named_with_its_path() {
        let e = object_from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}
        }))
        .unwrap_err();
        assert_eq!(e.key.as_ref().unwrap().to_string(), "DestinationRule shop/reviews");
        assert_eq!(e.errors[0].field, "spec.trafficPolicy.loadBalancer.simple");
        assert!(e.errors[0].reason.contains("FASTEST"), "{e}");
    }

    #[test]
    fn typo_in_a_field_name_is_an_error() {
        let e = object_from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "r"},
            "spec": {"host": "r", "trafficPolicy": {"loadBalancr": {}}}
        }))
        .unwrap_err();
        assert!(e.errors[0].reason.contains("loadBalancr"), "{e}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let e = object_from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "ext"},
            "spec": {"hosts": ["bad_host"], "addresses": ["nope"], "ports": [{"number": 0}]}
        }))
        .unwrap_err();
        let fields: Vec<&str> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.hosts[0]", "spec.addresses[0]", "spec.ports[0].number"], "{e}");
    }

    #[test]
    fn unknown_kind_and_missing_name() {
        let e =
            object_from_value(json!({"apiVersion": "v1", "kind": "Frobnicator", "metadata": {"name": "x"}}))
                .unwrap_err();
        assert!(e.errors[0].reason.contains("unknown kind Frobnicator"));
        let e = object_from_value(json!({"apiVersion": "v1", "kind": "Service", "spec": {}})).unwrap_err();
        assert_eq!(e.errors[0].field, "metadata.name");
        assert!(e.key.is_none());
    }

    #[test]
    fn endpoint_slice_needs_its_service_label() {
        let e = object_from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "reviews-abc"}, "addressType": "IPv4", "endpoints": []
        }))
        .unwrap_err();
        assert!(e.errors[0].field.contains("kubernetes.io/service-name"), "{e}");
    }
}
