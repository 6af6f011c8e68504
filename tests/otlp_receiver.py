"""An OTLP receiver for tests: OTLP/HTTP (``POST /v1/traces``, protobuf, gzip or not) and OTLP/gRPC
(``TraceService/Export``), decoding every request with ``opentelemetry-proto`` and keeping its spans.

Used by the tracing tests (unit: the exporters; integration: the ingress's export) and by the bench's tracing
section (as the collector the traced system exports to; there with ``decode=False``: it counts bytes and
requests only, standing in for a collector on another machine).
"""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Spans received, as ``opentelemetry.proto.trace.v1.Span`` messages with their resource attributes.

    Attributes:
        spans: ``[(resource attributes dict, Span message)]``. requests: Export requests received.
        http_port / grpc_port: Where it listens (127.0.0.1), once started.
    """

    def __init__(self, decode: bool = True):
        self.decode = decode
        self.bytes = 0
        self.spans: list = []
        self.requests = 0
        self.lock = threading.Lock()
        self.http_port = self.grpc_port = None
        self._http = self._grpc = None

    def take(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        if not self.decode:
            with self.lock:
                self.requests += 1
                self.bytes += len(body)
            return

        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        with self.lock:
            self.requests += 1
            for rs in req.resource_spans:
                resource = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((resource, s) for s in ss.spans)

    def start_http(self) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
                if ok:
                    receiver.take(body)
                self.send_response(200 if ok else 400)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_port = self._http.server_port
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self.http_port

    def start_grpc(self) -> int:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        def export(body: bytes, context) -> bytes:
            self.take(body)
            return b""  # an empty ExportTraceServiceResponse

        handler = grpc.method_handlers_generic_handler("opentelemetry.proto.collector.trace.v1.TraceService", {
            "Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=None,
                                                          response_serializer=None)})
        self._grpc = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler])
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        return self.grpc_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
        if self._grpc is not None:
            self._grpc.stop(0)

    def wait_for(self, predicate, timeout_s: float = 30.0):
        """Poll until ``predicate(spans)`` is truthy (returns it) or the deadline passes (returns the last value)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                value = predicate(list(self.spans))
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.05)
