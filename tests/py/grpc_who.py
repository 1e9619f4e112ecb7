#!/usr/bin/env python3
"""A gRPC server that says who it is, and a client that counts who answered.

Used by the conformance tests to drive gRPC's own xDS client (proxyless: `xds:///host:port`
with GRPC_XDS_BOOTSTRAP_CONFIG) and, for comparison, a plain gRPC client through mesh-node.
The method takes and returns raw bytes, so no generated code is needed.

  grpc_who.py serve --port 50051 --name v1
  grpc_who.py client --target xds:///who.shop.svc.cluster.local:50051 --requests 100 \
      [--metadata end-user=jason]

The client prints one JSON line: {"servers": {"v1": 90, ...}, "errors": 0, "first_error": ...}.
"""

import argparse
import json
import sys
from collections import Counter
from concurrent import futures

import grpc

METHOD = "/nodemesh.test.Who/Name"


def serve(args):
    name = args.name.encode()

    def who(_request, _context):
        return name

    handler = grpc.method_handlers_generic_handler(
        "nodemesh.test.Who", {"Name": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{args.port}")
    server.start()
    server.wait_for_termination()


def client(args):
    metadata = [tuple(m.split("=", 1)) for m in args.metadata]
    servers, errors, first_error = Counter(), 0, None
    with grpc.insecure_channel(args.target) as channel:
        call = channel.unary_unary(METHOD)
        for i in range(args.requests):
            try:
                # The first call waits for the channel (xDS resolution, first connection).
                reply = call(b"", metadata=metadata, timeout=args.timeout, wait_for_ready=i == 0)
                servers[reply.decode()] += 1
            except grpc.RpcError as e:
                errors += 1
                first_error = first_error or f"{e.code()}: {e.details()}"
    print(json.dumps({"servers": servers, "errors": errors, "first_error": first_error}))
    return 0 if errors == 0 else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--requests", type=int, default=100)
    c.add_argument("--metadata", action="append", default=[])
    c.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    return serve(args) if args.command == "serve" else client(args)


if __name__ == "__main__":
    sys.exit(main())
