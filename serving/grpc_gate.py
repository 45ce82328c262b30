"""The gRPC gate: the one door gRPC clients use, in front of tritonserver's own gRPC port.

tritonserver's gRPC endpoint takes messages of up to 2 GB (its limit is a compiled-in constant, no flag sets it), so
an image over the 20 MB limit was refused only after the whole message sat in the server's memory. The gate listens
where clients connect, refuses any message over ``MAX_MESSAGE_BYTES`` (gRPC's own receive limit: status
RESOURCE_EXHAUSTED, and tritonserver never sees it), and forwards everything else, bytes as they are, to the server
on a loopback port of its own. It relays every method of the KServe v2 ``GRPCInferenceService`` (``ModelStreamInfer``
as a stream) with the caller's metadata and deadline, and hands the server's status codes back unchanged.

    python -m serving.grpc_gate --listen 127.0.0.1:8001 --upstream 127.0.0.1:PORT

``freesolo serve start`` runs it beside the server (``serving.launcher``); docs/architecture.md, "Serving".
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from serving.contract import MAX_MESSAGE_BYTES

SERVICE = "/inference.GRPCInferenceService/"
STREAMING_METHODS = frozenset({SERVICE + "ModelStreamInfer"})
WORKERS = 64  # requests in flight at once (each waits on the server); more wait in gRPC's queue
UNLIMITED = -1
NO_DEADLINE_S = 365 * 24 * 3600.0  # a time_remaining() beyond this means the caller set no deadline


def forwarded_metadata(context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
    """The caller's metadata without what gRPC itself sets on the next hop."""
    return [(key, value) for key, value in context.invocation_metadata() if key != "user-agent"]


def remaining(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline as a timeout for the next hop; None when the caller set none (gRPC then reports an
    effectively infinite time, which would overflow as a timeout)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE_S else left


def unary_relay(call: grpc.UnaryUnaryMultiCallable) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return call(request, metadata=forwarded_metadata(context), timeout=remaining(context))
        except grpc.RpcError as error:
            context.abort(error.code(), error.details() or "")  # type: ignore[attr-defined]
            raise  # abort raises; this line is never reached

    return relay


def stream_relay(call: grpc.StreamStreamMultiCallable) -> Callable[..., Iterator[bytes]]:
    def relay(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            yield from call(requests, metadata=forwarded_metadata(context), timeout=remaining(context))
        except grpc.RpcError as error:
            context.abort(error.code(), error.details() or "")  # type: ignore[attr-defined]

    return relay


class Relay(grpc.GenericRpcHandler):
    """Every method of the inference service, forwarded as raw bytes; any other method is UNIMPLEMENTED."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method  # type: ignore[attr-defined]
        if not method.startswith(SERVICE):
            return None
        if method in STREAMING_METHODS:
            return grpc.stream_stream_rpc_method_handler(stream_relay(self.channel.stream_stream(method)))
        return grpc.unary_unary_rpc_method_handler(unary_relay(self.channel.unary_unary(method)))


def start_gate(listen: str, upstream: str, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Server:
    """A started gate on ``listen`` (HOST:PORT) relaying to ``upstream``; stop it with ``.stop(grace)``."""
    channel = grpc.insecure_channel(
        upstream,
        options=[("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", UNLIMITED)],
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS),
        handlers=[Relay(channel)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", UNLIMITED),  # answers: masks of a batch can be large
            ("grpc.so_reuseport", 0),  # a second gate on a taken port must fail, not share it
        ],
    )
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT clients connect to")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of tritonserver's gRPC endpoint")
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        server = start_gate(args.listen, args.upstream, args.max_message_bytes)
    except (OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    print(f"gate ready on {args.listen}, relaying to {args.upstream}", flush=True)
    stopped.wait()
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
