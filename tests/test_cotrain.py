"""Co-training end to end at toy size: the schedule, frozen models staying frozen, the alpha-0 baseline
equalling chat_rl, exact resume, and a 2-rank torchrun run."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, find_last_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--task", "arithmetic", "--gen_tag", "d2", "--ver_tag", "d1", "--examples_per_step", "2", "--num_samples", "2",
        "--gen_max_tokens", "12", "--ver_max_tokens", "12", "--ver_examples_per_step", "2", "--ver_solutions", "1",
        "--ver_samples", "2", "--device_batch_size", "4", "--eval_examples", "2", "--ver_eval_examples", "2",
        "--eval_samples", "2", "--eval_every", "0", "--save_every", "0", "--device_type", "cpu"]


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


def test_frozen_model_does_not_change_and_run_completes(sft_base, monkeypatch):
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


def test_alpha_zero_without_verifier_reproduces_chat_rl(sft_base, monkeypatch):
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


def test_resume_is_exact(sft_base):
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


def test_two_ranks_under_torchrun(sft_base, tmp_path):
    from multirank import run_torchrun
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    args = ["-m", "scripts.chat_cotrain", *TINY, "--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1",
            "--verifier_warmup_steps", "0", "--output_tag", "ddp"]
    result = run_torchrun(args, nproc=2, log_dir=tmp_path / "torchrun", env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.report()
    assert "eval [final]" in result.stdout
    assert find_last_step(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "cotrain_checkpoints", "ddp")) == 3


def test_print_memory_and_offload_frozen_leave_training_unchanged(sft_base, capsys):
    """--print_memory prints both models' estimates; --offload_frozen moves the frozen model off the device
    between phases. Neither may change what is learned (on CPU the move is a no-op; the GPU run in
    dev/gpu_results.md measured the memory it saves)."""
    import scripts.chat_cotrain as cotrain
    flags = TINY + ["--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "1"]
    cotrain.main(flags + ["--output_tag", "plain"])
    cotrain.main(flags + ["--output_tag", "flags", "--print_memory", "--offload_frozen"])
    out = capsys.readouterr().out
    for line in ("generator (training)", "generator (sampling)", "verifier (training)", "verifier (sampling)"):
        assert line in out
    assert "kv_cache" in out and "activations" in out
    base = os.environ["NANOCHAT_BASE_DIR"]
    a, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "plain"), 4, "cpu")
    b, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "flags"), 4, "cpu")
    for role in ("generator", "verifier"):
        for k in a[role]:
            assert torch.equal(a[role][k], b[role][k]), (role, k)


def test_shared_model_plays_both_roles_with_one_optimizer(sft_base, monkeypatch):
    import scripts.chat_cotrain as cotrain
    from tasks.arithmetic import ArithmeticTask
    # a random tiny model never solves a problem: a text-dependent reward gives generator steps a signal
    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, conversation, text: float(len(text) % 2))
    loads, updates = [], []
    real_load, real_update = cotrain.load_model, cotrain.grpo_update

    def recording_load(*args, **kwargs):
        out = real_load(*args, **kwargs)
        loads.append(out[0])
        return out

    def recording_update(model, optimizer, *args, **kwargs):
        before = checksum(model)
        stats = real_update(model, optimizer, *args, **kwargs)
        updates.append((model, optimizer, checksum(model) != before))
        return stats

    monkeypatch.setattr(cotrain, "load_model", recording_load)
    monkeypatch.setattr(cotrain, "grpo_update", recording_update)
    history = cotrain.main(TINY + ["--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1",
                                   "--verifier_warmup_steps", "1", "--shared_model", "--output_tag", "shared"])
    assert len(loads) == 1, "--shared_model must load one GPT"
    assert len(updates) == 4 and len(history["gen"]) == 2 and len(history["ver"]) == 2
    assert all(m is loads[0] and o is updates[0][1] for m, o, _ in updates)  # both roles: one model, one optimizer
    assert updates[1][2], "the generator step (which had a reward signal) did not move the shared model"
    directory = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "cotrain_checkpoints", "shared")
    data, _, meta = load_checkpoint(directory, find_last_step(directory), "cpu")
    assert meta["shared_model"] is True
    assert all(torch.equal(data["generator"][k], data["verifier"][k]) for k in data["generator"])


def test_majority_reward_labels_by_the_group_vote(sft_base, monkeypatch):
    """--reward majority ignores the gold answer: a sample is rewarded when its answer is the group's most common."""
    import scripts.chat_cotrain as cotrain
    real_sample = cotrain.sample_and_score
    answers = ["#### 7", "#### 5", "#### 7", "no answer", "#### 9", "#### 9"]  # two groups of three

    def scripted_texts(*args, **kwargs):
        rollouts = real_sample(*args, **kwargs)
        for r, text in zip(rollouts, answers):
            r.text = text
            r.reward = 0.5  # the exact checker's reward must be replaced, not kept
        return rollouts

    rewards = []
    real_update = cotrain.grpo_update

    def recording_update(model, optimizer, rollouts, *args, **kwargs):
        rewards.append([r.reward for r in rollouts])
        return real_update(model, optimizer, rollouts, *args, **kwargs)

    monkeypatch.setattr(cotrain, "sample_and_score", scripted_texts)
    monkeypatch.setattr(cotrain, "grpo_update", recording_update)
    cotrain.main(TINY + ["--num_gen_steps", "1", "--num_samples", "3", "--alpha", "0", "--no_verifier",
                         "--reward", "majority", "--eval_examples", "0", "--output_tag", "majority"])
    assert rewards == [[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]]


