"""``freesolo parity``: does an exported model give what its checkpoint gives in PyTorch? On real images of any size,
fed to every runtime exactly as serving feeds them (the input-size policy in the model's metadata).

Two comparisons per image and runtime (``export.parity`` holds the numpy core):

- **raw heads**, before any threshold: the category logits and dynamic kernels of every level and the mask features.
  PyTorch's come from a forward hook on the model ``Predictor.detections`` runs. ONNX Runtime's come from a second
  session on an in-memory copy of the model whose graph outputs are extended with the tensors that feed
  post-processing. They are found by the module scopes the torch exporter records on every node
  (``pkg.torch.onnx.name_scopes``): a module's outputs are the tensors its nodes produce that a node outside it reads
  (``model.head.cate_pred`` and ``model.head.kernel_pred``: one per level, in graph order; ``model.mask_branch``:
  one). A model without that metadata is compared on detections only (the table says so). A TensorRT engine exposes
  only the contract outputs, so for it the heads column reads n/a.
- **final detections** as sets (count, matched-mask IoU, scores, boxes), from a plain ``InferenceSession``
  (``export.onnx_inputs.session_options``, CPU) and, with ``--trt``, the engine.

Prints one table row per image and runtime and exits 1 when any row fails (2 for a user error).
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.graph_contract import OUTPUT_NAMES, variant
from export.onnx_inputs import check_inputs, graph_feeds, image_sizes, run_session, session_options
from export.parity import HeadParity, ImageParity, Tolerance, compare_heads, compare_image
from export.tensorrt_build import read_onnx
from training.data.images import list_images, read_rgb
from training.errors import UserError
from training.geometry import InputPolicy, prepare_image, same_canvas_batches
from training.inference import Predictor
from training.models.solov2 import SOLOv2Output

Arrays = dict[str, np.ndarray]
Log = Callable[[str], None]
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
# head name -> module path inside the exported wrapper (DeployableSOLOv2.model is the SOLOv2)
HEAD_MODULES = {
    "cate_logits": "model.head.cate_pred",
    "kernels": "model.head.kernel_pred",
    "mask_features": "model.mask_branch",
}


@dataclass
class Row:
    """One image on one runtime."""

    image: str
    input_size: tuple[int, int]
    runtime: str
    detections: ImageParity
    heads: HeadParity | None

    @property
    def ok(self) -> bool:
        return self.detections.ok and (self.heads is None or self.heads.ok)


def torch_heads(output: SOLOv2Output) -> Arrays:
    """The raw tensors compared, by the names ``head_tensors`` gives their ONNX counterparts."""
    arrays = {f"cate_logits.{i}": t.numpy() for i, t in enumerate(output.cate_logits)}
    arrays |= {f"kernels.{i}": t.numpy() for i, t in enumerate(output.kernels)}
    arrays["mask_features"] = output.mask_features.numpy()
    return arrays


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
    return []


def module_outputs(model: onnx.ModelProto, module: str) -> list[str]:
    """Tensors produced inside ``module``'s scope and read outside it (or graph outputs), in graph order."""
    nodes = [(node, module in _scopes(node)) for node in model.graph.node]
    read_outside = {name for node, is_inside in nodes if not is_inside for name in node.input}
    read_outside |= {output.name for output in model.graph.output}
    inside = [node for node, is_inside in nodes if is_inside]
    return [name for node in inside for name in node.output if name in read_outside]


def head_tensors(model: onnx.ModelProto, levels: int) -> dict[str, str]:
    """Head name (``cate_logits.0`` ...) -> graph tensor name; empty when the scopes are not all found."""
    found: dict[str, str] = {}
    for head, module in HEAD_MODULES.items():
        names = module_outputs(model, module)
        expected = 1 if head == "mask_features" else levels
        if len(names) != expected:
            return {}
        found |= {head: names[0]} if head == "mask_features" else {f"{head}.{i}": n for i, n in enumerate(names)}
    return found


