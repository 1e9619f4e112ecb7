//! Which DestinationRule applies to traffic for a host, as Istio decides it for a calling
//! proxy: among the rules for the host *visible to the caller* (`exportTo`), the first
//! namespace that has one wins — the caller's own namespace, then the service's, then the root
//! namespace (MeshConfig `rootNamespace`, default `istio-system`); rules in other namespaces do
//! not apply. Within a namespace an exact host beats a wildcard, a longer wildcard a shorter
//! one, and between equals the first by name applies (the others are reported as conflicts).
//!
//! So the rule can differ by the caller's namespace. Most callers — those in no namespace that
//! holds a rule or is named by one's `exportTo` — see the same rule, the *default*; the
//! translation gives callers that see another rule their own clusters ([`variants`]).
//!
//! [`variants`]: DestinationRules::variants

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Kind, Object, istio::DestinationRule, peer_authentication::root_namespace, qualify, store::Store,
    virtual_service::Callers,
};

pub struct DestinationRules<'a> {
    /// Every rule with its qualified host and the callers it is exported to, by namespace
    /// then name.
    rules: Vec<(&'a DestinationRule, String, Callers)>,
    root_namespace: String,
    /// The namespaces whose callers may see another rule than the default: those holding a
    /// rule, and those some rule is exported to by name.
    special: BTreeSet<String>,
}

/// A group of calling namespaces and the rule they see (`None`: none applies to them).
pub struct Variant<'a> {
    pub namespaces: BTreeSet<String>,
    pub rule: Option<&'a DestinationRule>,
}

impl<'a> DestinationRules<'a> {
    pub fn new(store: &'a Store) -> DestinationRules<'a> {
        let mut rules: Vec<(&DestinationRule, String, Callers)> = store
            .of_kind(Kind::DestinationRule)
            .filter_map(|o| match o {
                Object::DestinationRule(dr) => Some((
                    dr,
                    qualify(&dr.spec.host, &dr.meta.namespace),
                    Callers::exported(&dr.spec.export_to, &dr.meta.namespace),
                )),
                _ => None,
            })
            .collect();
        rules.sort_by(|a, b| {
            (&a.0.meta.namespace, &a.0.meta.name).cmp(&(&b.0.meta.namespace, &b.0.meta.name))
        });
        let mut special = BTreeSet::new();
        for (dr, _, callers) in &rules {
            special.insert(dr.meta.namespace.clone());
            if let Callers::In(set) = callers {
                special.extend(set.iter().cloned());
            }
        }
        DestinationRules { rules, root_namespace: root_namespace(store), special }
    }

    /// The rule for traffic to `host` (a service in `service_namespace`) from a caller in
    /// `caller` (`None`: a caller in a namespace with nothing special about it).
    pub fn for_caller(
        &self,
        host: &str,
        service_namespace: &str,
        caller: Option<&str>,
    ) -> Option<&'a DestinationRule> {
        let tiers = caller.into_iter().chain([service_namespace, self.root_namespace.as_str()]);
        let mut seen = BTreeSet::new();
        for namespace in tiers.filter(|ns| seen.insert(*ns)) {
            let mut best: Option<(usize, &DestinationRule)> = None;
            for (dr, rule_host, callers) in &self.rules {
                if dr.meta.namespace != namespace || !visible(callers, caller) {
                    continue;
                }
                let Some(specificity) = specificity(rule_host, host) else { continue };
                if best.is_none_or(|(s, _)| specificity > s) {
                    best = Some((specificity, dr));
                }
            }
            if let Some((_, dr)) = best {
                return Some(dr);
            }
        }
        None
    }

    /// The default caller's rule for `host`, and the namespaces whose callers see another one,
    /// grouped by the rule they see.
    pub fn variants(
        &self,
        host: &str,
        service_namespace: &str,
    ) -> (Option<&'a DestinationRule>, Vec<Variant<'a>>) {
        let default = self.for_caller(host, service_namespace, None);
        let key = |dr: Option<&DestinationRule>| dr.map(|d| (d.meta.namespace.clone(), d.meta.name.clone()));
        let mut groups: BTreeMap<Option<(String, String)>, Variant<'a>> = BTreeMap::new();
        for namespace in &self.special {
            let rule = self.for_caller(host, service_namespace, Some(namespace));
            if key(rule) == key(default) {
                continue;
            }
            groups
                .entry(key(rule))
                .or_insert_with(|| Variant { namespaces: BTreeSet::new(), rule })
                .namespaces
                .insert(namespace.clone());
        }
        (default, groups.into_values().collect())
    }

