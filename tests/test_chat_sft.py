"""
Tests for scripts/chat_sft.py (and through it the loop in nanochat/chat_train.py): the loss falls on a
fixture, checkpoints resume exactly, bad flags fail clearly, two ranks match one; also the task specs
and mixtures the SFT --tasks flag takes. The batching and the training step are in test_chat_data.py.
"""

import os

import pytest
import torch

from tasks.by_name import make_mixture, parse_task_spec
from tests.fixtures.chat.chat_helpers import FIXTURE_DIR, make_base_dir

IDENTITY = os.path.join(FIXTURE_DIR, "identity.jsonl")


def test_task_specs_and_mixtures():
    assert parse_task_spec("smoltalk:100|GSM8K|identity?*2") == [("smoltalk", 100, 1, False, None), ("gsm8k", None, 1, False, None),
                                                                ("identity", None, 2, True, None)]
    assert [n for n, *_ in parse_task_spec("offline")] == ["arithmetic", "simplespelling", "spellingbee"]
    assert parse_task_spec("arithmetic@3:50*2|arithmetic?@2") == [("arithmetic", 50, 2, False, 3), ("arithmetic", None, 1, True, 2)]
    for bad in ("", "gsm8k|", "nope", "gsm8k:0", "gsm8k*x", "arithmetic@", "arithmetic@x"):
        with pytest.raises(ValueError):
            parse_task_spec(bad)
    # '@D': the arithmetic task at difficulty preset D (3: 3-4 steps), in training and validation splits alike
    from tasks.arithmetic import DIFFICULTY_PRESETS
    for split in ("train", "val"):
        task, names = make_mixture("arithmetic@3:20", split, val_size=20)
        assert names == ["arithmetic"] and len(task) == 20
        steps = {len(task.tasks[0].reference_chain(i)) for i in range(20)}
        assert steps <= set(range(DIFFICULTY_PRESETS[3]["min_steps"], DIFFICULTY_PRESETS[3]["max_steps"] + 1)), steps
    for bad in ("arithmetic@9", "gsm8k@2"):  # no such preset; a preset for a task without any
        with pytest.raises(ValueError):
            make_mixture(bad, "train")
    with pytest.raises(FileNotFoundError, match="gen_synthetic_data"):
        make_mixture("identity|arithmetic:5", "train", identity_file="/nonexistent/identity.jsonl")
    # an optional task with missing data is left out; a mixture with nothing left is None
    task, names = make_mixture("identity?*2|arithmetic:5", "train", identity_file="/nonexistent/identity.jsonl")
    assert names == ["arithmetic"] and len(task) == 5
    task, names = make_mixture("identity?", "train", identity_file="/nonexistent/identity.jsonl")
    assert task is None and names == []
    # validation: identity has no held-out split, the synthetic tasks use their test split capped at val_size
    task, names = make_mixture("identity|arithmetic:50|spellingbee", "val", identity_file=IDENTITY, val_size=7)
    assert names == ["arithmetic", "spellingbee"] and len(task) == 14


def _run_sft(tmp_path, extra=()):
    from scripts import chat_sft
    argv = ["--source", "mid", "--device_type", "cpu", "--tasks", "identity|arithmetic:24", "--identity_file", IDENTITY,
            "--device_batch_size", "4", "--examples_per_step", "8", "--init_lr_frac", "1.0", "--max_seq_len", "96",
            "--eval_every", "10", "--eval_steps", "2", "--val_size", "8", "--eval_metrics_tasks", "arithmetic",
            "--eval_metrics_every", "-1", "--eval_metrics_max_problems", "2", "--eval_max_new_tokens", "4", *extra]
    return chat_sft.main(argv)


def test_sft_loss_falls_and_checkpoints(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="mid", seed=5)
    history = _run_sft(tmp_path, ["--num_iterations", "30", "--warmdown_ratio", "0.3"])
    losses = [history["losses"][s] for s in sorted(history["losses"])]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    val = history["val_loss"]
    assert sorted(val) == [0, 10, 20, 30] and val[30] < val[0]
    assert set(history["metrics"][30]) == {"Arithmetic"}
    ckpt = tmp_path / "chatsft_checkpoints" / "d1"
    assert (ckpt / "model_000030.pt").exists() and (ckpt / "optim_000030_rank0.pt").exists()
    section = (tmp_path / "report" / "chat-sft.md").read_text()
    assert "Minimum validation loss" in section
    assert (tmp_path / "report" / "curves" / "sft-train-loss.jsonl").exists()


def test_sft_resume_matches_uninterrupted_run(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="mid", seed=6)
    common = ["--num_iterations", "6", "--save_every", "3", "--eval_every", "-1", "--eval_metrics_tasks", ""]
    _run_sft(tmp_path, common)
    ckpt = tmp_path / "chatsft_checkpoints" / "d1"
    uninterrupted = torch.load(ckpt / "model_000006.pt")
    for f in ckpt.glob("*_000006*"):
        f.unlink()  # as if the run had died after step 3
    history = _run_sft(tmp_path, common + ["--resume"])
    assert sorted(history["losses"]) == [4, 5, 6]
    resumed = torch.load(ckpt / "model_000006.pt")
    for name in uninterrupted:
        assert torch.allclose(uninterrupted[name], resumed[name], atol=1e-6), name


