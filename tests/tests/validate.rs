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
