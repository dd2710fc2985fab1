"""
Tests for scripts/base_train.py on a tiny model (depth 2, width 64, seq 32) and tiny local shards:
resume is bit-for-bit, gradient accumulation equals one big batch, the NaN guard stops the run and
keeps the last good checkpoint, the schedules, bad flags, and a 2-rank torchrun run on CPU.
"""

import json
import os
import random
import shutil

import pytest
import torch

from conftest import TINY_CORPUS
from multirank import run_torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = ["--depth=2", "--aspect_ratio=32", "--head_dim=16", "--max_seq_len=32",
              "--core_metric_every=-1", "--sample_every=-1", "--eval_tokens=256"]


def make_docs(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.sample(TINY_CORPUS, 2)) for _ in range(n)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from dev.make_shards import write_shards
    out = tmp_path_factory.mktemp("shards")
    write_shards(make_docs(240), str(out), docs_per_shard=80, row_group_size=8, val_docs=40, log=lambda *a: None)
    return out


@pytest.fixture
def base_dir(tmp_path, tiny_base_dir, shard_dir, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR per test holding the tiny tokenizer and the shards."""
    shutil.copytree(tiny_base_dir / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(shard_dir, tmp_path / "base_data")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    # one thread: at these sizes a second one only adds synchronisation (and it is ruinous on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def run(*flags):
    from scripts import base_train
    return base_train.main(list(TINY_MODEL) + list(flags))


def load_weights(checkpoint_dir, step):
    return torch.load(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), map_location="cpu")


# -----------------------------------------------------------------------------

def test_resume_continues_bit_for_bit(base_dir, monkeypatch):
    common = ["--device_batch_size=2", "--total_batch_size=128", "--num_iterations=6", "--eval_every=3",
              "--warmdown_ratio=0.5", "--warmup_ratio=0.2"]
    straight = run(*common, "--model_tag=straight")

    # the same run killed right after its step-3 checkpoint, then resumed
    from nanochat import checkpoint_manager

    real_save = checkpoint_manager.save_checkpoint

    def save_then_die(checkpoint_dir, step, *args, **kwargs):
        real_save(checkpoint_dir, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(*common, "--model_tag=split", "--save_every=3")
    monkeypatch.setattr(checkpoint_manager, "save_checkpoint", real_save)
    assert checkpoint_manager.find_last_step(os.path.join(base_dir, "base_checkpoints", "split")) == 3
    resumed = run(*common, "--model_tag=split", "--save_every=3", "--resume")

    assert sorted(resumed["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed["losses"][step] == straight["losses"][step], step  # exact, not approximate
    assert resumed["val_bpb"][6] == straight["val_bpb"][6]
    a, b = load_weights(straight["checkpoint_dir"], 6), load_weights(resumed["checkpoint_dir"], 6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the loop state came back too: min val bpb covers the evaluation made before the interruption
    assert resumed["min_val_bpb"] == straight["min_val_bpb"]


def test_gradient_accumulation_matches_one_big_batch(base_dir):
    common = ["--total_batch_size=256", "--num_iterations=3", "--eval_every=-1"]
    accumulated = run(*common, "--device_batch_size=2", "--model_tag=accum")   # 4 micro-steps of 2 rows
    one_batch = run(*common, "--device_batch_size=8", "--model_tag=big")       # 1 step of 8 rows
    for step in (1, 2, 3):
        assert accumulated["losses"][step] == pytest.approx(one_batch["losses"][step], rel=1e-4, abs=1e-4)
    a, b = load_weights(accumulated["checkpoint_dir"], 3), load_weights(one_batch["checkpoint_dir"], 3)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-3, rtol=1e-2), k
    # and the runs actually trained (the loss moved), so the comparison is not between two no-ops
    assert one_batch["losses"][3] < one_batch["losses"][1]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(base_dir, monkeypatch):
    from nanochat.gpt import GPT
    real_forward = GPT.forward
    calls = {"n": 0}

    def poisoned_forward(self, idx, targets=None, *args, **kwargs):
        out = real_forward(self, idx, targets, *args, **kwargs)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # step 5 (1 micro-step per step)
                out = out * float("inf")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned_forward)
    from scripts.base_train import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match="non-finite training loss .* at step 5"):
        run("--device_batch_size=2", "--total_batch_size=64", "--num_iterations=8", "--eval_every=-1",
            "--save_every=2", "--model_tag=nan")
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", "nan")
    from nanochat.checkpoint_manager import list_steps
    assert list_steps(checkpoint_dir) == [2, 4]  # the bad step 5 was never saved
    weights = load_weights(checkpoint_dir, 4)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_checkpoint_meta_has_what_resume_needs(base_dir):
    out = run("--device_batch_size=2", "--total_batch_size=64", "--num_iterations=2", "--eval_every=1",
              "--model_tag=meta")
    with open(os.path.join(out["checkpoint_dir"], "meta_000002.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["num_iterations"] == 2
    assert meta["model_config"]["n_layer"] == 2 and meta["model_config"]["n_embd"] == 64
    assert meta["user_config"]["depth"] == 2
    assert len(meta["dataloader_state"]) == 1 and meta["dataloader_state"][0]["split"] == "train"
    assert set(meta["loop_state"]) >= {"smooth_train_loss", "total_training_time", "min_val_bpb", "val_bpb"}
    assert meta["loop_state"]["min_val_bpb"] == min(out["val_bpb"].values())
    # the horizon flag picked the step count and the checkpoint loads as a model
    from nanochat.checkpoint_manager import build_model
    model, _ = build_model(out["checkpoint_dir"], 2, "cpu")
    assert model.config.n_layer == 2


def test_horizon_from_param_data_ratio(base_dir):
    from scripts.base_train import get_args, resolve_num_iterations
    args = get_args(["--total_batch_size=1000", "--target_param_data_ratio=20"])
    assert resolve_num_iterations(args, num_params=10_000, flops_per_token=1.0)[0] == 200
    args = get_args(["--total_batch_size=1000", "--target_flops=6e6"])
    assert resolve_num_iterations(args, num_params=10_000, flops_per_token=60.0)[0] == 100
    args = get_args(["--total_batch_size=1000", "--num_iterations=7", "--target_flops=6e6"])
    assert resolve_num_iterations(args, num_params=10_000, flops_per_token=60.0)[0] == 7


def test_lr_schedule_and_momentum():
    from scripts.base_train import get_lr_multiplier, get_muon_momentum
    lrm = [get_lr_multiplier(s, 100, 0.1, 0.2, 0.0) for s in range(101)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == pytest.approx(1.0)   # warmup over 10 steps
    assert all(m == 1.0 for m in lrm[10:81])                                 # constant
    assert lrm[90] == pytest.approx(0.5) and lrm[100] == pytest.approx(0.0)  # linear warmdown over 20
    assert all(a >= b for a, b in zip(lrm[80:], lrm[81:]))                    # never ramps up in warmdown
    assert get_lr_multiplier(100, 100, 0.0, 0.2, 0.1) == pytest.approx(0.1)
    assert get_muon_momentum(0) == pytest.approx(0.85)
    assert get_muon_momentum(150) == pytest.approx(0.90)
    assert get_muon_momentum(300) == get_muon_momentum(5000) == pytest.approx(0.95)


def test_bad_flags_and_missing_checkpoint(base_dir):
    from nanochat.common import UserInputError
    from scripts.base_train import get_args
    with pytest.raises(UserInputError):
        get_args(["--num_iterations=0"])
    with pytest.raises(UserInputError):
        get_args(["--warmup_ratio=0.7", "--warmdown_ratio=0.5"])
    with pytest.raises(UserInputError, match="multiple of device_batch_size"):
        run("--device_batch_size=3", "--total_batch_size=100", "--num_iterations=1")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run("--device_batch_size=2", "--total_batch_size=64", "--num_iterations=1", "--resume", "--model_tag=none")


def test_val_split_under_one_batch_fails_before_training(base_dir, capsys):
    # the last step always evaluates; on a GPU this once trained 20 d20 steps and then lost them to this error
    from nanochat.common import UserInputError
    with pytest.raises(UserInputError, match="val split holds less than one batch.*before training"):
        run("--device_batch_size=64", "--total_batch_size=2048", "--eval_tokens=2048", "--num_iterations=1",
            "--model_tag=tiny_val")
    assert "step 00001" not in capsys.readouterr().out
    assert not os.path.exists(os.path.join(base_dir, "base_checkpoints", "tiny_val"))


def test_two_rank_torchrun_on_cpu(base_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled")
    proc = run_torchrun(["-m", "scripts.base_train", "--", *TINY_MODEL, "--device_batch_size=2", "--total_batch_size=256",
                         "--num_iterations=3", "--eval_every=3", "--model_tag=ddp"], nproc=2,
                        log_dir=tmp_path / "torchrun", env=env, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.report()
    assert "grad accumulation 2 (2 x 32 x 2 ranks" in proc.stdout
    assert "step 00003/00003" in proc.stdout and "val bpb" in proc.stdout
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", "ddp")
    for name in ("model_000003.pt", "optim_000003_rank0.pt", "optim_000003_rank1.pt", "meta_000003.json"):
        assert os.path.exists(os.path.join(checkpoint_dir, name)), name
    with open(os.path.join(checkpoint_dir, "meta_000003.json")) as f:
        meta = json.load(f)
    assert meta["world_size"] == 2
    assert [s["rank"] for s in meta["dataloader_state"]] == [0, 1]


def test_base_eval_on_a_trained_checkpoint(base_dir, capsys):
    from nanochat.common import UserInputError
    run("--device_batch_size=2", "--total_batch_size=64", "--num_iterations=2", "--eval_every=-1", "--model_tag=tiny")
    from scripts import base_eval
    bundle = os.path.join(REPO, "tests", "fixtures", "core_bundle")
    out = base_eval.main(["--model_tag=tiny", f"--bundle_dir={bundle}", "--device_batch_size=2", "--split_tokens=128",
                          "--max_per_task=3"])
    assert out["step"] == 2 and 0 < out["train bpb"] < 20 and 0 < out["val bpb"] < 20
    assert {"CORE tiny_mc", "CORE tiny_schema", "CORE tiny_lm"} <= set(out)
    assert out["CORE"] == pytest.approx((out["CORE tiny_mc"] + out["CORE tiny_schema"] + out["CORE tiny_lm"]) / 3)
    with open(os.path.join(base_dir, "base_eval", "tiny_000002.csv")) as f:
        assert f.readline().strip() == "Task,Accuracy,Centered"
    printed = capsys.readouterr().out
    assert "The capital of France is" in printed and "val bpb" in printed
    with pytest.raises(UserInputError):
        base_eval.get_args(["--eval=core,perplexity"])


def poison_the_nth_optimizer_step(monkeypatch, n):
    """Make the n-th optimizer step leave inf in the weights, as an exploding update does."""
    from nanochat.optim import MuonAdamW
    real_step, calls = MuonAdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            with torch.no_grad():
                self.param_groups[-1]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(MuonAdamW, "step", step)
    return lambda: monkeypatch.setattr(MuonAdamW, "step", real_step)


def test_nonfinite_update_is_never_saved_and_resume_loads_finite_weights(base_dir, monkeypatch):
    """The loss guard sees only the loss before an update; the weights guard sees what the update did. An
    absurd learning rate stops the run with one clear error and every checkpoint it left is finite; a run
    whose 3rd update explodes keeps step 2 as its last checkpoint, and --resume continues from it."""
    from nanochat.checkpoint_manager import NonFiniteWeightsError, ResumeMismatchError, list_steps
    from scripts.base_train import NonFiniteLossError
    common = ["--device_batch_size=2", "--total_batch_size=64", "--num_iterations=4", "--eval_every=-1", "--save_every=1"]
    with pytest.raises((NonFiniteWeightsError, NonFiniteLossError), match="non-finite"):
        run(*common, "--model_tag=absurd", "--matrix_lr=1e30", "--embedding_lr=1e30", "--unembedding_lr=1e30")
    absurd = os.path.join(base_dir, "base_checkpoints", "absurd")
    for step in (list_steps(absurd) if os.path.isdir(absurd) else []):
        assert all(torch.isfinite(v).all() for v in load_weights(absurd, step).values()), step
    restore = poison_the_nth_optimizer_step(monkeypatch, 3)
    with pytest.raises(NonFiniteWeightsError, match="step 3 left non-finite weights .*step 2"):
        run(*common, "--model_tag=poisoned")
    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", "poisoned")
    assert list_steps(checkpoint_dir) == [1, 2]
    restore()
    out = run(*common, "--model_tag=poisoned", "--resume")
    assert sorted(out["losses"]) == [3, 4] and list_steps(checkpoint_dir) == [1, 2, 3, 4]
    assert all(torch.isfinite(v).all() for v in load_weights(checkpoint_dir, 4).values())
    with pytest.raises(ResumeMismatchError, match="matrix_lr"):
        run(*common, "--model_tag=poisoned", "--resume", "--matrix_lr=0.5")
