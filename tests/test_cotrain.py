"""Co-training at toy size: the schedule, each step function training only its own model, the alpha-0 baseline
equalling chat_rl, exact resume, every RL task, one shared model, and a 2-rank torchrun run."""

import json
import os
import subprocess
import sys

import zlib
from types import SimpleNamespace

import pytest
import torch

from conftest import clean_lucky_wrong
from nanochat.checkpoint_manager import find_last_step, load_checkpoint
from nanochat.grpo import sample_and_score, sample_batch
from tasks import verify
from tasks.by_name import RL_TASKS, build_rl_task

REAL_PARSE = verify.parse_verification
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

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
    with pytest.raises(SystemExit):
        get_args(["--max_batch_rows", "0"])
    assert "--max_batch_rows must be >= 1" in capsys.readouterr().err


def test_max_batch_rows_and_decode_reach_both_roles(sft_base):
    import scripts.chat_cotrain as cotrain
    roles = cotrain.load_roles(cotrain.get_args(TINY + ["--max_batch_rows", "6", "--decode", "dynamic"]), torch.device("cpu"))
    assert roles.gen_engine.max_rows == 6 and roles.ver_engine.max_rows == 6
    assert roles.gen_engine.decode == roles.ver_engine.decode == "dynamic"  # --decode reaches both roles
    assert not roles.gen_engine.keep_graphs and not roles.ver_engine.keep_graphs  # graphs given back after each rollout
    kept = cotrain.load_roles(cotrain.get_args(TINY + ["--keep_graphs"]), torch.device("cpu"))
    assert kept.gen_engine.keep_graphs and kept.ver_engine.keep_graphs
    args = cotrain.get_args(TINY + ["--num_samples", "4", "--max_batch_rows", "6"])
    rollouts, _, _ = sample_batch(roles.gen_engine, roles.tokenizer, build_rl_task("arithmetic", "train"), 0, 1, args, 0, 1,
                                  torch.device("cpu"))
    assert len(rollouts) == args.examples_per_step * 4  # whole groups of 4, one per pass


def test_bench_cotrain_splits_each_phase_into_prefill_decode_and_host_work():
    """dev/bench_cotrain at toy size: both arms' table, then where generate and verify go (the Engine's prefill and
    decoding from Engine.time_spent, chat_cotrain's gen/time_*_prefill / _decode; the rest host work)."""
    cmd = [sys.executable, "-m", "dev.bench_cotrain", "--depth_g", "2", "--depth_v", "1", "--vocab_size", "300",
           "--questions", "2", "--samples", "2", "--gen_tokens", "12", "--ver_tokens", "12", "--steps", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True,
                         env=dict(os.environ, WANDB_MODE="disabled")).stdout
    split = out.split("where generate and verify go")[1]
    baseline, cotrain = [line for line in split.splitlines() if line.startswith("  ")]
    assert baseline.startswith("  baseline GRPO step: generate") and "verify" not in baseline
    assert cotrain.startswith("  co-training generator step: generate") and "; verify " in cotrain
    assert cotrain.count("(captures 0.00)") == 2  # on CPU no CUDA graph is captured


def varied_verdicts(text):
    """A stand-in verifier reading that depends on the text, so verifier rewards vary (a random tiny model
    writes no parsable verification) and both update paths have something to learn."""
    h = zlib.crc32(text.encode())
    lines = [f"Step {i + 1}: x → {'Correct' if (h >> i) & 1 else 'Incorrect'}" for i in range(h % 4)]
    return REAL_PARSE("\n".join(lines + [f"Overall: {'Correct' if (h >> 8) & 1 else 'Incorrect'}"]))


@pytest.fixture()
def varied_rewards(monkeypatch):
    """Rewards that vary between samples of a random tiny model: a text-dependent outcome and verifier."""
    from tasks.arithmetic import ArithmeticTask
    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, conversation, text: float(len(text) % 3) / 2)
    monkeypatch.setattr(verify, "parse_verification", varied_verdicts)


def test_each_step_trains_only_its_own_model(sft_base, varied_rewards):
    import scripts.chat_cotrain as cotrain
    args = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0.3", "--num_samples", "4"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    task = build_rl_task("arithmetic", "train")
    generator, verifier = checksum(roles.generator), checksum(roles.verifier)
    record = cotrain.verifier_step(args, roles, task, 0, 0, 1, cotrain.make_balancer(args))
    assert checksum(roles.generator) == generator, "the frozen generator changed in a verifier step"
    assert checksum(roles.verifier) != verifier, "the verifier did not train"
    assert {"ver/balanced_accuracy", "ver/share_said_correct", "ver/steps_aligned", "ver/time_train"} <= set(record)
    verifier = checksum(roles.verifier)
    record = cotrain.generator_step(args, roles, task, 0, 0, 1)
    assert checksum(roles.verifier) == verifier, "the frozen verifier changed in a generator step"
    assert checksum(roles.generator) != generator, "the generator did not train"
    assert record["gen/alpha"] == 0.3 and record["gen/steps_exact"] > 0  # the process signal reached the update
    for key in ("gen/outcome_reward", "gen/process_reward", "gen/time_generate", "gen/time_verify", "gen/time_train"):
        assert key in record


