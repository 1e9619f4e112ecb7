//! A Kubernetes API server for tests: real Kubernetes JSON over HTTP/1.1 for the subset a
//! watcher uses — `list` (with `limit`/`continue` and `fieldSelector`, 400 for a field the
//! real server does not index) and `watch` (chunked stream of watch events
//! from a `resourceVersion`, `BOOKMARK`s when asked, `ERROR` 410 Expired for a version older
//! than the last compaction), `404 NotFound` for resources it is told not to serve,
//! `TokenReview` for ServiceAccount tokens the test registers, and, when told to, bearer-token
//! authentication and RBAC over the (Cluster)Roles and bindings applied to it (401 / 403).
//!
//! Objects are kept as JSON under one global resourceVersion counter, like etcd's revision.
//! The test drives it: apply/delete objects, end every open watch (as the API server's watch
//! timeout does), hold new watches, and compact the history so a resumed watch gets 410.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};

/// How long an idle watch waits before sending a bookmark (the real server: about a minute).
const BOOKMARK_EVERY: Duration = Duration::from_millis(200);

#[derive(Default)]
struct State {
    revision: u64,
    /// resource path (`/api/v1/pods`) → `namespace/name` → object (with kind and apiVersion).
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (revision, resource path, event type, object)
    events: Vec<(u64, String, &'static str, Value)>,
    /// Events up to here are forgotten.
    compacted: u64,
    /// Bumped to end every open watch.
    watch_epoch: u64,
    hold_watches: bool,
    not_served: BTreeSet<String>,
    /// resource path → the kind of its objects, as applied (`ServiceEntry`).
    kinds: BTreeMap<String, String>,
    /// resource path → revisions sent in bookmarks.
    bookmarks: BTreeMap<String, BTreeSet<u64>>,
    /// resource path → resourceVersion of each watch request, in order.
    watches: BTreeMap<String, Vec<u64>>,
    lists: BTreeMap<String, usize>,
    expired_sent: usize,
    /// ServiceAccount tokens this server issued.
    tokens: BTreeMap<String, IssuedToken>,
    /// Whether requests must carry a known bearer token and pass RBAC.
    rbac: bool,
    /// Requests RBAC refused: "<user> <verb> <group>/<resource> in <namespace>".
    forbidden: Vec<String>,
}

/// A ServiceAccount token as the API server minted it (a projected token is bound to its pod,
/// so to the pod's node, and carries the audiences its volume asked for).
#[derive(Clone)]
struct IssuedToken {
    username: String,
    node: String,
    audiences: Vec<String>,
}

/// The API server's own audience (`--api-audiences`' usual value): the audience of the tokens
/// kubelet mounts by default, the one bearer tokens of API requests must carry, and what
/// TokenReview checks when the review names no audience.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Served over TLS with this cluster CA (see `kube_api_tls`).
    pub(crate) tls_ca: Option<String>,
}

/// A Secret object as the API serves it (`data` base64-encoded), e.g. `kubectl create secret
/// generic <name> --from-file=…`.
pub fn secret_object(
    namespace: &str,
    name: &str,
    data: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> Value {
    use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Default::default()
    };
    let mut value = serde_json::to_value(secret).expect("a Secret serialises");
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    value
}

/// `/api/v1/pods` or `/apis/networking.istio.io/v1/serviceentries` for an object's apiVersion
/// and kind.
pub fn resource_path(api_version: &str, kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    let plural = match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    };
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

