//! Istio's `Telemetry` (telemetry.istio.io/v1): access logging per mesh, namespace and
//! workload, resolved with MeshConfig's providers into each workload's access logs.
//!
//! Levels, least specific first, each overriding the one before per provider and side: MeshConfig
//! `accessLogFile` (the built-in `envoy` provider on for everyone), the root namespace's
//! Telemetry without a selector (mesh-wide), the workload's namespace's without a selector, the
//! one whose selector matches the workload. Within a level the first by name wins, as for
//! PeerAuthentication. Tracing resolves the same way, per field (provider, sampling, reporting),
//! against MeshConfig's zipkin and opentelemetry providers. `metrics` is read (so a typo'd
//! object still fails as a whole) but not applied: Nodemesh always reports Istio's standard
//! metrics.

use std::collections::BTreeMap;

use nodemesh_api::{access_log, proto::mesh};
use serde::{Deserialize, Serialize};

use super::{
    FieldError, Labels, Meta, Object,
    istio::{AccessLogEncoding, ENVOY_PROVIDER, MeshConfigSpec},
    peer_authentication::{LabelSelector, root_namespace},
    selector_matches,
    store::Store,
};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Telemetry {
    pub meta: Meta,
    pub spec: TelemetrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    pub selector: Option<LabelSelector>,
    /// Gateways and waypoints; Nodemesh has neither.
    pub target_ref: Option<serde_json::Value>,
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    #[serde(default)]
    pub access_logging: Vec<AccessLogging>,
    #[serde(default)]
    pub tracing: Vec<TracingSpec>,
    #[serde(default)]
    pub metrics: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    #[serde(rename = "match")]
    pub match_: Option<LogMatch>,
    /// Empty: MeshConfig's default providers (else `envoy`).
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    pub disabled: Option<bool>,
    pub filter: Option<LogFilter>,
}

/// `spec.tracing[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSpec {
    #[serde(rename = "match")]
    pub match_: Option<LogMatch>,
    /// The first is used (Istio supports one tracing provider per workload); empty: MeshConfig
    /// `defaultProviders.tracing`.
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: Option<serde_json::Value>,
    pub use_request_id_for_trace_sampling: Option<bool>,
    pub enable_istio_tags: Option<bool>,
}

/// Istio's sampling when neither a Telemetry nor MeshConfig `defaultConfig.tracing.sampling`
/// sets one.
const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogMatch {
    #[serde(default)]
    pub mode: LogMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LogMode {
    #[default]
    ClientAndServer,
    Client,
    Server,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRef {
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFilter {
    pub expression: String,
}

impl TelemetrySpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        if self.target_ref.is_some() || !self.target_refs.is_empty() {
            errors.push(FieldError::new(
                "spec.targetRefs",
                "Nodemesh has no gateways or waypoints to target; use spec.selector (or none) instead",
            ));
        }
        for (i, entry) in self.access_logging.iter().enumerate() {
            for (j, p) in entry.providers.iter().enumerate() {
                if p.name.is_empty() {
                    errors.push(FieldError::new(
                        format!("spec.accessLogging[{i}].providers[{j}].name"),
                        "empty",
                    ));
                }
            }
            if let Some(filter) = &entry.filter
                && let Err(e) = access_log::Filter::parse(&filter.expression)
            {
                errors.push(FieldError::new(
                    format!("spec.accessLogging[{i}].filter.expression"),
                    format!("`{}`: {e}", filter.expression),
                ));
            }
        }
        for (i, t) in self.tracing.iter().enumerate() {
            let at = |field: &str| format!("spec.tracing[{i}].{field}");
            if t.random_sampling_percentage.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
                errors.push(FieldError::new(at("randomSamplingPercentage"), "must be within 0-100"));
            }
            if t.providers.len() > 1 {
                errors
                    .push(FieldError::new(at("providers"), "one tracing provider per workload, as in Istio"));
            }
            if t.match_.as_ref().is_some_and(|m| m.mode != LogMode::ClientAndServer) {
                errors.push(FieldError::new(
                    at("match.mode"),
                    "Nodemesh traces both sides of a request; only CLIENT_AND_SERVER is supported",
                ));
            }
            for (field, set) in [
                ("customTags", t.custom_tags.is_some()),
                ("useRequestIdForTraceSampling", t.use_request_id_for_trace_sampling.is_some()),
                ("enableIstioTags", t.enable_istio_tags == Some(false)),
            ] {
                if set {
                    errors.push(FieldError::new(at(field), "not supported by Nodemesh yet"));
                }
            }
        }
    }
}