def test_ver_kl_coef_anchors_the_verifier_to_its_warm_start(sft_base, varied_rewards, capsys):
    """--ver_kl_coef: a frozen copy of the verifier as loaded; no KL before its first update, some after, the
    anchor never trains, the penalty changes the update, and a resumed run anchors to the same warm start."""
    import scripts.chat_cotrain as cotrain
    task = build_rl_task("arithmetic", "train")
    runs = {}
    for coef in ("0", "0.5"):
        args = cotrain.get_args(TINY + ["--num_samples", "4", "--ver_kl_coef", coef])
        roles = cotrain.load_roles(args, torch.device("cpu"))
        start, balancer = checksum(roles.verifier), cotrain.make_balancer(args)
        records = [cotrain.verifier_step(args, roles, task, step, 0, 1, balancer) for step in range(2)]
        runs[coef] = checksum(roles.verifier)
        if coef == "0":
            assert roles.ver_reference is None and records[1]["ver/kl"] == 0.0
            continue
        assert roles.ver_reference is not roles.verifier and checksum(roles.ver_reference) == start
        assert abs(records[0]["ver/kl"]) < 1e-6 and records[1]["ver/kl"] > 0
        assert {"ver/exact_balanced_accuracy", "ver/exact_gold_correct_rate", "ver/exact_tn", "ver/exact_fp"} <= set(records[0])
        assert records[0]["ver/exact_tn"] + records[0]["ver/exact_fp"] <= records[0]["ver/gold_correct_rate"] * 4 + 1e-9  # lucky ones drop out
    assert runs["0"] != runs["0.5"], "the KL penalty did not change the verifier's update"

    flags = TINY + ["--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "1",
                    "--ver_kl_coef", "0.5"]
    cotrain.main(flags + ["--output_tag", "kl_straight"])
    cotrain.main(flags + ["--output_tag", "kl_resumed", "--stop_after", "2"])
    cotrain.main(flags + ["--output_tag", "kl_resumed", "--resume"])
    assert "| kl " in capsys.readouterr().out
    base = os.environ["NANOCHAT_BASE_DIR"]
    a, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "kl_straight"), 4, "cpu")
    b, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "kl_resumed"), 4, "cpu")
    for k in a["verifier"]:  # an anchor taken from the resumed weights would give no KL at step 2 and other weights
        assert torch.equal(a["verifier"][k], b["verifier"][k]), k
    for bad in (["--ver_kl_coef", "-1"], ["--ver_kl_coef", "0.1", "--shared_model"]):
        with pytest.raises(SystemExit):
            cotrain.get_args(bad)
    assert "--ver_kl_coef anchors" in capsys.readouterr().err


def test_run_completes_with_schedule_and_checkpoint(sft_base):
    import scripts.chat_cotrain as cotrain
    history = cotrain.main(TINY + ["--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1",
                                   "--verifier_warmup_steps", "1", "--alpha", "0.1"])
    assert len(history["gen"]) == 2 and len(history["ver"]) == 2 and len(history["eval"]) == 2
    for record in history["gen"]:  # each phase's share spent in its role's Engine (bench_cotrain prints the split)
        for phase in ("generate", "verify"):
            prefill, decode = record[f"gen/time_{phase}_prefill"], record[f"gen/time_{phase}_decode"]
            assert prefill > 0 and decode > 0 and prefill + decode <= record[f"gen/time_{phase}"]
            assert record[f"gen/time_{phase}_capture"] == 0.0  # no CUDA graph on CPU
    assert {"verifier_balanced_accuracy", "verifier_share_said_correct", "verifier_gold_share_correct",
            "verifier_steps_aligned"} <= set(history["eval"][-1])
    ckpt = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "cotrain_checkpoints", "g2_v1")
    assert find_last_step(ckpt) == 4


def test_eval_split_val_evaluates_on_the_validation_problems(sft_base, monkeypatch):
    import scripts.chat_cotrain as cotrain
    seeds, real = [], cotrain.evaluate
    monkeypatch.setattr(cotrain, "evaluate", lambda args, roles, task, *a: seeds.append((task.split, task.seed)) or real(args, roles, task, *a))
    cotrain.main(TINY + ["--num_gen_steps", "1", "--no_verifier", "--alpha", "0", "--eval_split", "val", "--output_tag", "val_split"])
    assert seeds == [("train", 1)] * 2  # start and end, on the val problems (train skeletons, seed 1), not test


def test_ver_pool_gives_the_verifier_a_class_balanced_batch(sft_base, monkeypatch):
    import scripts.chat_cotrain as cotrain
    from tasks.arithmetic import ArithmeticTask
    monkeypatch.setattr(ArithmeticTask, "evaluate", lambda self, conversation, text: int(len(text) % 5 == 0))  # ~1 in 5 "right"
    read, real = [], cotrain.judge
    monkeypatch.setattr(cotrain, "judge", lambda args, roles, task, solutions, *a, **k: read.append(solutions) or real(args, roles, task, solutions, *a, **k))
    for pool in (1, 4):
        args = cotrain.get_args(TINY + ["--ver_solutions", "2", "--ver_pool", str(pool), "--ver_examples_per_step", "4"])
        roles = cotrain.load_roles(args, torch.device("cpu"))
        record = cotrain.verifier_step(args, roles, build_rl_task("arithmetic", "train"), 0, 0, 1, cotrain.make_balancer(args))
        labels = [s.info["correct"] for s in read[-1]]
        assert len(labels) == 8 and record["ver/gold_correct_rate"] == sum(labels) / 8
        if pool == 1:
            plain = sum(labels)
    assert plain < 4 and sum(labels) == 4  # 8 of a pool of 32: as many right as wrong


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


