//! Distributed tracing across two nodes with mTLS between them: a three-hop request (client →
//! service A on the other node → service B beside A; A forwards the trace headers as an
//! instrumented application does) yields one trace — a CLIENT and a SERVER span per hop, each
//! with the right parent, for the cross-node hop and the same-node one alike — at a
//! Zipkin receiver and, after the Telemetry switches provider at runtime, at an OTLP/gRPC
//! receiver (OpenTelemetry's own protocol code). A trace started in B3 reaches the last app in
//! W3C as well, and the reverse; `x-request-id` is set when absent; an unsampled request
//! (`x-b3-sampled: 0`) makes no span.

use std::time::Duration;

use nodemesh_tests::{
    Pod, Registration, SimCluster, SimNode,
    mesh::{eventually, http_get, http_service_yaml},
    trace_collectors::{Collector, TraceCollectors},
};
use serde_json::Value;

const A_VIP: &str = "10.96.0.40";
const B_VIP: &str = "10.96.0.41";
const A_HOST: &str = "a.shop.svc.cluster.local";
const B_HOST: &str = "b.shop.svc.cluster.local";

fn mesh_config(collectors: &TraceCollectors) -> String {
    let (z, o) = (collectors.zipkin, collectors.otlp);
    format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  extensionProviders:\n  \
         - {{name: zipkin, zipkin: {{service: \"{}\", port: {}}}}}\n  \
         - {{name: otel, opentelemetry: {{service: \"{}\", port: {}}}}}\n",
        z.ip(),
        z.port(),
        o.ip(),
        o.port()
    )
}

/// Every request of namespace `shop` traced to `provider`.
fn shop_tracing(provider: &str) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: traces, namespace: shop}}\n\
         spec:\n  tracing: [{{providers: [{{name: {provider}}}], randomSamplingPercentage: 100}}]\n"
    )
}

/// One request from `client` through A to B with `headers`; returns what B saw.
fn chain(node: &SimNode, client: &Pod, path: &str, headers: &[&str]) -> Value {
    let mut args = vec!["--path", path];
    for h in headers {
        args.extend(["--header", h]);
    }
    let r = http_get(node, client, &format!("{A_VIP}:80"), &args);
    assert_eq!(r["statuses"]["200"], 1, "{r}");
    r["first"].clone()
}

/// The spans of trace `trace_id` at `collector`, once there are `n`.
fn trace(collectors: &TraceCollectors, collector: Collector, trace_id: &str, n: usize) -> Vec<Value> {
    let of_trace = || -> Vec<Value> {
        collectors.spans(collector).into_iter().filter(|s| s["traceId"] == trace_id).collect()
    };
    eventually(&format!("{n} spans of trace {trace_id} at {collector:?}"), Duration::from_secs(10), || {
        of_trace().len() >= n
    });
    std::thread::sleep(Duration::from_millis(300));
    let spans = of_trace();
    assert_eq!(spans.len(), n, "{collector:?}: {spans:#?}\n{}", collectors.log());
    spans
}

/// The one span of `kind` named for `host`.
fn span<'a>(spans: &'a [Value], kind: &str, host: &str) -> &'a Value {
    let found: Vec<&Value> = spans
        .iter()
        .filter(|s| s["kind"] == kind && s["name"].as_str().is_some_and(|n| n.starts_with(host)))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} span for {host} in {spans:#?}");
    found[0]
}

