//! `mesh-control validate` on a directory of broken files: every error listed with its file,
//! document and field, exit status non-zero; a clean directory passes.

use std::process::Command;

#[test]
fn validate_lists_every_error_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("nm-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("rules.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: shop}\n\
         spec: {host: web, trafficPolicy: {loadBalancer: {simple: FASTEST}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: Bad_Name}\nspec: {ports: [{port: 80}]}\n",
    )
    .unwrap();
    std::fs::write(dir.join("syntax.yaml"), "kind: [unclosed\n").unwrap();
    std::fs::write(
        dir.join("limits.yaml"),
        "apiVersion: nodemesh.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: pods, namespace: shop}\n\
         spec: {host: web, side: Server, workloadSelector: {labels: {app: a}}, limits: [{maxTokens: 0}]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("routes.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pool, namespace: shop}\n\
         spec: {host: web, trafficPolicy: {connectionPool: {http: {http2MaxRequest: 2}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\n\
         spec: {hosts: [web], http: [{route: [{destination: {host: web}, weight: 60}, {destination: {host: web, subset: v2}, weight: 30}]}]}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: stray, namespace: shop}\n\
         spec: {host: web}\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}\n",
    )
    .unwrap();
    let bin = nodemesh_tests::bin("mesh-control").unwrap();
    let out = Command::new(&bin).arg("validate").arg(&dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "broken files must fail validation:\n{text}");
    for expected in [
        "rules.yaml",
        "FASTEST",
        "spec.trafficPolicy.loadBalancer",
        "metadata.name",
        "syntax.yaml",
        "spec.trafficPolicy.connectionPool.http.http2MaxRequest",
        "spec.http[0].route",
        "add up to 90",
        "trafficPolicy: unknown top-level field",
        "limits.yaml",
        "spec.workloadSelector",
        "spec.limits[0].maxTokens",
        "spec.limits[0].fillInterval",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }

    std::fs::remove_file(dir.join("syntax.yaml")).unwrap();
    std::fs::remove_file(dir.join("routes.yaml")).unwrap();
    std::fs::remove_file(dir.join("limits.yaml")).unwrap();
    std::fs::write(dir.join("rules.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
        .unwrap();
    let out = Command::new(&bin).arg("validate").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every example a user might copy is valid. The bookshop's route files are alternatives (each
/// defines `reviews`), applied one at a time over the app, each with the chaos layer over it.
#[test]
fn the_examples_validate() {
    let bin = nodemesh_tests::bin("mesh-control").unwrap();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut sets: Vec<Vec<std::path::PathBuf>> =
        ["config", "policies"].iter().map(|d| vec![examples.join(d)]).collect();
    let mut routes: Vec<_> =
        std::fs::read_dir(examples.join("bookshop/routes")).unwrap().map(|e| e.unwrap().path()).collect();
    routes.sort();
    assert!(routes.len() >= 6, "{routes:?}");
    let layer = examples.join("bookshop/layers/chaos-reviews.yaml");
    sets.extend(routes.into_iter().map(|r| vec![examples.join("bookshop/bookshop.yaml"), r, layer.clone()]));
    for set in sets {
        let out = Command::new(&bin).arg("validate").args(&set).output().unwrap();
        assert!(
            out.status.success(),
            "{set:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Objects that are each valid but compose badly: reported as conflicts (exit non-zero), with
/// both objects named; an object defined in two files is an error.
#[test]
fn validate_reports_conflicts_between_objects() {
    let dir = std::env::temp_dir().join(format!("nm-validate-conflicts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vs = |name: &str, ns: &str, body: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{hosts: [reviews.shop.svc.cluster.local], http: [{body}]}}\n"
        )
    };
    let to = |subset: &str| {
        format!("{{route: [{{destination: {{host: reviews.shop.svc.cluster.local, subset: {subset}}}}}]}}")
    };
    std::fs::write(dir.join("platform.yaml"), vs("platform", "shop", &to("v1"))).unwrap();
    std::fs::write(dir.join("team-b.yaml"), vs("team-b", "team-b", &to("v2"))).unwrap();
    std::fs::write(
        dir.join("chaos.yaml"),
        vs(
            "chaos",
            "chaos",
            "{match: [{uri: {regex: '/r.*'}}], fault: {abort: {httpStatus: 503}}}, \
                             {match: [{uri: {regex: '/r.*'}}], fault: {delay: {fixedDelay: 1s}}}",
        ),
    )
    .unwrap();
    let dr = |name: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{host: reviews}}\n"
        )
    };
    std::fs::write(dir.join("rules.yaml"), format!("{}---\n{}", dr("a"), dr("b"))).unwrap();
    std::fs::write(dir.join("zz-copy.yaml"), vs("platform", "shop", &to("v3"))).unwrap();
    let bin = nodemesh_tests::bin("mesh-control").unwrap();
    let out = Command::new(&bin).arg("validate").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "conflicts must fail validation:\n{text}");
    for expected in [
        // team-b's catch-all sits behind the host namespace's own.
        "conflict: host reviews.shop.svc.cluster.local: VirtualService team-b/team-b spec.http[0] never matches: \
         VirtualService shop/platform spec.http[0] comes first",
        // The second layer matches what the first does: its fault would never apply.
        "VirtualService chaos/chaos spec.http[1] never matches",
        "its fault would never apply",
        "DestinationRule shop/b is ignored: DestinationRule shop/a",
        "zz-copy.yaml document 1 (line 1): VirtualService shop/platform: already defined by",
        "3 conflict(s)",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every Istio field Nodemesh accepts is enforced; the ones it does not enforce make their
/// object rejected, naming the field — never accepted and silently ignored. One file per field,
/// so each rejection is seen to come from its own object.
#[test]
fn fields_nodemesh_does_not_enforce_are_rejected_by_name() {
    let dr = |tp: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\n\
             spec: {{host: web, trafficPolicy: {tp}}}\n"
        )
    };
    let sidecar = |spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: shop}}\nspec: {spec}\n"
        )
    };
    let se = |extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: api, namespace: shop}}\n\
             spec: {{hosts: [api.example.com], addresses: [192.0.2.10], ports: [{{number: 443, name: tls, protocol: TLS}}]{extra}}}\n"
        )
    };
    let rejected: Vec<(String, &str)> = vec![
        (
            dr("{tls: {mode: SIMPLE}}"),
            "spec.trafficPolicy.tls.mode: SIMPLE: TLS origination is not supported",
        ),
        (dr("{tls: {mode: MUTUAL}}"), "spec.trafficPolicy.tls.mode: MUTUAL"),
        (dr("{tls: {mode: ISTIO_MUTUAL, sni: a.example}}"), "spec.trafficPolicy.tls.sni: not enforced"),
        (dr("{tunnel: {targetHost: egress}}"), "spec.trafficPolicy.tunnel: not enforced"),
        (dr("{proxyProtocol: {version: V1}}"), "spec.trafficPolicy.proxyProtocol: not enforced"),
        (
            dr("{connectionPool: {tcp: {maxConnectionDuration: 1h}}}"),
            "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration: not enforced",
        ),
        (
            dr("{connectionPool: {http: {maxRetries: 3}}}"),
            "spec.trafficPolicy.connectionPool.http.maxRetries",
        ),
        (
            dr("{connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}"),
            "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: UPGRADE is not enforced",
        ),
        (
            dr("{connectionPool: {http: {useClientProtocol: false}}}"),
            "spec.trafficPolicy.connectionPool.http.useClientProtocol",
        ),
        (
            dr("{connectionPool: {http: {maxConcurrentStreams: 10}}}"),
            "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams",
        ),
        (
            dr("{portLevelSettings: [{port: {number: 80}, tls: {mode: SIMPLE}}]}"),
            "spec.trafficPolicy.portLevelSettings[0].tls.mode",
        ),
        (
            dr("{loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 30s}}"),
            "spec.trafficPolicy.loadBalancer.warmupDurationSecs",
        ),
        (
            dr("{loadBalancer: {localityLbSetting: {failover: [{from: a, to: b}]}}}"),
            "spec.trafficPolicy.loadBalancer.localityLbSetting.failover",
        ),
        (sidecar("{ingress: [{port: {number: 9080}, defaultEndpoint: '127.0.0.1:8080'}]}"), "spec.ingress"),
        (sidecar("{egress: [{port: {number: 80}, hosts: ['./*']}]}"), "spec.egress[0].port: not enforced"),
        (sidecar("{egress: [{bind: 127.0.0.2, hosts: ['./*']}]}"), "spec.egress[0].bind: not enforced"),
        (sidecar("{egress: [{captureMode: NONE, hosts: ['./*']}]}"), "spec.egress[0].captureMode"),
        (
            sidecar("{outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: egress}}}"),
            "spec.outboundTrafficPolicy.egressProxy",
        ),
        (se(", subjectAltNames: [spiffe://x/ns/a/sa/b]"), "spec.subjectAltNames: not enforced"),
        (
            se(", exportTo: [Bad_Namespace]"),
            "spec.exportTo[0]: `Bad_Namespace` is not `*`, `.`, `~` or a namespace name",
        ),
        (se(", exportTo: ['~', shop]"), "spec.exportTo: `~` (visible to no namespace) cannot be combined"),
    ];
    let accepted = [
        dr("{tls: {mode: ISTIO_MUTUAL}}"),
        dr("{tls: {mode: DISABLE}, portLevelSettings: [{port: {number: 80}, tls: {mode: ISTIO_MUTUAL}}]}"),
        dr("{connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: true}}}"),
        sidecar("{egress: [{hosts: ['./*'], captureMode: DEFAULT}]}"),
        se(", exportTo: [., other]"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\n\
         spec: {hosts: [web], exportTo: ['~'], http: [{route: [{destination: {host: web}}]}]}\n"
            .to_string(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, annotations: {networking.istio.io/exportTo: '., other'}}\n\
         spec: {ports: [{port: 80}]}\n"
            .to_string(),
    ];
    let dir = std::env::temp_dir().join(format!("nm-validate-unenforced-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (yaml, _)) in rejected.iter().enumerate() {
        std::fs::write(dir.join(format!("case-{i:02}.yaml")), yaml).unwrap();
    }
    let bin = nodemesh_tests::bin("mesh-control").unwrap();
    let out = Command::new(&bin).arg("validate").arg(&dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    for (i, (_, expected)) in rejected.iter().enumerate() {
        let file = format!("case-{i:02}.yaml");
        let line =
            text.lines().find(|l| l.contains(&file)).unwrap_or_else(|| panic!("{file} accepted:\n{text}"));
        assert!(line.contains(expected), "{file}: want `{expected}`, got:\n{line}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    for (i, yaml) in accepted.iter().enumerate() {
        // Each its own host: two DestinationRules for one host would conflict.
        let yaml = yaml
            .replace("name: web", &format!("name: web{i}"))
            .replace("host: web", &format!("host: web{i}"));
        std::fs::write(dir.join(format!("ok-{i}.yaml")), yaml).unwrap();
    }
    let out = Command::new(&bin).arg("validate").arg(&dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the enforced forms must validate:\n{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
