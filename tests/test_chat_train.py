"""
Tests for nanochat/chat_train.py, the loop mid_train and chat_sft share, driven directly with a tiny GPT
and hand-made batches: when it validates, measures accuracies and checkpoints; a step with no trained
token is skipped; a nan validation stays off the minimum; the one-epoch horizon stops by itself; resume
continues from the checkpoint's step and data position. The scripts' own tests run it end to end.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from nanochat.chat_train import epoch_progress, train_chat
from nanochat.checkpoint_manager import list_steps
from nanochat.common import DummyWandb
from tests.fixtures.chat.chat_helpers import tiny_gpt

VOCAB = 64


class CurveRecorder:
    """Stands in for the report: remembers the curve points."""

    def __init__(self):
        self.curves = {}

    def log_curve(self, name, step, value):
        self.curves.setdefault(name, []).append(step)


def flags(**overrides):
    defaults = dict(resume=False, dry_run=False, eval_every=2, save_every=-1, warmup_ratio=0.0, warmdown_ratio=0.5,
                    final_lr_frac=0.0, grad_clip=0.0)
    return SimpleNamespace(**{**defaults, **overrides})


def batches(masked=(), rows=2, T=8, per_position=1):
    """make_train_batches for train_chat: micro-batch k (counted from the resume position) is random tokens,
    with every target -1 when k is in `masked`; its state says how many micro-batches were used."""
    def make(resume_state):
        start = resume_state["position"] if resume_state else 0
        k = start
        while True:
            g = torch.Generator().manual_seed(k)
            x = torch.randint(0, VOCAB, (rows, T), generator=g)
            y = torch.full_like(x, -1) if k in masked else torch.randint(0, VOCAB, (rows, T), generator=g)
            k += 1
            yield x, y, {"position": k * per_position, "epoch": 0}
    return make


def run(tmp_path, args, model=None, **kw):
    model = model or tiny_gpt(VOCAB, seed=0)
    optimizer = model.setup_optimizers()
    report = CurveRecorder()
    options = dict(num_iterations=4, grad_accum_steps=2, num_examples=100, checkpoint_dir=str(tmp_path / "ckpt"),
                   meta={"note": "from the test"}, val_name="val_loss", evaluate_val=lambda: 1.0)
    options.update(kw)
    history = train_chat("sft", args, model, optimizer, options.pop("make_batches", batches()), report=report,
                         wandb_run=DummyWandb(), **options)
    return history, report, model


def test_schedule_skips_and_checkpoints(tmp_path):
    vals = iter([3.0, math.nan, 2.0])
    calls = {"metrics": 0}

    def metrics():
        calls["metrics"] += 1
        return {"Arithmetic": 0.5}

    # micro-batches 2 and 3 make up step 2: all masked, so that step trains nothing
    history, report, _ = run(tmp_path, flags(save_every=3), make_batches=batches(masked={2, 3}),
                             evaluate_val=lambda: next(vals), evaluate_metrics=metrics, metrics_every=3)
    assert sorted(history["losses"]) == [1, 3, 4] and history["skipped_steps"] == 1
    assert history["skipped_micro_batches"] == 2
    assert sorted(history["val_loss"]) == [0, 2, 4] and math.isnan(history["val_loss"][2])
    assert history["min_val_loss"] == 2.0  # the nan is not a minimum
    assert sorted(history["metrics"]) == [3, 4] and calls["metrics"] == 2  # step 3, then the last step
    assert report.curves["sft/val_loss"] == [0, 4] and report.curves["sft/train_loss"] == [1, 3, 4]
    assert report.curves["sft/Arithmetic_acc"] == [3, 4]
    assert history["num_iterations"] == 4
    assert list_steps(str(tmp_path / "ckpt")) == [3, 4]


def test_dry_run_writes_no_checkpoint(tmp_path):
    run(tmp_path, flags(dry_run=True, save_every=1))
    assert not (tmp_path / "ckpt").exists()


def test_one_epoch_horizon_stops_by_itself(tmp_path):
    # one micro-batch per step, each moves the position by 20 of 100 conversations: 5 steps make an epoch
    history, _, _ = run(tmp_path, flags(eval_every=-1), num_iterations=None, grad_accum_steps=1, num_examples=100,
                        make_batches=batches(per_position=20))
    assert history["num_iterations"] == 5 and sorted(history["losses"]) == [1, 2, 3, 4, 5]
    assert epoch_progress({"position": 20}, 0, 1, 100, torch.device("cpu")) == pytest.approx(0.2)
    assert epoch_progress({"position": 20}, 1, 2, 100, torch.device("cpu")) == pytest.approx(0.41)


def test_resume_continues_the_interrupted_run(tmp_path):
    full, _, full_model = run(tmp_path / "a", flags(save_every=2))
    run(tmp_path / "b", flags(save_every=2), num_iterations=4, make_batches=batches())
    ckpt = tmp_path / "b" / "ckpt"
    for f in ckpt.glob("*_000004*"):
        f.unlink()  # as if the run had died after step 2
    resumed, _, resumed_model = run(tmp_path / "b", flags(save_every=2, resume=True))
    assert sorted(resumed["losses"]) == [3, 4]
    assert resumed["losses"][4] == pytest.approx(full["losses"][4], rel=1e-6)
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
