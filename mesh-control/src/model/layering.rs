//! Several objects routing one host compose by a documented precedence, never by whichever
//! arrived last (Istio, for sidecars, silently uses the oldest VirtualService of a host).
//!
//! **VirtualServices.** Every VirtualService listing a host contributes its `http` routes, in
//! this order, highest first:
//! 1. the `nodemesh.io/precedence` annotation (an integer, default 0);
//! 2. an object in the host's own namespace before one elsewhere (the service owner's word);
//! 3. namespace, then name, alphabetically (so the order never depends on arrival).
//!
//! The routes are concatenated in that order, each object's in its own order; as within one
//! VirtualService, the first route that matches a request takes it.
//!
//! **Fault layers.** A route with `match` and `fault` but no destination (say, a chaos tool's)
//! takes no request itself: it adds its fault to every route of the host its match overlaps,
//! which keep their destinations, retries and the rest. Layers go first; between two layers
//! that both match a request, the earlier one's fault applies. With no other route for the
//! host, a layer lays over the host's default route.
//!
//! **Conflicts** are reported (by `mesh-control validate`, in the control plane's log and at
//! `/debug/config`), never resolved by dropping an object:
//! - a route that never matches, because an earlier one takes every request it would;
//! - a fault layer whose match cannot be combined with a route's (both match by regex), so the
//!   fault does not apply to that route;
//! - two DestinationRules for one host at the same rank, of which only the first applies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::qualify;
use super::{
    Kind, Meta, Object,
    store::Store,
    virtual_service::{
        Callers, Destination, HttpMatch, HttpRoute, L4Match, L4Route, RouteDestination, StringMatch,
        VirtualService,
    },
};

/// The composed routes of each host, and what in them conflicts.
pub struct Composed {
    /// By fully qualified host: one VirtualService holding the routes of every object that
    /// routes it, layers expanded, destinations qualified and routes named.
    pub by_host: HashMap<String, VirtualService>,
    pub conflicts: Vec<String>,
}

/// One route with where it came from, for names and reports. Its matches admit only the
/// callers its object is exported to.
struct Sourced<'a> {
    object: &'a VirtualService,
    index: usize,
    route: HttpRoute,
}

impl Sourced<'_> {
    fn describe(&self) -> String {
        let v = self.object;
        let name =
            if self.route.name.is_empty() { String::new() } else { format!(" (`{}`)", self.route.name) };
        format!("VirtualService {}/{} spec.http[{}]{name}", v.meta.namespace, v.meta.name, self.index)
    }

    fn name(&self) -> String {
        if self.route.name.is_empty() {
            format!("{}.{}.{}", self.object.meta.namespace, self.object.meta.name, self.index)
        } else {
            self.route.name.clone()
        }
    }

    /// The route as the composed VirtualService holds it: named, destinations qualified in
    /// the namespace of the object that wrote them.
    fn resolved(&self) -> HttpRoute {
        let namespace = &self.object.meta.namespace;
        let mut r = self.route.clone();
        r.name = self.name();
        r.route.iter_mut().for_each(|d| d.destination.qualify(namespace));
        r.mirror.iter_mut().for_each(|d| d.qualify(namespace));
        r.mirrors.iter_mut().for_each(|m| m.destination.qualify(namespace));
        r
    }
}

pub fn compose(store: &Store) -> Composed {
    let mut by_host: BTreeMap<String, Vec<&VirtualService>> = BTreeMap::new();
    for o in store.of_kind(Kind::VirtualService) {
        let Object::VirtualService(v) = o else { continue };
        for host in &v.spec.hosts {
            by_host.entry(qualify(host, &v.meta.namespace)).or_default().push(v);
        }
    }
    let mut composed = Composed { by_host: HashMap::new(), conflicts: Vec::new() };
    for (host, mut objects) in by_host {
        order(&host, &mut objects);
        if let Some(v) = compose_host(&host, &objects, &mut composed.conflicts) {
            composed.by_host.insert(host, v);
        }
    }
    composed.conflicts.extend(super::destination_rules::DestinationRules::new(store).conflicts());
    composed
}

