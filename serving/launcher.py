"""``freesolo serve start|stop|status``: run tritonserver on a model repository in the background, bound to
127.0.0.1 by default, and know when it is ready, why it failed, and how to stop all of it.

gRPC clients reach the server through the gate (``serving.grpc_gate``), a process of its own on the gRPC port that
refuses messages over ``MAX_MESSAGE_BYTES``; tritonserver's own gRPC endpoint listens on a loopback port only the
gate uses. The server's state (pids, start times, ports) is ``DIR/server.json``, its log ``DIR/server.log`` and the
gate's ``DIR/gate.log``: Triton loads only the sub-folders of a model repository, so files beside them are ignored.
"""

from __future__ import annotations

import errno
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.processes import (
    PROC,
    command_line,
    family,
    is_running,
    orphans,
    signal_all,
    start_time,
    stop_tree,
    wait_gone,
)
from serving.server_binary import check_backend_path, find_server, server_environment
from training.errors import UserError
from training.fileio import atomic_write_text

STATE_FILE = "server.json"
LOG_FILE = "server.log"
GATE_LOG_FILE = "gate.log"
LOOPBACK = "127.0.0.1"
BUNDLED_HINT = (
    "the tritonserver bundled with nvidia-pytriton has only the python backend: prepare the repository with "
    "--backend python, or run a full Triton install (--tritonserver PATH, or tritonserver on PATH)"
)
SHM_DIR = Path("/dev/shm")
STUB_REGION = re.compile(r"triton_python_backend_shm_region_[\w-]+")  # a stub's region, by its argument
LOG_PREFIX = re.compile(r"^[IWE]\d{4} [\d:.]+\s+\d+ \S+\] ")
LIBPROTOBUF_PREFIX = re.compile(r"^\[libprotobuf ERROR [^\]]*\] ")
ERROR_LINE = re.compile(r"^(E\d{4} |\[libprotobuf ERROR|error: )")
LOG_NOISE = (
    "CudaDriverHelper",
    "pinned memory",
    "DCGM",
    "NVML",
    "CUDA driver",
    "created_time",
)  # CPU-only machines log these; they are harmless


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


@dataclass(frozen=True)
class ServerState:
    """What ``serve stop`` and ``serve status`` need to find the server again."""

    pid: int
    started: int  # /proc start time of the pid (guards against pid reuse)
    host: str
    http_port: int
    grpc_port: int  # the gate's: where clients connect
    metrics_port: int
    binary: str
    log: str
    gate_pid: int
    gate_started: int
    server_grpc_port: int  # tritonserver's own gRPC endpoint, on loopback, for the gate

    @property
    def probe_host(self) -> str:
        """Where to reach the server's HTTP from this machine, as a URL host (a wildcard bind answers on loopback)."""
        host = LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]" if ":" in host else host

    @property
    def grpc_url(self) -> str:
        """HOST:PORT of the gRPC endpoint for a client on this machine (``freesolo infer --url``)."""
        return f"{self.probe_host}:{self.grpc_port}"


def loopback_ports(count: int) -> list[int]:
    """Ports the OS has just handed out on loopback (held together so that they differ): for servers started next
    to others (tests, benchmarks, the demo)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind((LOOPBACK, 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def read_state(repo: Path) -> ServerState | None:
    try:
        return ServerState(**json.loads((repo / STATE_FILE).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def running_state(repo: Path, log: Callable[[str], None] | None = None) -> ServerState | None:
    """The recorded server if it still runs; a stale state file is removed, and what its dead server left behind
    is cleaned up."""
    state = read_state(repo)
    if state is not None and not is_running(state.pid, state.started):
        if is_running(state.gate_pid, state.gate_started):  # a gate without its server relays to nothing
            stop_tree(state.gate_pid, 5.0)
        left = clean_up_after(state.pid)
        if left and log is not None:
            log(f"the server pid {state.pid} died without stopping; stopped what it left: {left}")
        (repo / STATE_FILE).unlink(missing_ok=True)
        return None
    return state


def clean_up_after(pid: int) -> str:
    """A server that died without stopping (SIGKILL, the OOM killer) leaves python-backend stubs that may never exit
    (they ignore SIGTERM) and their shared-memory regions in /dev/shm: SIGKILL those, unlink these. Says what it did
    ("" when nothing was left)."""
    stubs = {stub for stub in orphans(pid) if is_running(stub)}  # a zombie holds nothing
    if not stubs:
        return ""
    regions = {arg for stub in stubs for arg in command_line(stub) if STUB_REGION.fullmatch(arg)}
    signal_all(stubs, signal.SIGKILL)
    survivors = wait_gone(stubs, 5.0)
    for name in regions:
        (SHM_DIR / name).unlink(missing_ok=True)
    done = f"{len(stubs) - len(survivors)} processes and {len(regions)} shared-memory regions"
    return done + (f"; processes {sorted(survivors)} survived SIGKILL" if survivors else "")


def mapped_regions(pids: set[int]) -> set[str]:
    """The python backend's shared-memory regions (names in /dev/shm) that these processes have mapped."""
    names: set[str] = set()
    for pid in pids:
        try:
            names |= set(STUB_REGION.findall((PROC / str(pid) / "maps").read_text()))
        except OSError:  # gone meanwhile
            continue
    return names