impl FakeApiServer {
    /// Listens on `listener` (bound wherever the test wants it: loopback, or inside a
    /// simulated node's netns) and serves every connection on its own thread.
    pub fn start(listener: TcpListener) -> anyhow::Result<FakeApiServer> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), changed: Condvar::new() });
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    let _ = serve_connection(&s, stream);
                });
            }
        });
        Ok(FakeApiServer { addr, shared, tls_ca: None })
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.shared.state.lock().expect("api state"));
        self.shared.changed.notify_all();
        r
    }

    /// Issues `token` to ServiceAccount `namespace/account` of a pod on `node`, for `audience`
    /// ([`API_AUDIENCE`] for the default mounted token, which API requests carry; another for a
    /// projected token meant for someone else, which only a TokenReview asking for that
    /// audience accepts).
    pub fn add_token(&self, token: &str, namespace: &str, account: &str, node: &str, audience: &str) {
        let issued = IssuedToken {
            username: format!("system:serviceaccount:{namespace}:{account}"),
            node: node.to_string(),
            audiences: vec![audience.to_string()],
        };
        self.with(|st| st.tokens.insert(token.to_string(), issued));
    }

    /// From now on every request needs the bearer token of a ServiceAccount registered with
    /// [`FakeApiServer::add_token`] (else 401) and is authorized against the ClusterRoles,
    /// Roles and their bindings applied here, as the real authorizer does (else 403).
    pub fn enforce_rbac(&self) {
        self.with(|st| st.rbac = true);
    }

    /// The requests refused with 403 so far.
    pub fn forbidden(&self) -> Vec<String> {
        self.with(|st| st.forbidden.clone())
    }

    /// Applies every object of a multi-document YAML file (a manifest of deploy/, say).
    pub fn apply_file(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        for object in serde_saphyr::from_multiple::<Value>(&text)?.into_iter().filter(|o| !o.is_null()) {
            self.apply(&object)?;
        }
        Ok(())
    }

    /// Writes a kubeconfig that reaches this server as `user` with bearer `token` (what kube
    /// reads as it would a pod's in-cluster credentials).
    pub fn write_kubeconfig(&self, path: &std::path::Path, user: &str, token: &str) -> anyhow::Result<()> {
        let url = self.url();
        // Over TLS: trust the cluster CA (a file beside the kubeconfig), as a pod's in-cluster
        // config trusts its ca.crt.
        let ca = match &self.tls_ca {
            Some(pem) => {
                let file = path.with_extension("ca.crt");
                std::fs::write(&file, pem)?;
                format!(", certificate-authority: \"{}\"", file.display())
            }
            None => String::new(),
        };
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: test, cluster: {{server: \"{url}\"{ca}}}}}]\n\
                 users: [{{name: {user}, user: {{token: {token}}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: {user}}}}}]\ncurrent-context: test\n"
            ),
        )?;
        Ok(())
    }

    /// Creates or replaces an object (ADDED or MODIFIED), as `kubectl apply` would.
    pub fn apply(&self, object: &Value) -> anyhow::Result<()> {
        let api_version = object["apiVersion"].as_str().context("apiVersion")?.to_string();
        let kind = object["kind"].as_str().context("kind")?.to_string();
        let name = object["metadata"]["name"].as_str().context("metadata.name")?.to_string();
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let path = resource_path(&api_version, &kind);
        self.with(|st| {
            st.revision += 1;
            let mut object = object.clone();
            let meta = &mut object["metadata"];
            meta["resourceVersion"] = st.revision.to_string().into();
            let key = format!("{namespace}/{name}");
            // The server assigns a UID at creation and keeps it across updates; a test that
            // lays out a pod's cgroup by UID (kubelet does) chooses it up front.
            let existing =
                st.objects.get(&path).and_then(|m| m.get(&key)).map(|o| o["metadata"]["uid"].clone());
            let uid = match (existing, meta["uid"].as_str()) {
                (Some(uid), _) => uid,
                (None, Some(chosen)) => chosen.into(),
                (None, None) => format!("uid-{namespace}-{name}").into(),
            };
            meta["uid"] = uid;
            meta["creationTimestamp"] = "2026-11-21T00:00:00Z".into();
            st.kinds.insert(path.clone(), kind.clone());
            let existed = st.objects.entry(path.clone()).or_default().insert(key, object.clone()).is_some();
            let kind = if existed { "MODIFIED" } else { "ADDED" };
            st.events.push((st.revision, path, kind, object));
        });
        Ok(())
    }

    /// Deletes an object (DELETED carries its last state).
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> anyhow::Result<()> {
        let path = resource_path(api_version, kind);
        self.with(|st| {
            let mut object = st
                .objects
                .get_mut(&path)
                .and_then(|m| m.remove(&format!("{namespace}/{name}")))
                .with_context(|| format!("no {kind} {namespace}/{name}"))?;
            st.revision += 1;
            object["metadata"]["resourceVersion"] = st.revision.to_string().into();
            st.events.push((st.revision, path, "DELETED", object));
            Ok(())
        })
    }

    /// Answers 404 for this resource (say, a CRD that is not installed).
    pub fn not_served(&self, api_version: &str, kind: &str) {
        let path = resource_path(api_version, kind);
        self.with(|st| st.not_served.insert(path));
    }

    /// Ends every open watch; clients resume from the last resourceVersion they saw.
    pub fn end_watches(&self) {
        self.with(|st| st.watch_epoch += 1);
    }

    /// New watches wait (as if the API server were unreachable) until released.
    pub fn hold_watches(&self, hold: bool) {
        self.with(|st| st.hold_watches = hold);
    }

    /// Forgets history up to now: a watch resuming from an older version gets 410 Expired.
    pub fn compact(&self) {
        self.with(|st| {
            st.compacted = st.revision;
            st.events.clear();
        });
    }

    /// Watches of `resource` that resumed from a revision only a bookmark had told the client.
    pub fn watches_resumed_from_bookmarks(&self, api_version: &str, kind: &str) -> usize {
        let path = resource_path(api_version, kind);
        self.with(|st| {
            let sent = st.bookmarks.get(&path).cloned().unwrap_or_default();
            let event_revisions: BTreeSet<u64> =
                st.events.iter().filter(|e| e.1 == path).map(|e| e.0).collect();
            st.watches
                .get(&path)
                .into_iter()
                .flatten()
                .filter(|rv| sent.contains(rv) && !event_revisions.contains(rv))
                .count()
        })
    }

    /// How many times `resource` was listed.
    pub fn lists(&self, api_version: &str, kind: &str) -> usize {
        let path = resource_path(api_version, kind);
        self.with(|st| st.lists.get(&path).copied().unwrap_or(0))
    }

    /// How many watches were answered 410 Expired.
    pub fn expired_sent(&self) -> usize {
        self.with(|st| st.expired_sent)
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
    bearer: Option<String>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let method = line.split_whitespace().next().context("request line")?.to_string();
    let target = line.split_whitespace().nth(1).context("request line")?.to_string();
    let mut length = 0usize;
    let mut bearer = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        if header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.trim().eq_ignore_ascii_case("authorization") {
                bearer = value.trim().strip_prefix("Bearer ").map(str::to_string);
            }
        }
    }
    let mut body = vec![0u8; length];
    std::io::Read::read_exact(reader, &mut body)?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/").replace("%3D", "=")))
        .collect();
    Ok(Some(Request { method, path: path.to_string(), query, body, bearer }))
}

