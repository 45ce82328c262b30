"""DenseCL pre-training: model structure, momentum encoder, dense matching, queues, two-view data, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.backbone_io import backbone_state_dict
from training.checkpoint import load_checkpoint
from training.config import PretrainConfig
from training.data.views import TwoViews, stack_view_pairs
from training.densecl import DenseCL, dense_matches
from training.errors import UserError
from training.models.backbone import build_resnet
from training.pretrain import register

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def small_config(**changes: object) -> PretrainConfig:
    base = {"crop_size": 64, "dilate_res5": True, "queue_size": 16, "projection_dim": 16, "hidden_dim": 32}
    return PretrainConfig(**{**base, **changes})


def small_model(**changes: object) -> DenseCL:
    torch.manual_seed(0)
    return DenseCL(18, small_config(**changes), MEAN, STD)


def random_views(batch: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator) for _ in "qk")


@pytest.fixture(scope="module")
def image_files(synth_data: Path) -> list[Path]:
    """12 distinct synthetic scenes (train and val)."""
    return sorted((synth_data / "train").glob("*.png")) + sorted((synth_data / "val").glob("*.png"))


def test_keys_are_torchvision_resnet_keys_and_shapes() -> None:
    model = small_model()
    state = model.state_dict()
    assert "encoder_q.backbone.layer4.0.conv1.weight" in state
    resnet_keys = {key for key in build_resnet(18).state_dict() if not key.startswith("fc.")}
    for encoder in ("encoder_q", "encoder_k"):
        prefix = f"{encoder}.backbone."
        assert {key.removeprefix(prefix) for key in state if key.startswith(prefix)} == resnet_keys
    assert state["queue_global"].shape == state["queue_dense"].shape == (16, 16)
    assert torch.allclose(state["queue_dense"].norm(dim=0), torch.ones(16))
    view_q, _ = random_views()
    c5, projection, dense = model.encoder_q(model.normalize(view_q))
    assert c5.shape == (2, 512, 4, 4)  # dilated res5: stride 16
    assert projection.shape == (2, 16) and dense.shape == (2, 16, 4, 4)
    losses = model(*random_views(), 0)
    assert set(losses) == {"loss_global", "loss_dense"}
    assert all(value.ndim == 0 and torch.isfinite(value) for value in losses.values())


def test_key_encoder_moves_only_by_the_momentum_rule() -> None:
    model = small_model(momentum=0.9)
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
    query_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    key_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sum(model(*random_views(), 0).values()).backward()
    optimizer.step()
    for key, old_key, old_query in zip(model.encoder_k.parameters(), key_before, query_before, strict=True):
        torch.testing.assert_close(key, 0.9 * old_key + 0.1 * old_query)
    assert any(not torch.equal(p, old) for p, old in zip(model.encoder_q.parameters(), query_before, strict=True))


def test_dense_matches_equal_brute_force_argmax() -> None:
    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(2, 8, 3, 4, generator=generator), torch.randn(2, 8, 3, 4, generator=generator)
    expected = torch.empty(2, 12, dtype=torch.long)
    for b in range(2):
        for i in range(12):
            q = query[b].flatten(1)[:, i]
            similarities = [F.cosine_similarity(q, key[b].flatten(1)[:, j], dim=0) for j in range(12)]
            expected[b, i] = int(torch.stack(similarities).argmax())
    assert torch.equal(dense_matches(query, key), expected)


def test_dense_loss_matches_on_backbone_features() -> None:
    """The dense loss recomputed by hand: positives picked by backbone (not projection) similarity."""
    model = small_model().eval()  # eval: no momentum step, no enqueue, fixed BN statistics
    view_q, view_k = random_views()
    with torch.no_grad():
        losses = model(view_q, view_k, 0)
        query_c5, _, query_dense = model.encoder_q(model.normalize(view_q))
        key_c5, _, key_dense = model.encoder_k(model.normalize(view_k))
    query_dense, key_dense = F.normalize(query_dense.flatten(2), dim=1), F.normalize(key_dense.flatten(2), dim=1)
    total = 0.0
    for b in range(2):
        for i in range(query_c5.shape[2] * query_c5.shape[3]):
            similarity = F.cosine_similarity(query_c5[b].flatten(1)[:, i : i + 1], key_c5[b].flatten(1), dim=0)
            positive = query_dense[b, :, i] @ key_dense[b, :, int(similarity.argmax())]
            logits = torch.cat([positive[None], query_dense[b, :, i] @ model.queue_dense]) / 0.2
            total += float(torch.logsumexp(logits, 0) - logits[0])
    expected = 0.5 * total / (2 * query_c5.shape[2] * query_c5.shape[3])
    assert float(losses["loss_dense"]) == pytest.approx(expected, rel=1e-4)


def test_queue_pointer_advances_and_wraps() -> None:
    model = small_model(queue_size=10, projection_dim=4)
    batches = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    pointers = []
    for keys in batches:
        model.enqueue(keys, -keys)
        pointers.append(int(model.queue_ptr))
    assert pointers == [4, 8, 2]
    assert torch.equal(model.queue_global[:, [8, 9, 0, 1]], batches[2].T)
    assert torch.equal(model.queue_dense[:, [8, 9, 0, 1]], -batches[2].T)
    assert torch.equal(model.queue_global[:, 2:8], torch.cat([batches[0][2:], batches[1]]).T)
    model.enqueue(batches[0].repeat(3, 1), batches[0].repeat(3, 1))  # more keys than slots: the newest are kept
    assert int(model.queue_ptr) == 2


def test_loss_decreases_over_a_few_steps(image_files: list[Path]) -> None:
    """Two alternating batches of distinct images: each batch's negatives are the other batch's keys."""
    dataset = TwoViews(image_files, 64, (0.2, 1.0))
    batches = [stack_view_pairs([dataset[(i, i)] for i in range(start, start + 6)]) for start in (0, 6)]
    model = small_model(queue_size=6, momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    totals = []
    for step in range(12):
        total = sum(model(*batches[step % 2], step).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    # step 0 met the random initial queue; from step 1 on the negatives are real keys
    assert sum(totals[-3:]) / 3 < 0.7 * totals[1]


def test_views_are_deterministic_by_seed(image_files: list[Path]) -> None:
    dataset = TwoViews(image_files, 48, (0.2, 1.0))
    view_q, view_k = dataset[(3, 7)]
    assert view_q.dtype == torch.uint8 and view_q.shape == view_k.shape == (3, 48, 48)
    again_q, again_k = dataset[(3, 7)]
    assert torch.equal(view_q, again_q) and torch.equal(view_k, again_k)
    other_q, _ = dataset[(3, 8)]
    assert not torch.equal(view_q, other_q)
    assert not torch.equal(view_q, view_k)
    batch_q, batch_k = stack_view_pairs([dataset[(0, 1)], dataset[(1, 2)]])
    assert batch_q.shape == batch_k.shape == (2, 3, 48, 48)


def test_views_reject_a_bad_crop_scale(image_files: list[Path]) -> None:
    with pytest.raises(UserError, match="crop scale"):
        TwoViews(image_files, 48, (0.0, 1.0))


def freesolo_pretrain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="freesolo")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretrain", *argv])
    return args.handler(args)


def test_pretrain_cli_writes_a_run_and_resumes(
    synth_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    common = ["--images", str(synth_data / "train"), "--out", str(run), "--batch-size", "4", "--no-progress"]
    small = ["--set", "pretrain.queue_size=64", "--set", "pretrain.crop_size=64", "--set", "pretrain.hidden_dim=64"]
    assert freesolo_pretrain([*common, *small, "--iters", "3"]) == 0
    for name in ("config.yaml", "checkpoint.pt", "model.pt", "log.jsonl", "loss_curve.png"):
        assert (run / name).is_file(), name
    model = load_checkpoint(run / "model.pt")
    assert model["metadata"]["kind"] == "densecl" and model["metadata"]["depth"] == 18
    assert model["config"]["pretrain"]["queue_size"] == 64 and model["config"]["solver"]["batch_size"] == 4
    assert backbone_state_dict(run / "model.pt")[1] == 18  # what `freesolo export-backbone` reads

    assert freesolo_pretrain([*common, "--iters", "5", "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 5
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [entry["iter"] for entry in log] == [3, 5]
    with pytest.raises(UserError, match="--set"):
        freesolo_pretrain([*common, *small, "--iters", "6", "--resume"])


def test_pretrain_refuses_an_existing_run_without_resume(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(UserError, match="--resume"):
        freesolo_pretrain(["--images", str(synth_data / "train"), "--out", str(run)])


def test_pretrain_resume_with_nothing_to_resume_is_refused(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "mistyped"
    with pytest.raises(UserError, match=r"holds no checkpoint\.pt"):
        freesolo_pretrain(["--images", str(synth_data / "train"), "--out", str(run), "--iters", "1", "--resume"])
    assert not run.exists()
