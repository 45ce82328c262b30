"""README.md's shell commands run as written right after `make demo` (issue 17): every command of every ```bash
block, in README order, on a miniature of what the demo leaves.

- The miniature: in a temporary working directory, the paths of `runs/demo/` that the README reads
  (`data/`, `pipeline/` with its DenseCL, Free Mask, weak and self-training runs, `model.onnx`), made by the real
  `freesolo` commands the demo runs, at toy size (8 + 4 images, 2 steps per stage); `.venv` links to this
  environment. The demo's own size (400 + 200 images, hundreds of steps) would take 11 minutes or more.
- Each command is one test item, run with bash from that directory after `source .venv/bin/activate`, as the
  README tells its readers, so `freesolo` is the console script. It must exit 0 and leave the files its
  `--out`, `--vis`, `--json`, `--results` (and `serve prepare`'s `--repo`) name.
- Trainings (`train`, `pretrain`, `selftrain`, `pipeline`) run as written until a `log.jsonl` under their `--out`
  has its first record, then are stopped: by then the command parsed its arguments, read its inputs, built the
  model and trained its first logged steps (10), and it counts as running. The README says how long the full
  schedules take; finishing them is what `make demo` and the training tests do. No README command reads what these
  trainings write, so stopping them changes nothing downstream (a command that did would fail here).
- Commands after a `# needs ...` comment line (to the end of their block) are skipped, naming what they need; so
  are `make` lines (the miniature stands for `make demo`; the others act on the repository).
- Serving uses the README's ports (the defaults) on 127.0.0.1. Where one is taken on this machine, `serve start`
  and the commands that reach that server are skipped with the port named, rather than run with other ports than
  the README's. Every server started is stopped at the end.

Cost (2026-12-06, 2 loaded cores): about 4.5 minutes of CPU, most of it three ONNX exports, six started trainings and
the miniature; each command pays its own interpreter start (about 5 s), the price of running the console script.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from serving.launcher import LOOPBACK, Ports, check_port_free
from training.cli import main
from training.errors import UserError

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS = "# needs "  # a comment line that marks the rest of its block as needing what it names
TRAININGS = {"train", "pretrain", "selftrain", "pipeline"}  # stopped once they log their first steps
OUTPUT_OPTIONS = ("--out", "--vis", "--json", "--results")
HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")
WORD = re.compile(r"[a-z][a-z-]*")  # a subcommand, not an option, path or value
MAKE_REASONS = {
    "demo": "the test's miniature of runs/demo stands for its outputs",
    "test": "the test suite, which runs this test",
}
GUARD_S = 900  # against a command that hangs; no command here comes near it
POLL_S = 0.2


@dataclass(frozen=True)
class Command:
    """One shell command of README.md: its first line number, its text (continuations and heredoc included) and
    what it needs beyond the demo's outputs (None: nothing)."""

    line: int
    text: str
    needs: str | None

    @property
    def words(self) -> list[str]:
        """The words of its first line (a heredoc's body is not part of the command line)."""
        return shlex.split(self.text.splitlines()[0], comments=True)

    def option(self, name: str) -> str | None:
        words = self.words
        return words[words.index(name) + 1] if name in words[:-1] else None

    @property
    def id(self) -> str:
        """README line and program words: L150-freesolo-data-synth."""
        program, *rest = self.words[:3]
        return "-".join([f"L{self.line}", Path(program).name, *(word for word in rest if WORD.fullmatch(word))])


def readme_commands(text: str) -> list[Command]:
    """The commands of the ```bash blocks: comment lines dropped, backslash continuations joined, heredocs kept
    whole; a `# needs ...` comment applies to every command after it in its block."""
    commands: list[Command] = []
    lines = text.splitlines()
    index, in_block, needs = 0, False, None
    while index < len(lines):
        line, number = lines[index], index + 1
        index += 1
        if not in_block:
            in_block, needs = line.strip() == "```bash", None
            continue
        if line.strip() == "```":
            in_block = False
            continue
        if line.startswith(NEEDS):
            needs = line[len("# ") :]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line]
        while parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1].rstrip()
            parts.append(lines[index].strip())
            index += 1
        heredoc = HEREDOC.search(line)
        if heredoc:
            while lines[index] != heredoc.group(1):
                parts.append(lines[index])
                index += 1
            parts.append(lines[index])
            index += 1
            commands.append(Command(number, "\n".join(parts), needs))
        else:
            commands.append(Command(number, " ".join(parts), needs))
    return commands