/// Precedence order (see the module docs).
fn order(host: &str, objects: &mut [&VirtualService]) {
    let host_namespace = host.split('.').nth(1).unwrap_or_default().to_string();
    objects.sort_by_key(|v| {
        (
            -i64::from(v.precedence),
            v.meta.namespace != host_namespace,
            v.meta.namespace.clone(),
            v.meta.name.clone(),
        )
    });
}

fn compose_host(
    host: &str,
    objects: &[&VirtualService],
    conflicts: &mut Vec<String>,
) -> Option<VirtualService> {
    let sourced = objects.iter().flat_map(|v| {
        let callers = Callers::exported(&v.spec.export_to, &v.meta.namespace);
        v.spec.http.iter().enumerate().map(move |(index, route)| Sourced {
            object: v,
            index,
            route: for_callers(route, &callers),
        })
    });
    let (layers, routes): (Vec<Sourced<'_>>, Vec<Sourced<'_>>) =
        sourced.partition(|s| s.route.is_fault_layer());
    // tcp and tls routes: concatenated in the same order, destinations qualified likewise.
    let mut tcp = Vec::new();
    let mut tls = Vec::new();
    for v in objects {
        let callers = Callers::exported(&v.spec.export_to, &v.meta.namespace);
        let qualified = |r: &L4Route| {
            let mut r = r.clone();
            r.route.iter_mut().for_each(|d| d.destination.qualify(&v.meta.namespace));
            if callers != Callers::All {
                if r.matches.is_empty() {
                    r.matches.push(L4Match::default());
                }
                r.matches.iter_mut().for_each(|m| m.callers = callers.clone());
            }
            r
        };
        tcp.extend(v.spec.tcp.iter().map(qualified));
        tls.extend(v.spec.tls.iter().map(qualified));
    }
    if layers.is_empty() && routes.is_empty() && tcp.is_empty() && tls.is_empty() {
        return None;
    }
    report_shadowed(host, &layers, conflicts);
    report_shadowed(host, &routes, conflicts);
    let default_route = HttpRoute {
        name: "default".into(),
        route: vec![RouteDestination {
            destination: Destination { host: host.to_string(), ..Default::default() },
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut resolved: Vec<HttpRoute> = match (routes.is_empty(), layers.is_empty()) {
        // Only a lone layer needs a route to lie over; without one, HTTP keeps its default.
        (true, false) => vec![default_route.clone()],
        _ => routes.iter().map(Sourced::resolved).collect(),
    };
    // When every object with routes is exported to some namespaces only, a caller elsewhere
    // sees no VirtualService of the host, so its requests take the default route (Istio).
    let exported_to: Option<BTreeSet<String>> = routes.iter().try_fold(BTreeSet::new(), |mut all, r| {
        let callers = Callers::exported(&r.object.spec.export_to, &r.object.meta.namespace);
        match callers {
            Callers::In(set) => {
                all.extend(set);
                Some(all)
            }
            _ => None,
        }
    });
    if let (false, Some(exported_to)) = (routes.is_empty(), exported_to) {
        resolved.push(HttpRoute {
            matches: vec![HttpMatch { callers: Callers::NotIn(exported_to), ..Default::default() }],
            ..default_route
        });
    }
    let mut http = Vec::new();
    for layer in &layers {
        for (route, source) in resolved.iter().zip(routes.iter().map(Some).chain(std::iter::repeat(None))) {
            match lay_over(&layer.route, route) {
                Ok(Some(r)) => http.push(HttpRoute { name: format!("{}+{}", layer.name(), route.name), ..r }),
                Ok(None) => {}
                Err(why) => conflicts.push(format!(
                    "host {host}: the fault of {} does not apply to {}: {why}",
                    layer.describe(),
                    source.map_or("the default route".to_string(), Sourced::describe)
                )),
            }
        }
    }
    http.extend(resolved);
    let first = objects[0];
    Some(VirtualService {
        meta: Meta {
            name: first.meta.name.clone(),
            namespace: first.meta.namespace.clone(),
            ..Default::default()
        },
        precedence: first.precedence,
        spec: super::virtual_service::VirtualServiceSpec {
            hosts: vec![host.to_string()],
            http,
            tcp,
            tls,
            ..Default::default()
        },
    })
}

/// `route` with `layer`'s fault, for the requests both match (`None`: no request does).
fn lay_over(layer: &HttpRoute, route: &HttpRoute) -> Result<Option<HttpRoute>, String> {
    let all = [HttpMatch::default()];
    let as_list = |r: &HttpRoute| if r.matches.is_empty() { all.to_vec() } else { r.matches.clone() };
    let mut matches = Vec::new();
    for a in as_list(layer) {
        for b in as_list(route) {
            if let Some(m) = intersect(&a, &b)? {
                matches.push(m);
            }
        }
    }
    if matches.is_empty() {
        return Ok(None);
    }
    let layer_fault = layer.fault.clone().unwrap_or_default();
    let own = route.fault.clone().unwrap_or_default();
    let fault = super::virtual_service::HttpFault {
        delay: layer_fault.delay.or(own.delay),
        abort: layer_fault.abort.or(own.abort),
    };
    Ok(Some(HttpRoute { matches, fault: Some(fault), ..route.clone() }))
}

/// Reports each route of `routes` that an earlier one shadows.
fn report_shadowed(host: &str, routes: &[Sourced<'_>], conflicts: &mut Vec<String>) {
    for (j, later) in routes.iter().enumerate() {
        let later_matches = match_list(&later.route);
        let by = routes[..j].iter().find(|earlier| {
            later_matches.iter().all(|m| match_list(&earlier.route).iter().any(|e| covers(e, m)))
        });
        if let Some(earlier) = by {
            conflicts.push(format!(
                "host {host}: {} never matches: {} comes first and takes every request it would{}",
                later.describe(),
                earlier.describe(),
                if later.route.is_fault_layer() { " (its fault would never apply)" } else { "" },
            ));
        }
    }
}

fn match_list(r: &HttpRoute) -> Vec<HttpMatch> {
    if r.matches.is_empty() { vec![HttpMatch::default()] } else { r.matches.clone() }
}

/// Whether every request `b` matches, `a` matches too. Conservative: `false` when unsure.
fn covers(a: &HttpMatch, b: &HttpMatch) -> bool {
    let uri_case_agrees = a.uri.is_none() || a.ignore_uri_case == b.ignore_uri_case;
    uri_case_agrees
        && a.port.is_none_or(|p| b.port == Some(p))
        && [(&a.uri, &b.uri), (&a.method, &b.method), (&a.authority, &b.authority), (&a.scheme, &b.scheme)]
            .iter()
            .all(|(x, y)| x.as_ref().is_none_or(|x| y.as_ref().is_some_and(|y| string_covers(x, y))))
        && [(&a.headers, &b.headers), (&a.query_params, &b.query_params)]
            .iter()
            .all(|(x, y)| x.iter().all(|(k, xm)| y.get(k).is_some_and(|ym| string_covers(xm, ym))))
        && a.without_headers.iter().all(|(k, xm)| b.without_headers.get(k) == Some(xm))
        && a.source_labels.iter().all(|(k, v)| b.source_labels.get(k) == Some(v))
        && (a.source_namespace.is_empty() || a.source_namespace == b.source_namespace)
        && a.callers.covers(&b.callers)
}

/// `route` with every match admitting only `callers` (a match-less route gets one match).
fn for_callers(route: &HttpRoute, callers: &Callers) -> HttpRoute {
    let mut r = route.clone();
    if *callers != Callers::All {
        if r.matches.is_empty() {
            r.matches.push(HttpMatch::default());
        }
        r.matches.iter_mut().for_each(|m| m.callers = callers.clone());
    }
    r
}

/// Whether every value `b` matches, `a` matches too.
fn string_covers(a: &StringMatch, b: &StringMatch) -> bool {
    if a == b {
        return true;
    }
    match (&a.prefix, &b.exact, &b.prefix) {
        (Some(p), Some(e), _) => e.starts_with(p.as_str()),
        (Some(p), _, Some(q)) => q.starts_with(p.as_str()),
        _ => false,
    }
}

/// The requests both `a` and `b` match, as one match (`None`: there are none); an error when
/// that cannot be written as one match.
fn intersect(a: &HttpMatch, b: &HttpMatch) -> Result<Option<HttpMatch>, String> {
    let mut m = b.clone();
    if a.port.is_some() {
        if b.port.is_some_and(|p| Some(p) != a.port) {
            return Ok(None);
        }
        m.port = a.port;
    }
    if a.uri.is_some() && b.uri.is_some() && a.ignore_uri_case != b.ignore_uri_case {
        return Err("one matches the uri ignoring case and the other does not".into());
    }
    m.ignore_uri_case = if a.uri.is_some() { a.ignore_uri_case } else { b.ignore_uri_case };
    for (what, x, y, out) in [
        ("uri", &a.uri, &b.uri, &mut m.uri),
        ("method", &a.method, &b.method, &mut m.method),
        ("authority", &a.authority, &b.authority, &mut m.authority),
        ("scheme", &a.scheme, &b.scheme, &mut m.scheme),
    ] {
        *out = match (x, y) {
            (None, y) => y.clone(),
            (Some(x), None) => Some(x.clone()),
            (Some(x), Some(y)) => match string_intersect(x, y).map_err(|e| format!("{what}: {e}"))? {
                Some(s) => Some(s),
                None => return Ok(None),
            },
        };
    }
    for (what, x, out) in
        [("headers", &a.headers, &mut m.headers), ("queryParams", &a.query_params, &mut m.query_params)]
    {
        for (k, xm) in x {
            let merged = match out.get(k) {
                None => xm.clone(),
                Some(ym) => match string_intersect(xm, ym).map_err(|e| format!("{what}.{k}: {e}"))? {
                    Some(s) => s,
                    None => return Ok(None),
                },
            };
            out.insert(k.clone(), merged);
        }
    }
    for (k, xm) in &a.without_headers {
        match m.without_headers.get(k) {
            Some(ym) if ym != xm => {
                return Err(format!("withoutHeaders.{k}: two different conditions on one header"));
            }
            _ => {
                m.without_headers.insert(k.clone(), xm.clone());
            }
        }
    }
    for (k, v) in &a.source_labels {
        match m.source_labels.get(k) {
            Some(w) if w != v => return Ok(None),
            _ => {
                m.source_labels.insert(k.clone(), v.clone());
            }
        }
    }
    if !a.source_namespace.is_empty() {
        if !m.source_namespace.is_empty() && m.source_namespace != a.source_namespace {
            return Ok(None);
        }
        m.source_namespace = a.source_namespace.clone();
    }
    match a.callers.intersect(&b.callers) {
        Some(callers) => m.callers = callers,
        None => return Ok(None),
    }
    Ok(Some(m))
}

/// The values both match, as one condition (`None`: none); an error where a regex is involved.
fn string_intersect(a: &StringMatch, b: &StringMatch) -> Result<Option<StringMatch>, String> {
    if string_covers(a, b) {
        return Ok(Some(b.clone()));
    }
    if string_covers(b, a) {
        return Ok(Some(a.clone()));
    }
    if a.regex.is_some() || b.regex.is_some() {
        return Err(format!("cannot combine {} with {}", describe(a), describe(b)));
    }
    // Both exact or prefix, neither covering the other: disjoint.
    Ok(None)
}

fn describe(m: &StringMatch) -> String {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), _, _) => format!("exact `{e}`"),
        (_, Some(p), _) => format!("prefix `{p}`"),
        (_, _, Some(r)) => format!("regex `{r}`"),
        _ => "any value".into(),
    }
}

/// DestinationRules of one host at the same rank: only the first by namespace/name applies.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::object_from_value;

    fn store(yaml: &str) -> Store {
        Store::from_valid_yaml(yaml)
    }

    const PLATFORM: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: platform, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v3}, weight: 10}
