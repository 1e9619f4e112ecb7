//! deploy/daemonset: renders with kustomize (the base and every overlay), every object passes
//! Kubernetes' own schemas strictly (kubernetes-validate, offline), the examples validate
//! against our CRD schemas, and the manifests agree with the binaries: every NODEMESH_*
//! variable is a flag the binary takes, every path it reads is mounted, probes hit the admin
//! port, and the RBAC rules are exactly the API calls the code makes. No root needed; needs
//! `cargo xtask setup` (kubectl with kustomize v5, kubernetes-validate) and the built binaries.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

const TOOLS_BIN: &str = "/usr/local/lib/nodemesh/bin";
const KUBERNETES_VERSION: &str = "1.33.0";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e} (cargo xtask setup installs it)", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubectl kustomize <dir>` as YAML text.
fn render(dir: &str) -> String {
    let kubectl = Path::new(TOOLS_BIN).join("kubectl");
    run(&kubectl, &["kustomize", &workspace().join(dir).display().to_string()])
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// The `NODEMESH_*` variables a binary's subcommand reads (clap prints `[env: NAME=]`).
fn accepted_env(binary: &str, subcommand: &str) -> BTreeSet<String> {
    let help = run(&nodemesh_tests::bin(binary).unwrap(), &[subcommand, "--help"]);
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_string)
        .collect()
}

fn env_of(container: &Value) -> Vec<(String, Value)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].clone()))
        .collect()
}

fn env_value(container: &Value, name: &str) -> String {
    env_of(container)
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("container {} sets no {name}", container["name"]))
}

#[test]
fn the_install_and_its_overlay_render_and_pass_kubernetes_schemas_strictly() {
    for dir in ["deploy/daemonset", "deploy/daemonset/overlays/with-istio-crds"] {
        let yaml = render(dir);
        let objects = documents(&yaml);
        assert!(objects.len() >= 15, "{dir}: only {} objects", objects.len());
        let file = std::env::temp_dir().join(format!("nodemesh-manifests-{}.yaml", std::process::id()));
        std::fs::write(&file, &yaml).unwrap();
        let validate = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .arg(&file)
            .output()
            .expect("kubernetes-validate (cargo xtask setup installs it)");
        let _ = std::fs::remove_file(&file);
        assert!(
            validate.status.success(),
            "{dir} fails Kubernetes {KUBERNETES_VERSION} schemas:\n{}{}",
            String::from_utf8_lossy(&validate.stdout),
            String::from_utf8_lossy(&validate.stderr)
        );
        for o in &objects {
            if o["kind"] != "Namespace"
                && !o["kind"].as_str().unwrap().starts_with("Cluster")
                && o["kind"] != "CustomResourceDefinition"
            {
                assert_eq!(o["metadata"]["namespace"], "nodemesh-system", "{}", o["metadata"]["name"]);
            }
        }
    }
}