COMMANDS = readme_commands(README.read_text())


@dataclass
class Session:
    """The working directory and the servers the commands started (or could not)."""

    root: Path
    started: list[str] = field(default_factory=list)  # repositories, as the commands name them
    unreachable: dict[str, str] = field(default_factory=dict)  # repository or gRPC URL -> why its server is not up


def build_demo_miniature(root: Path) -> None:
    """What `make demo` leaves that the README reads, made by the commands the demo runs (studies/demo.py), at toy
    size."""
    demo = root / "runs" / "demo"
    data, run = demo / "data", demo / "pipeline"
    assert main(["data", "synth", "--out", str(data), "--train", "8", "--val", "4"]) == 0
    short = ["--set", "pretrain.solver.iters=2", "--set", "weak.solver.iters=2", "--set", "weak.selftrain_iters=2"]
    assert main(["pipeline", "--images", str(data / "train"), "--out", str(run), *short, "--no-progress"]) == 0
    checkpoint = run / "selftrain" / "model.pt"
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(demo / "model.onnx")]) == 0


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory, cache_home: Path) -> Iterator[Session]:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file() or not (venv / "bin" / "freesolo").is_file():
        pytest.skip(f"these tests run in the virtual environment `make test` makes, with freesolo installed: {venv}")
    root = tmp_path_factory.mktemp("after_make_demo")
    (root / ".venv").symlink_to(venv, target_is_directory=True)
    build_demo_miniature(root)
    state = Session(root)
    yield state
    for repo in state.started:
        main(["serve", "stop", "--repo", str(root / repo)])


def skip_reason(command: Command, state: Session) -> str | None:
    """Why ``command`` is not run here, or None."""
    words = command.words
    if command.needs:
        return command.needs
    if words[0] == "make":
        target = words[1] if len(words) > 1 else "all"
        return f"`make {target}`: " + MAKE_REASONS.get(target, "acts on the repository, not on the demo's outputs")
    for what, why in state.unreachable.items():
        if what == command.option("--repo") or re.search(rf"(?<![\w.]){re.escape(what)}(?![\w-])", command.text):
            return why
    if words[:3] == ["freesolo", "serve", "start"]:
        return taken_port(command)
    return None


def taken_port(command: Command) -> str | None:
    """Which of `serve start`'s ports (its options, else the defaults) is in use on this machine, in words."""
    defaults = Ports()
    for name, port in (("grpc", defaults.grpc), ("http", defaults.http), ("metrics", defaults.metrics)):
        chosen = int(command.option(f"--{name}-port") or port)
        try:
            check_port_free(LOOPBACK, chosen, name)
        except UserError as error:
            return f"the README's server cannot start here: {error}"
    return None