/// One provider's state on one side (client or server) while levels are applied.
#[derive(Clone, Debug, Default, PartialEq)]
struct Side {
    on: bool,
    filter: Option<String>,
}

/// A provider's file log, as MeshConfig defines it.
struct FileProvider {
    path: String,
    json: bool,
    text: String,
    labels: BTreeMap<String, String>,
}

/// The Telemetries and MeshConfig of one store, ready to resolve for any workload.
pub struct Telemetries<'a> {
    telemetries: Vec<&'a Telemetry>,
    root_namespace: String,
    providers: BTreeMap<String, FileProvider>,
    defaults: Vec<String>,
    /// MeshConfig's tracing providers by name, sampling and switch still unset.
    tracers: BTreeMap<String, mesh::Tracing>,
    default_tracer: Option<String>,
    default_sampling: f64,
    /// MeshConfig `accessLogFile`: the `envoy` provider is on mesh-wide.
    mesh_file: bool,
}

impl<'a> Telemetries<'a> {
    pub fn new(store: &'a Store) -> Telemetries<'a> {
        let mesh = store.of_kind(super::Kind::MeshConfig).find_map(|o| match o {
            Object::MeshConfig(m) => Some(&m.spec),
            _ => None,
        });
        let telemetries = store
            .of_kind(super::Kind::Telemetry)
            .filter_map(|o| match o {
                Object::Telemetry(t) => Some(t),
                _ => None,
            })
            .collect();
        let default = MeshConfigSpec::default();
        let mesh = mesh.unwrap_or(&default);
        Telemetries {
            telemetries,
            root_namespace: root_namespace(store),
            providers: file_providers(mesh),
            defaults: if mesh.default_providers.access_logging.is_empty() {
                vec![ENVOY_PROVIDER.to_string()]
            } else {
                mesh.default_providers.access_logging.clone()
            },
            mesh_file: mesh.access_log_file.as_deref().is_some_and(|f| !f.is_empty()),
            tracers: tracing_providers(mesh),
            default_tracer: mesh.default_providers.tracing.first().cloned(),
            default_sampling: mesh.default_config.tracing.sampling.unwrap_or(DEFAULT_SAMPLING_PERCENT),
        }
    }

    /// The tracing of a workload in `namespace` with `labels`: `None` when no provider is
    /// chosen for it (its requests' trace headers still pass through).
    pub fn tracing(&self, namespace: &str, labels: &Labels) -> Option<mesh::Tracing> {
        let mut provider = self.default_tracer.clone();
        let mut sampling = self.default_sampling;
        let mut disabled = false;
        for telemetry in self.levels(namespace, labels) {
            for entry in &telemetry.spec.tracing {
                if let Some(p) = entry.providers.first() {
                    provider = Some(p.name.clone());
                }
                if let Some(p) = entry.random_sampling_percentage {
                    sampling = p;
                }
                if let Some(d) = entry.disable_span_reporting {
                    disabled = d;
                }
            }
        }
        let name = provider?;
        let Some(tracer) = self.tracers.get(&name) else {
            tracing::warn!(
                provider = name,
                namespace,
                "tracing provider `{name}` is not defined in MeshConfig extensionProviders \
                 (zipkin or opentelemetry); no spans are sent for it"
            );
            return None;
        };
        Some(mesh::Tracing { sampling_percent: sampling, reporting_disabled: disabled, ..tracer.clone() })
    }

    /// The Telemetries that apply to a workload, least specific first: the root namespace's
    /// selector-less one, its namespace's, the one selecting it.
    fn levels(&self, namespace: &str, labels: &Labels) -> impl Iterator<Item = &'a Telemetry> {
        [
            self.first(&self.root_namespace, |t| t.spec.selector.is_none()),
            self.first(namespace, |t| t.spec.selector.is_none()).filter(|_| namespace != self.root_namespace),
            self.first(namespace, |t| {
                t.spec.selector.as_ref().is_some_and(|s| selector_matches(&s.match_labels, labels))
            }),
        ]
        .into_iter()
        .flatten()
    }