def test_ver_kl_coef_after_in_process_sft_anchors_the_sft_verifier_and_resumes_to_it(sft_base, varied_rewards):
    """With --verifier_sft_steps the warm start is the verifier after its SFT: the anchor is taken then (so the first
    verifier step, before any RL update, sees no KL although SFT moved the weights), checkpoints carry it, and a run
    resumed after the SFT anchors to the same weights (the same end weights as a straight run)."""
    import scripts.chat_cotrain as cotrain
    flags = TINY + ["--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "1",
                    "--verifier_sft_steps", "2", "--verifier_sft_batch", "2", "--ver_kl_coef", "0.5"]
    straight = cotrain.main(flags + ["--output_tag", "sft_kl_straight"])
    assert abs(straight["ver"][0]["ver/kl"]) < 1e-6 and straight["ver"][1]["ver/kl"] > 0
    cotrain.main(flags + ["--output_tag", "sft_kl_resumed", "--stop_after", "2"])
    cotrain.main(flags + ["--output_tag", "sft_kl_resumed", "--resume"])
    base = os.environ["NANOCHAT_BASE_DIR"]
    loaded, _, _ = load_checkpoint(os.path.join(base, "chatsft_checkpoints", "d1"), 0, "cpu")
    a, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "sft_kl_straight"), 4, "cpu")
    b, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "sft_kl_resumed"), 4, "cpu")
    middle, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "sft_kl_resumed"), 2, "cpu")
    for k in a["ver_reference"]:
        assert torch.equal(a["ver_reference"][k], middle["ver_reference"][k]), k  # the anchor never trains
    assert any(not torch.equal(a["ver_reference"][k], loaded[k]) for k in loaded), "the anchor is the loaded verifier, not the SFT one"
    for k in a["verifier"]:  # an anchor rebuilt from the loaded weights at the resume would give other weights
        assert torch.equal(a["verifier"][k], b["verifier"][k]), k


def test_resume_is_exact(sft_base, varied_rewards):
    import scripts.chat_cotrain as cotrain
    flags = TINY + ["--num_gen_steps", "3", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "1"]
    straight = cotrain.main(flags + ["--output_tag", "straight"])
    first = cotrain.main(flags + ["--output_tag", "resumed", "--stop_after", "3"])
    resumed = cotrain.main(flags + ["--output_tag", "resumed", "--resume"])
    # the checkpoint carries the history: the resumed run returns the whole run's, as the straight run does
    # (timings aside); compared as JSON, where NaN equals NaN
    untimed = lambda h: json.dumps({part: [{k: v for k, v in r.items() if "time" not in k} for r in rows]
                                    for part, rows in h.items()}, sort_keys=True)
    assert len(first["gen"]) + len(first["ver"]) == 3 and len(resumed["gen"]) + len(resumed["ver"]) == 6
    assert untimed(resumed) == untimed(straight)
    base = os.environ["NANOCHAT_BASE_DIR"]
    a, _, meta_a = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "straight"), 6, "cpu")
    b, _, meta_b = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "resumed"), 6, "cpu")
    middle, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "resumed"), 3, "cpu")
    assert meta_a["loop_state"] == meta_b["loop_state"] and meta_a["class_balancer"] == meta_b["class_balancer"]
    for role in ("generator", "verifier"):
        # the steps after the resume point trained both models, so an inexact resume would show
        assert any(not torch.equal(middle[role][k], a[role][k]) for k in a[role]), f"the {role} never moved"
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


def test_shared_model_plays_both_roles_with_one_optimizer(sft_base, varied_rewards):
    import scripts.chat_cotrain as cotrain
    args = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--shared_model"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    assert roles.verifier is roles.generator and roles.ver_optimizer is roles.gen_optimizer
    history = cotrain.main(TINY + ["--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1",
                                   "--verifier_warmup_steps", "1", "--shared_model", "--output_tag", "shared"])
    assert len(history["gen"]) == 2 and len(history["ver"]) == 2
    directory = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "cotrain_checkpoints", "shared")
    data, _, meta = load_checkpoint(directory, find_last_step(directory), "cpu")
    start, _, _ = load_checkpoint(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "chatsft_checkpoints", "d2"), 0, "cpu")
    assert meta["shared_model"] is True and meta["task"] == "arithmetic"
    assert all(torch.equal(data["generator"][k], data["verifier"][k]) for k in data["generator"])
    assert any(not torch.equal(data["generator"][k], start[k]) for k in start), "the shared model did not train"


class ScriptedAnswers:
    """The arithmetic task, except that the answers read from completions come from a script (in sampling
    order) and the exact checker's reward is a constant that the majority vote must replace."""

    def __init__(self, task, answers):
        self.task, self.answers = task, iter(answers)

    def __len__(self):
        return len(self.task)

    def __getitem__(self, i):
        return self.task[i]

    def __getattr__(self, name):
        return getattr(self.task, name)

    def reward(self, conversation, text):
        return 0.5

    def extract_answer(self, conversation, text):
        return next(self.answers)