@pytest.mark.slow
def test_cotrain_sh_toy_run_writes_the_comparison(sft_base, tmp_path):
    """cotrain.sh at toy size on the tiny d2/d1 checkpoints: co-training, the GRPO baseline for the same
    generator steps, chat_eval of both and the baseline vs co-trained table. (Training a missing SFT
    checkpoint goes through speedrun.sh's toy pipeline, which tests/test_speedrun.py runs.)"""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               NANOCHAT_TOY="1", SKIP_SETUP="1", NPROC="1", DEPTH_G="2", DEPTH_V="1", GEN_STEPS="2",
               OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)
    for var in ("COTRAIN_ARGS", "RL_ARGS", "CHAT_EVAL_ARGS", "VIRTUAL_ENV", "WANDB_RUN"):
        env.pop(var, None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "cotrain.sh")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    base = os.environ["NANOCHAT_BASE_DIR"]
    assert "no d" not in out  # both checkpoints existed: nothing was retrained
    positions = [out.index(f"running {m}") for m in ("scripts.chat_cotrain", "scripts.chat_rl", "scripts.chat_eval -i rl",
                                                     "scripts.chat_eval -i cotrain")]
    assert positions == sorted(positions)
    assert find_last_step(os.path.join(base, "cotrain_checkpoints", "d2")) > 0
    assert find_last_step(os.path.join(base, "chatrl_checkpoints", "d2")) == 1
    with open(os.path.join(base, "report", "cotrain_vs_baseline.md")) as f:
        table = f.read()
    assert "| metric | GRPO baseline | co-trained |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) >= 3, table  # header + >= 1 metric
    assert "cotrain_vs_baseline.md" in out


@pytest.mark.slow
def test_experiment_script_compares_three_arms(sft_base, tmp_path):
    """dev/cotrain_experiment.py end to end at the smallest size: baseline, two models and one shared model."""
    out = tmp_path / "table.md"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "dev.cotrain_experiment", "--gen_tag", "d2", "--ver_tag", "d1", "--seeds", "1",
           "--num_gen_steps", "1", "--arms", "baseline,cotrain,shared", "--out", str(out), "--log_dir", str(tmp_path / "logs"),
           "--cotrain_args", "--verifier_warmup_steps 1 --ver_examples_per_step 2 --ver_solutions 1 --ver_samples 2 "
                             "--ver_max_tokens 12 --gen_max_tokens 12 --ver_eval_examples 2",
           "--", "--examples_per_step", "2", "--num_samples", "2", "--device_batch_size", "4", "--eval_examples", "2",
           "--eval_samples", "2"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert "| metric | GRPO baseline | co-trained (two models) | co-trained (one shared model) |" in table
    pass1 = next(line for line in table.splitlines() if line.startswith("| generator pass@1"))
    assert pass1.count("|") == 5
    assert "seed 1: " in table and table.count(" vs ") >= 2