#[test]
fn examples_validate_against_the_crd_schemas() {
    let objects = documents(&render("deploy/daemonset"));
    let crd = find(&objects, "CustomResourceDefinition", "ratelimitpolicies.nodemesh.io");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let examples = std::fs::read_to_string(workspace().join("examples/policies/rate-limit.yaml")).unwrap();
    let policies: Vec<Value> =
        documents(&examples).into_iter().filter(|o| o["kind"] == "RateLimitPolicy").collect();
    assert!(!policies.is_empty(), "no RateLimitPolicy in the example");
    // JSON Schema (what OpenAPI v3 schemas of CRDs are, plus x-kubernetes-* hints) with
    // Python's jsonschema, which kubernetes-validate itself runs on.
    let script = "import json, sys, jsonschema\nschema, objects = json.load(sys.stdin)\nbad = 0\n\
for o in objects:\n    errors = list(jsonschema.Draft4Validator(schema).iter_errors(o))\n    bad += len(errors)\n\
    for e in errors: print(o['metadata']['name'], list(e.path), e.message)\nsys.exit(1 if bad else 0)\n";
    let mut broken = policies[0].clone();
    broken["spec"]["limits"][0]["maxTokens"] = "ten".into();
    for (objects, want_ok) in [(policies.clone(), true), (vec![broken], false)] {
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        serde_json::to_writer(child.stdin.take().unwrap(), &serde_json::json!([schema, objects])).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.success(), want_ok, "{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn the_daemonset_runs_mesh_node_with_flags_it_takes_and_mounts_every_path_it_reads() {
    let objects = documents(&render("deploy/daemonset"));
    let ds = find(&objects, "DaemonSet", "mesh-node");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["args"], serde_json::json!(["run"]));
    let accepted = accepted_env("mesh-node", "run");
    for (name, _) in env_of(c) {
        assert!(accepted.contains(&name), "mesh-node run does not read {name}; it reads {accepted:?}");
    }
    assert_eq!(env_value(c, "NODEMESH_KUBERNETES"), "true");
    // Where it finds pods and their namespaces.
    assert_eq!(pod["hostPID"], true, "pod processes (their netns) are the host's");
    assert_eq!(pod["hostNetwork"], true, "the tunnel listens on the node's address");
    let mounts: Vec<(String, bool)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap().to_string(), m["readOnly"] == true))
        .collect();
    let mounted = |path: &str, writable: bool| {
        mounts.iter().any(|(m, ro)| Path::new(path).starts_with(m) && (!writable || !ro))
    };
    for (var, writable) in [
        ("NODEMESH_CGROUP_ROOT", false),
        ("NODEMESH_HOST_PROC", false),
        ("NODEMESH_NETNS_DIR", false),
        ("NODEMESH_STATE_DIR", true),
        ("NODEMESH_API_SOCKET", true),
        ("NODEMESH_TOKEN_FILE", false),
        ("NODEMESH_CONTROL_PLANE_ROOT", false),
    ] {
        let path = env_value(c, var);
        assert!(
            mounted(&path, writable),
            "{var}={path} is not on a{} mount: {mounts:?}",
            if writable { " writable" } else { "" }
        );
    }
    assert!(mounted("/sys/fs/bpf", false), "bpffs is not mounted");
    // The precheck init container checks what `run` will use: the same cgroup root, bpffs.
    let init = &pod["initContainers"][0];
    assert_eq!(init["args"], serde_json::json!(["precheck"]));
    assert_eq!(init["image"], c["image"]);
    let precheck_env = accepted_env("mesh-node", "precheck");
    for (name, _) in env_of(init) {
        assert!(precheck_env.contains(&name), "mesh-node precheck does not read {name}");
    }
    let cgroup_root = env_value(init, "NODEMESH_CGROUP_ROOT");
    assert_eq!(cgroup_root, env_value(c, "NODEMESH_CGROUP_ROOT"));
    let init_mounts: Vec<&str> =
        init["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    for path in [cgroup_root.as_str(), "/sys/fs/bpf"] {
        assert!(init_mounts.iter().any(|m| Path::new(path).starts_with(m)), "precheck: {path} not mounted");
    }
    let netns =
        c["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == "/var/run/netns").unwrap();
    assert_eq!(netns["mountPropagation"], "HostToContainer", "netns created after start must show up");
    // Least privilege: capabilities, not privileged.
    let security = &c["securityContext"];
    assert_eq!(security["privileged"], false);
    let caps: BTreeSet<&str> =
        security["capabilities"]["add"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    for needed in ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"] {
        assert!(caps.contains(needed), "{needed} missing: {caps:?}");
    }
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // Readiness on the admin port mesh-node listens on.
    let admin = env_value(c, "NODEMESH_ADMIN_ADDR");
    let port = admin.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], port);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    // Prometheus scrapes the port mesh-node serves its metrics on.
    let metrics = env_value(c, "NODEMESH_METRICS_ADDR");
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"].as_str(), metrics.rsplit(':').next(), "{annotations}");
    // Node-critical, everywhere, rolled one node at a time without a gap.
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())
    );
    // New pod first (it takes the old one's listeners over); no declared port, which
    // hostNetwork would turn into a host port that keeps the surged pod Pending.
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0})
    );
    assert!(c.get("ports").is_none(), "a hostNetwork container's ports block the surge: {c}");
    // The drain ends before the kubelet's SIGKILL.
    let drain: u64 = env_value(c, "NODEMESH_DRAIN_TIMEOUT_SECS").parse().unwrap();
    assert!(drain < pod["terminationGracePeriodSeconds"].as_u64().unwrap(), "drain {drain}s");
    // The node token: projected, for the mesh's audience, at the path it reads.
    let token_volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "node-token").unwrap();
    let projected = &token_volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["audience"], "nodemesh");
    assert!(env_value(c, "NODEMESH_TOKEN_FILE").ends_with(projected["path"].as_str().unwrap()));
}