/// Field labels the API server accepts in a `fieldSelector`, per resource: every resource has
/// `metadata.name` and `metadata.namespace`; Pods add the ones below (others are a 400).
fn selectable(path: &str, field: &str) -> bool {
    const POD_FIELDS: [&str; 8] = [
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ];
    matches!(field, "metadata.name" | "metadata.namespace")
        || (path == "/api/v1/pods" && POD_FIELDS.contains(&field))
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, comma-joined.
struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    fn parse(path: &str, text: Option<&String>) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in text.map(String::as_str).unwrap_or_default().split(',').filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{term}'; can't understand '{term}'"));
            };
            if !selectable(path, field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), equal, value.to_string()));
        }
        Ok(FieldSelector(terms))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let found = field.split('.').fold(object, |v, part| &v[part]);
            let text = match found {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (text == *value) == *equal
        })
    }
}

fn bad_request(message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "BadRequest", "code": 400})
}

fn serve_connection(shared: &Shared, stream: TcpStream) -> anyhow::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(req) = read_request(&mut reader)? {
        let fields = FieldSelector::parse(&req.path, req.query.get("fieldSelector"));
        let access = authorize(shared, &req);
        if let Err((status, body)) = &access {
            respond(&mut out, status, body)?;
        } else if let Err(message) = &fields {
            respond(&mut out, "400 Bad Request", &bad_request(message))?;
        } else if shared.state.lock().expect("api state").not_served.contains(&req.path) {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "the server could not find the requested resource", "reason": "NotFound", "details": {}, "code": 404});
            respond(&mut out, "404 Not Found", &status)?;
        } else if req.method == "POST" && req.path == TOKEN_REVIEWS {
            let review = token_review(shared, &req.body);
            respond(&mut out, "201 Created", &review)?;
        } else if let Some((resource, key)) = single_object(&req.path) {
            let found = shared
                .state
                .lock()
                .expect("api state")
                .objects
                .get(&resource)
                .and_then(|m| m.get(&key))
                .cloned();
            match found {
                Some(object) => respond(&mut out, "200 OK", &object)?,
                None => {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("{key} not found"), "reason": "NotFound", "details": {}, "code": 404});
                    respond(&mut out, "404 Not Found", &status)?;
                }
            }
        } else if req.query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            // A watch holds the connection until it ends; the client opens another one.
            return watch(shared, &mut out, &req, &fields.unwrap_or(FieldSelector(Vec::new())));
        } else {
            let list = list(shared, &req, &fields.unwrap_or(FieldSelector(Vec::new())));
            respond(&mut out, "200 OK", &list)?;
        }
    }
    Ok(())
}

