//! A service port's VirtualService tcp and tls routes (`mesh::L4Route`), compiled: which
//! cluster a connection that is not proxied as HTTP goes to. Checked once per connection, in
//! order; the first route that matches takes it, and its weighted destinations are picked by
//! smooth weighted round robin (exact per cycle, per connection).

use nodemesh_api::{matchers::sni_matches, proto::mesh};

use super::{request_match::RequestSource, weights::SmoothWeights};

pub struct L4Routes {
    routes: Vec<L4Route>,
    /// What they were compiled from: an unchanged port keeps its compiled table (and the
    /// state of its weighted picks) across config updates.
    pub source: Vec<mesh::L4Route>,
}

struct L4Route {
    name: String,
    tls: bool,
    matches: Vec<mesh::L4Match>,
    clusters: Vec<String>,
    weights: SmoothWeights,
}

/// What a connection offers to match on.
pub struct Connection<'a> {
    /// The server name of a TLS ClientHello; `None` for a connection that is not TLS (or a
    /// ClientHello without one: such a connection matches no tls route).
    pub sni: Option<&'a str>,
    pub source: &'a RequestSource<'a>,
}

impl L4Routes {
    pub fn compile(routes: &[mesh::L4Route]) -> Result<L4Routes, String> {
        let mut compiled = Vec::new();
        for r in routes {
            if r.destinations.is_empty() {
                return Err(format!("L4 route {}: no destinations", r.name));
            }
            if r.tls && (r.matches.is_empty() || r.matches.iter().any(|m| m.sni_hosts.is_empty())) {
                return Err(format!("L4 route {}: a tls route needs server names in every match", r.name));
            }
            let weights = SmoothWeights::new(r.destinations.iter().map(|d| d.weight).collect())
                .map_err(|e| format!("L4 route {}: {e}", r.name))?;
            compiled.push(L4Route {
                name: r.name.clone(),
                tls: r.tls,
                matches: r.matches.clone(),
                clusters: r.destinations.iter().map(|d| d.cluster.clone()).collect(),
                weights,
            });
        }
        Ok(L4Routes { routes: compiled, source: routes.to_vec() })
    }

    /// Whether a tls route needs the ClientHello read even on a port declared opaque.
    pub fn has_tls(&self) -> bool {
        self.routes.iter().any(|r| r.tls)
    }

    pub fn has_tcp(&self) -> bool {
        self.routes.iter().any(|r| !r.tls)
    }

    /// The route taking `conn`, and the cluster it picked; `None`: the port's own cluster.
    pub fn pick(&self, conn: &Connection<'_>) -> Option<(&str, &str)> {
        let route = self.routes.iter().find(|r| r.matches(conn))?;
        Some((&route.name, &route.clusters[route.weights.pick()]))
    }
}

impl L4Route {
    fn matches(&self, conn: &Connection<'_>) -> bool {
        if self.tls && conn.sni.is_none() {
            return false;
        }
        let one = |m: &mesh::L4Match| {
            m.source.as_ref().is_none_or(|s| conn.source.is(s))
                && (!self.tls || m.sni_hosts.iter().any(|h| conn.sni.is_some_and(|n| sni_matches(h, n))))
        };
        self.matches.is_empty() || self.matches.iter().any(one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(
        name: &str,
        tls: bool,
        sni: &[&str],
        labels: &[(&str, &str)],
        weights: &[(&str, u32)],
    ) -> mesh::L4Route {
        let source = (!labels.is_empty()).then(|| mesh::RouteSource {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            namespace: String::new(),
            ..Default::default()
        });
        mesh::L4Route {
            name: name.into(),
            tls,
            matches: if sni.is_empty() && source.is_none() {
                Vec::new()
            } else {
                vec![mesh::L4Match { sni_hosts: sni.iter().map(|s| s.to_string()).collect(), source }]
            },
            destinations: weights
                .iter()
                .map(|(c, w)| mesh::L4Destination { cluster: c.to_string(), weight: *w })
                .collect(),
        }
    }

    #[test]
    fn tls_routes_take_named_servers_then_tcp_routes_take_the_rest() {
        let table = L4Routes::compile(&[
            route("a", true, &["a.example.com"], &[], &[("ca", 100)]),
            route("wild", true, &["*.example.org"], &[], &[("cw", 100)]),
            route("canary", false, &[], &[("track", "canary")], &[("c2", 100)]),
            route("split", false, &[], &[], &[("c1", 80), ("c2", 20)]),
        ])
        .unwrap();
        let labels = [("track".to_string(), "canary".to_string())].into_iter().collect();
        let plain = RequestSource { namespace: "shop", labels: None };
        let canary = RequestSource { namespace: "shop", labels: Some(&labels) };
        let pick = |sni: Option<&str>, source: &RequestSource<'_>| {
            table.pick(&Connection { sni, source }).map(|(r, c)| (r.to_string(), c.to_string())).unwrap()
        };
        assert_eq!(pick(Some("a.example.com"), &plain).1, "ca");
        assert_eq!(pick(Some("x.example.org"), &plain).1, "cw");
        assert_eq!(pick(Some("example.org"), &canary).1, "c2", "`*.` needs a subdomain");
        assert_eq!(pick(None, &canary).0, "canary");
        let split: Vec<String> = (0..100).map(|_| pick(None, &plain).1).collect();
        assert_eq!(split.iter().filter(|c| *c == "c1").count(), 80, "exact per cycle");
    }

    #[test]
    fn a_route_without_destinations_or_server_names_is_refused() {
        let mut no_dest = route("x", false, &[], &[], &[]);
        assert!(L4Routes::compile(&[no_dest.clone()]).err().unwrap().contains("no destinations"));
        no_dest.destinations.push(mesh::L4Destination { cluster: "c".into(), weight: 1 });
        no_dest.tls = true;
        assert!(L4Routes::compile(&[no_dest]).err().unwrap().contains("server names"));
    }
}