def test_majority_reward_labels_by_the_group_vote(sft_base):
    import scripts.chat_cotrain as cotrain
    args = cotrain.get_args(TINY + ["--num_gen_steps", "1", "--num_samples", "3", "--alpha", "0", "--no_verifier",
                                    "--reward", "majority"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    task = ScriptedAnswers(build_rl_task("arithmetic", "train"), ["7", "5", "7", None, "9", "9"])  # two groups of three
    record = cotrain.generator_step(args, roles, task, 0, 0, 1)
    assert record["gen/outcome_reward"] == 4 / 6  # labels [1, 0, 1 | 0, 1, 1], not the checker's 0.5


@pytest.mark.parametrize("task", RL_TASKS)
def test_two_steps_on_every_rl_task_with_majority_reward(sft_base, task):
    """Both co-training phases, majority@k and the labelled verifier evaluation run on every RL task."""
    import scripts.chat_cotrain as cotrain
    history = cotrain.main(TINY[2:] + ["--task", task, "--data_dir", FIXTURES, "--num_gen_steps", "2", "--gen_steps", "1",
                                       "--ver_steps", "1", "--verifier_warmup_steps", "0", "--reward", "majority",
                                       "--output_tag", f"every_{task}"])
    assert len(history["gen"]) == 2 and len(history["ver"]) == 1
    final = history["eval"][-1]
    assert "majority@2" in final and 0 <= final["verifier_accuracy"] <= 1


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
def test_experiment_script_compares_the_arms(sft_base, tmp_path):
    """dev/cotrain_experiment.py end to end at the smallest size: baseline, oracle, two models and one shared
    model, then the same report again from the saved results (--reuse) without running anything."""
    out = tmp_path / "table.md"
    env = dict(os.environ, PYTHONPATH=ROOT)
    flags = ["--gen_tag", "d2", "--ver_tag", "d1", "--seeds", "1", "--num_gen_steps", "1", "--arms", "baseline,oracle,cotrain,shared",
             "--out", str(out), "--log_dir", str(tmp_path / "logs"), "--process_args", "--alpha 0.3 --alpha_end 0.3",
             "--verifier_args", "--verifier_warmup_steps 1 --ver_examples_per_step 2 --ver_solutions 1 --ver_samples 2 "
                                "--ver_max_tokens 12 --ver_eval_examples 2"]
    shared = ["--", "--examples_per_step", "2", "--num_samples", "2", "--device_batch_size", "4", "--eval_examples", "2",
              "--eval_samples", "2", "--gen_max_tokens", "12", "--eval_every", "0"]
    result = subprocess.run([sys.executable, "-m", "dev.cotrain_experiment", *flags, *shared], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert "| metric | GRPO baseline | oracle verifier | co-trained (two models) | co-trained (one shared model) |" in table
    pass1 = next(line for line in table.splitlines() if line.startswith("| generator pass@1 (held-out"))
    assert pass1.count("|") == 6
    assert "gain over the baseline (paired by seed) | 0.000 |" in table and "seed 1: baseline" in table
    assert "--oracle_verifier" in (tmp_path / "logs" / "oracle_s1.log").read_text() and "(the task's test split)" in table
    cost = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "PFLOPs" not in line}
    assert cost["GRPO baseline"][-1] == "1.00 |" and cost["oracle verifier"][-2].endswith("+ 0.000)")
    assert float(cost["co-trained (two models)"][-1].rstrip(" |")) > 1  # the verifier's reading and training cost FLOPs
    with open(tmp_path / "logs" / "cotrain_s1.json") as f:
        curve = json.load(f)["verifier_curve"]
    assert len(curve) == 1 and {"exact_tp", "exact_fp", "exact_tn", "exact_fn", "kl", "share_said_correct"} <= set(curve[0])
    assert sum(curve[0][k] for k in ("exact_tp", "exact_fp", "exact_tn", "exact_fn")) == 2 * 2  # 2 solutions x 2 readings
    again = subprocess.run([sys.executable, "-m", "dev.cotrain_experiment", *flags, "--reuse", *shared], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("reused: ") == 4, again.stdout[-2000:] + again.stderr[-2000:]
    assert out.read_text().split("Wall time")[1].split("\n", 1)[1] == table.split("Wall time")[1].split("\n", 1)[1]
    # the same baseline runs standing in for a compute-matched baseline: every arm's gain over it is its plain gain
    matched = subprocess.run([sys.executable, "-m", "dev.cotrain_experiment", *flags, "--reuse", "--matched_baseline",
                              str(tmp_path / "logs"), *shared], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert matched.returncode == 0, matched.stdout[-2000:] + matched.stderr[-2000:]
    text = out.read_text()
    gain = next(line for line in text.splitlines() if line.startswith("| gain over the baseline"))
    assert next(line for line in text.splitlines() if line.startswith("| gain over the compute-matched")).split(")", 1)[1] == gain.split(")", 1)[1]
    assert "Compute-matched GRPO baseline" in text and "1 updates" in text
    missing = subprocess.run([sys.executable, "-m", "dev.cotrain_experiment", *flags, "--reuse", "--matched_baseline",
                              str(tmp_path / "nowhere"), *shared], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no " in missing.stderr and "baseline_s1.json" in missing.stderr


def test_experiment_driver_resumes_a_run_left_part_way(sft_base, tmp_path):
    """With --reuse the driver continues a run that an earlier invocation left part-way, from its last checkpoint:
    its log is appended to, its result holds every update (the earlier ones from the checkpoint's history), and the
    report says it was resumed."""
    import scripts.chat_cotrain as cotrain
    from dev.cotrain_experiment import run_argv
    logs = tmp_path / "logs"
    shared = ["--examples_per_step", "2", "--num_samples", "2", "--device_batch_size", "4", "--eval_examples", "2",
              "--eval_samples", "2", "--gen_max_tokens", "12", "--eval_every", "0", "--save_every", "1"]
    args = SimpleNamespace(task="arithmetic", gen_tag="d2", ver_tag="d1", ver_source="sft", num_gen_steps=3,
                           tag_prefix="part", shared=shared, process_args="", verifier_args="")
    cotrain.main(run_argv("baseline", 1, args) + ["--stop_after", "2"])  # the earlier invocation, stopped after 2 updates
    logs.mkdir()
    (logs / "baseline_s1.log").write_text("the earlier invocation's log\n")
    flags = ["--gen_tag", "d2", "--ver_tag", "d1", "--seeds", "1", "--num_gen_steps", "3", "--arms", "baseline",
             "--out", str(tmp_path / "table.md"), "--log_dir", str(logs), "--tag_prefix", "part", "--reuse"]
    result = subprocess.run([sys.executable, "-m", "dev.cotrain_experiment", *flags, "--", *shared], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming: baseline seed 1" in result.stdout and "(resumed: the minutes count" in result.stdout
    log = (logs / "baseline_s1.log").read_text()
    assert log.startswith("the earlier invocation's log") and "resumed co-training at global step 2" in log
    with open(logs / "baseline_s1.json") as f:
        data = json.load(f)
    assert data["resumed"] and len(data["reward_curve"]) == 3
    assert "Resumed from a checkpoint after an interruption" in (tmp_path / "table.md").read_text()


def test_flops_count_the_rollouts_dynamic_sampling_left_out(sft_base, monkeypatch):
    import scripts.chat_cotrain as cotrain
    from tasks.arithmetic import ArithmeticTask
    monkeypatch.setattr(ArithmeticTask, "reward", lambda self, conversation, text: 0.0)  # every group flat: nothing kept
    calls, real = [], cotrain.rollout_flops

    def recording(model, rollouts, num_samples=1, train_passes=0):
        calls.append((len(rollouts), train_passes, real(model, rollouts, num_samples, train_passes)))
        return calls[-1][2]

    monkeypatch.setattr(cotrain, "rollout_flops", recording)
    args = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0.5", "--oracle_verifier", "--dynamic_sampling", "1"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    record = cotrain.generator_step(args, roles, build_rl_task("arithmetic", "train"), 0, 0, 1)
    batch = args.examples_per_step * args.num_samples
    assert record["gen/dynamic_sampling_rounds"] == 1
    assert [(n, passes > 0) for n, passes, _ in calls] == [(batch, True), (batch, False)]  # trained on one round, sampled two
    assert record["gen/flops_generator"] == pytest.approx(calls[0][2] + calls[1][2])


def test_experiment_cost_counts_branch_continuations_as_generation():
    from dev.cotrain_experiment import seconds_per_update
    plain = [{"gen/time_generate": 2.0, "gen/time_verify": 1.0, "gen/time_train": 3.0}] * 2
    branched = [{"gen/time_generate": 2.0, "gen/time_verify": 1.0, "gen/time_train": 3.0, "gen/time_branch": 1.5},
                {"gen/time_generate": 4.0, "gen/time_verify": 1.0, "gen/time_train": 3.0, "gen/time_branch": 0.5}]
    assert seconds_per_update(plain) == {"generate": 2.0, "verify": 1.0, "train": 3.0}
    assert seconds_per_update(branched) == {"generate": 4.0, "verify": 1.0, "train": 3.0}


def test_experiment_report_names_the_split_it_scored():
    from dev.cotrain_experiment import eval_split
    assert eval_split(["--difficulty", "2", "--eval_split", "val", "--eval_every", "0"]) == "val"
    assert eval_split(["--eval_split=val"]) == "val" and eval_split(["--difficulty", "2"]) == "test"


def test_oracle_verifier_feeds_gold_step_labels_through_the_process_path(sft_base, varied_rewards):
    import scripts.chat_cotrain as cotrain
    args = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0.5", "--oracle_verifier"])
    assert cotrain.phase_schedule(args) == ["G", "G"]
    roles = cotrain.load_roles(args, torch.device("cpu"))
    assert roles.verifier is None  # no verifier model is loaded
    record = cotrain.generator_step(args, roles, build_rl_task("arithmetic", "train"), 0, 0, 1)
    assert record["gen/steps_exact"] == 1.0  # one verdict per step for every sample
    assert record["gen/verifier_step_agreement"] == 1.0
    assert record["gen/flops_generator"] > 0 and record["gen/flops_verifier"] == 0  # the oracle costs no model FLOPs
    within = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0.5", "--oracle_verifier", "--process_credit", "within"])
    assert cotrain.generator_step(within, roles, build_rl_task("arithmetic", "train"), 1, 0, 1)["gen/steps_exact"] == 1.0
    gated = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0.5", "--oracle_verifier", "--mix", "gated"])
    assert cotrain.generator_step(gated, roles, build_rl_task("arithmetic", "train"), 1, 0, 1)["gen/steps_exact"] == 1.0
    answer = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0.5", "--oracle_verifier", "--answer_step", "--difficulty", "2"])
    record = cotrain.generator_step(answer, roles, build_rl_task("arithmetic", "train", difficulty=answer.difficulty), 1, 0, 1)
    assert record["gen/steps_exact"] == 1.0 and 0.0 <= record["gen/process_reward"] <= 1.0
    unwritten = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0.5", "--oracle_verifier", "--answer_step",
                                         "--unwritten_wrong", "--difficulty", "2"])
    record = cotrain.generator_step(unwritten, roles, build_rl_task("arithmetic", "train", difficulty=2), 1, 0, 1)
    assert record["gen/steps_exact"] == 1.0 and 0.0 <= record["gen/process_reward"] <= 1.0
    progress = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0.5", "--oracle_verifier", "--mix", "progress",
                                        "--unwritten_wrong", "--difficulty", "2"])
    record = cotrain.generator_step(progress, roles, build_rl_task("arithmetic", "train", difficulty=2), 1, 0, 1)
    assert record["gen/steps_exact"] == 1.0 and 0.0 <= record["gen/process_reward"] <= 1.0
    with pytest.raises(SystemExit):
        cotrain.get_args(["--oracle_verifier", "--mix", "progress"])  # the share needs the steps a problem needs
    with pytest.raises(SystemExit):
        cotrain.get_args(["--oracle_verifier", "--shared_model"])
    with pytest.raises(SystemExit):
        cotrain.get_args(["--task", "gsm8k", "--difficulty", "2"])  # presets are the arithmetic task's
    assert cotrain.get_args(["--unwritten_wrong", "--verifier_format", "expectations"]).unwritten_wrong
    for bad in (["--unwritten_wrong"], ["--oracle_verifier", "--unwritten_wrong", "--process_credit", "within"],
                ["--unwritten_wrong", "--verifier_format", "expectations", "--no_verifier", "--alpha", "0"]):
        with pytest.raises(SystemExit):
            cotrain.get_args(bad)


def test_branch_replaces_all_wrong_groups_by_continuations_of_a_right_prefix(sft_base, varied_rewards, monkeypatch):
    import nanochat.grpo as grpo
    import scripts.chat_cotrain as cotrain
    args = cotrain.get_args(TINY + ["--num_gen_steps", "2", "--alpha", "0", "--oracle_verifier", "--branch", "--num_samples", "3"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    task = build_rl_task("arithmetic", "train")
    # a random tiny model writes no steps, so no group has a right prefix: the real rule branches nothing
    record = cotrain.generator_step(args, roles, task, 0, 0, 1)
    assert record["gen/branched_groups"] == 0.0
    # forced: the first group is branched after its first sample's first two tokens
    seen = {}
    monkeypatch.setattr(cotrain, "branch_points", lambda rollouts, judgements, group, budget: [(0, rollouts[0], 2)])
    real_update = cotrain.grpo_update

    def update(model, optimizer, rollouts, advantages, *a, **k):
        seen["rollouts"], seen["advantages"] = list(rollouts), advantages
        return real_update(model, optimizer, rollouts, advantages, *a, **k)
    monkeypatch.setattr(cotrain, "grpo_update", update)
    sampled = {}
    real_continue = cotrain.continue_rollouts

    def continue_(engine, tokenizer, task, points, *a, **k):
        sampled["source"] = points[0][1]
        return real_continue(engine, tokenizer, task, points, *a, **k)
    monkeypatch.setattr(cotrain, "continue_rollouts", continue_)
    record = cotrain.generator_step(args, roles, task, 1, 0, 1)
    assert record["gen/branched_groups"] == 0.5  # one group of two
    source, trained = sampled["source"], seen["rollouts"]
    assert len(trained) == 6
    for r in trained[:3]:  # the branched group: the source's prompt and first two tokens are the new prompt
        assert r.prompt_ids == source.prompt_ids + source.completion_ids[:2] and r.info["branch_cut"] == 2
        assert len(r.completion_ids) <= args.max_new_tokens - 2
        assert r.reward == task.reward(None, r.text)  # the whole solution is rewarded (stand-in reward: by text)
    assert all("branch_cut" not in r.info for r in trained[3:])
    assert seen["advantages"] == grpo.group_advantages(torch.tensor([r.reward for r in trained]).view(2, 3)).view(-1).tolist()
    for bad in (["--oracle_verifier", "--branch"],  # alpha defaults to 0.1: branching uses the outcome alone
                ["--no_verifier", "--alpha", "0", "--branch"],
                ["--oracle_verifier", "--alpha", "0", "--branch", "--reward", "majority"],
                ["--oracle_verifier", "--alpha", "0", "--branch", "--overlong", "mask"]):
        with pytest.raises(SystemExit):
            cotrain.get_args(bad)


def test_unwritten_wrong_reads_the_number_of_steps_from_the_reference_chain():
    import scripts.chat_cotrain as cotrain
    task = build_rl_task("arithmetic", "train", difficulty=2)
    assert cotrain.reference_steps(task, 3) == len(task.reference_calculations(3)) >= 1

    class NoChain:
        def reference_chain(self, index):
            return None
    with pytest.raises(ValueError, match="reference chains"):
        cotrain.reference_steps(NoChain(), 0)


def test_collapse_guard_switches_a_one_class_verifier_to_balanced_weights(sft_base, monkeypatch):
    """A verifier that says "Correct" to everything while the (random) generator is always wrong has collapsed:
    after --collapse_patience verifier steps its class weights become 1/count and its batches class-balanced
    choices from --collapse_pool times more solutions."""
    import scripts.chat_cotrain as cotrain
    monkeypatch.setattr(verify, "parse_verification", lambda text: REAL_PARSE("Step 1: x → Correct\nOverall: Correct"))
    args = cotrain.get_args(TINY + ["--collapse_patience", "2"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    task = build_rl_task("arithmetic", "train")
    balancer = cotrain.make_balancer(args)
    asked, real = [], cotrain.sample_and_score
    monkeypatch.setattr(cotrain, "sample_and_score",
                        lambda engine, tok, task, indices, k, *a, **kw: asked.append(k) or real(engine, tok, task, indices, k, *a, **kw))
    records = [cotrain.verifier_step(args, roles, task, step, 0, 1, balancer) for step in range(3)]
    assert all(r["ver/share_said_correct"] == 1.0 and r["ver/gold_correct_rate"] == 0.0 for r in records)
    assert [r["ver/class_power"] for r in records] == [0.5, 1.0, 1.0]
    # and from the step after it fires, the generator writes --collapse_pool (default 4) x --ver_solutions per question
    assert [r["ver/pool"] for r in records] == [1, 4, 4] and asked == [1, 1, 4]


def test_absurd_learning_rate_stops_before_saving_and_resume_checks_the_config(sft_base, varied_rewards):
    import scripts.chat_cotrain as cotrain
    from nanochat.checkpoint_manager import NonFiniteWeightsError, ResumeMismatchError
    flags = TINY + ["--num_gen_steps", "2", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "1",
                    "--save_every", "1"]
    base = os.environ["NANOCHAT_BASE_DIR"]
    # global step 1 trains the verifier (saved as step 1), global step 2 the generator with an absurd learning rate
    with pytest.raises(NonFiniteWeightsError, match="step 2 left non-finite weights .*last finite checkpoint is step 1"):
        cotrain.main(flags + ["--gen_init_lr_frac", "1e30", "--output_tag", "absurd"])
    assert find_last_step(os.path.join(base, "cotrain_checkpoints", "absurd")) == 1  # step 2 was never saved
    cotrain.main(flags + ["--output_tag", "sane", "--stop_after", "2"])
    with pytest.raises(ResumeMismatchError, match="alpha"):
        cotrain.main(flags + ["--output_tag", "sane", "--resume", "--alpha", "0.3"])
    history = cotrain.main(flags + ["--output_tag", "sane", "--resume"])
    data, _, _ = load_checkpoint(os.path.join(base, "cotrain_checkpoints", "sane"), find_last_step(os.path.join(base, "cotrain_checkpoints", "sane")), "cpu")
    assert all(torch.isfinite(t).all() for role in data.values() for t in role.values())
    assert len(history["gen"]) + len(history["ver"]) == 4  # two global steps restored from the checkpoint, two after it


def test_forced_headers_give_one_verification_line_per_step(sft_base):
    """With --forced_headers every reading opens each line with 'Step k:' and ends with 'Overall:', so a
    verifier that writes a newline after each step is aligned with the solution by construction."""
    import scripts.chat_cotrain as cotrain
    args = cotrain.get_args(TINY + ["--forced_headers", "--ver_max_tokens", "60"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    task = build_rl_task("arithmetic", "train")
    solutions = sample_and_score(roles.gen_engine, roles.tokenizer, task, [0, 1], 2, 12, 1.0, 50, seed=1)
    readings, judgements = cotrain.judge(args, roles, task, solutions, 2, 1.0, seed=3)
    for i, (reading, judgement) in enumerate(zip(readings, judgements)):
        headers = verify.step_headers(roles.tokenizer, judgement.num_steps)
        first = headers[0]
        assert reading.completion_ids[:len(first)] == first and reading.completion_mask[:len(first)] == [0] * len(first)
        lines = reading.text.split("\n")
        # every line the verifier finished opens with the next header, in order
        for k, line in enumerate(lines[:len(headers)]):
            assert line.startswith(roles.tokenizer.decode(headers[k])), (i, k, reading.text)
    assert any("\n" in r.text for r in readings), "no reading reached a second line: the test would check nothing"


def test_verifier_warm_start_on_the_generators_own_solutions(sft_base, monkeypatch):
    """--ver_sft_own_frac mixes exactly labelled, class-balanced solutions of the generator itself into the
    verifier's SFT; labels line up with the steps, and no example is cut."""
    import scripts.chat_cotrain as cotrain
    from tasks.arithmetic import ArithmeticTask
    # a random tiny model never solves a problem: call every third solution right so both classes occur
    real_evaluate, calls = ArithmeticTask.evaluate, {"n": 0}

    def sometimes_right(self, conversation, text):
        calls["n"] += 1
        return 1 if calls["n"] % 3 == 0 else real_evaluate(self, conversation, text)

    monkeypatch.setattr(ArithmeticTask, "evaluate", sometimes_right)
    # its lines have no calculations, an error against the reference chain; without the chain they pass
    monkeypatch.setattr(ArithmeticTask, "reference_chain", lambda self, index: None)
    args = cotrain.get_args(TINY + ["--ver_sft_own_frac", "0.5", "--ver_sft_own_pool", "6", "--verifier_sft_steps", "2",
                                    "--verifier_sft_batch", "4"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    task = build_rl_task("arithmetic", "train")
    own = cotrain.own_solutions_labelled(args, roles, task, 0, 1)
    assert own and sum(it["overall_correct"] for it in own) * 2 == len(own)  # balanced
    for it in own:
        steps = verify.split_steps(verify.to_display(it["solution"]))
        assert len(it["step_labels"]) == len(steps) and it["overall_correct"] == (it["first_error"] < 0)
        example = verify.labelled_example(it["question"], it["solution"], it["overall_correct"], it["step_labels"])
        ids, _ = roles.tokenizer.render_conversation(example, max_tokens=None)
        assert roles.tokenizer.decode(ids).rstrip().endswith(f"Overall: {'Correct' if it['overall_correct'] else 'Incorrect'}<|assistant_end|>")
    before = checksum(roles.verifier)
    losses = cotrain.verifier_sft(args, roles, task, 0, 1)
    assert len(losses) == 2 and checksum(roles.verifier) != before


def test_expectations_format_end_to_end(sft_base):
    """--verifier_format expectations: the warm start trains on expectation targets (with calculator calls), the
    forced headers give one expectation line per step, the rule gives the verdicts, and the held-out metrics
    on the generator's own solutions are reported."""
    import scripts.chat_cotrain as cotrain
    with pytest.raises(SystemExit):
        cotrain.get_args(["--verifier_format", "expectations", "--process_score", "prob"])
    history = cotrain.main(TINY + ["--num_gen_steps", "1", "--gen_steps", "1", "--ver_steps", "1", "--verifier_warmup_steps", "1",
                                   "--verifier_format", "expectations", "--forced_headers", "--verifier_sft_steps", "2",
                                   "--ver_sft_own_frac", "0.5", "--ver_sft_own_pool", "2", "--ver_max_tokens", "40",
                                   "--ver_eval_votes", "2", "--ver_gold", "exact", "--output_tag", "expectations"])
    final = history["eval"][-1]
    for key in ("verifier_balanced_accuracy", "verifier_auc", "verifier_first_error_accuracy", "verifier_steps_aligned",
                "verifier_synthetic_balanced_accuracy", "verifier_share_said_correct", "verifier_gold_share_correct",
                "verifier_exact_balanced_accuracy", "verifier_exact_auc", "verifier_exact_gold_share_correct"):
        assert key in final, key
    assert final["verifier_exact_gold_share_correct"] <= final["verifier_gold_share_correct"]
    assert 0 <= final["verifier_share_said_correct"] <= 1 and history["ver"][0]["ver/format_rate"] >= 0
    # the verifier's reading of the generator's samples and its own training are counted as FLOPs
    assert history["gen"][0]["gen/flops_verifier"] > 0 and history["ver"][0]["ver/flops_verifier"] > 0
    # the warm-started verifier is reusable: --ver_source cotrain loads the verifier role of that checkpoint
    ckpt = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "cotrain_checkpoints", "expectations")
    model_data, _, _ = load_checkpoint(ckpt, find_last_step(ckpt), torch.device("cpu"))
    roles = cotrain.load_roles(cotrain.get_args(TINY + ["--ver_source", "cotrain", "--ver_tag", "expectations"]), torch.device("cpu"))
    saved = model_data["verifier"]
    assert all(torch.equal(p.detach(), saved[name].to(p.dtype)) for name, p in roles.verifier.named_parameters())
    assert roles.verifier.config.n_layer == 1 and roles.generator.config.n_layer == 2


def test_expectations_judge_reads_rule_verdicts(sft_base, monkeypatch):
    """judge() in the expectations format: what the verifier wrote is compared with each step by the rule."""
    import scripts.chat_cotrain as cotrain
    from nanochat import grpo
    args = cotrain.get_args(TINY + ["--verifier_format", "expectations"])
    roles = cotrain.load_roles(args, torch.device("cpu"))
    task = build_rl_task("arithmetic", "train")
    reference = task.reference_calculations(0)
    text = "\n".join(f"x {e}=<<{e}={v}>>{v}" for e, v in reference) + f"\n#### {reference[-1][1]}"
    solutions = [SimpleNamespace(text=text, body_ids=roles.tokenizer.encode(text), example_index=0, info={"conversation": task[0]})]
    written = verify.expectation_text(text, reference)
    real = grpo.generate_rollouts

    def fake(engine, tokenizer, prompts, indices, n, *a, **k):
        rollouts = real(engine, tokenizer, prompts, indices, n, *a, **k)
        for r in rollouts:
            r.text = written
        return rollouts
    monkeypatch.setattr(cotrain, "generate_rollouts", fake)
    _, judgements = cotrain.judge(args, roles, task, solutions, 2, 1.0, seed=0)
    k = len(reference)
    assert [j.verification.step_verdicts for j in judgements] == [[True] * k, [True] * k]
    assert all(j.verification.overall is True and j.step_rewards == [1 / k] * k for j in judgements)


def test_own_solution_metrics_count_lucky_right_answers_under_exact_labels(monkeypatch):
    """A right answer reached through a wrong step is correct by the answer check and incorrect by the exact
    label (every step clean): a verifier that flags it loses under the first and not under the second; verifier RL
    uses the label --ver_gold names."""
    import scripts.chat_cotrain as cotrain
    task = build_rl_task("arithmetic", "train")
    texts = clean_lucky_wrong(task)
    steps = task.reference_calculations(0)
    rollouts, judgements = [], []
    for name, said in (("clean", True), ("lucky", False), ("wrong", False)):
        rollout = SimpleNamespace(text=texts[name], example_index=0, info={"conversation": task[0]})
        rollout.info["correct"] = int(task.evaluate(task[0], texts[name]))
        rollouts.append(rollout)
        judgements.append(SimpleNamespace(verification=verify.Verification(step_verdicts=[said] * len(steps), overall=said)))
    assert [r.info["correct"] for r in rollouts] == [1, 1, 0]
    assert verify.gold_step_labels(texts["lucky"], task.reference_chain(0))[1] == 0  # its first step is the error
    monkeypatch.setattr(cotrain, "auc_scores", lambda *a, **k: [0.9, 0.2, 0.1])
    counts, pairs = cotrain.own_solution_counts(SimpleNamespace(seed=0), None, task, rollouts, [None] * 3, judgements)
    assert (counts["tn"], counts["fp"], counts["tp"], counts["gold"]) == (1, 1, 1, 2)  # answer check: lucky = correct
    assert (counts["exact_tn"], counts["exact_fp"], counts["exact_tp"], counts["exact_gold"]) == (1, 0, 2, 1)
    assert verify.verdict_metrics(counts)["balanced_accuracy"] == 0.75
    assert verify.verdict_metrics({k[6:]: v for k, v in counts.items() if k.startswith("exact_")})["balanced_accuracy"] == 1.0
    assert pairs == [(0.9, True, True), (0.2, True, False), (0.1, False, False)]
    # verifier RL's labels: the answer check by default, the exact label with --ver_gold exact
    assert cotrain.verifier_gold(cotrain.get_args(["--ver_gold", "answer"]), task, rollouts) == [1, 1, 0]
    assert cotrain.verifier_gold(cotrain.get_args(["--ver_gold", "exact"]), task, rollouts) == [1, 0, 0]
    with pytest.raises(SystemExit):
        cotrain.get_args(["--ver_gold", "steps"])


def test_verifier_metrics_take_more_samples_per_problem_when_asked(sft_base, monkeypatch, capsys):
    """--ver_eval_examples above the problems evaluated: the first sample of every problem, then the second ones;
    at or below it, one sample per problem as before."""
    import scripts.chat_cotrain as cotrain
    seen = []
    real = cotrain.own_solution_counts

    def recording(args, roles, task, rollouts, readings, judgements):
        seen.append([(r.example_index, r.text) for r in rollouts])
        return real(args, roles, task, rollouts, readings, judgements)

    monkeypatch.setattr(cotrain, "own_solution_counts", recording)
    base = TINY + ["--num_gen_steps", "1", "--gen_steps", "1", "--ver_steps", "0", "--verifier_warmup_steps", "0"]
    cotrain.main(base + ["--ver_eval_examples", "3", "--output_tag", "three"])
    assert [len(s) for s in seen] == [3, 3] and [i for i, _ in seen[0]] == [0, 1, 0]
    assert "of the generator's own solutions" not in capsys.readouterr().out
    seen.clear()
    cotrain.main(base + ["--ver_eval_examples", "2", "--output_tag", "two"])
    assert [[i for i, _ in s] for s in seen] == [[0, 1], [0, 1]]
    cotrain.main(base + ["--ver_eval_examples", "9", "--output_tag", "nine"])
    assert [len(s) for s in seen[2:]] == [4, 4]  # 2 problems x 2 samples at most
    assert "uses 2 (pass@k) and 4 of the generator's own solutions" in capsys.readouterr().out