    /// Rules that never apply: another rule in the same namespace has the same host and is
    /// exported to some of the same callers, and comes first by name.
    pub fn conflicts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, (later, host, callers)) in self.rules.iter().enumerate() {
            let shadowing = self.rules[..i].iter().find(|(earlier, earlier_host, earlier_callers)| {
                earlier.meta.namespace == later.meta.namespace
                    && earlier_host == host
                    && earlier_callers.intersect(callers).is_some()
            });
            if let Some((earlier, _, _)) = shadowing {
                out.push(format!(
                    "host {host}: DestinationRule {}/{} is ignored: DestinationRule {}/{} targets the same \
                     host at the same rank and applies (write one DestinationRule per host, or give each \
                     its own host)",
                    later.meta.namespace, later.meta.name, earlier.meta.namespace, earlier.meta.name
                ));
            }
        }
        out
    }
}

/// Whether a rule exported to `callers` applies to a caller in `caller` (`None`: a namespace
/// no rule names, which sees only the rules exported everywhere).
fn visible(callers: &Callers, caller: Option<&str>) -> bool {
    match (callers, caller) {
        (Callers::All, _) => true,
        (Callers::In(set), Some(ns)) => set.contains(ns),
        (Callers::NotIn(set), Some(ns)) => !set.contains(ns),
        (Callers::In(_), None) => false,
        (Callers::NotIn(_), None) => true,
    }
}

/// How specifically `rule_host` names `host` (higher wins), or `None` if it does not: an exact
/// host above every wildcard, a longer wildcard above a shorter.
fn specificity(rule_host: &str, host: &str) -> Option<usize> {
    if rule_host == host {
        return Some(usize::MAX);
    }
    let suffix = rule_host.strip_prefix('*')?;
    host.ends_with(suffix).then_some(suffix.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(yaml: &str) -> Store {
        Store::from_valid_yaml(yaml)
    }

    fn dr(name: &str, namespace: &str, host: &str, export_to: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{host: {host}, exportTo: [{export_to}]}}\n---\n"
        )
    }

    const REVIEWS: &str = "reviews.shop.svc.cluster.local";

    #[test]
    fn the_callers_namespace_then_the_services_then_the_root_and_only_what_is_exported() {
        let yaml = [
            dr("owner", "shop", "reviews", "'*'"),
            dr("private", "shop", "reviews.shop.svc.cluster.local", "."),
            dr("client-side", "team-a", "reviews.shop.svc.cluster.local", "."),
            dr("elsewhere", "team-b", "reviews.shop.svc.cluster.local", "'*'"),
            dr("mesh-wide", "istio-system", "'*.svc.cluster.local'", "'*'"),
        ]
        .concat();
        let s = store(&yaml);
        let rules = DestinationRules::new(&s);
        let name = |dr: Option<&DestinationRule>| dr.map(|d| d.meta.name.clone()).unwrap_or_default();
        // Everyone else: the service owner's public rule (team-b's does not apply outside it).
        assert_eq!(name(rules.for_caller(REVIEWS, "shop", None)), "owner");
        assert_eq!(name(rules.for_caller(REVIEWS, "shop", Some("team-c"))), "owner");
        // shop's callers: two rules for the host in shop; `private` (exported to shop) and
        // `owner` are equally specific and the first by name applies.
        assert_eq!(name(rules.for_caller(REVIEWS, "shop", Some("shop"))), "owner");
        assert_eq!(name(rules.for_caller(REVIEWS, "shop", Some("team-a"))), "client-side");
        assert_eq!(name(rules.for_caller(REVIEWS, "shop", Some("team-b"))), "elsewhere");
        // Another host: only the root namespace's wildcard.
        assert_eq!(name(rules.for_caller("ratings.shop.svc.cluster.local", "shop", None)), "mesh-wide");
        let (default, variants) = rules.variants(REVIEWS, "shop");
        assert_eq!(name(default), "owner");
        let groups: Vec<(Vec<String>, String)> =
            variants.iter().map(|v| (v.namespaces.iter().cloned().collect(), name(v.rule))).collect();
        // (A caller in the root namespace finds the wildcard in its own namespace first.)
        let group = |ns: &str, rule: &str| (vec![ns.to_string()], rule.to_string());
        assert_eq!(
            groups,
            vec![
                group("istio-system", "mesh-wide"),
                group("team-a", "client-side"),
                group("team-b", "elsewhere")
            ]
        );
        let conflicts = rules.conflicts();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(
            conflicts[0].contains("shop/private is ignored: DestinationRule shop/owner"),
            "{conflicts:?}"
        );
    }

    #[test]
    fn a_rule_exported_to_its_own_namespace_leaves_everyone_else_without_one() {
        let s = store(&dr("private", "shop", "reviews", "."));
        let rules = DestinationRules::new(&s);
        let (default, variants) = rules.variants(REVIEWS, "shop");
        assert!(default.is_none(), "not exported to other namespaces");
        assert_eq!(variants.len(), 1);
        assert_eq!(variants[0].namespaces, BTreeSet::from(["shop".to_string()]));
        assert_eq!(variants[0].rule.map(|d| d.meta.name.as_str()), Some("private"));
    }
}
