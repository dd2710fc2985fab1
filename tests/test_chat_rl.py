"""scripts/chat_rl.py at toy size: every GRPO variant flag reaches the update and changes it, an interrupted
run resumes exactly, and a few steps raise the reward on average over seeds (on a reward a tiny random
model can learn: the arithmetic problems themselves are out of its reach)."""

import os

import pytest
import torch

from nanochat.checkpoint_manager import find_last_step, load_checkpoint

COMMON = ["--model_tag", "d2", "--task", "arithmetic", "--examples_per_step", "2", "--num_samples", "3",
          "--max_new_tokens", "10", "--device_batch_size", "6", "--eval_examples", "0", "--eval_every", "0",
          "--eval_samples", "2", "--device_type", "cpu", "--seed", "5"]


def graded_reward(self, conversation, text):
    """Three reward levels, so that groups have different spreads (std division then rescales them unequally)."""
    return (len(text) % 3) / 2


def final_weights(tag):
    directory = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "chatrl_checkpoints", tag)
    data, _, meta = load_checkpoint(directory, find_last_step(directory), "cpu")
    return data, meta


@pytest.fixture()
def graded(sft_base, monkeypatch):
    from tasks.arithmetic import ArithmeticTask
    monkeypatch.setattr(ArithmeticTask, "reward", graded_reward)
    return sft_base


VARIANTS = {
    "std": (["--normalize_std"], {}),
    "sequence": (["--normalization", "sequence"], {"normalization": "seq-mean-token-mean"}),
    "ppo": (["--ppo_epochs", "2", "--clip_eps", "0.1"], {"ppo_epochs": 2, "clip_eps": 0.1}),
    "kl": (["--kl_coef", "0.5"], {"kl_coef": 0.5}),
}