/// What a request asks, in RBAC's terms.
#[derive(Debug)]
struct Attributes {
    verb: &'static str,
    group: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

/// `/api/v1[/namespaces/<ns>]/<plural>[/<name>]` or `/apis/<group>/<version>/…` with the
/// method and `watch` → RBAC attributes (`namespaces` itself is a cluster-scoped resource).
fn attributes(req: &Request) -> Option<Attributes> {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => return None,
    };
    let (namespace, resource, name) = match rest {
        ["namespaces", ns, plural, tail @ ..] => {
            (Some(ns.to_string()), plural.to_string(), tail.first().map(|n| n.to_string()))
        }
        [plural] => (None, plural.to_string(), None),
        [plural, name] => (None, plural.to_string(), Some(name.to_string())),
        _ => return None,
    };
    let watch = req.query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (req.method.as_str(), &name, watch) {
        ("GET", _, true) => "watch",
        ("GET", Some(_), false) => "get",
        ("GET", None, false) => "list",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", _, _) => "delete",
        _ => return None,
    };
    Some(Attributes { verb, group, resource, namespace, name })
}

/// With RBAC on: the caller's token names a ServiceAccount (401 otherwise), and a binding of
/// it grants the request (403 otherwise, recorded).
fn authorize(shared: &Shared, req: &Request) -> Result<(), (&'static str, Value)> {
    let mut st = shared.state.lock().expect("api state");
    if !st.rbac {
        return Ok(());
    }
    let Some(user) = req
        .bearer
        .as_ref()
        .and_then(|t| st.tokens.get(t))
        .filter(|t| t.audiences.iter().any(|a| a == API_AUDIENCE))
        .map(|t| t.username.clone())
    else {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Unauthorized", "reason": "Unauthorized", "code": 401});
        return Err(("401 Unauthorized", status));
    };
    let Some(attrs) = attributes(req) else { return Ok(()) };
    if allowed(&st, &user, &attrs) {
        return Ok(());
    }
    let scope = match &attrs.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let message = format!(
        "{} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
        attrs.resource, attrs.verb, attrs.resource, attrs.group
    );
    st.forbidden.push(format!("{user} {} {}/{} {scope}", attrs.verb, attrs.group, attrs.resource));
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "Forbidden", "details": {"kind": attrs.resource}, "code": 403});
    Err(("403 Forbidden", status))
}

