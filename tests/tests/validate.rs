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

/// Every example a user might copy is valid.
#[test]
fn the_examples_validate() {
    let bin = nodemesh_tests::bin("mesh-control").unwrap();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for dir in ["config", "policies", "bookshop"] {
        let out = Command::new(&bin).arg("validate").arg(examples.join(dir)).output().unwrap();
        assert!(
            out.status.success(),
            "examples/{dir}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
