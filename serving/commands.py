"""The serving package's subcommands: ``freesolo serve prepare|start|stop|status`` and ``freesolo infer``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.cli_args import Subcommands
from training.errors import UserError

PREPARE_DESCRIPTION = """\
Write a Triton model repository for an exported ONNX model: the ensemble 'freesolo' (preprocess -> model ->
postprocess; serving/model_repository/README.md) with the model step as a python-backend model running ONNX Runtime
(--backend python: the pip-bundled tritonserver), Triton's onnxruntime backend (stock Triton images) or a TensorRT
engine (--backend tensorrt --plan model.plan). The served size is the model's fixed H x W (a dynamic model: --height
and --width, default the size in its metadata)."""

START_DESCRIPTION = """\
Start tritonserver on a model repository in the background (its own session; pid in DIR/server.json, log in
DIR/server.log) and wait until every model is ready. Binds 127.0.0.1 unless --host says otherwise. Uses
--tritonserver, else a tritonserver on PATH, else the one bundled in nvidia-pytriton."""


INFER_DESCRIPTION = """\
Segment images with a running server (`freesolo serve start`) over gRPC. Writes what `freesolo predict` writes:
COCO results (RLE masks at the original size, xywh boxes, scores; image_id is the index in the given order, or the
id in --ann GT.json matched by file name; file_name names the image) and, with --vis, overlay PNGs. JPEG and PNG
files are sent as they are, other images as PNG."""


def register(commands: Subcommands) -> None:
    """Add ``serve`` and its actions, and ``infer``, to the ``freesolo`` parser."""
    _register_infer(commands)
    serve = commands.add_parser(
        "serve",
        help="Triton Inference Server: prepare a model repository, start/stop/status the server",
        description="Serve an exported model with Triton Inference Server (gRPC and HTTP).",
    )
    actions = serve.add_subparsers(dest="serve_action", metavar="ACTION", required=True)
    _register_prepare(actions)
    _register_start(actions)
    stop = actions.add_parser("stop", help="stop the server of a repository and everything it started")
    stop.add_argument("--repo", type=Path, required=True, metavar="DIR", help="the model repository served")
    stop.add_argument("--timeout", type=float, default=30.0, metavar="S", help="SIGKILL after S seconds (30)")
    stop.set_defaults(handler=run_stop)
    status = actions.add_parser("status", help="is the server running and ready; the state of each model")
    status.add_argument("--repo", type=Path, required=True, metavar="DIR", help="the model repository served")
    status.add_argument("--json", action="store_true", help="print the status as json")
    status.set_defaults(handler=run_status)


def _register_prepare(actions: Subcommands) -> None:
    from serving.repository import FLAVOURS, Settings

    defaults = Settings()
    prepare = actions.add_parser(
        "prepare",
        help="write a Triton model repository for an exported ONNX model",
        description=PREPARE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("--onnx", type=Path, required=True, metavar="model.onnx", help="from `freesolo export onnx`")
    prepare.add_argument("--repo", type=Path, required=True, metavar="DIR", help="the repository to write")
    prepare.add_argument("--backend", choices=list(FLAVOURS), default="python", help="the model step (python)")
    prepare.add_argument("--plan", type=Path, metavar="model.plan", help="--backend tensorrt: the engine")
    prepare.add_argument("--max-batch", type=int, default=defaults.max_batch, metavar="N", help="max_batch_size (8)")
    prepare.add_argument("--instances", type=int, default=1, metavar="N", help="model step instances (1)")
    prepare.add_argument("--io-instances", type=int, default=1, metavar="N", help="pre/postprocess instances (1)")
    prepare.add_argument(
        "--queue-delay-us",
        type=int,
        default=defaults.queue_delay_us,
        metavar="US",
        help="dynamic batching: how long a request may wait for others (0: batch what is queued)",
    )
    prepare.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime threads (0: per core)")
    prepare.add_argument("--height", type=int, metavar="H", help="served height (dynamic models only)")
    prepare.add_argument("--width", type=int, metavar="W", help="served width (dynamic models only)")
    prepare.add_argument(
        "--python-env",
        default=sys.prefix,
        metavar="DIR",
        help="virtual environment the python models run in (EXECUTION_ENV_PATH; default this one; 'none' to omit)",
    )
    prepare.add_argument("--force", action="store_true", help="replace the freesolo repository already in DIR")
    prepare.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from serving.repository import Settings, prepare_repository

    settings = Settings(
        args.backend,
        args.max_batch,
        args.instances,
        args.io_instances,
        args.queue_delay_us,
        args.threads,
        args.python_env,
    )
    model = prepare_repository(args.onnx, args.repo, settings, args.plan, args.height, args.width, args.force)
    print(
        f"wrote {args.repo}: ensemble 'freesolo', model step {args.backend}, {model.height}x{model.width} input, "
        f"K={model.k}, max batch {settings.max_batch}"
    )
    return 0


def _register_start(actions: Subcommands) -> None:
    from serving.launcher import LOOPBACK, Ports

    ports = Ports()
    start = actions.add_parser(
        "start",
        help="start tritonserver on a model repository (background) and wait until it is ready",
        description=START_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start.add_argument("--repo", type=Path, required=True, metavar="DIR", help="from `freesolo serve prepare`")
    start.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1: this machine only)")
    start.add_argument("--grpc-port", type=int, default=ports.grpc, metavar="P", help=f"gRPC port ({ports.grpc})")
    start.add_argument("--http-port", type=int, default=ports.http, metavar="P", help=f"HTTP port ({ports.http})")
    start.add_argument(
        "--metrics-port", type=int, default=ports.metrics, metavar="P", help=f"metrics port ({ports.metrics}; 0: off)"
    )
    start.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds to wait for ready (120)")
    start.add_argument("--tritonserver", type=Path, metavar="PATH", help="the tritonserver executable to run")
    start.add_argument("--plugin-lib", type=Path, metavar="PATH", help="preload a TensorRT plugin library")
    start.set_defaults(handler=run_start)


def run_start(args: argparse.Namespace) -> int:
    from serving.launcher import Ports, start_server

    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    start_server(args.repo, args.host, ports, args.timeout, args.tritonserver, args.plugin_lib)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from serving.launcher import stop_server

    state = stop_server(args.repo, args.timeout)
    print(f"stopped tritonserver pid {state.pid}" if state else f"no server running on {args.repo}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Exit code 0 when running and ready, 1 otherwise."""
    from serving.launcher import server_status

    status = server_status(args.repo)
    if args.json:
        print(json.dumps(status, indent=1))
    elif not status["running"]:
        print(f"no server running on {args.repo}")
    else:
        print(
            f"pid {status['pid']}, {'ready' if status['ready'] else 'NOT ready'}, "
            f"gRPC {status['host']}:{status['grpc_port']}, HTTP {status['host']}:{status['http_port']}"
        )
        for model in status["models"]:
            print(
                f"  {model['name']} v{model.get('version', '?')}: {model.get('state', '?')} {model.get('reason', '')}"
            )
    return 0 if status["running"] and status.get("ready") else 1