/// Whether any (Cluster)RoleBinding of `user` points at a role with a rule covering `attrs`.
/// A RoleBinding grants within its namespace only, whether it names a Role or a ClusterRole.
fn allowed(st: &State, user: &str, attrs: &Attributes) -> bool {
    let objects = |plural: &str| {
        st.objects
            .get(&format!("/apis/rbac.authorization.k8s.io/v1/{plural}"))
            .into_iter()
            .flat_map(|m| m.values())
    };
    let names_user = |binding: &Value| {
        binding["subjects"].as_array().into_iter().flatten().any(|s| match s["kind"].as_str() {
            Some("ServiceAccount") => {
                format!(
                    "system:serviceaccount:{}:{}",
                    s["namespace"].as_str().unwrap_or_default(),
                    s["name"].as_str().unwrap_or_default()
                ) == user
            }
            Some("User") => s["name"] == user,
            _ => false,
        })
    };
    let role = |kind: &str, namespace: &str, name: &str| -> Option<Value> {
        let (plural, key) = match kind {
            "ClusterRole" => ("clusterroles", format!("/{name}")),
            _ => ("roles", format!("{namespace}/{name}")),
        };
        st.objects.get(&format!("/apis/rbac.authorization.k8s.io/v1/{plural}"))?.get(&key).cloned()
    };
    let grants = |role: &Value| {
        role["rules"].as_array().into_iter().flatten().any(|rule| {
            let has = |field: &str, want: &str| {
                rule[field].as_array().into_iter().flatten().any(|v| v == "*" || v == want)
            };
            let names = rule["resourceNames"].as_array().filter(|n| !n.is_empty());
            has("apiGroups", &attrs.group)
                && has("resources", &attrs.resource)
                && has("verbs", attrs.verb)
                && names.is_none_or(|n| {
                    attrs.name.as_ref().is_some_and(|name| n.iter().any(|v| v == name.as_str()))
                })
        })
    };
    let cluster_wide = objects("clusterrolebindings").filter(|b| names_user(b)).any(|b| {
        role("ClusterRole", "", b["roleRef"]["name"].as_str().unwrap_or_default()).is_some_and(|r| grants(&r))
    });
    cluster_wide
        || objects("rolebindings").filter(|b| names_user(b)).any(|b| {
            let ns = b["metadata"]["namespace"].as_str().unwrap_or_default();
            attrs.namespace.as_deref() == Some(ns)
                && role(
                    b["roleRef"]["kind"].as_str().unwrap_or_default(),
                    ns,
                    b["roleRef"]["name"].as_str().unwrap_or_default(),
                )
                .is_some_and(|r| grants(&r))
        })
}