def head_session(model: onnx.ModelProto, tensors: Mapping[str, str]) -> ort.InferenceSession:
    """A session on a copy of ``model`` whose outputs are the given intermediate tensors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {value.name: value for value in copy.graph.value_info}
    del copy.graph.output[:]
    for name in tensors.values():
        copy.graph.output.append(known.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(copy.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to their images; every file checked up front."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += list_images(path) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            raise UserError(f"image not found: {file}")
    return files


def batches(
    files: list[Path], policy: InputPolicy, batch_size: int
) -> list[tuple[list[Path], torch.Tensor, np.ndarray]]:
    """Images prepared as serving prepares them, in batches of one canvas each (``training.geometry``), with each
    image's size inside its canvas (int32 [B, 2])."""
    items = [(file, *prepare_image(read_rgb(file), policy)) for file in files]
    return [
        (
            [file for file, _, _ in batch],
            torch.from_numpy(np.stack([inputs for _, inputs, _ in batch])),
            image_sizes([geometry for _, _, geometry in batch]),
        )
        for batch in same_canvas_batches(items, lambda item: item[1].shape[1:], batch_size)
    ]


class PyTorchRunner:
    """``Predictor.detections`` with a forward hook keeping the raw head outputs of the same forward pass. Its masks
    are what the model's export carries: the probabilities for a ``resize_soft_masks`` model."""

    def __init__(self, checkpoint: Path) -> None:
        self.predictor = Predictor.from_checkpoint(checkpoint)
        self.levels = len(self.predictor.config.model.strides)

    def run(self, images: torch.Tensor, sizes: np.ndarray) -> tuple[Arrays, Arrays]:
        raw: list[SOLOv2Output] = []
        hook = self.predictor.model.register_forward_hook(lambda _module, _inputs, output: raw.append(output))
        try:
            dets, _ = self.predictor.detections(images, sizes=torch.from_numpy(sizes))
        finally:
            hook.remove()
        outputs = {name: getattr(dets, name).numpy() for name in OUTPUT_NAMES}
        if self.predictor.config.inference.resize_soft_masks:
            outputs["masks"] = dets.soft_masks.numpy()
        return outputs, torch_heads(raw[0])


class OnnxRunner:
    """A plain session for the contract outputs, and, when the heads can be found, a second one for them."""

    def __init__(self, path: Path, levels: int) -> None:
        model = read_onnx(path)
        props = {p.key: p.value for p in model.metadata_props}
        self.policy = InputPolicy.from_metadata(props)
        declared = variant(props, str(path))
        try:
            self.session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"ONNX Runtime cannot load {path}: {' '.join(str(error).split())}") from None
        check_inputs(self.session, declared.inputs, path)
        self.tensors = head_tensors(model, levels)
        self.heads = head_session(model, self.tensors) if self.tensors else None

    def run(self, images: np.ndarray, sizes: np.ndarray) -> Arrays:
        return run_session(self.session, images, sizes)

    def run_heads(self, images: np.ndarray, sizes: np.ndarray) -> Arrays | None:
        if self.heads is None:
            return None
        values = self.heads.run(list(self.tensors.values()), graph_feeds(self.heads, images, sizes))
        return dict(zip(self.tensors, values, strict=True))


def format_table(rows: list[Row]) -> list[str]:
    """The table lines, then one line per failing row saying what failed."""
    header = ("image", "input", "runtime", "dets pt/rt", "matched", "worst IoU", "max |dscore|", "heads max |d|")
    cells = [
        (
            row.image,
            f"{row.input_size[0]}x{row.input_size[1]}",
            row.runtime,
            f"{row.detections.num_dets[0]}/{row.detections.num_dets[1]}",
            str(row.detections.matched),
            f"{row.detections.min_iou:.4f}" if row.detections.matched else "-",
            f"{row.detections.max_score_diff:.1e}" if row.detections.matched else "-",
            "n/a" if row.heads is None else f"{row.heads.max_abs_diff:.1e}",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip((*header, "result"), (*widths, 6), strict=True)).rstrip()]
    for row, line in zip(rows, cells, strict=True):
        padded = [v.ljust(w) for v, w in zip(line, widths, strict=True)]
        lines.append("  ".join([*padded, "PASS" if row.ok else "FAIL"]))
    for row in rows:
        if not row.ok:
            problems = [*row.detections.problems, *(row.heads.problems if row.heads else [])]
            lines.append(f"  {row.image} on {row.runtime}: {'; '.join(problems)}")
    return lines