def test_sft_bad_flags(tiny_tokenizer, tmp_path, monkeypatch):
    from nanochat.common import UserInputError
    from scripts import chat_sft
    for argv in (["--examples_per_step", "0"], ["--warmdown_ratio", "1.5"], ["--warmup_ratio", "0.5", "--warmdown_ratio", "0.6"]):
        with pytest.raises(UserInputError):
            chat_sft.get_args(argv)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_base_dir(str(tmp_path), tiny_tokenizer, source="mid")
    with pytest.raises(ValueError, match="multiple of device_batch_size"):
        _run_sft(tmp_path, ["--examples_per_step", "6", "--num_iterations", "1"])
    with pytest.raises(ValueError, match="unknown task"):
        _run_sft(tmp_path, ["--tasks", "arithmetic|bogus"])


@pytest.mark.slow
def test_two_ranks_match_one_rank_under_torchrun(tiny_tokenizer, tmp_path):
    """SFT on 2 ranks (torchrun, gloo) must give the weights of the same run on 1 rank: each step sees the
    same 8 conversations (rank-strided instead of consecutive) and the loss is the mean over the step's
    trained tokens on every rank count. Also checks the checkpoint records both ranks' data positions.
    (Muon and AdamW barely care about a global gradient scale, so this catches wrong relative weighting
    and wrong data assignment; test_accumulation_is_a_token_mean checks the scale itself.)"""
    import json
    from multirank import run_torchrun
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for nproc in (1, 2):
        base = tmp_path / f"ranks{nproc}"
        make_base_dir(str(base), tiny_tokenizer, source="mid", seed=9)
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONPATH": repo,
               "WANDB_MODE": "disabled"}
        env.pop("RANK", None)
        args = ["-m", "scripts.chat_sft", "--device_type", "cpu", "--tasks", "identity|arithmetic:16", "--identity_file", IDENTITY,
                "--device_batch_size", "2", "--examples_per_step", "8", "--num_iterations", "3", "--init_lr_frac", "0.5",
                "--max_seq_len", "96", "--eval_every", "-1", "--eval_metrics_tasks", ""]
        proc = run_torchrun(args, nproc=nproc, log_dir=tmp_path / f"torchrun{nproc}", env=env, cwd=repo, timeout=300)
        assert proc.returncode == 0, proc.report()
        ckpt = base / "chatsft_checkpoints" / "d1"
        results[nproc] = torch.load(ckpt / "model_000003.pt")
        meta = json.loads((ckpt / "meta_000003.json").read_text())
        assert meta["world_size"] == nproc and len(meta["dataloader_state"]) == nproc
    for name, one in results[1].items():
        two = results[2][name]
        assert torch.allclose(one, two, atol=2e-4, rtol=1e-3), (name, (one - two).abs().max().item())
    start = make_base_dir(str(tmp_path / "fresh"), tiny_tokenizer, source="mid", seed=9).state_dict()
    assert any(not torch.allclose(start[k], results[1][k]) for k in start)  # training moved the weights


def test_metric_tasks_with_missing_data_are_left_out(tmp_path, capsys):
    from scripts.chat_sft import load_metric_tasks
    tasks = load_metric_tasks("mmlu|arithmetic", str(tmp_path))  # an empty data dir: no MMLU files
    assert [name for name, _ in tasks] == ["Arithmetic"]
    assert "no accuracy for mmlu" in capsys.readouterr().out
    assert load_metric_tasks(" ", str(tmp_path)) == []


def test_nonfinite_update_is_never_saved_and_resume_loads_finite_weights(tiny_tokenizer, tmp_path, monkeypatch):
    from nanochat.checkpoint_manager import NonFiniteWeightsError, ResumeMismatchError, list_steps
    from test_base_train import poison_the_nth_optimizer_step
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    make_base_dir(str(tmp_path), tiny_tokenizer, source="mid", seed=6)
    common = ["--num_iterations", "4", "--save_every", "1", "--eval_every", "-1", "--eval_metrics_tasks", ""]
    # an absurd learning rate stops the run with one clear error; every checkpoint it left is finite
    with pytest.raises(NonFiniteWeightsError, match="non-finite"):
        _run_sft(tmp_path, common + ["--init_lr_frac", "1e30", "--output_tag", "absurd"])
    absurd = tmp_path / "chatsft_checkpoints" / "absurd"
    for step in (list_steps(str(absurd)) if absurd.exists() else []):
        assert all(torch.isfinite(v).all() for v in torch.load(absurd / f"model_{step:06d}.pt").values()), step
    restore = poison_the_nth_optimizer_step(monkeypatch, 3)
    with pytest.raises(NonFiniteWeightsError, match="step 3 left non-finite weights"):
        _run_sft(tmp_path, common + ["--output_tag", "poisoned"])
    ckpt = tmp_path / "chatsft_checkpoints" / "poisoned"
    assert list_steps(str(ckpt)) == [1, 2]
    restore()
    history = _run_sft(tmp_path, common + ["--output_tag", "poisoned", "--resume"])
    assert sorted(history["losses"]) == [3, 4]
    assert all(torch.isfinite(v).all() for v in torch.load(ckpt / "model_000004.pt").values())
    with pytest.raises(ResumeMismatchError, match="init_lr_frac"):
        _run_sft(tmp_path, common + ["--output_tag", "poisoned", "--resume", "--init_lr_frac", "0.5"])
