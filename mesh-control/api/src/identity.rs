//! SPIFFE identities of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! Istio's form, so policies written for Istio name the same principals.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// The identity of a workload running as `service_account` in `namespace` (Kubernetes'
    /// `default` account when none is named).
    pub fn of_workload(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        let account = if service_account.is_empty() { "default" } else { service_account };
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: account.to_string(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = String;

    fn from_str(s: &str) -> Result<SpiffeId, String> {
        let bad = || {
            format!("`{s}` is not a workload identity (spiffe://<trust-domain>/ns/<namespace>/sa/<account>)")
        };
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| !p.is_empty()) => Ok(SpiffeId {
                trust_domain: td.to_string(),
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_istio_identities() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/reviews".parse().unwrap();
        assert_eq!((id.namespace.as_str(), id.service_account.as_str()), ("shop", "reviews"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "https://x/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/b/c",
        ] {
            assert!(bad.parse::<SpiffeId>().unwrap_err().contains("not a workload identity"), "{bad}");
        }
    }
}
