//! AuthorizationPolicies → the `Authorization` messages on each Workload they apply to.

use crate::{
    model::authorization::{Action, AuthorizationPolicy},
    proto::mesh,
};

pub fn authorization(p: &AuthorizationPolicy) -> mesh::Authorization {
    let ports = |ports: &[String]| ports.iter().filter_map(|p| p.parse().ok()).collect();
    mesh::Authorization {
        name: format!("{}/{}", p.meta.namespace, p.meta.name),
        action: match p.spec.action {
            Action::Deny => mesh::authorization::Action::Deny,
            Action::Audit => mesh::authorization::Action::Audit,
            // CUSTOM never gets here (rejected when parsed).
            Action::Allow | Action::Custom => mesh::authorization::Action::Allow,
        } as i32,
        rules: p
            .spec
            .rules
            .iter()
            .map(|r| mesh::AuthorizationRule {
                from: r
                    .from
                    .iter()
                    .map(|f| {
                        let s = &f.source;
                        mesh::AuthorizationSource {
                            principals: s.principals.clone(),
                            not_principals: s.not_principals.clone(),
                            namespaces: s.namespaces.clone(),
                            not_namespaces: s.not_namespaces.clone(),
                            ip_blocks: s.ip_blocks.clone(),
                            not_ip_blocks: s.not_ip_blocks.clone(),
                            remote_ip_blocks: s.remote_ip_blocks.clone(),
                            not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                        }
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|t| {
                        let o = &t.operation;
                        mesh::AuthorizationOperation {
                            hosts: o.hosts.clone(),
                            not_hosts: o.not_hosts.clone(),
                            ports: ports(&o.ports),
                            not_ports: ports(&o.not_ports),
                            methods: o.methods.clone(),
                            not_methods: o.not_methods.clone(),
                            paths: o.paths.clone(),
                            not_paths: o.not_paths.clone(),
                        }
                    })
                    .collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| mesh::AuthorizationCondition {
                        key: c.key.clone(),
                        values: c.values.clone(),
                        not_values: c.not_values.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