def run_shell(command: Command, root: Path, output: IO[str]) -> subprocess.Popen:
    """``command`` in bash from ``root`` after activating .venv, stdout and stderr to ``output`` (a file: a pipe
    nobody reads while a training runs could fill and stall it)."""
    script = f"source .venv/bin/activate || exit 1\n{command.text}\n"
    return subprocess.Popen(
        ["bash", "-c", script],
        cwd=root,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a stopped training takes its data workers along
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def tail(output: IO[str]) -> str:
    output.seek(0)
    return output.read()[-3000:]


def first_record(out: Path) -> dict | None:
    """The first record of a log.jsonl under ``out`` (a training's run folder, or a folder of runs)."""
    for log in sorted(out.rglob("log.jsonl")) if out.is_dir() else []:
        lines = log.read_text().splitlines()
        try:
            return json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:  # being written
            return None
    return None


def run_training(command: Command, root: Path, output: IO[str]) -> tuple[int | None, dict | None]:
    """Run until it ends or logs its first steps, whichever comes first; (exit code, None when stopped; the first
    log record)."""
    out = root / (command.option("--out") or ".")
    process = run_shell(command, root, output)
    deadline = time.monotonic() + GUARD_S
    record = None
    while process.poll() is None and time.monotonic() < deadline:
        record = first_record(out)
        if record is not None:
            os.killpg(process.pid, signal.SIGTERM)
            break
        time.sleep(POLL_S)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return (None if record is not None else process.returncode), record or first_record(out)


def named_outputs(command: Command) -> list[str]:
    words = command.words
    named = [command.option(option) for option in OUTPUT_OPTIONS]
    if words[:3] == ["freesolo", "serve", "prepare"]:
        named.append(command.option("--repo"))
    return [name for name in named if name]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_runs_as_written(command: Command, session: Session) -> None:
    reason = skip_reason(command, session)
    words = command.words
    starts_server = words[:3] == ["freesolo", "serve", "start"]
    if reason is not None:
        if starts_server:
            session.unreachable[command.option("--repo") or ""] = reason
            session.unreachable[f"{LOOPBACK}:{command.option('--grpc-port') or Ports().grpc}"] = reason
        pytest.skip(f"README line {command.line}: {reason}")
    root = session.root
    if starts_server:
        session.started.append(command.option("--repo") or "")
    with tempfile.TemporaryFile("w+") as output:
        where = f"README line {command.line}"
        if words[0] == "freesolo" and words[1] in TRAININGS:
            code, record = run_training(command, root, output)
            assert record is not None and "iter" in record, f"{where} logged no step:\n{tail(output)}"
            assert code in (None, 0), f"{where} exited {code}:\n{tail(output)}"
            return
        code = run_shell(command, root, output).wait(timeout=GUARD_S)
        assert code == 0, f"{where} exited {code}:\n{tail(output)}"
        for name in named_outputs(command):
            assert (root / name).exists(), f"{where} did not write {name}:\n{tail(output)}"


def test_readme_parser_reads_continuations_heredocs_and_needs() -> None:
    text = "\n".join(
        [
            "```bash",
            "# a comment",
            "freesolo a --out x \\",
            "    --vis y",
            "python - <<'PY'",
            "print(1)",
            "PY",
            "# needs a GPU",
            "freesolo b",
            "```",
            "```bash",
            "freesolo c",
            "```",
        ]
    )
    commands = readme_commands(text)
    heredoc = "python - <<'PY'\nprint(1)\nPY"
    assert [c.text for c in commands] == ["freesolo a --out x --vis y", heredoc, "freesolo b", "freesolo c"]
    assert [c.line for c in commands] == [3, 5, 9, 12]
    assert [c.needs for c in commands] == [None, None, "needs a GPU", None]
    assert named_outputs(commands[0]) == ["x", "y"]


def test_a_taken_port_skips_the_server_and_says_which() -> None:
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        start = Command(1, f"freesolo serve start --repo runs/serve --grpc-port {port}", None)
        reason = taken_port(start)
    assert reason is not None and f"--grpc-port {port}" in reason


def test_commands_that_reach_a_server_that_did_not_start_are_skipped(tmp_path: Path) -> None:
    state = Session(tmp_path, unreachable={"runs/serve": "port taken", "127.0.0.1:8001": "port taken"})
    client = Command(1, "python - <<'PY'\nFreeSOLOClient(\"127.0.0.1:8001\")\nPY", None)
    assert skip_reason(client, state) == "port taken"
    assert skip_reason(Command(2, "freesolo serve stop --repo runs/serve", None), state) == "port taken"
    assert skip_reason(Command(3, "freesolo infer --url 127.0.0.1:80011 a.png --out b.json", None), state) is None
    assert skip_reason(Command(4, "freesolo serve stop --repo runs/serve_r50", None), state) is None
