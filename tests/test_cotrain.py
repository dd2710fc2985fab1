"""Co-training end to end at toy size: the schedule, frozen models staying frozen, the alpha-0 baseline
equalling chat_rl, exact resume, and a 2-rank torchrun run."""

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, find_last_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--task", "arithmetic", "--gen_tag", "d2", "--ver_tag", "d1", "--examples_per_step", "2", "--num_samples", "2",
        "--gen_max_tokens", "12", "--ver_max_tokens", "12", "--ver_examples_per_step", "2", "--ver_solutions", "1",
        "--ver_samples", "2", "--device_batch_size", "4", "--eval_examples", "2", "--ver_eval_examples", "2",
        "--eval_samples", "2", "--eval_every", "0", "--save_every", "0", "--device_type", "cpu"]


def make_checkpoint(base_dir, source_dir, tag, n_layer, vocab_size, seed):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=512, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(os.path.join(base_dir, source_dir, tag), 0, model.state_dict(), None, {"model_config": asdict(config)})


@pytest.fixture()
def cotrain_base(tiny_base_dir, tiny_tokenizer, monkeypatch, tmp_path):
    """A base dir with the tiny tokenizer and random tiny SFT checkpoints d2 (generator) and d1 (verifier)."""
    base = tmp_path / "base"
    base.mkdir()
    os.symlink(tiny_base_dir / "tokenizer", base / "tokenizer")
    vocab = tiny_tokenizer.get_vocab_size()
    make_checkpoint(str(base), "chatsft_checkpoints", "d2", 2, vocab, seed=1)
    make_checkpoint(str(base), "chatsft_checkpoints", "d1", 1, vocab, seed=2)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return base


def checksum(model):
    return sum(p.detach().double().sum().item() * (i + 1) for i, p in enumerate(model.parameters()))


def test_schedule():
    from scripts.chat_cotrain import get_args, phase_schedule
    args = get_args(["--num_gen_steps", "7", "--gen_steps", "3", "--ver_steps", "1", "--verifier_warmup_steps", "2"])
    assert "".join(phase_schedule(args)) == "VVGGGVGGGVG"
    args = get_args(["--num_gen_steps", "3", "--alpha", "0", "--no_verifier"])
    assert phase_schedule(args) == ["G", "G", "G"]


def test_bad_flags_fail_clearly(capsys):
    from scripts.chat_cotrain import get_args
    with pytest.raises(SystemExit):
        get_args(["--no_verifier"])  # alpha defaults to 0.1: a process signal needs a verifier
    assert "--no_verifier needs --alpha 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        get_args(["--num_samples", "0"])


def test_frozen_model_does_not_change_and_run_completes(cotrain_base, monkeypatch):
    import scripts.chat_cotrain as cotrain
    models = []
    real_load, real_update = cotrain.load_model, cotrain.grpo_update

    def recording_load(*args, **kwargs):
        out = real_load(*args, **kwargs)
        models.append(out[0])
        return out

    events = []

    def checking_update(model, *args, **kwargs):
        other = [m for m in models if m is not model]
        before_other = [checksum(m) for m in other]
        before_self = checksum(model)
        stats = real_update(model, *args, **kwargs)
        assert [checksum(m) for m in other] == before_other, "the frozen model changed"
        events.append(("G" if model is models[0] else "V", checksum(model) != before_self))
        return stats

    monkeypatch.setattr(cotrain, "load_model", recording_load)
    monkeypatch.setattr(cotrain, "grpo_update", checking_update)
    history = cotrain.main(TINY + ["--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1",
                                   "--verifier_warmup_steps", "1", "--alpha", "0.1"])
    assert [e[0] for e in events] == ["V", "G", "V", "G"]
    assert len(history["gen"]) == 2 and len(history["ver"]) == 2 and history["eval"]
    record = history["gen"][0]
    for key in ("gen/outcome_reward", "gen/alpha", "gen/steps_exact", "gen/time_generate", "gen/time_verify", "gen/time_train"):
        assert key in record
    assert "ver/balanced_accuracy" in history["ver"][0] and "ver/share_said_correct" in history["ver"][0]
    ckpt = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "cotrain_checkpoints", "g2_v1")
    assert find_last_step(ckpt) == 4


def final_generator_weights(source, tag):
    base = os.environ["NANOCHAT_BASE_DIR"]
    directory = os.path.join(base, source, tag)
    data, _, _ = load_checkpoint(directory, find_last_step(directory), "cpu")
    return data.get("generator", data)


def test_alpha_zero_without_verifier_reproduces_chat_rl(cotrain_base, monkeypatch):
    import scripts.chat_cotrain as cotrain
    import scripts.chat_rl as chat_rl
    from tasks.arithmetic import ArithmeticTask
    # a random tiny model never solves a problem; a text-dependent reward gives the update something to do
    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, conversation, text: float(len(text) % 2))
    common = ["--examples_per_step", "2", "--num_samples", "2", "--device_batch_size", "4", "--eval_examples", "2",
              "--eval_every", "0", "--device_type", "cpu", "--task", "arithmetic", "--seed", "3"]
    chat_rl.main(common + ["--model_tag", "d2", "--num_steps", "2", "--max_new_tokens", "12", "--eval_samples", "2",
                           "--output_tag", "baseline"])
    cotrain.main(common + ["--gen_tag", "d2", "--num_gen_steps", "2", "--gen_max_tokens", "12", "--eval_samples", "2",
                           "--alpha", "0", "--no_verifier", "--output_tag", "alpha0", "--ver_eval_examples", "0"])
    rl = final_generator_weights("chatrl_checkpoints", "baseline")
    co = final_generator_weights("cotrain_checkpoints", "alpha0")
    start = final_generator_weights("chatsft_checkpoints", "d2")
    assert any(not torch.equal(start[k], rl[k]) for k in rl), "the baseline did not train"
    for k in rl:
        assert torch.equal(rl[k], co[k]), k


def test_resume_is_exact(cotrain_base):
    import scripts.chat_cotrain as cotrain
    flags = TINY + ["--num_gen_steps", "3", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "1"]
    cotrain.main(flags + ["--output_tag", "straight"])
    cotrain.main(flags + ["--output_tag", "resumed", "--stop_after", "3"])
    cotrain.main(flags + ["--output_tag", "resumed", "--resume"])
    base = os.environ["NANOCHAT_BASE_DIR"]
    a, _, meta_a = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "straight"), 6, "cpu")
    b, _, meta_b = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "resumed"), 6, "cpu")
    assert meta_a["loop_state"] == meta_b["loop_state"] and meta_a["class_balancer"] == meta_b["class_balancer"]
    for role in ("generator", "verifier"):
        for k in a[role]:
            assert torch.equal(a[role][k], b[role][k]), (role, k)


def test_two_ranks_under_torchrun(cotrain_base):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scripts.chat_cotrain",
           *TINY, "--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "0",
           "--output_tag", "ddp"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "eval [final]" in result.stdout
    assert find_last_step(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "cotrain_checkpoints", "ddp")) == 3
