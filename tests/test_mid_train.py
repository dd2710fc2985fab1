"""
Tests for scripts/mid_train.py (and through it the loop in nanochat/chat_train.py): a few steps on a
tiny fixture, checkpoints, exact resume, the one-epoch stop, bad input. The packed batches themselves
are tested in test_chat_data.py.
"""

import os

import pytest
import torch

from tasks.by_name import make_mixture
from tests.fixtures.chat.chat_helpers import FIXTURE_DIR, make_base_dir
from tests.test_chat_data import concatenated_stream

IDENTITY = os.path.join(FIXTURE_DIR, "identity.jsonl")


def _run_mid(extra=()):
    from scripts import mid_train
    argv = ["--device_type", "cpu", "--tasks", "identity*2|arithmetic:40", "--identity_file", IDENTITY,
            "--max_seq_len", "32", "--device_batch_size", "2", "--total_batch_size", "128", "--init_lr_frac", "1.0",
            "--eval_tokens", "128", "--val_size", "16", *extra]
    return mid_train.main(argv)


def test_mid_train_runs_checkpoints_and_resumes(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="base", seed=7, sequence_len=32)
    history = _run_mid(["--num_iterations", "8", "--save_every", "4", "--eval_every", "4"])
    losses = [history["losses"][s] for s in sorted(history["losses"])]
    assert len(losses) == 8 and all(l == l for l in losses)
    assert losses[-1] < losses[0]
    assert sorted(history["val_bpb"]) == [0, 4, 8] and history["val_bpb"][8] < history["val_bpb"][0]
    ckpt = tmp_path / "mid_checkpoints" / "d1"
    for step in (4, 8):
        assert (ckpt / f"model_{step:06d}.pt").exists() and (ckpt / f"optim_{step:06d}_rank0.pt").exists()
    section = (tmp_path / "report" / "midtraining.md").read_text()
    assert "Minimum validation bpb" in section and "- loss_on: all" in section

    # resume from step 4 reproduces the uninterrupted step-8 weights
    uninterrupted = torch.load(ckpt / "model_000008.pt")
    for f in ckpt.glob("*_000008*"):
        f.unlink()
    resumed_history = _run_mid(["--num_iterations", "8", "--save_every", "4", "--eval_every", "4", "--resume"])
    assert sorted(resumed_history["losses"]) == [5, 6, 7, 8]
    resumed = torch.load(ckpt / "model_000008.pt")
    for name in uninterrupted:
        assert torch.allclose(uninterrupted[name], resumed[name], atol=1e-6), name

    # the mid checkpoint loads as a model for the next stage
    from nanochat.checkpoint_manager import load_model
    model, _, meta = load_model("mid", "cpu")
    assert meta["step"] == 8 and meta["source"] == "base"


def test_mid_train_one_epoch_stops_by_itself(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="base", seed=8, sequence_len=32)
    task, _ = make_mixture("identity*2|arithmetic:40", "train", identity_file=IDENTITY)
    total_tokens = len(concatenated_stream(task, tiny_tokenizer)[0])
    history = _run_mid(["--eval_every", "-1", "--dry_run", "--loss_on", "assistant"])
    # one epoch of ~total_tokens tokens at 128 tokens per step (the last step may cross into epoch 2)
    assert total_tokens // 128 - 1 <= history["num_iterations"] <= total_tokens // 128 + 2
    assert not (tmp_path / "mid_checkpoints").exists()  # dry run


def test_mid_train_bad_input(tiny_tokenizer, tmp_path, monkeypatch):
    from nanochat.common import UserInputError
    from scripts import mid_train
    with pytest.raises(SystemExit):  # outside the choices: argparse's own usage error
        mid_train.get_args(["--loss_on", "users"])
    with pytest.raises(UserInputError, match="warmup_ratio"):
        mid_train.get_args(["--warmup_ratio", "0.9"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_base_dir(str(tmp_path), tiny_tokenizer, source="base", sequence_len=32)
    with pytest.raises(ValueError, match="multiple of device_batch_size"):
        _run_mid(["--total_batch_size", "100", "--num_iterations", "1"])
    with pytest.raises(FileNotFoundError, match="identity"):
        _run_mid(["--identity_file", str(tmp_path / "missing.jsonl"), "--num_iterations", "1"])



def test_nonfinite_update_is_never_saved_and_resume_loads_finite_weights(tiny_tokenizer, tmp_path, monkeypatch):
    from nanochat.checkpoint_manager import NonFiniteWeightsError, ResumeMismatchError, list_steps
    from test_base_train import poison_the_nth_optimizer_step
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="base", seed=7, sequence_len=32)
    common = ["--num_iterations", "4", "--save_every", "1", "--eval_every", "-1"]
    # an absurd learning rate stops the run with one clear error; every checkpoint it left is finite
    with pytest.raises(NonFiniteWeightsError, match="non-finite"):
        _run_mid(common + ["--init_lr_frac", "1e30", "--output_tag", "absurd"])
    absurd = tmp_path / "mid_checkpoints" / "absurd"
    for step in (list_steps(str(absurd)) if absurd.exists() else []):
        assert all(torch.isfinite(v).all() for v in torch.load(absurd / f"model_{step:06d}.pt").values()), step
    restore = poison_the_nth_optimizer_step(monkeypatch, 3)
    with pytest.raises(NonFiniteWeightsError, match="step 3 left non-finite weights"):
        _run_mid(common + ["--output_tag", "poisoned"])
    ckpt = tmp_path / "mid_checkpoints" / "poisoned"
    assert list_steps(str(ckpt)) == [1, 2]
    restore()
    history = _run_mid(common + ["--output_tag", "poisoned", "--resume"])
    assert sorted(history["losses"]) == [3, 4]
    assert all(torch.isfinite(v).all() for v in torch.load(ckpt / "model_000004.pt").values())
    with pytest.raises(ResumeMismatchError, match="init_lr_frac"):
        _run_mid(common + ["--output_tag", "poisoned", "--resume", "--init_lr_frac", "0.5"])
