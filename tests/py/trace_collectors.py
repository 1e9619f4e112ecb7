#!/usr/bin/env python3
"""Span collectors for the tracing tests: an OTLP/gRPC receiver built on OpenTelemetry's own
protocol code (the `opentelemetry-proto` package's TraceService, served by grpcio) and a Zipkin
v2 receiver (POST /api/v2/spans, JSON, checked against Zipkin's v2 model: no receiver ships on
PyPI, so the checks below are the model's required fields and types).

  trace_collectors.py --otlp 10.76.0.1:4317 --zipkin 10.76.0.1:9411 --out DIR

Every span received is appended to DIR/otlp.jsonl or DIR/zipkin.jsonl as one JSON object in a
common shape: {"traceId", "id", "parentId", "name", "kind", "service", "tags"} (ids in
lower-case hex, kind CLIENT or SERVER). A Zipkin body that breaks the model is answered 400 and
nothing of it is kept, so the sender's error shows.
"""

import argparse
import json
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

LOCK = threading.Lock()
HEX16 = re.compile(r"^[0-9a-f]{16}$")
HEX_TRACE = re.compile(r"^([0-9a-f]{16}|[0-9a-f]{32})$")
KINDS = {"CLIENT", "SERVER", "PRODUCER", "CONSUMER"}


def append(path, spans):
    with LOCK, open(path, "a") as f:
        for span in spans:
            f.write(json.dumps(span, sort_keys=True) + "\n")


class Otlp(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        spans = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    kind = trace_pb2.Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_")
                    spans.append({
                        "traceId": s.trace_id.hex(),
                        "id": s.span_id.hex(),
                        "parentId": s.parent_span_id.hex() or None,
                        "name": s.name,
                        "kind": kind,
                        "service": attributes.get("service.name"),
                        "tags": {a.key: a.value.string_value for a in s.attributes},
                        "error": s.status.code == trace_pb2.Status.STATUS_CODE_ERROR,
                    })
        append(self.out, spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def zipkin_errors(body):
    """What breaks Zipkin's v2 model in a POSTed body, if anything."""
    if not isinstance(body, list):
        return "the body is not a list of spans"
    for i, s in enumerate(body):
        if not isinstance(s, dict):
            return f"span {i} is not an object"
        if not HEX_TRACE.match(s.get("traceId", "")):
            return f"span {i}: traceId {s.get('traceId')!r} is not 16 or 32 lower-hex"
        for field in ("id", "parentId"):
            if field in s and not HEX16.match(s[field]):
                return f"span {i}: {field} {s[field]!r} is not 16 lower-hex"
        if "id" not in s:
            return f"span {i}: no id"
        if "kind" in s and s["kind"] not in KINDS:
            return f"span {i}: kind {s['kind']!r}"
        for field in ("timestamp", "duration"):
            if field in s and (not isinstance(s[field], int) or s[field] < 1):
                return f"span {i}: {field} must be a positive integer (microseconds)"
        tags = s.get("tags", {})
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            return f"span {i}: tags must map to strings"
    return None


def zipkin_handler(out):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/api/v2/spans":
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError as e:
                self.send_error(400, f"not JSON: {e}")
                return
            error = zipkin_errors(body)
            if error:
                self.send_error(400, error)
                return
            append(out, [{
                "traceId": s["traceId"].rjust(32, "0"),
                "id": s["id"],
                "parentId": s.get("parentId"),
                "name": s.get("name"),
                "kind": s.get("kind"),
                "service": s.get("localEndpoint", {}).get("serviceName"),
                "tags": s.get("tags", {}),
            } for s in body])
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--otlp", required=True)
    parser.add_argument("--zipkin", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Otlp(f"{args.out}/otlp.jsonl"), server)
    server.add_insecure_port(args.otlp)
    server.start()
    host, port = args.zipkin.rsplit(":", 1)
    http = ThreadingHTTPServer((host, int(port)), zipkin_handler(f"{args.out}/zipkin.jsonl"))
    print(f"trace_collectors: OTLP on {args.otlp}, Zipkin on {args.zipkin}", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main()