    fn first(&self, namespace: &str, pick: impl Fn(&Telemetry) -> bool) -> Option<&'a Telemetry> {
        self.telemetries
            .iter()
            .copied()
            .filter(|t| t.meta.namespace == namespace && pick(t))
            .min_by(|a, b| a.meta.name.cmp(&b.meta.name))
    }

    /// The access logs of a workload in `namespace` with `labels`.
    pub fn access_logs(&self, namespace: &str, labels: &Labels) -> Vec<mesh::AccessLog> {
        // provider → (client, server)
        let mut state: BTreeMap<String, (Side, Side)> = BTreeMap::new();
        if self.mesh_file {
            let on = Side { on: true, filter: None };
            state.insert(ENVOY_PROVIDER.into(), (on.clone(), on));
        }
        for telemetry in self.levels(namespace, labels) {
            for entry in &telemetry.spec.access_logging {
                let names: Vec<&str> = if entry.providers.is_empty() {
                    self.defaults.iter().map(String::as_str).collect()
                } else {
                    entry.providers.iter().map(|p| p.name.as_str()).collect()
                };
                let mode = entry.match_.as_ref().map(|m| m.mode).unwrap_or_default();
                for name in names {
                    let sides = state.entry(name.to_string()).or_default();
                    for (side, applies) in
                        [(&mut sides.0, mode != LogMode::Server), (&mut sides.1, mode != LogMode::Client)]
                    {
                        if applies {
                            side.on = !entry.disabled.unwrap_or(false);
                            if let Some(f) = &entry.filter {
                                side.filter = Some(f.expression.clone());
                            }
                        }
                    }
                }
            }
        }
        let mut logs = Vec::new();
        for (name, (client, server)) in state {
            let Some(provider) = self.providers.get(&name) else {
                if client.on || server.on {
                    tracing::warn!(
                        provider = name,
                        namespace,
                        "a Telemetry turns on access log provider `{name}`, which MeshConfig does not define \
                         (extensionProviders with envoyFileAccessLog); nothing is logged for it"
                    );
                }
                continue;
            };
            let log = |side: &Side, mode: mesh::access_log::Mode| mesh::AccessLog {
                provider: name.clone(),
                path: provider.path.clone(),
                json: provider.json,
                text: provider.text.clone(),
                labels: provider.labels.clone().into_iter().collect(),
                filter: side.filter.clone().unwrap_or_default(),
                mode: mode as i32,
            };
            match (client.on, server.on) {
                (true, true) if client.filter == server.filter => {
                    logs.push(log(&client, mesh::access_log::Mode::ClientAndServer))
                }
                (c, s) => {
                    if c {
                        logs.push(log(&client, mesh::access_log::Mode::Client));
                    }
                    if s {
                        logs.push(log(&server, mesh::access_log::Mode::Server));
                    }
                }
            }
        }
        logs
    }
}