/// Checks the four spans of a client → A → B trace: names, services, parents, tags.
fn check_chain(spans: &[Value], root_parent: Option<&str>) {
    let client_a = span(spans, "CLIENT", A_HOST);
    let server_a = span(spans, "SERVER", A_HOST);
    let client_b = span(spans, "CLIENT", B_HOST);
    let server_b = span(spans, "SERVER", B_HOST);
    assert_eq!(client_a["parentId"].as_str(), root_parent, "{client_a}");
    assert_eq!(server_a["parentId"], client_a["id"], "A's server span is the client span's child");
    assert_eq!(client_b["parentId"], server_a["id"], "A forwarded the context: B's call is inside A's span");
    assert_eq!(server_b["parentId"], client_b["id"]);
    assert_eq!(client_a["service"], "client.shop");
    assert_eq!(
        (server_a["service"].as_str(), client_b["service"].as_str()),
        (Some("a.shop"), Some("a.shop"))
    );
    assert_eq!(server_b["service"], "b.shop");
    // CLIENT spans name the Service port the caller dialled; SERVER spans the pod's port.
    assert_eq!(
        (client_a["name"].as_str(), server_a["name"].as_str()),
        (Some("a.shop.svc.cluster.local:80/*"), Some("a.shop.svc.cluster.local:8080/*"))
    );
    assert_eq!(
        (client_b["name"].as_str(), server_b["name"].as_str()),
        (Some("b.shop.svc.cluster.local:80/*"), Some("b.shop.svc.cluster.local:8080/*"))
    );
    for s in spans {
        let tags = &s["tags"];
        assert_eq!(tags["http.status_code"], "200", "{s}");
        assert_eq!(tags["component"], "proxy", "{s}");
        assert_eq!(tags["http.method"], "GET", "{s}");
        assert!(tags["guid:x-request-id"].as_str().is_some_and(|id| id.len() == 36), "{s}");
        assert!(tags["upstream_cluster"].as_str().is_some_and(|c| c.contains("bound|")), "{s}");
        assert_eq!(tags["istio.namespace"], "shop", "{s}");
    }
    let ids: std::collections::BTreeSet<&str> =
        spans.iter().filter_map(|s| s["tags"]["guid:x-request-id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one x-request-id along the chain: {ids:?}");
}

#[test]
fn a_three_hop_request_is_one_trace_at_zipkin_and_at_otlp_in_b3_and_w3c() {
    let mut cluster = SimCluster::new(2).unwrap();
    let collectors =
        TraceCollectors::start(&cluster.fabric_netns, cluster.fabric_ip().into(), &cluster.work_dir).unwrap();
    cluster.write_config("a.yaml", &http_service_yaml("a", "shop", A_VIP, "a"));
    cluster.write_config("b.yaml", &http_service_yaml("b", "shop", B_VIP, "b"));
    cluster.write_config("mesh.yaml", &mesh_config(&collectors));
    cluster.write_config("telemetry.yaml", &shop_tracing("zipkin"));
    cluster.start(&[], &[]).unwrap();

    let client = cluster.nodes[0].add_pod("client", "shop").unwrap();
    cluster.nodes[0].register(&client, &Registration::labelled(&[("app", "client")])).unwrap();
    let a = cluster.nodes[1].add_pod("a0", "shop").unwrap();
    cluster.nodes[1].register(&a, &Registration::labelled(&[("app", "a")])).unwrap();
    // B beside A: the second hop is delivered within node 1, whose proxy makes both its spans.
    let b = cluster.nodes[1].add_pod("b0", "shop").unwrap();
    cluster.nodes[1].register(&b, &Registration::labelled(&[("app", "b")])).unwrap();
    cluster.nodes[1].serve_http(&b, &[b.addr(8080)]).unwrap();
    let forward = format!("{B_VIP}:80");
    let args: Vec<String> =
        ["http-serve", "--name", "a0", "--listen", &a.addr(8080).to_string(), "--forward-to", &forward]
            .map(String::from)
            .to_vec();
    cluster.nodes[1].spawn_in(&a, &nodemesh_tests::bin("nm-testapp").unwrap(), &args).unwrap();
    nodemesh_tests::netns::wait_listening(&a.netns, a.addr(8080), Duration::from_secs(10)).unwrap();

    let node0 = &cluster.nodes[0];
    let a_to = format!("{A_VIP}:80");
    eventually("client → A → B answers", Duration::from_secs(20), || {
        node0
            .testapp(&client, &["http-client", "--to", &a_to, "--path", "/warm"])
            .is_ok_and(|r| r["statuses"]["200"] == 1)
    });

    // B3 in: the trace the client started goes on in W3C too, and every hop reports to Zipkin.
    let trace_id = "463ac35c9f6413ad48485a3953bb6124";
    let root = "a2fb4a1d1a96d312";
    let seen = chain(
        node0,
        &client,
        "/b3",
        &[&format!("x-b3-traceid: {trace_id}"), &format!("x-b3-spanid: {root}"), "x-b3-sampled: 1"],
    );
    let headers = &seen["headers"];
    assert_eq!(seen["server"], "b0", "{seen}");
    let traceparent = headers["traceparent"].as_str().unwrap_or_default();
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")) && traceparent.ends_with("-01"), "{headers}");
    assert_eq!(headers["x-b3-traceid"], trace_id, "{headers}");
    assert!(
        headers["x-request-id"].as_str().is_some_and(|id| id.len() == 36),
        "x-request-id made: {headers}"
    );
    let spans = trace(&collectors, Collector::Zipkin, trace_id, 4);
    check_chain(&spans, Some(root));
    // The context B got names B's SERVER span's parent: the span B's node made for the hop.
    let server_b = span(&spans, "SERVER", B_HOST);
    assert_eq!(headers["x-b3-spanid"], server_b["id"], "{headers}");

    // Switched to OTLP at runtime; W3C in, B3 out.
    cluster.write_config("telemetry.yaml", &shop_tracing("otel"));
    let w3c_trace = "0af7651916cd43dd8448eb211c80319c";
    let w3c_root = "b7ad6b7169203331";
    let mut seen = Value::Null;
    eventually("spans go to the OTLP collector", Duration::from_secs(10), || {
        seen = chain(
            node0,
            &client,
            "/w3c",
            &[&format!("traceparent: 00-{w3c_trace}-{w3c_root}-01"), "tracestate: vendor=opaque"],
        );
        std::thread::sleep(Duration::from_millis(1500));
        collectors.spans(Collector::Otlp).iter().any(|s| s["traceId"] == w3c_trace)
    });
    let headers = &seen["headers"];
    assert_eq!(headers["x-b3-traceid"], w3c_trace, "{headers}");
    assert_eq!(headers["x-b3-sampled"], "1", "{headers}");
    assert_eq!(headers["tracestate"], "vendor=opaque", "tracestate passes unchanged: {headers}");
    let all = collectors.spans(Collector::Otlp);
    let latest_request: Vec<Value> = {
        // The last attempt's spans (earlier attempts may have gone to Zipkin mid-switch).
        let ids: Vec<&str> = all
            .iter()
            .filter(|s| s["traceId"] == w3c_trace)
            .filter_map(|s| s["tags"]["guid:x-request-id"].as_str())
            .collect();
        let last = *ids.last().unwrap();
        all.iter()
            .filter(|s| s["traceId"] == w3c_trace && s["tags"]["guid:x-request-id"] == last)
            .cloned()
            .collect()
    };
    assert_eq!(latest_request.len(), 4, "{latest_request:#?}");
    check_chain(&latest_request, Some(w3c_root));
    assert!(latest_request.iter().all(|s| s["error"] == false));

    // A request that says "do not sample" is passed on as such and makes no span.
    let before = collectors.spans(Collector::Otlp).len();
    let unsampled = "11111111111111111111111111111111";
    let seen = chain(
        node0,
        &client,
        "/unsampled",
        &[&format!("x-b3-traceid: {unsampled}"), "x-b3-spanid: 2222222222222222", "x-b3-sampled: 0"],
    );
    assert_eq!(seen["headers"]["x-b3-sampled"], "0", "{seen}");
    assert!(seen["headers"]["traceparent"].as_str().is_some_and(|t| t.ends_with("-00")), "{seen}");
    std::thread::sleep(Duration::from_millis(2500));
    let after = collectors.spans(Collector::Otlp);
    assert!(after.len() >= before);
    assert!(after.iter().all(|s| s["traceId"] != unsampled), "an unsampled request made spans");
}