"#;

    const CHAOS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: chaos, namespace: chaos-tools}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - name: abort-tests
    match: [{headers: {x-chaos: {exact: abort}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
"#;

    const HOST: &str = "reviews.shop.svc.cluster.local";

    #[test]
    fn a_fault_layer_lays_over_every_route_it_overlaps() {
        let c = compose(&store(&format!("{PLATFORM}---{CHAOS}")));
        assert!(c.conflicts.is_empty(), "{:?}", c.conflicts);
        let http = &c.by_host[HOST].spec.http;
        let names: Vec<&str> = http.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "abort-tests+shop.platform.0",
                "abort-tests+shop.platform.1",
                "shop.platform.0",
                "shop.platform.1"
            ]
        );
        // Jason's layered route needs both headers; the catch-all's needs the chaos header only.
        assert_eq!(http[0].matches[0].headers.keys().collect::<Vec<_>>(), ["end-user", "x-chaos"]);
        assert_eq!(http[1].matches[0].headers.keys().collect::<Vec<_>>(), ["x-chaos"]);
        assert_eq!(http[1].route.len(), 2, "the layer keeps the route's destinations");
        assert!(http[0].fault.as_ref().unwrap().abort.is_some());
        assert!(http[2].fault.is_none() && http[3].fault.is_none());
        assert_eq!(http[3].route[0].destination.host, HOST, "destinations are qualified");
    }

    #[test]
    fn a_lone_fault_layer_lays_over_the_default_route() {
        let c = compose(&store(CHAOS));
        let http = &c.by_host[HOST].spec.http;
        assert_eq!(http.len(), 2);
        assert_eq!(http[0].route[0].destination.host, HOST);
        assert!(http[0].fault.is_some() && http[1].fault.is_none() && http[1].matches.is_empty());
    }

    #[test]
    fn precedence_then_own_namespace_then_name_orders_routes() {
        let other = |name: &str, ns: &str, precedence: Option<i32>, subset: &str| {
            let annotations = precedence
                .map(|p| format!(", annotations: {{nodemesh.io/precedence: \"{p}\"}}"))
                .unwrap_or_default();
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}{annotations}}}\n\
                 spec:\n  hosts: [{HOST}]\n  http:\n  - match: [{{uri: {{prefix: /{name}}}}}]\n    route: [{{destination: {{host: {HOST}, subset: {subset}}}}}]\n"
            )
        };
        let yaml = [
            other("a-elsewhere", "team-a", None, "v1"),
            other("b-own", "shop", None, "v2"),
            other("z-urgent", "team-z", Some(10), "v3"),
            other("c-own", "shop", None, "v1"),
        ]
        .join("---\n");
        let c = compose(&store(&yaml));
        let order: Vec<&str> = c.by_host[HOST].spec.http.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(order, ["team-z.z-urgent.0", "shop.b-own.0", "shop.c-own.0", "team-a.a-elsewhere.0"]);
    }

    #[test]
    fn a_route_behind_a_catch_all_is_reported() {
        let second = PLATFORM.replace("name: platform", "name: team-b").replace("subset: v2", "subset: v3");
        let c = compose(&store(&format!("{PLATFORM}---{second}")));
        // team-b's jason route is shadowed by platform's identical one; its catch-all by platform's.
        assert_eq!(c.conflicts.len(), 2, "{:#?}", c.conflicts);
        assert!(
            c.conflicts[0].contains("VirtualService shop/team-b spec.http[0] never matches"),
            "{}",
            c.conflicts[0]
        );
        assert!(c.conflicts[0].contains("VirtualService shop/platform spec.http[0] comes first"));
        assert!(c.conflicts[1].contains("shop/team-b spec.http[1] never matches"));
    }

    #[test]
    fn prefixes_and_ports_cover_only_what_they_should() {
        let m = |yaml: &str| serde_saphyr::from_str::<HttpMatch>(yaml).unwrap();
        assert!(covers(&m("{uri: {prefix: /api}}"), &m("{uri: {exact: /api/v1}, port: 80}")));
        assert!(!covers(&m("{uri: {prefix: /api}, port: 80}"), &m("{uri: {prefix: /api}}")));
        assert!(!covers(&m("{uri: {prefix: /api}}"), &m("{uri: {regex: /api.*}}")));
        assert!(covers(&m("{sourceLabels: {app: a}}"), &m("{sourceLabels: {app: a, v: '1'}}")));
        assert!(!covers(&m("{headers: {x: {exact: a}}}"), &m("{}")));
        assert_eq!(intersect(&m("{uri: {prefix: /a}}"), &m("{uri: {prefix: /b}}")).unwrap(), None);
        assert_eq!(intersect(&m("{port: 80}"), &m("{port: 81}")).unwrap(), None);
        assert_eq!(
            intersect(&m("{uri: {prefix: /a}}"), &m("{uri: {exact: /a/b}}")).unwrap(),
            Some(m("{uri: {exact: /a/b}}"))
        );
        let err = intersect(&m("{uri: {regex: /a.*}}"), &m("{uri: {prefix: /b}}")).unwrap_err();
        assert!(err.contains("regex `/a.*`"), "{err}");
    }

    #[test]
    fn a_layer_that_cannot_be_combined_is_reported() {
        let regex_layer = CHAOS.replace("headers: {x-chaos: {exact: abort}}", "uri: {regex: '/r.*'}");
        let regex_route = PLATFORM.replace("headers: {end-user: {exact: jason}}", "uri: {regex: '/q.*'}");
        let c = compose(&store(&format!("{regex_route}---{regex_layer}")));
        assert_eq!(c.conflicts.len(), 1, "{:?}", c.conflicts);
        assert!(
            c.conflicts[0].contains("does not apply to VirtualService shop/platform spec.http[0]"),
            "{}",
            c.conflicts[0]
        );
        // It still lays over the catch-all.
        assert_eq!(c.by_host[HOST].spec.http.len(), 3);
    }

    #[test]
    fn two_destination_rules_at_one_rank_are_reported() {
        let dr = |name: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{host: reviews}}\n"
            )
        };
        let c = compose(&store(&format!("{}---\n{}", dr("a"), dr("b"))));
        assert_eq!(c.conflicts.len(), 1);
        assert!(
            c.conflicts[0].contains("DestinationRule shop/b is ignored: DestinationRule shop/a"),
            "{}",
            c.conflicts[0]
        );
    }

    #[test]
    fn a_bad_precedence_is_an_error_naming_the_annotation() {
        let value: serde_json::Value = serde_saphyr::from_str(&CHAOS.replace(
            "namespace: chaos-tools}",
            "namespace: chaos-tools, annotations: {nodemesh.io/precedence: high}}",
        ))
        .unwrap();
        let err = object_from_value(value).unwrap_err().to_string();
        assert!(
            err.contains("metadata.annotations.nodemesh.io/precedence") && err.contains("`high`"),
            "{err}"
        );
    }

    #[test]
    fn export_to_limits_a_virtual_service_to_its_namespaces_and_others_take_the_default_route() {
        let private = PLATFORM.replace(
            "  hosts: [reviews]",
            "  hosts: [reviews]\n  exportTo: [.]\n  tcp: [{route: [{destination: {host: reviews}}]}]",
        );
        let c = compose(&store(&private));
        let v = &c.by_host["reviews.shop.svc.cluster.local"];
        let shop = Callers::In(["shop".to_string()].into());
        // Both routes admit callers in shop only (the match-less one gained a match)…
        assert_eq!(v.spec.http.len(), 3, "{:?}", v.spec.http);
        for r in &v.spec.http[..2] {
            assert!(r.matches.iter().all(|m| m.callers == shop), "{r:?}");
        }
        // …and everyone else takes the host's default route.
        let default = &v.spec.http[2];
        assert_eq!(default.matches[0].callers, Callers::NotIn(["shop".to_string()].into()));
        assert_eq!(default.route[0].destination.host, "reviews.shop.svc.cluster.local");
        assert_eq!(v.spec.tcp[0].matches[0].callers, shop, "tcp routes are exported alike");

        // A second object exported everywhere: every caller sees a VirtualService, so no
        // default route is added; the chaos layer (exported everywhere) lays over shop's
        // routes for shop's callers only.
        let c = compose(&store(&format!("{private}---{CHAOS}")));
        let v = &c.by_host["reviews.shop.svc.cluster.local"];
        let layered: Vec<_> = v.spec.http.iter().filter(|r| r.fault.is_some()).collect();
        assert!(
            !layered.is_empty()
                && layered
                    .iter()
                    .all(|r| r.matches.iter().all(
                        |m| m.callers == shop || m.callers == Callers::NotIn(["shop".to_string()].into())
                    )),
            "{layered:?}"
        );
        let everyone = CHAOS.replace(
            "  - name: abort-tests",
            "  - route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v1}}]\n  - name: abort-tests",
        );
        let c = compose(&store(&format!("{private}---{everyone}")));
        let v = &c.by_host["reviews.shop.svc.cluster.local"];
        assert!(
            v.spec.http.iter().all(|r| r.matches.iter().all(|m| !matches!(m.callers, Callers::NotIn(_)))),
            "no default route when a public VirtualService routes the host: {:?}",
            v.spec.http
        );
    }
}