/// `/api/v1/namespaces/<ns>/<plural>/<name>` → (`/api/v1/<plural>`, `<ns>/<name>`): a GET of
/// one object (a list path has no name after the plural).
fn single_object(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [ns, plural, name] => Some((format!("/api/v1/{plural}"), format!("{ns}/{name}"))),
        _ => None,
    }
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// TokenReview: a token the test registered is authenticated as its ServiceAccount, with the
/// node of its (bound) pod in `extra`, as the API server does for projected tokens. Audiences
/// as the real one checks them: the review's (the API server's own when it names none) must
/// meet the token's, and `status.audiences` is what they share.
fn token_review(shared: &Shared, body: &[u8]) -> Value {
    let review: Value = serde_json::from_slice(body).unwrap_or_default();
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = match review["spec"]["audiences"].as_array() {
        Some(list) if !list.is_empty() => list.iter().filter_map(|a| a.as_str().map(String::from)).collect(),
        _ => vec![API_AUDIENCE.to_string()],
    };
    let known = shared.state.lock().expect("api state").tokens.get(token).cloned();
    let status = match known {
        Some(t) => {
            let shared_audiences: Vec<&String> = t.audiences.iter().filter(|a| wanted.contains(a)).collect();
            if shared_audiences.is_empty() {
                json!({"authenticated": false, "error": format!(
                    "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                    t.audiences, wanted)})
            } else {
                json!({"authenticated": true, "audiences": shared_audiences, "user": {"username": t.username,
                    "extra": {"authentication.kubernetes.io/node-name": [t.node]}}})
            }
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
        "spec": review["spec"], "status": status})
}

fn respond(out: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn list(shared: &Shared, req: &Request, fields: &FieldSelector) -> Value {
    let mut st = shared.state.lock().expect("api state");
    *st.lists.entry(req.path.clone()).or_default() += 1;
    let limit: usize =
        req.query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    // continue = "<revision>/<offset>": later pages report the first page's revision.
    let (revision, offset) = req
        .query
        .get("continue")
        .and_then(|c| c.split_once('/'))
        .and_then(|(r, o)| Some((r.parse().ok()?, o.parse().ok()?)))
        .unwrap_or((st.revision, 0usize));
    let all: Vec<Value> = st
        .objects
        .get(&req.path)
        .map(|m| m.values().filter(|o| fields.matches(o)).cloned().collect())
        .unwrap_or_default();
    let items: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|o| {
            // List items carry no kind/apiVersion: the list does.
            let mut o = o.clone();
            if let Some(map) = o.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            o
        })
        .collect();
    let next = offset + items.len();
    let kind = format!("{}List", kind_of(&st, &req.path));
    let api_version = api_version_of(&req.path);
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if next < all.len() {
        metadata["continue"] = format!("{revision}/{next}").into();
    }
    json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items})
}

/// Kind of the objects under a resource path: as applied, else guessed from the plural (for a
/// resource never written to; watchers do not check list kinds).
fn kind_of(st: &State, path: &str) -> String {
    if let Some(kind) = st.kinds.get(path) {
        return kind.clone();
    }
    let plural = path.rsplit('/').next().unwrap_or_default();
    let stem = plural
        .strip_suffix("ies")
        .map(|s| format!("{s}y"))
        .unwrap_or_else(|| plural.trim_end_matches('s').to_string());
    let mut c = stem.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

fn api_version_of(path: &str) -> String {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", v, _] => v.to_string(),
        ["apis", g, v, _] => format!("{g}/{v}"),
        _ => String::new(),
    }
}

fn chunk(out: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(out, "{:x}\r\n{line}\r\n", line.len())?;
    out.flush()
}

/// A watch: events of the resource after `resourceVersion` whose object matches the field
/// selector (the fields selectable here never change on a live object, so an object does not
/// move in or out of a selector), bookmarks, 410 for compacted history.
fn watch(shared: &Shared, out: &mut TcpStream, req: &Request, fields: &FieldSelector) -> anyhow::Result<()> {
    let from: u64 = req.query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let mut st = shared.state.lock().expect("api state");
    while st.hold_watches {
        st = shared.changed.wait(st).expect("api state");
    }
    st.watches.entry(req.path.clone()).or_default().push(from);
    write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")?;
    if from < st.compacted {
        st.expired_sent += 1;
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {from} ({})", st.compacted),
            "reason": "Expired", "code": 410}});
        drop(st);
        chunk(out, &status)?;
        write!(out, "0\r\n\r\n")?;
        return Ok(());
    }
    let epoch = st.watch_epoch;
    let deadline = Instant::now() + timeout;
    let mut cursor = from;
    let mut last_sent = Instant::now();
    loop {
        let pending: Vec<Value> = st
            .events
            .iter()
            .filter(|(rv, path, _, object)| *rv > cursor && *path == req.path && fields.matches(object))
            .map(|(_, _, kind, object)| json!({"type": kind, "object": object}))
            .collect();
        if let Some(rv) = st.events.iter().filter(|e| e.1 == req.path).map(|e| e.0).max() {
            cursor = cursor.max(rv);
        }
        let bookmark = if pending.is_empty()
            && bookmarks
            && last_sent.elapsed() >= BOOKMARK_EVERY
            && st.revision > cursor
        {
            cursor = st.revision;
            st.bookmarks.entry(req.path.clone()).or_default().insert(cursor);
            let kind = kind_of(&st, &req.path);
            Some(json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version_of(&req.path),
                "metadata": {"resourceVersion": cursor.to_string()}}}))
        } else {
            None
        };
        drop(st);
        for event in pending.iter().chain(bookmark.iter()) {
            chunk(out, event)?;
            last_sent = Instant::now();
        }
        st = shared.state.lock().expect("api state");
        if st.watch_epoch != epoch || Instant::now() > deadline {
            break;
        }
        st = shared.changed.wait_timeout(st, Duration::from_millis(50)).expect("api state").0;
        if st.watch_epoch != epoch {
            break;
        }
    }
    drop(st);
    write!(out, "0\r\n\r\n")?;
    Ok(())
}