def test_each_variant_flag_reaches_the_update_and_changes_it(graded, monkeypatch):
    import scripts.chat_rl as chat_rl
    calls = []
    real_update, real_advantages = chat_rl.grpo_update, chat_rl.group_advantages

    def recording_update(model, optimizer, rollouts, advantages, *args, **kwargs):
        calls[-1]["update"] = kwargs
        calls[-1]["advantages"] = list(advantages)
        return real_update(model, optimizer, rollouts, advantages, *args, **kwargs)

    def recording_advantages(rewards, normalize_std=False):
        calls.append({"normalize_std": normalize_std})
        return real_advantages(rewards, normalize_std=normalize_std)

    import nanochat.grpo as grpo
    real_sample = grpo.sample_and_score

    def uneven_lengths(*args, **kwargs):
        # a random tiny model rarely stops early, and with equal lengths sequence- and token-level
        # normalisation coincide: cut completions to different lengths (in every run alike)
        rollouts = real_sample(*args, **kwargs)
        for i, r in enumerate(rollouts):
            keep = max(1, len(r.completion_ids) - 3 * (i % 3))
            r.completion_ids, r.completion_mask = r.completion_ids[:keep], r.completion_mask[:keep]
        return rollouts

    monkeypatch.setattr(grpo, "sample_and_score", uneven_lengths)
    monkeypatch.setattr(chat_rl, "grpo_update", recording_update)
    monkeypatch.setattr(chat_rl, "group_advantages", recording_advantages)
    chat_rl.main(COMMON + ["--num_steps", "2", "--output_tag", "default"])
    default_calls = list(calls)
    assert default_calls[0]["update"]["normalization"] == "token-mean" and default_calls[0]["update"]["ppo_epochs"] == 1
    assert default_calls[0]["update"]["ref_model"] is None and not default_calls[0]["normalize_std"]
    default, _ = final_weights("default")
    for name, (flags, expected) in VARIANTS.items():
        calls.clear()
        chat_rl.main(COMMON + ["--num_steps", "2", "--output_tag", name] + flags)
        for key, value in expected.items():
            assert calls[0]["update"][key] == value, (name, key)
        if name == "std":
            assert calls[0]["normalize_std"]
            assert calls[0]["advantages"] != default_calls[0]["advantages"]  # same samples, rescaled groups
        if name == "kl":
            assert calls[0]["update"]["ref_model"] is not None
        weights, meta = final_weights(name)
        assert any(not torch.equal(weights[k], default[k]) for k in default), f"--{name} changed nothing"
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_interrupted_run_resumes_exactly(graded, monkeypatch):
    import scripts.chat_rl as chat_rl
    flags = COMMON + ["--num_steps", "4", "--save_every", "1"]
    chat_rl.main(flags + ["--output_tag", "straight"])

    real_update = chat_rl.grpo_update
    count = {"n": 0}

    def crash_on_third(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 3:
            raise KeyboardInterrupt("simulated crash in step 2")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(chat_rl, "grpo_update", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        chat_rl.main(flags + ["--output_tag", "resumed"])
    directory = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "chatrl_checkpoints", "resumed")
    assert find_last_step(directory) == 1  # steps 0 and 1 were saved, step 2 died
    monkeypatch.setattr(chat_rl, "grpo_update", real_update)
    history = chat_rl.main(flags + ["--output_tag", "resumed", "--resume"])
    assert [r["step"] for r in history["train"]] == [2, 3]
    a, meta_a = final_weights("straight")
    b, meta_b = final_weights("resumed")
    assert meta_a["loop_state"] == meta_b["loop_state"] == {"next_step": 4}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_keep_graphs_reaches_the_engine(graded, monkeypatch):
    """--keep_graphs (off by default) makes the Engine keep its captured graphs between rollouts."""
    import scripts.chat_rl as chat_rl

    class Made(Exception):
        pass

    def engine(*args, **kwargs):
        raise Made(kwargs["keep_graphs"])
    monkeypatch.setattr(chat_rl, "Engine", engine)
    kept = []
    for extra in ([], ["--keep_graphs"]):
        with pytest.raises(Made) as made:
            chat_rl.main(COMMON + ["--num_steps", "1", "--output_tag", "keep_graphs"] + extra)
        kept.append(made.value.args[0])
    assert kept == [False, True]


def test_resume_without_a_checkpoint_fails_clearly(graded):
    import scripts.chat_rl as chat_rl
    with pytest.raises((SystemExit, FileNotFoundError)) as error:
        chat_rl.main(COMMON + ["--num_steps", "1", "--output_tag", "never_ran", "--resume"])
    assert "never_ran" in str(error.value) or "checkpoint" in str(error.value).lower()


def test_a_few_steps_raise_the_reward_on_average_over_seeds(sft_base, monkeypatch):
    """Reward: the share of completion characters that are digits, which a tiny random model can learn to
    raise (the real arithmetic answers are out of its reach at this size). Four seeds, eight steps each at a
    high learning rate: the mean reward of the last two steps beats that of the first two on average."""
    import scripts.chat_rl as chat_rl
    from tasks.arithmetic import ArithmeticTask
    monkeypatch.setattr(ArithmeticTask, "reward",
                        lambda self, conversation, text: sum(c.isdigit() for c in text) / max(len(text), 1))
    gains = []
    for seed in range(4):
        flags = ["--model_tag", "d2", "--task", "arithmetic", "--examples_per_step", "4", "--num_samples", "8",
                 "--max_new_tokens", "8", "--device_batch_size", "32", "--eval_examples", "0", "--eval_every", "0",
                 "--device_type", "cpu", "--num_steps", "8", "--init_lr_frac", "1.0", "--seed", str(seed),
                 "--output_tag", f"seed{seed}", "--save_every", "0"]
        history = chat_rl.main(flags)["train"]
        rewards = [r["reward"] for r in history]
        gains.append(sum(rewards[-2:]) / 2 - sum(rewards[:2]) / 2)
    print("reward gain per seed:", gains)
    assert sum(gains) / len(gains) > 0.02, gains


@pytest.mark.parametrize("task", ["gsm8k", "aqua", "arithmetic"])
def test_two_steps_and_evaluations_on_every_rl_task(sft_base, task):
    """chat_rl trains and evaluates on every task in RL_TASKS (AQuA's first evaluation once crashed)."""
    import scripts.chat_rl as chat_rl
    from tasks.by_name import RL_TASKS
    assert task in RL_TASKS
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    flags = [f for f in COMMON if f not in ("arithmetic",)]
    flags[flags.index("--task") + 1:flags.index("--task") + 1] = [task]
    result = chat_rl.main(flags + ["--data_dir", fixtures, "--num_steps", "2", "--eval_every", "1", "--eval_examples", "2",
                                   "--output_tag", f"every_{task}"])
    assert len(result["train"]) == 2 and 0 <= result["final"]["pass@1"] <= 1
    assert {"answered", "top_answer_share"} <= set(result["train"][0])
    _, meta = final_weights(f"every_{task}")
    assert meta["task"] == task


def test_eval_split_val_evaluates_on_the_validation_problems(sft_base, monkeypatch):
    import scripts.chat_rl as chat_rl
    from tasks.by_name import build_rl_task
    built = []
    monkeypatch.setattr(chat_rl, "build_rl_task", lambda *a, **k: built.append(a[1]) or build_rl_task(*a, **k))
    evaluated = []
    real = chat_rl.pass_at_k
    monkeypatch.setattr(chat_rl, "pass_at_k", lambda engine, tok, task, *a, **k: evaluated.append(task.seed) or real(engine, tok, task, *a, **k))
    chat_rl.main(COMMON + ["--num_steps", "1", "--eval_examples", "2", "--eval_split", "val", "--output_tag", "val_split"])
    assert built == ["train", "val"] and evaluated and set(evaluated) == {1}  # the val problems' seed


def test_new_grpo_flags_reach_the_update_and_change_it(graded, monkeypatch, tmp_path, capsys):
    """--loss_agg, --clip_high, --overlong, --reward_fn and --lr_schedule each reach grpo_update (or the
    rewards) and change the trained weights; dynamic sampling on a reward that is always 0 stops at its cap."""
    import scripts.chat_rl as chat_rl
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text("def vowels(conversation, text):\n    return sum(c in 'aeiou' for c in text) / 10\n\n"
                           "def zero(conversation, text):\n    return 0.0\n\ndef word(conversation, text):\n    return 'good'\n")
    calls = []
    real_update = chat_rl.grpo_update

    def recording_update(*args, **kwargs):
        calls.append(kwargs)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(chat_rl, "grpo_update", recording_update)
    chat_rl.main(COMMON + ["--num_steps", "2", "--output_tag", "plain"])
    default, _ = final_weights("plain")
    variants = {
        "seqsum": (["--loss_agg", "seq-mean-token-sum"], {"normalization": "seq-mean-token-sum"}),
        "drgrpo": (["--loss_agg", "dr-grpo"], {"normalization": "dr-grpo", "max_completion_tokens": 10}),
        "cliphigh": (["--ppo_epochs", "2", "--clip_low", "0.1", "--clip_high", "0.28"], {"clip_eps": 0.1, "clip_high": 0.28}),
        "overlong": (["--overlong", "penalty", "--overlong_buffer", "6"], {}),
        "rewardfn": (["--reward_fn", f"{reward_file}:vowels"], {}),
        "constant": (["--lr_schedule", "constant", "--warmup_steps", "1"], {}),
    }
    for name, (flags, expected) in variants.items():
        calls.clear()
        result = chat_rl.main(COMMON + ["--num_steps", "2", "--output_tag", name] + flags)
        for key, value in expected.items():
            assert calls[0][key] == value, (name, key)
        if name == "drgrpo":
            # a random tiny model fills every completion to the budget, and then dr-grpo's divisor (sequences x
            # budget) equals token-mean's (tokens): same update. Its maths is checked in tests/test_grpo.py.
            continue
        weights, _ = final_weights(name)
        assert any(not torch.equal(weights[k], default[k]) for k in default), f"{name} changed nothing"
    assert result["train"][0]["lr_multiplier"] == 1.0 and result["train"][1]["lr_multiplier"] == 1.0
    for key in ("entropy", "grad_norm", "truncated", "length_max", "clip_frac", "kl", "reward/task", "skipped_microbatches"):
        assert key in result["train"][0], key
    capsys.readouterr()
    result = chat_rl.main(COMMON + ["--num_steps", "1", "--output_tag", "dyn", "--reward_fn", f"{reward_file}:zero",
                                    "--dynamic_sampling", "2"])
    assert result["train"][0]["dynamic_sampling_rounds"] == 2 and result["train"][0]["zero_variance_groups"] == 1.0
    assert "dynamic sampling stopped at its cap" in capsys.readouterr().out
    with pytest.raises(ValueError, match="must return a number"):
        chat_rl.main(COMMON + ["--num_steps", "1", "--output_tag", "bad", "--reward_fn", f"{reward_file}:word"])
    for bad in (["--reward_fn", f"{reward_file}:nothing"], ["--clip_low", "1.5"], ["--clip_high", "-0.1"], ["--difficulty", "7"]):
        with pytest.raises(SystemExit):
            chat_rl.get_args(COMMON + bad)


def test_nonfinite_weights_stop_the_run_and_resume_loads_the_last_finite_checkpoint(graded, monkeypatch):
    """An absurd learning rate makes the first update non-finite: the run stops with one clear error and
    saves nothing. A run whose third update blows up stops there; --resume then continues from the last
    (finite) checkpoint, and a checkpoint written by a different run config is refused."""
    import scripts.chat_rl as chat_rl
    from nanochat.checkpoint_manager import NonFiniteWeightsError, ResumeMismatchError
    # (weights this large are still finite numbers, but the next forward overflows: the guard's probe sees it)
    with pytest.raises(NonFiniteWeightsError, match="step 0 left non-finite weights .* last finite checkpoint is none"):
        chat_rl.main(COMMON + ["--num_steps", "2", "--save_every", "1", "--init_lr_frac", "1e30", "--output_tag", "absurd"])
    assert find_last_step_or_none("absurd") is None  # nothing was saved

    real_update = chat_rl.grpo_update
    count = {"n": 0}

    def blow_up_third(model, *args, **kwargs):
        stats = real_update(model, *args, **kwargs)
        count["n"] += 1
        if count["n"] == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))  # what an exploding update leaves behind
        return stats

    monkeypatch.setattr(chat_rl, "grpo_update", blow_up_third)
    flags = COMMON + ["--num_steps", "4", "--save_every", "1", "--output_tag", "poisoned"]
    with pytest.raises(NonFiniteWeightsError, match="step 2 left non-finite weights .*step 1"):
        chat_rl.main(flags)
    assert find_last_step_or_none("poisoned") == 1  # nothing was saved for the poisoned step
    monkeypatch.setattr(chat_rl, "grpo_update", real_update)
    result = chat_rl.main(flags + ["--resume"])
    assert [r["step"] for r in result["train"]] == [2, 3]
    weights, _ = final_weights("poisoned")
    assert all(torch.isfinite(w).all() for w in weights.values())
    with pytest.raises(ResumeMismatchError, match="init_lr_frac"):
        chat_rl.main(flags + ["--resume", "--init_lr_frac", "0.5"])


def find_last_step_or_none(tag):
    directory = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "chatrl_checkpoints", tag)
    try:
        return find_last_step(directory)
    except FileNotFoundError:
        return None