def stop_and_clean(pid: int, timeout: float) -> set[int]:
    """``stop_tree`` plus the shared-memory regions the server and its stubs had mapped: a server stopped while its
    models load (a failed or interrupted start) does not unlink them itself. Returns the survivors."""
    regions = mapped_regions({pid, *family(pid)})
    leftover = stop_tree(pid, timeout)
    for name in regions:
        (SHM_DIR / name).unlink(missing_ok=True)
    return leftover


def check_repository(repo: Path) -> None:
    """Fail early on a folder that cannot be a model repository (the server checks the rest)."""
    if not repo.is_dir():
        raise UserError(f"--repo {repo}: no such folder (create one with `freesolo serve prepare`)")
    check_backend_path(repo, "--repo")
    if not any((entry / "config.pbtxt").is_file() for entry in repo.iterdir() if entry.is_dir()):
        raise UserError(f"--repo {repo} holds no model (no */config.pbtxt); create it with `freesolo serve prepare`")


def check_port_free(host: str, port: int, name: str) -> None:
    """UserError naming the port when something already listens there."""
    if not 0 < port < 65536:
        raise UserError(f"--{name}-port must be 1 to 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the server: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"--{name}-port {port} on {host} is already in use (pick another port)") from None
            raise UserError(f"cannot bind {host}:{port} (--{name}-port): {error.strerror}") from None


def http_get(url: str, timeout: float = 2.0, data: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of a request to the server's HTTP endpoint; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def is_ready(state: ServerState) -> bool:
    return http_get(f"http://{state.probe_host}:{state.http_port}/v2/health/ready")[0] == 200


def models(state: ServerState) -> list[dict[str, Any]]:
    """The repository index: name, version, state (READY, UNAVAILABLE, ...) and reason of each model."""
    status, body = http_get(f"http://{state.probe_host}:{state.http_port}/v2/repository/index", data=b"{}")
    return json.loads(body) if status == 200 and body else []


def log_excerpt(log: Path, count: int = 6) -> list[str]:
    """The server's error messages from its log (without log prefixes, tracebacks or CPU-only noise), else the
    last lines."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ["(no log)"]
    picked: list[str] = []
    for line in lines:
        if not (ERROR_LINE.match(line) or "already in use" in line) or any(noise in line for noise in LOG_NOISE):
            continue
        message = LIBPROTOBUF_PREFIX.sub("", LOG_PREFIX.sub("", line)).strip().strip('"').split("\\n")[0].strip()
        if message and message not in picked:
            picked.append(message)
    return picked[-count:] or [line.strip() for line in lines[-count:] if line.strip()]


def server_command(
    binary_path: Path, backend_dir: Path | None, repo: Path, host: str, ports: Ports, server_grpc_port: int
) -> list[str]:
    command = [
        str(binary_path),
        f"--model-repository={repo}",
        f"--http-address={host}",
        f"--grpc-address={LOOPBACK}",  # only the gate connects here
        f"--http-port={ports.http}",
        f"--grpc-port={server_grpc_port}",
        "--disable-auto-complete-config",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--grpc-infer-allocation-pool-size=0",  # no request object keeps a large message (server_binary.py)
    ]
    if ports.metrics:
        command += [f"--metrics-address={host}", f"--metrics-port={ports.metrics}", "--allow-gpu-metrics=false"]
    else:
        command.append("--allow-metrics=false")
    if backend_dir is not None:
        command.append(f"--backend-directory={backend_dir}")
    return command


def start_server(
    repo: Path,
    host: str = LOOPBACK,
    ports: Ports = Ports(),
    timeout: float = 120.0,
    tritonserver: Path | None = None,
    plugin_lib: Path | None = None,
    log: Callable[[str], None] = print,
) -> ServerState:
    """Start tritonserver on ``repo`` in its own session and return once every model is ready; on failure stop
    what was started and raise UserError with the server's own words."""
    repo = repo.resolve()
    check_repository(repo)
    running = running_state(repo, log)
    if running is not None:
        raise UserError(f"a server already runs on {repo} (pid {running.pid}); `freesolo serve stop --repo {repo}`")
    named = {"http": ports.http, "grpc": ports.grpc} | ({"metrics": ports.metrics} if ports.metrics else {})
    if len(set(named.values())) != len(named):
        raise UserError(f"the ports must differ, got {named}")
    for name, port in named.items():
        check_port_free(host, port, name)
    binary = find_server(tritonserver)
    env = server_environment(binary, plugin_lib)
    log_path = repo / LOG_FILE
    server_grpc_port = loopback_ports(1)[0]
    command = server_command(binary.path, binary.backend_dir, repo, host, ports, server_grpc_port)
    process = background(command, log_path, env, repo)
    gate_command = [sys.executable, "-m", "serving.grpc_gate", "--listen", host_port(host, ports.grpc)]
    gate = background([*gate_command, "--upstream", host_port(LOOPBACK, server_grpc_port)], repo / GATE_LOG_FILE)
    state = ServerState(
        process.pid,
        start_time(process.pid) or 0,
        host,
        ports.http,
        ports.grpc,
        ports.metrics,
        str(binary.path),
        str(log_path),
        gate.pid,
        start_time(gate.pid) or 0,
        server_grpc_port,
    )
    atomic_write_text(repo / STATE_FILE, json.dumps(asdict(state), indent=1))
    log(f"tritonserver pid {process.pid} ({binary.path}), log {log_path}; waiting for the models (<= {timeout:g} s)")
    begin = time.monotonic()
    try:
        problem = wait_until_ready(process, state, timeout) or wait_for_gate(gate, state, timeout)
    except BaseException:  # Ctrl-C while waiting: leave nothing running
        stop_all(state, 10.0)
        (repo / STATE_FILE).unlink(missing_ok=True)
        raise
    if problem is not None:
        stop_all(state, 10.0)
        process.poll()
        gate.poll()
        (repo / STATE_FILE).unlink(missing_ok=True)
        what, details = problem
        if any("already in use" in line for line in details):
            what += " because a port is already in use"
        if binary.backend_dir is not None and any("unable to find backend" in line for line in details):
            details.append(BUNDLED_HINT)
        raise UserError(f"tritonserver {what} on {repo}:\n  " + "\n  ".join(details) + f"\n(full log: {log_path})")
    log(f"ready in {time.monotonic() - begin:.1f} s: gRPC {state.host}:{ports.grpc}, HTTP {state.host}:{ports.http}")
    return state


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def background(
    command: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """A process in a session of its own (``serve stop`` ends it and its children), output to ``log_path``."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def wait_for_gate(gate: subprocess.Popen, state: ServerState, timeout: float) -> tuple[str, list[str]] | None:
    """None once the gate accepts connections; else what went wrong (the gate's own words)."""
    deadline = time.monotonic() + timeout
    family_ = socket.AF_INET6 if ":" in state.probe_host else socket.AF_INET
    while True:
        code = gate.poll()
        if code is not None:
            return f"could not start its gRPC gate (exit {code})", log_excerpt(Path(state.log).with_name(GATE_LOG_FILE))
        with socket.socket(family_, socket.SOCK_STREAM) as probe:
            if probe.connect_ex((state.probe_host.strip("[]"), state.grpc_port)) == 0:
                return None
        if time.monotonic() > deadline:
            return f"gRPC gate was not listening after {timeout:g} s", []
        time.sleep(0.1)


def stop_all(state: ServerState, timeout: float) -> set[int]:
    """Stop the gate, then the server and its stubs (see ``stop_and_clean``); returns the survivors."""
    leftover = stop_tree(state.gate_pid, timeout) if is_running(state.gate_pid, state.gate_started) else set()
    return leftover | stop_and_clean(state.pid, timeout)


def wait_until_ready(process: subprocess.Popen, state: ServerState, timeout: float) -> tuple[str, list[str]] | None:
    """None once the server is ready; else what went wrong and the details (log lines or model states)."""
    deadline = time.monotonic() + timeout
    while not is_ready(state):
        code = process.poll()
        if code is not None:
            return f"exited with code {code}", log_excerpt(Path(state.log))
        if time.monotonic() > deadline:
            loaded = [f"{m['name']}: {m.get('state')} {m.get('reason', '')}".strip() for m in models(state)]
            return f"was not ready after {timeout:g} s", loaded or log_excerpt(Path(state.log))
        time.sleep(0.2)
    return None


def stop_server(repo: Path, timeout: float = 30.0) -> ServerState | None:
    """Stop the server started on ``repo`` and everything it started; None when none was running."""
    repo = repo.resolve()
    state = running_state(repo)
    if state is None:
        return None
    leftover = stop_all(state, timeout)
    (repo / STATE_FILE).unlink(missing_ok=True)
    if leftover:
        raise UserError(f"processes {sorted(leftover)} of the server survived SIGKILL")
    return state


def server_status(repo: Path) -> dict[str, Any]:
    """Whether a server runs on ``repo``, is ready, and the state of each model."""
    repo = repo.resolve()
    state = running_state(repo)
    if state is None:
        return {"running": False, "repo": str(repo)}
    gate = is_running(state.gate_pid, state.gate_started)
    return {
        "running": True,
        "ready": is_ready(state) and gate,
        "gate_running": gate,
        "models": models(state),
        **asdict(state),
    }