def parity_rows(
    checkpoint: Path,
    onnx_path: Path,
    images: Sequence[Path],
    trt_plan: Path | None = None,
    plugin_lib: Path | None = None,
    batch_size: int = 1,
    tolerance: Tolerance | None = None,
    log: Log = print,
) -> list[Row]:
    """``freesolo parity``'s comparisons: print the table and a summary line, return the rows (the real-size
    benchmark reads their worst IoU and score difference)."""
    tolerance = tolerance or Tolerance()
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not Path(checkpoint).is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    if not Path(onnx_path).is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    files = collect_images(images)
    if trt_plan is not None and not Path(trt_plan).is_file():
        raise UserError(f"TensorRT engine not found: {trt_plan}")

    start = time.perf_counter()
    engine = None
    if trt_plan is not None:  # first: without TensorRT or a GPU there is no point loading the rest
        from export.tensorrt_run import TensorRTModel

        engine = TensorRTModel(trt_plan, plugin_lib)
    reference = PyTorchRunner(checkpoint)
    onnx_runner = OnnxRunner(onnx_path, reference.levels)
    runtimes: list[tuple[str, Callable[[np.ndarray, np.ndarray], Arrays]]] = [("onnxruntime", onnx_runner.run)]
    if engine is not None:
        runtimes.append(("tensorrt", engine.run))
    policy = onnx_runner.policy
    shape = "dynamic H x W (padded to multiples of 32)" if policy.dynamic else f"fixed {policy.height} x {policy.width}"
    log(
        f"PyTorch ({checkpoint}) vs {' and '.join(name for name, _ in runtimes)} ({onnx_path}"
        f"{f', {trt_plan}' if trt_plan else ''}): {len(files)} images, {shape}, batch size {batch_size}"
    )
    if onnx_runner.heads is None:
        log(
            "note: the head tensors were not found by their exporter scopes (metadata stripped, or a head layout "
            "other than the checkpoint's), so raw heads are not compared: detections only"
        )

    rows: list[Row] = []
    names = display_names(files)
    mask_thr = reference.predictor.config.inference.mask_thr
    for chunk, batch, sizes in batches(files, policy, batch_size):
        expected, expected_heads = reference.run(batch, sizes)
        inputs = batch.numpy()
        onnx_heads = onnx_runner.run_heads(inputs, sizes)
        for runtime, run in runtimes:
            got = run(inputs, sizes)
            for i, file in enumerate(chunk):
                heads = None
                if runtime == "onnxruntime" and onnx_heads is not None:
                    heads = compare_heads(expected_heads, onnx_heads, i, tolerance)
                detections = compare_image(expected, got, i, tolerance, mask_thr)
                rows.append(Row(names[file], tuple(batch.shape[-2:]), runtime, detections, heads))

    for line in format_table(rows):
        log(line)
    failed = sum(not row.ok for row in rows)
    seconds = time.perf_counter() - start
    limits = (
        f"mask IoU >= {tolerance.mask_iou}, |dscore| <= {tolerance.score:g}, "
        f"heads |d| <= {tolerance.head_atol:g} + {tolerance.head_rtol:g} |ref|"
    )
    if failed:
        log(f"parity: FAIL, {failed} of {len(rows)} image/runtime comparisons outside tolerance ({limits})")
    else:
        log(f"parity: PASS, {len(rows)} image/runtime comparisons within tolerance ({limits}) in {seconds:.1f} s")
    return rows


def display_names(files: list[Path]) -> dict[Path, str]:
    """File names, or the paths as given where two files share a name."""
    counts: dict[str, int] = {}
    for file in files:
        counts[file.name] = counts.get(file.name, 0) + 1
    return {file: file.name if counts[file.name] == 1 else str(file) for file in files}


def tolerance_from_args(args: Any) -> Tolerance:
    """The Tolerance of ``freesolo parity``'s options."""
    return Tolerance(
        num_dets=args.count_tol,
        unmatched=args.count_tol,
        mask_iou=args.min_iou,
        score=args.score_tol,
        head_atol=args.atol,
        head_rtol=args.rtol,
    )


def exit_code(rows: Sequence[Row]) -> int:
    """``freesolo parity``'s exit code: 0 when every row passes, 1 otherwise."""
    return 0 if all(row.ok for row in rows) else 1
