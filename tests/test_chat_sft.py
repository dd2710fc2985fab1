"""
Tests for scripts/chat_sft.py and the SFT half of nanochat/chat_data.py: the padding collate and its
loss mask (masked tokens get no gradient), the fully-masked-batch guard, the token-mean normalisation
of gradient accumulation, the LR schedule, and the script itself (the loss falls on a fixture, checkpoints
resume exactly, bad flags fail clearly).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from nanochat.chat_data import accumulate_gradients, lr_multiplier, sft_batches, sft_collate
from tasks.by_name import make_mixture, parse_task_spec
from tests.fixtures.chat.chat_helpers import FIXTURE_DIR, make_base_dir, tiny_gpt

IDENTITY = os.path.join(FIXTURE_DIR, "identity.jsonl")


def _conversations():
    return [
        {"messages": [{"role": "user", "content": "What is 3 plus 4?"},
                      {"role": "assistant", "content": [{"type": "text", "text": "It is "},
                                                        {"type": "python", "text": "3+4"},
                                                        {"type": "python_output", "text": "7"},
                                                        {"type": "text", "text": ". #### 7"}]}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]},
    ]


def test_collate_targets_follow_the_mask(tiny_tokenizer):
    rows = [tiny_tokenizer.render_conversation(c) for c in _conversations()]
    pad = tiny_tokenizer.get_bos_token_id()
    inputs, targets = sft_collate(rows, pad)
    width = max(len(ids) for ids, _ in rows) - 1
    assert inputs.shape == targets.shape == (2, width)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        assert inputs[b, :n].tolist() == ids[:-1]
        assert (inputs[b, n:] == pad).all()
        expected = [ids[t + 1] if mask[t + 1] else -1 for t in range(n)] + [-1] * (width - n)
        assert targets[b].tolist() == expected
    # the tool output and the prompt are never targets; the assistant text and <|assistant_end|> are
    trained = set(targets[targets >= 0].tolist())
    assert tiny_tokenizer.encode_special("<|assistant_end|>") in trained
    assert tiny_tokenizer.encode_special("<|python_start|>") in trained
    assert tiny_tokenizer.encode_special("<|output_start|>") not in trained
    assert tiny_tokenizer.encode_special("<|user_end|>") not in trained
    with pytest.raises(ValueError):
        sft_collate([([1, 2, 3], [0, 1])], pad)


def test_masked_positions_get_no_gradient(tiny_tokenizer):
    rows = [tiny_tokenizer.render_conversation(c) for c in _conversations()]
    inputs, targets = sft_collate(rows, tiny_tokenizer.get_bos_token_id())
    model = tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=1)
    with torch.no_grad():  # make the zero-initialised projections non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    logits = model(inputs).detach().requires_grad_(True)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction="sum")
    loss.backward()
    grad_norm_per_position = logits.grad.norm(dim=-1)
    masked = targets < 0
    assert masked.any() and (~masked).any()
    assert (grad_norm_per_position[masked] == 0).all()
    assert (grad_norm_per_position[~masked] > 0).all()
    # the model's own loss is the sum over trained positions only
    assert model(inputs, targets, loss_reduction="sum").item() == pytest.approx(loss.item(), rel=1e-5)
    # whatever sits in the padding cannot change the loss (causal attention, -1 targets)
    garbage = inputs.clone()
    garbage[masked & (inputs == tiny_tokenizer.get_bos_token_id())] = 7
    assert model(garbage, targets, loss_reduction="sum").item() == pytest.approx(loss.item(), rel=1e-5)


def test_fully_masked_micro_batches_are_skipped(tiny_tokenizer):
    model = tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=2)
    rows = [tiny_tokenizer.render_conversation(c) for c in _conversations()]
    inputs, targets = sft_collate(rows, tiny_tokenizer.get_bos_token_id())
    masked = torch.full_like(targets, -1)
    # a step with nothing to train: no loss, no gradient, no NaN
    loss, n, skipped = accumulate_gradients(model, [(inputs, masked), (inputs, masked)])
    assert (loss, n, skipped) == (None, 0, 2)
    assert all(p.grad is None for p in model.parameters())
    # a masked micro-batch next to a real one changes nothing
    loss_a, n_a, skipped_a = accumulate_gradients(model, [(inputs, targets), (inputs, masked)])
    grads_a = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss_b, n_b, skipped_b = accumulate_gradients(model, [(inputs, targets)])
    grads_b = [p.grad.clone() for p in model.parameters()]
    assert (skipped_a, skipped_b) == (1, 0) and n_a == n_b == int((targets >= 0).sum())
    assert loss_a == pytest.approx(loss_b) and torch.isfinite(torch.tensor(loss_a))
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb)


def test_accumulation_is_a_token_mean(tiny_tokenizer):
    """Two micro-batches with different numbers of trained tokens give the gradient of the mean over all
    their tokens (not the mean of the two micro-batch means)."""
    model = tiny_gpt(tiny_tokenizer.get_vocab_size(), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rows = [tiny_tokenizer.render_conversation(c) for c in _conversations()]
    pad = tiny_tokenizer.get_bos_token_id()
    a, b = sft_collate(rows[:1], pad), sft_collate(rows[1:], pad)
    assert (a[1] >= 0).sum() != (b[1] >= 0).sum()
    loss, n, _ = accumulate_gradients(model, [a, b])
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    both_in, both_t = sft_collate(rows, pad)
    oracle = model(both_in, both_t)  # mean over all trained tokens of one padded batch
    oracle.backward()
    assert loss == pytest.approx(oracle.item(), rel=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)


def test_sft_batches_rank_striding_and_resume(tiny_tokenizer):
    task, names = make_mixture("arithmetic:10", "train")
    assert names == ["arithmetic"] and len(task) == 10
    full = list(zip(range(4), sft_batches(task, tiny_tokenizer, 2, 64)))
    # resuming from the state of batch 1 gives batches 2 and 3 again
    resumed = sft_batches(task, tiny_tokenizer, 2, 64, resume_state=full[1][1][2])
    for k in (2, 3):
        x, y, _ = next(resumed)
        assert torch.equal(x, full[k][1][0]) and torch.equal(y, full[k][1][1])
    # two ranks see disjoint conversations: rank r's first row is conversation r
    for rank in (0, 1):
        x, _, _ = next(sft_batches(task, tiny_tokenizer, 1, 64, rank=rank, world_size=2))
        ids, _ = tiny_tokenizer.render_conversation(task[rank], max_tokens=65)
        assert x[0, :len(ids) - 1].tolist() == ids[:-1]
    # one validation pass over 10 conversations in batches of 4: 4 + 4 + 2
    sizes = [x.size(0) for x, _, _ in sft_batches(task, tiny_tokenizer, 4, 64, single_pass=True)]
    assert sizes == [4, 4, 2]
    # rows are cut to max_seq_len inputs
    x, _, _ = next(sft_batches(task, tiny_tokenizer, 2, 8))
    assert x.size(1) == 8


def test_lr_multiplier_and_task_specs():
    assert lr_multiplier(0.0, 0.0, 1.0, 0.0) == 1.0
    assert lr_multiplier(0.5, 0.0, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(1.0, 0.0, 1.0, 0.0) == 0.0
    assert lr_multiplier(0.05, 0.1, 0.2, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(0.5, 0.1, 0.2, 0.1) == 1.0
    assert lr_multiplier(0.9, 0.0, 0.2, 0.1) == pytest.approx(0.5 + 0.5 * 0.1)
    assert parse_task_spec("smoltalk:100|GSM8K|identity?*2") == [("smoltalk", 100, 1, False), ("gsm8k", None, 1, False),
                                                                ("identity", None, 2, True)]
    assert [n for n, _, _, _ in parse_task_spec("offline")] == ["arithmetic", "simplespelling", "spellingbee"]
    for bad in ("", "gsm8k|", "nope", "gsm8k:0", "gsm8k*x"):
        with pytest.raises(ValueError):
            parse_task_spec(bad)
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
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for nproc in (1, 2):
        base = tmp_path / f"ranks{nproc}"
        make_base_dir(str(base), tiny_tokenizer, source="mid", seed=9)
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", "PYTHONPATH": repo,
               "WANDB_MODE": "disabled"}
        env.pop("RANK", None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "scripts.chat_sft", "--device_type", "cpu", "--tasks", "identity|arithmetic:16", "--identity_file", IDENTITY,
               "--device_batch_size", "2", "--examples_per_step", "8", "--num_iterations", "3", "--init_lr_frac", "0.5",
               "--max_seq_len", "96", "--eval_every", "-1", "--eval_metrics_tasks", ""]
        proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ckpt = base / "chatsft_checkpoints" / "d1"
        results[nproc] = torch.load(ckpt / "model_000003.pt")
        meta = json.loads((ckpt / "meta_000003.json").read_text())
        assert meta["world_size"] == nproc and len(meta["dataloader_state"]) == nproc
    for name, one in results[1].items():
        two = results[2][name]
        assert torch.allclose(one, two, atol=2e-4, rtol=1e-3), (name, (one - two).abs().max().item())
    start = make_base_dir(str(tmp_path / "fresh"), tiny_tokenizer, source="mid", seed=9).state_dict()
    assert any(not torch.allclose(start[k], results[1][k]) for k in start)  # training moved the weights