#[test]
fn mesh_control_runs_two_replicas_with_flags_it_takes_behind_a_service_and_a_budget() {
    let objects = documents(&render("deploy/daemonset"));
    let deployment = find(&objects, "Deployment", "mesh-control");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    let accepted = accepted_env("mesh-control", "run");
    for (name, _) in env_of(c) {
        assert!(accepted.contains(&name), "mesh-control run does not read {name}; it reads {accepted:?}");
    }
    let port_of = |var: &str| env_value(c, var).rsplit(':').next().unwrap().parse::<u64>().unwrap();
    let (tls, admin) = (port_of("NODEMESH_TLS_ADDR"), port_of("NODEMESH_CONTROL_ADMIN_ADDR"));
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], admin);
    let service = find(&objects, "Service", "mesh-control");
    let ports: BTreeSet<u64> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["targetPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, BTreeSet::from([tls, admin]));
    let pdb = find(&objects, "PodDisruptionBudget", "mesh-control");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    // Node tokens: TokenReview asks for the audience the DaemonSet's projected token has, of
    // the DaemonSet's ServiceAccount.
    let node_account = env_value(c, "NODEMESH_NODE_SERVICE_ACCOUNT");
    assert_eq!(node_account, "nodemesh-system/mesh-node");
    let ds = find(&objects, "DaemonSet", "mesh-node");
    let node_pod = &ds["spec"]["template"]["spec"];
    assert_eq!(node_pod["serviceAccountName"], "mesh-node");
    let token_volume =
        node_pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "node-token").unwrap();
    let audience = &token_volume["projected"]["sources"][0]["serviceAccountToken"]["audience"];
    assert_eq!(env_value(c, "NODEMESH_NODE_TOKEN_AUDIENCE"), audience.as_str().unwrap());
}

/// The images the manifests run are the ones `cargo xtask image` builds
/// (`nodemesh/<binary>:<workspace version>`), and each runs its own binary.
#[test]
fn manifests_run_the_images_xtask_builds() {
    let objects = documents(&render("deploy/daemonset"));
    for (kind, name, binary) in
        [("DaemonSet", "mesh-node", "mesh-node"), ("Deployment", "mesh-control", "mesh-control")]
    {
        let object = find(&objects, kind, name);
        let container = &object["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["image"],
            format!("nodemesh/{binary}:{}", env!("CARGO_PKG_VERSION")),
            "{kind}/{name}"
        );
        let containerfile = workspace().join(format!("deploy/images/{binary}.Containerfile"));
        let text = std::fs::read_to_string(&containerfile).unwrap();
        assert!(
            text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
            "{}: entrypoint is not {binary}",
            containerfile.display()
        );
        // The container's args are a subcommand of that binary (the entrypoint's).
        assert_eq!(container["args"][0], "run", "{kind}/{name}");
        assert!(container.get("command").is_none(), "{kind}/{name}: command would replace the entrypoint");
    }
}

/// (apiGroup, resource, verb) triples a role grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    out.insert((
                        g.as_str().unwrap().into(),
                        r.as_str().unwrap().into(),
                        v.as_str().unwrap().into(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_the_api_calls_the_code_makes() {
    let objects = documents(&render("deploy/daemonset"));
    // mesh-control: list + watch of every kind its model reads, create tokenreviews, and get of
    // the cacerts Secret in its own namespace only.
    let mut want: BTreeSet<(String, String, String)> = mesh_control::source::kube::watched_resources()
        .into_iter()
        .flat_map(|(g, r)| ["list", "watch"].map(|v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    want.insert(("authentication.k8s.io".into(), "tokenreviews".into(), "create".into()));
    assert_eq!(grants(find(&objects, "ClusterRole", "nodemesh-mesh-control")), want);
    let secret_role = find(&objects, "Role", "nodemesh-mesh-control-cacerts");
    assert_eq!(secret_role["metadata"]["namespace"], "nodemesh-system");
    assert_eq!(
        secret_role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["cacerts"], "verbs": ["get"]}])
    );
    // mesh-node: its pods (field selector) and the namespaces; enforced against its real
    // requests by the in-test API server in tests/pod_discovery.rs.
    let node = grants(find(&objects, "ClusterRole", "nodemesh-mesh-node"));
    let want: BTreeSet<(String, String, String)> = ["pods", "namespaces"]
        .into_iter()
        .flat_map(|r| ["list", "watch"].map(|v| (String::new(), r.to_string(), v.to_string())))
        .collect();
    assert_eq!(node, want);
    for (binding, account) in [("nodemesh-mesh-control", "mesh-control"), ("nodemesh-mesh-node", "mesh-node")]
    {
        let b = find(&objects, "ClusterRoleBinding", binding);
        assert_eq!(
            b["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": account, "namespace": "nodemesh-system"}])
        );
        assert_eq!(b["roleRef"]["name"], binding);
    }
}