def _register_infer(commands: Subcommands) -> None:
    infer = commands.add_parser(
        "infer",
        help="segment images with a running Triton server (gRPC); COCO results json and overlay pictures",
        description=INFER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    infer.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    infer.add_argument("--url", default="127.0.0.1:8001", metavar="HOST:PORT", help="the server's gRPC endpoint")
    infer.add_argument("--out", type=Path, required=True, metavar="preds.json", help="COCO results json")
    infer.add_argument("--vis", type=Path, metavar="DIR", help="write overlay PNGs here")
    infer.add_argument(
        "--vis-thr", type=float, default=0.3, metavar="T", help="draw detections with score >= T (default 0.3)"
    )
    infer.add_argument("--ann", type=Path, metavar="GT.json", help="take image ids from this COCO json (by file name)")
    infer.add_argument(
        "--batch-size", type=int, metavar="N", help="images per request (default: the server's max batch size)"
    )
    infer.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds per request (60)")
    infer.add_argument(
        "--retries", type=int, default=3, metavar="N", help="retries while the server is unavailable (3)"
    )
    infer.add_argument(
        "--shared-memory",
        action="store_true",
        help="send the images through system shared memory (the server must run on this machine)",
    )
    infer.set_defaults(handler=run_infer)


def run_infer(args: argparse.Namespace) -> int:
    from serving.infer import run_infer as infer

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    return infer(args)