/// MeshConfig's file-log providers by name, the built-in `envoy` among them.
fn file_providers(mesh: &MeshConfigSpec) -> BTreeMap<String, FileProvider> {
    let mut providers = BTreeMap::new();
    providers.insert(
        ENVOY_PROVIDER.to_string(),
        FileProvider {
            path: mesh
                .access_log_file
                .clone()
                .filter(|f| !f.is_empty())
                .unwrap_or_else(|| "/dev/stdout".into()),
            json: mesh.access_log_encoding == AccessLogEncoding::Json,
            text: mesh.access_log_format.clone().unwrap_or_default(),
            labels: BTreeMap::new(),
        },
    );
    for p in &mesh.extension_providers {
        if let Some(file) = &p.envoy_file_access_log {
            let format = file.log_format.clone().unwrap_or_default();
            providers.insert(
                p.name.clone(),
                FileProvider {
                    path: file.path.clone(),
                    json: format.labels.is_some(),
                    text: format.text.unwrap_or_default(),
                    labels: format.labels.unwrap_or_default(),
                },
            );
        }
    }
    providers
}

/// MeshConfig's zipkin and opentelemetry providers by name.
fn tracing_providers(mesh: &MeshConfigSpec) -> BTreeMap<String, mesh::Tracing> {
    let mut tracers = BTreeMap::new();
    for p in &mesh.extension_providers {
        let (protocol, service, port, max_tag_length, path) = match (&p.zipkin, &p.opentelemetry) {
            (Some(z), _) => {
                (mesh::tracing::Protocol::Zipkin, &z.service, z.port, z.max_tag_length, z.path.clone())
            }
            (_, Some(o)) => (mesh::tracing::Protocol::OtlpGrpc, &o.service, o.port, o.max_tag_length, None),
            _ => continue,
        };
        let host = if service.contains(':') { format!("[{service}]") } else { service.clone() };
        tracers.insert(
            p.name.clone(),
            mesh::Tracing {
                provider: p.name.clone(),
                protocol: protocol as i32,
                endpoint: format!("{host}:{port}"),
                path: path.unwrap_or_default(),
                max_tag_length: max_tag_length.unwrap_or_default(),
                ..mesh::Tracing::default()
            },
        );
    }
    tracers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::object_from_value;

    fn store(yaml: &str) -> Store {
        Store::from_valid_yaml(yaml)
    }

    fn labels(app: &str) -> Labels {
        [("app".to_string(), app.to_string())].into()
    }

    #[test]
    fn levels_override_per_provider_and_side() {
        let s = store(
            "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{providers: [{name: envoy}]}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: quiet, namespace: batch}
spec:
  accessLogging: [{disabled: true}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: errors-only, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  accessLogging:
  - match: {mode: SERVER}
    filter: {expression: 'response.code >= 500'}
",
        );
        let t = Telemetries::new(&s);
        let web = t.access_logs("shop", &labels("web"));
        assert_eq!(web.len(), 1);
        assert_eq!((web[0].path.as_str(), web[0].mode), ("/dev/stdout", 0));
        assert!(t.access_logs("batch", &labels("job")).is_empty());
        let cart = t.access_logs("shop", &labels("cart"));
        assert_eq!(cart.len(), 2, "{cart:?}");
        assert_eq!((cart[0].mode, cart[0].filter.as_str()), (mesh::access_log::Mode::Client as i32, ""));
        assert_eq!(
            (cart[1].mode, cart[1].filter.as_str()),
            (mesh::access_log::Mode::Server as i32, "response.code >= 500")
        );
    }

    #[test]
    fn mesh_config_providers_and_defaults() {
        let s = store(
            "apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  accessLogFile: /var/log/mesh.log
  accessLogEncoding: JSON
  defaultProviders: {accessLogging: [json-file]}
  extensionProviders:
  - name: json-file
    envoyFileAccessLog:
      path: /var/log/json.log
      logFormat: {labels: {code: '%RESPONSE_CODE%'}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: logs-on, namespace: shop}
spec:
  accessLogging: [{}]
",
        );
        let t = Telemetries::new(&s);
        let logs = t.access_logs("shop", &labels("web"));
        let by: Vec<(&str, &str, bool)> =
            logs.iter().map(|l| (l.provider.as_str(), l.path.as_str(), l.json)).collect();
        assert_eq!(by, [("envoy", "/var/log/mesh.log", true), ("json-file", "/var/log/json.log", true)]);
        assert_eq!(t.access_logs("other", &labels("web")).len(), 1, "accessLogFile: envoy on everywhere");
    }

    #[test]
    fn bad_filters_and_targets_are_named() {
        let value = serde_json::json!({
            "apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
            "metadata": {"name": "t", "namespace": "shop"},
            "spec": {"targetRefs": [{"kind": "Gateway", "name": "gw"}],
                     "accessLogging": [{"filter": {"expression": "response.status >= 400"}}]}
        });
        let err = object_from_value(value).unwrap_err().to_string();
        assert!(err.contains("Telemetry shop/t"), "{err}");
        assert!(err.contains("spec.targetRefs"), "{err}");
        assert!(err.contains("spec.accessLogging[0].filter.expression"), "{err}");
        assert!(err.contains("unknown attribute `response.status`"), "{err}");
    }

    #[test]
    fn tracing_resolves_provider_and_sampling_per_level() {
        let s = store(
            "apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  extensionProviders:
  - {name: zipkin, zipkin: {service: zipkin.tracing.svc.cluster.local, port: 9411}}
  - {name: otel, opentelemetry: {service: 10.0.0.9, port: 4317, maxTagLength: 64}}
  defaultProviders: {tracing: [zipkin]}
  defaultConfig: {tracing: {sampling: 5}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{providers: [{name: zipkin}], randomSamplingPercentage: 10}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: all, namespace: shop}
spec:
  tracing: [{randomSamplingPercentage: 100}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: cart-otel, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  tracing: [{providers: [{name: otel}], disableSpanReporting: true}]
",
        );
        let t = Telemetries::new(&s);
        let batch = t.tracing("batch", &labels("job")).expect("mesh-wide zipkin");
        assert_eq!(
            (batch.endpoint.as_str(), batch.sampling_percent),
            ("zipkin.tracing.svc.cluster.local:9411", 10.0)
        );
        let web = t.tracing("shop", &labels("web")).unwrap();
        assert_eq!((web.provider.as_str(), web.sampling_percent), ("zipkin", 100.0));
        let cart = t.tracing("shop", &labels("cart")).unwrap();
        assert_eq!(cart.protocol, mesh::tracing::Protocol::OtlpGrpc as i32);
        assert_eq!(
            (cart.endpoint.as_str(), cart.max_tag_length, cart.sampling_percent),
            ("10.0.0.9:4317", 64, 100.0)
        );
        assert!(cart.reporting_disabled);
        // No Telemetry in `istio-system` says otherwise: MeshConfig's default provider and
        // sampling.
        let s = store(
            "apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  extensionProviders: [{name: zipkin, zipkin: {service: zipkin, port: 9411}}]
  defaultProviders: {tracing: [zipkin]}
  defaultConfig: {tracing: {sampling: 5}}
",
        );
        let job =
            Telemetries::new(&s).tracing("batch", &labels("job")).expect("MeshConfig's default provider");
        assert_eq!((job.provider.as_str(), job.sampling_percent), ("zipkin", 5.0));
        // Without a provider anywhere, nothing is traced.
        assert!(Telemetries::new(&store("")).tracing("shop", &labels("web")).is_none());
    }

    #[test]
    fn unsupported_tracing_fields_are_named() {
        let value = serde_json::json!({
            "apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
            "metadata": {"name": "t", "namespace": "shop"},
            "spec": {"tracing": [{"randomSamplingPercentage": 150, "customTags": {"a": {"literal": {"value": "b"}}}}]}
        });
        let err = object_from_value(value).unwrap_err().to_string();
        assert!(err.contains("spec.tracing[0].randomSamplingPercentage"), "{err}");
        assert!(err.contains("spec.tracing[0].customTags"), "{err}");
    }
}
