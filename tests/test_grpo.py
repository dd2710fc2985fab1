"""GRPO pieces checked against hand-computed values: advantages, the loss and its gradient, process
advantages, both co-training mixes, alpha's schedule, class balancing, and the update's variants."""

import codecs
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from nanochat.grpo import (Rollout, group_advantages, process_advantages, mix_advantages, alpha_schedule,
                           policy_gradient_loss, collate_rollouts, ClassBalancer, majority_answers, grpo_update,
                           apply_overlong, dynamic_sampling, load_reward_fn, checked_reward, rl_lr_multiplier,
                           token_pieces, rollout_flops, within_solution_advantages, token_advantages,
                           update_passes, balanced_choice)
from nanochat.gpt import GPT, GPTConfig


def test_group_advantages_mean_and_std():
    adv = group_advantages([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    adv = group_advantages([[1.0, 0.0, 0.0, 0.0]], normalize_std=True)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 4)
    assert torch.allclose(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (std + 1e-6), atol=1e-5)


def test_policy_gradient_loss_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[5, 6, 7, -1], [3, 4, -1, -1]])
    adv = torch.tensor([[0.5, 0.5, 0.5, 0.5], [-1.0, -1.0, -1.0, -1.0]])
    loss = policy_gradient_loss(logp, targets, adv)
    # on-policy: ratio 1, loss = -sum(A over valid tokens) / 5 tokens = -(1.5 - 2.0) / 5
    assert loss.item() == pytest.approx(0.1)
    loss.backward()
    expected = torch.tensor([[-0.1, -0.1, -0.1, 0.0], [0.2, 0.2, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expected)  # positive advantage pushes log p up (negative gradient)
    # sequence-level normalisation: mean per sequence, then mean over sequences
    seq_loss = policy_gradient_loss(logp.detach(), targets, adv, normalization="sequence")
    assert seq_loss.item() == pytest.approx((-0.5 + 1.0) / 2)


def test_ppo_clip_and_kl():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[math.log(0.25)]])  # ratio 2, clipped to 1.2 for a positive advantage
    targets = torch.tensor([[1]])
    loss = policy_gradient_loss(logp, targets, torch.tensor([[1.0]]), old_logp=old, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert logp.grad.abs().item() == 0.0  # clipped: no gradient
    ref = torch.tensor([[math.log(0.25)]])
    kl = policy_gradient_loss(logp.detach(), targets, torch.tensor([[0.0]]), ref_logp=ref, kl_coef=1.0)
    x = math.log(0.25) - math.log(0.5)
    assert kl.item() == pytest.approx(math.exp(x) - x - 1)


def test_process_advantages_hand_computed():
    # sample 0: steps end at tokens 1 and 3 with +1/2, -1/2; sample 1: steps end at 0 and 2, both +1/2
    adv = process_advantages([[0.5, -0.5], [0.5, 0.5]], [[1, 3], [0, 2]], length=4, normalize_std=True)
    pooled = torch.tensor([0.5, -0.5, 0.5, 0.5])
    mean, std = pooled.mean(), pooled.std(unbiased=False)
    up, down = (0.5 - mean) / (std + 1e-6), (-0.5 - mean) / (std + 1e-6)
    expected = torch.tensor([[up + down, up + down, down, down], [2 * up, up, up, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert up.item() == pytest.approx(0.57735, abs=1e-4) and down.item() == pytest.approx(-1.73205, abs=1e-4)
    # the default only centres (mean 0.25), like the outcome advantages without --normalize_std
    adv = process_advantages([[0.5, -0.5], [0.5, 0.5]], [[1, 3], [0, 2]], length=4)
    expected = torch.tensor([[0.25 - 0.75, 0.25 - 0.75, -0.75, -0.75], [0.5, 0.25, 0.25, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert adv.abs().max() <= 2  # a suffix sum of centred +-1/K rewards stays on the outcome's scale
    # a sample without a process signal (step-count mismatch) gets zeros
    adv = process_advantages([None, [1.0]], [[0], [0]], length=2)
    assert torch.all(adv[0] == 0)


def test_within_solution_credit_hand_computed():
    """--process_credit within: each token carries its step's verdict (+-1), the answer line and terminal
    token the last step's, minus the solution's token mean: zero sum per solution, zero past its end."""
    # sample 0: 6 tokens, steps end at tokens 1 and 3 (right, then wrong); tokens 4-5 follow the last step
    # sample 1: 3 tokens, one step, right; sample 2: no signal
    adv = within_solution_advantages([[0.5, -0.5], [1.0], None], [[1, 3], [1], [0]], lengths=[6, 3, 2], length=6)
    values = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    assert torch.allclose(adv[0], values - values.mean())
    assert torch.all(adv[1] == 0) and torch.all(adv[2] == 0)  # one verdict for the whole solution: nothing to move
    assert adv[0].sum().abs() < 1e-6 and adv[0, 0] > 0 > adv[0, 2]
    # within a solution, one wrong line and six wrong lines both get nothing: no credit for length
    within = within_solution_advantages([[-1.0], [-1 / 6] * 6], [[0], list(range(6))], lengths=[1, 6], length=6)
    assert torch.all(within == 0)


def test_return_to_go_gives_no_credit_for_extra_wrong_lines():
    """Regression: with +-1/K_i step rewards pooled over the group, one wrong line (-1), six wrong lines (-1/6
    each) and one right line (+1) gave the six-line solution more credit than the one-line wrong one (-0.25
    vs -0.875). On one scale per group (1 / mean step count = 3/8) the six lines get less."""
    adv = process_advantages([[-1.0], [-1 / 6] * 6, [1.0]], [[0], list(range(6)), [0]], length=6)
    mean = (-7 * 3 / 8 + 3 / 8) / 8
    assert adv[0, 0].item() == pytest.approx(-3 / 8 - mean)
    assert adv[1, 0].item() == pytest.approx(6 * (-3 / 8 - mean))
    assert adv[2, 0].item() == pytest.approx(3 / 8 - mean)
    assert adv[1, 0] < adv[0, 0] < 0 < adv[2, 0]


def test_token_advantages_with_within_credit():
    from tasks.verify import Judgement, Verification
    rollouts = [Rollout(0, [1], [5, 6, 7, 8], [1] * 4, reward=0.0), Rollout(0, [1], [5, 6], [1, 1], reward=1.0)]
    judgements = [Judgement(Verification([True, False], False), 2, [1, 3], [0.5, -0.5]),
                  Judgement(Verification([True], True), 1, [1], [1.0])]
    adv = token_advantages(rollouts, 2, alpha=0.3, judgements=judgements, credit="within")
    assert torch.allclose(adv[0], torch.tensor([0.7 * -0.5 + 0.3, 0.7 * -0.5 + 0.3, 0.7 * -0.5 - 0.3, 0.7 * -0.5 - 0.3]))
    assert torch.allclose(adv[1], torch.full((2,), 0.7 * 0.5))
    with pytest.raises(ValueError):
        token_advantages(rollouts, 2, alpha=0.3, judgements=judgements, credit="bogus")


def test_both_mixes_hand_computed():
    """The worked example in the docs: two samples, alpha 0.1."""
    outcome = group_advantages(torch.tensor([1.0, 0.0]))                    # [0.5, -0.5]
    proc = process_advantages([[0.5, -0.5], [0.5, 0.5]], [[1, 3], [0, 2]], length=4)
    mixed = mix_advantages(outcome, proc, 0.1)
    assert torch.allclose(mixed[0], 0.9 * 0.5 + 0.1 * proc[0])
    assert torch.allclose(mixed[1], 0.9 * -0.5 + 0.1 * proc[1])
    # --mix reward: r = r_o + alpha * (fraction of steps judged correct), one group baseline
    total = torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([0.5, 1.0])       # [1.05, 0.1]
    assert torch.allclose(group_advantages(total), torch.tensor([0.475, -0.475]))
    # alpha 0 leaves exactly the outcome advantage (the baseline)
    assert torch.equal(mix_advantages(outcome, proc, 0.0), outcome.unsqueeze(-1).expand(2, 4))


def test_alpha_schedule():
    assert alpha_schedule(0, 300) == pytest.approx(0.1)
    assert alpha_schedule(300, 300) == pytest.approx(0.001)
    assert alpha_schedule(150, 300) == pytest.approx(0.01)  # geometric midpoint
    assert alpha_schedule(1000, 300) == pytest.approx(0.001)
    assert alpha_schedule(5, 300, alpha_start=0.0) == 0.0


def test_class_balancer_upweights_the_rare_class():
    balancer = ClassBalancer(decay=0.8)
    labels = [1] + [0] * 19  # a generator right 5% of the time
    balancer.update(labels)
    weights = balancer.weights(labels)
    assert weights[0] / weights[1] == pytest.approx(math.sqrt(19), rel=1e-6)
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    balancer.update([1, 1, 0, 0])
    assert balancer.counts[1] == pytest.approx(0.8 * 1 + 0.2 * 2)
    restored = ClassBalancer()
    restored.load_state_dict(balancer.state_dict())
    assert restored.counts == balancer.counts


def test_majority_answers():
    assert majority_answers(["3", None, "4", "3"]) == "3"
    assert majority_answers([None, None]) is None


def test_collate_masks_prompt_and_forced_tokens():
    r = Rollout(0, prompt_ids=[1, 2, 3], completion_ids=[4, 5, 6, 7], completion_mask=[1, 0, 1, 1])
    inputs, targets, adv, weights = collate_rollouts([r], [torch.tensor([0.1, 0.2, 0.3, 0.4])], pad_id=0, device="cpu")
    assert inputs.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert targets.tolist() == [[-1, -1, 4, -1, 6, 7]]  # prompt and the forced token 5 are not trained
    assert torch.allclose(adv, torch.tensor([[0, 0, 0.1, 0.2, 0.3, 0.4]]))
    assert weights.tolist() == [1.0]


class _PlainSGD(torch.optim.SGD):
    """Stands in for MuonAdamW's step(grad_clip=...) signature."""

    def step(self, grad_clip=None):
        super().step()
        return None


def _tiny_policy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_grpo_update_raises_logprob_of_rewarded_completion():
    model = _tiny_policy()
    optimizer = _PlainSGD(model.parameters(), lr=0.5)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    good = Rollout(0, [1, 2], [3, 4], [1, 1])
    bad = Rollout(0, [1, 2], [5, 6], [1, 1])

    def logp(rollout):
        ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
        with torch.no_grad():
            return -model(ids[:, :-1], targets=ids[:, 1:], loss_reduction="none")[0, 1:].sum().item()

    before = logp(good), logp(bad)
    grpo_update(model, optimizer, [good, bad], [0.5, -0.5], pad_id=0, device="cpu", device_batch_size=1)
    after = logp(good), logp(bad)
    assert after[0] > before[0] and after[1] < before[1]


def test_micro_batching_does_not_change_the_update():
    rollouts = [Rollout(0, [1, 2], [3, 4, 5], [1, 1, 1]), Rollout(0, [1], [6, 7], [1, 0]), Rollout(1, [2, 3, 4], [8], [1])]
    results = []
    for device_batch_size in (1, 3):
        model = _tiny_policy()
        optimizer = _PlainSGD(model.parameters(), lr=0.1)
        for g in optimizer.param_groups:
            g["initial_lr"] = g["lr"]
        grpo_update(model, optimizer, rollouts, [1.0, -0.5, -0.5], pad_id=0, device="cpu", device_batch_size=device_batch_size)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_inverse_class_weights_balance_the_classes():
    balancer = ClassBalancer(decay=0.8, power=1.0)
    labels = [1] * 9 + [0]
    balancer.update(labels)
    weights = balancer.weights(labels)
    total_correct, total_incorrect = sum(weights[:9]), weights[9]
    assert abs(total_correct - total_incorrect) < 1e-9  # 1/count: each class carries the same total weight
    sqrt = ClassBalancer(decay=0.8, power=0.5)
    sqrt.update(labels)
    w = sqrt.weights(labels)
    assert abs(w[9] / w[0] - 3.0) < 1e-9  # 1/sqrt: the rare class weighs sqrt(9) = 3x per sample
    assert ClassBalancer(power=0.0).weights(labels) == [1.0] * 10


def test_collapse_guard_escalates_after_patience_and_resets():
    balancer = ClassBalancer(power=0.5, margin=0.3, patience=3, relative=0.0)  # the absolute margin alone
    assert not balancer.check_collapse(0.95, 0.5) and not balancer.check_collapse(0.9, 0.5)
    assert not balancer.check_collapse(0.6, 0.5)  # tracking again: the count restarts
    assert [balancer.check_collapse(0.0, 0.5) for _ in range(3)] == [False, False, True]
    assert balancer.power == 1.0 and not balancer.check_collapse(0.0, 0.5)  # escalates once
    assert balancer.pool == 1  # collapse_pool 1: weights only
    restored = ClassBalancer()
    restored.load_state_dict(balancer.state_dict())
    assert restored.power == 1.0 and restored.strikes == balancer.strikes and restored.shares == balancer.shares


def test_collapse_guard_fires_at_a_low_gold_share_and_turns_on_the_pool():
    """Seed 1 of dev/logs/cotrain_hard_learned: the generator is right ~12 % of the time and the verifier stops
    saying Correct. Never 0.3 off, yet a collapse: the relative test catches it on the moving averages (the
    first step sets them: said 0.1 vs gold 0.12 is fine, then said falls to 0 while gold stays 0.12)."""
    balancer = ClassBalancer(power=0.5, margin=0.3, patience=3, relative=0.5, pool=1, collapse_pool=4)
    said_share, gold_share = [0.1] + [0.0] * 8, [0.12] * 9
    fired = [balancer.check_collapse(said, gold) for said, gold in zip(said_share, gold_share)]
    # moving averages of said (decay 0.9): 0.1, 0.09, 0.081, 0.0729, 0.0656, 0.0590 (< 0.06: strike 1), 0.0531, 0.0478
    assert fired == [False] * 7 + [True, False]
    assert balancer.power == 1.0 and balancer.pool == 4
    restored = ClassBalancer(pool=1)
    restored.load_state_dict(balancer.state_dict())
    assert restored.pool == 4 and restored.shares == pytest.approx(balancer.shares)
    # a verifier that tracks a low gold share with noise (said 0.08-0.12 vs gold 0.1-0.14) never strays
    healthy = ClassBalancer(power=0.5, patience=3, relative=0.5, collapse_pool=4)
    assert not any(healthy.check_collapse(0.08 + 0.04 * (i % 2), 0.1 + 0.04 * (i % 3 == 0)) for i in range(50))
    assert healthy.strikes == 0 and healthy.pool == 1
    # the mirror image: a verifier that stops saying Incorrect to a generator right 90 % of the time
    mirror = ClassBalancer(power=1.0, patience=2, relative=0.5, collapse_pool=2)
    assert [mirror.check_collapse(1.0, 0.9) for _ in range(2)] == [False, True] and mirror.pool == 2
    # power 1 with the pool already there: nothing left to escalate
    done = ClassBalancer(power=1.0, patience=1, pool=4, collapse_pool=4)
    assert not done.check_collapse(0.0, 0.12)


# -----------------------------------------------------------------------------
# Loss aggregation, clip-higher, overlong, dynamic sampling, reward functions, LR schedule, diagnostics

def _two_rows():
    """Two sequences of 3 and 1 trained tokens with per-token values the tests can sum by hand."""
    targets = torch.tensor([[1, 1, 1, -1], [1, -1, -1, -1]])
    advantages = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    logp = torch.zeros(2, 4, requires_grad=True)  # on-policy: ratio 1, per-token loss = -advantage
    return logp, targets, advantages


def test_loss_aggregations_hand_computed():
    logp, targets, advantages = _two_rows()
    loss = lambda mode, **kw: policy_gradient_loss(logp, targets, advantages, normalization=mode, **kw).item()
    assert loss("token-mean") == pytest.approx(-(1 + 2 + 3 + 4) / 4)
    assert loss("token") == loss("token-mean")                                   # the older name
    assert loss("seq-mean-token-mean") == pytest.approx(-((1 + 2 + 3) / 3 + 4 / 1) / 2)
    assert loss("sequence") == loss("seq-mean-token-mean")
    assert loss("seq-mean-token-sum") == pytest.approx(-((1 + 2 + 3) + 4) / 2)
    assert loss("dr-grpo", max_completion_tokens=5) == pytest.approx(-(1 + 2 + 3 + 4) / (2 * 5))
    with pytest.raises(ValueError):
        loss("dr-grpo")  # needs the generation budget
    with pytest.raises(ValueError):
        loss("mean-of-everything")


def test_clip_higher_is_asymmetric():
    targets = torch.tensor([[1, 1, 1, 1]])
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[0.7, 1.3, 1.3, 0.7]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    logp = torch.log(ratios).requires_grad_()
    symmetric = policy_gradient_loss(logp, targets, advantages, old_logp=old, clip_eps=0.2).item()
    higher = policy_gradient_loss(logp, targets, advantages, old_logp=old, clip_eps=0.2, clip_high=0.28).item()
    # per token -min(r A, clip(r) A): A>0, r=0.7 -> 0.7; A>0, r=1.3 -> clipped to 1.2 (1.28 with clip-higher);
    # A<0, r=1.3 -> -1.3; A<0, r=0.7 -> clipped to -0.8
    assert symmetric == pytest.approx(-(0.7 + 1.2 - 1.3 - 0.8) / 4)
    assert higher == pytest.approx(-(0.7 + 1.28 - 1.3 - 0.8) / 4)


def test_overlong_penalty_and_mask():
    finished = Rollout(0, [1], [2, 3, 0], [1, 1, 1], reward=1.0, finished=True)        # body of 2 tokens
    near = Rollout(0, [1], [2] * 9 + [0], [1] * 10, reward=1.0, finished=True)         # body of 9 of 10
    cut = Rollout(0, [1], [2] * 10, [1] * 10, reward=1.0, finished=False)                # hit the budget
    penalties = apply_overlong([finished, near, cut], "penalty", max_new_tokens=10, buffer=4)
    assert penalties == [0.0, pytest.approx(3 / 4), 1.0]  # linear over the last 4 tokens of the budget
    assert [r.reward for r in (finished, near, cut)] == [1.0, pytest.approx(0.25), 0.0]
    apply_overlong([finished, cut], "mask", max_new_tokens=10, buffer=4)
    assert finished.completion_mask == [1, 1, 1] and cut.completion_mask == [0] * 10


def test_dynamic_sampling_stops_at_the_cap_and_early_when_it_can():
    rounds = []

    def always_zero(r):
        rounds.append(r)
        return [Rollout(r, [1], [2], [1], reward=0.0) for _ in range(4)]  # two groups of two, no variance

    rollouts, extra, short, left_out = dynamic_sampling(always_zero, group_size=2, wanted_groups=2, max_extra_rounds=3, device="cpu")
    assert rounds == [0, 1, 2, 3] and extra == 3 and short and len(rollouts) == 4  # bounded, batch shape kept
    assert [r.example_index for r in rollouts] == [0] * 4 and [r.example_index for r in left_out] == [1] * 4 + [2] * 4 + [3] * 4

    def mixed_from_round_one(r):
        rewards = [0.0, 0.0, 1.0, 0.0] if r else [0.0] * 4
        return [Rollout(r, [1], [2], [1], reward=x) for x in rewards]

    rollouts, extra, short, left_out = dynamic_sampling(mixed_from_round_one, group_size=2, wanted_groups=1, max_extra_rounds=5, device="cpu")
    assert extra == 1 and not short and [r.reward for r in rollouts] == [1.0, 0.0]
    assert len(left_out) == 6 and not {id(r) for r in left_out} & {id(r) for r in rollouts}  # each drawn rollout in one list


def test_reward_fn_loads_from_a_file_and_bad_specs_fail_clearly(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def length_bonus(conversation, text):\n    return len(text) / 10\n\n"
                    "def says_hi(conversation, text):\n    return 'hi'\n")
    fn = load_reward_fn(f"{path}:length_bonus")
    assert checked_reward(fn, {"messages": []}, "abcde") == 0.5
    with pytest.raises(ValueError, match="must return a number"):
        checked_reward(load_reward_fn(f"{path}:says_hi"), {}, "x")
    for spec, message in ((f"{path}:missing", "no function"), (f"{tmp_path}/nope.py:f", "no file"),
                          ("no_such_module_xyz:f", "could not be loaded"), ("justaname", "expected")):
        with pytest.raises(ValueError, match=message):
            load_reward_fn(spec)
    assert load_reward_fn("math:sqrt") is __import__("math").sqrt  # module:function


def test_rl_lr_schedules():
    assert [rl_lr_multiplier(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]  # nanochat's linear decay
    assert rl_lr_multiplier(3, 4, "constant") == 1.0
    assert rl_lr_multiplier(0, 4, "cosine") == 1.0 and rl_lr_multiplier(2, 4, "cosine") == pytest.approx(0.5)
    assert [rl_lr_multiplier(s, 10, "constant", warmup_steps=2) for s in range(3)] == [0.5, 1.0, 1.0]


def test_all_masked_microbatch_is_skipped_and_an_all_masked_batch_changes_nothing():
    model = _tiny_policy()
    optimizer = model.setup_optimizers(unembedding_lr=0.01, embedding_lr=0.01, matrix_lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    masked = [Rollout(0, [1, 2], [3, 4], [0, 0]), Rollout(0, [1, 2], [5, 6], [0, 0])]
    stats = grpo_update(model, optimizer, masked, [1.0, -1.0], 0, "cpu", device_batch_size=1)
    assert stats["skipped_step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # one trainable micro-batch and one without a trained token: the second is skipped and counted, no NaN
    mixed = [Rollout(0, [1, 2], [3, 4], [1, 1]), Rollout(0, [1, 2], [5, 6], [0, 0])]
    stats = grpo_update(model, optimizer, mixed, [1.0, -1.0], 0, "cpu", device_batch_size=1)
    assert stats["skipped_microbatches"] == 1 and stats["skipped_step"] == 0 and math.isfinite(stats["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_update_reports_the_true_token_entropy_and_grad_norm():
    model = _tiny_policy()
    optimizer = model.setup_optimizers(unembedding_lr=0.0, embedding_lr=0.0, matrix_lr=0.0)
    rollouts = [Rollout(0, [1, 2], [3, 4, 5], [1, 1, 1]), Rollout(0, [1], [6], [1])]
    with torch.no_grad():  # the hand computation: entropy of the policy at each trained position
        expected = []
        for r in rollouts:
            logits = model(torch.tensor([r.prompt_ids + r.completion_ids[:-1]]))[0].float()
            logp = torch.log_softmax(logits, -1)
            expected += (-(logp.exp() * logp).sum(-1))[len(r.prompt_ids) - 1:].tolist()
    stats = grpo_update(model, optimizer, rollouts, [1.0, -1.0], 0, "cpu", device_batch_size=2)
    assert stats["entropy"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert stats["grad_norm"] > 0


def test_token_texts_join_into_the_text_with_multibyte_characters(tiny_tokenizer):
    from tasks import verify
    text = "12+5 → 17 ✓\nthen 17*2 = 34 €\n#### 34"
    ids = tiny_tokenizer.encode(text)
    pieces = token_pieces(tiny_tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    # each step ends at the token that completes its last character
    assert verify.step_end_tokens(pieces) == [next(i for i, p in enumerate(pieces) if "✓" in p),
                                              next(i for i, p in enumerate(pieces) if "€" in p)]


def test_token_pieces_equal_an_incremental_decoder_on_any_ids(tiny_tokenizer):
    """The oracle: every token's bytes through one incremental UTF-8 decoder (how token_pieces was written
    before its table lookup). Random ids over the whole vocabulary, so partial characters, bytes that never
    complete one and special tokens all occur."""
    rng = random.Random(0)
    vocab = tiny_tokenizer.get_vocab_size()
    texts = tiny_tokenizer.token_texts()
    assert any(t is None for t in texts) and texts[ord("a")] == "a"  # lone bytes >= 0x80 are no text of their own
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        assert token_pieces(tiny_tokenizer, ids) == [decoder.decode(tiny_tokenizer.decode_bytes([t])) for t in ids]


def test_rollout_flops_counts_each_prompt_once_and_every_trained_token():
    """Sampling: one forward pass over each group's prompt and over every completion token; training: forward
    and backward over prompt and completion per pass. Checked against the count done by hand."""
    model = GPT(GPTConfig(sequence_len=32, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    per_token = model.estimate_flops()
    group = [Rollout(0, [1, 2, 3], [4, 5], [1, 1]), Rollout(0, [1, 2, 3], [6], [1])]  # one prompt, two samples
    assert rollout_flops(model, group, num_samples=2) == pytest.approx(per_token / 3 * (3 + 2 + 1))
    assert rollout_flops(model, group, num_samples=2, train_passes=2) == pytest.approx(per_token / 3 * 6 + per_token * 2 * (5 + 4))
    assert rollout_flops(model, group, num_samples=1) == pytest.approx(per_token / 3 * (3 + 3 + 2 + 1))
    assert rollout_flops(model, []) == 0
    # grpo_update's passes: one per epoch, a forward for old log-probs (epochs > 1) and for the KL reference
    assert update_passes() == 1 and update_passes(2) == pytest.approx(2 + 1 / 3)
    assert update_passes(2, kl_coef=0.1) == pytest.approx(2 + 2 / 3) and update_passes(1, kl_coef=0.1) == pytest.approx(4 / 3)


def test_answer_step_puts_an_early_stop_on_the_answer_tokens():
    """Two samples of one question, both wrong: one stops after two right lines, one writes a wrong third
    line. Without the answer step the early stop's right second line takes the whole penalty and its answer
    line (the tokens after the last step) none; with it the answer line pays most and the right lines less."""
    from tasks.verify import oracle_judge
    stop = ["a 1+1=", "<<1+1=2>>2.", "\n", "b 2*3=", "<<2*3=6>>6.", "\n#### ", "6"]
    wrong = ["a 1+1=", "<<1+1=2>>2.", "\n", "b 2*3=", "<<2*3=6>>6.", "\n", "c 6+2=", "<<6+2=9>>9.", "\n#### ", "9"]
    rollouts = [Rollout(0, [1], list(range(len(stop))), [1] * len(stop), reward=0.0),
                Rollout(0, [1], list(range(len(wrong))), [1] * len(wrong), reward=0.0)]
    early = {}
    for answer_step in (False, True):
        judgements = [oracle_judge(stop, [1, 1], False, answer_step), oracle_judge(wrong, [1, 1, 0], False, answer_step)]
        early[answer_step] = token_advantages(rollouts, 2, alpha=0.3, judgements=judgements, centre="steps")[0]
    assert early[False][4] < 0 and early[False][5] == 0 and early[False][6] == 0
    assert early[True][5] < early[True][4] and early[True][5] < 0 and early[True][6] < 0
    assert early[True][4] > early[False][4] and early[True][0] > 0
    # hand-computed: one scale 2/7 (1 / mean step count, 3 and 4 rewards), pooled mean (2/7)(4 - 3)/7
    mean = 2 / 49
    assert early[True][5].item() == pytest.approx(0.3 * (-2 / 7 - mean))
    assert early[True][4].item() == pytest.approx(0.3 * (2 / 7 - mean - 2 / 7 - mean))


def test_unwritten_steps_make_an_early_stop_score_the_same_as_a_wrong_attempt():
    """The same two wrong samples as above, for a problem that needs three steps. With the answer step alone the
    early stop's first token is credited above the attempt's (the attempt's wrong third line costs, the line
    the early stop never wrote costs nothing); with the missing step charged both first tokens are credited
    the same: stopping early no longer pays."""
    from tasks.verify import oracle_judge
    stop = ["a 1+1=", "<<1+1=2>>2.", "\n", "b 2*3=", "<<2*3=6>>6.", "\n#### ", "6"]
    wrong = ["a 1+1=", "<<1+1=2>>2.", "\n", "b 2*3=", "<<2*3=6>>6.", "\n", "c 6+2=", "<<6+2=9>>9.", "\n#### ", "9"]
    rollouts = [Rollout(0, [1], list(range(len(stop))), [1] * len(stop), reward=0.0),
                Rollout(0, [1], list(range(len(wrong))), [1] * len(wrong), reward=0.0)]
    first = {}
    for needed in (None, 3):
        judgements = [oracle_judge(stop, [1, 1], False, True, needed), oracle_judge(wrong, [1, 1, 0], False, True, needed)]
        adv = token_advantages(rollouts, 2, alpha=0.3, judgements=judgements, centre="steps")
        first[needed] = (adv[0][0].item(), adv[1][0].item())
    assert first[None][0] > first[None][1]
    assert first[3][0] == pytest.approx(first[3][1])


def test_progress_mix_scores_an_early_stop_like_a_wrong_attempt_and_below_a_right_step():
    """--mix progress, hand-computed: one group baseline over r_out + alpha * progress, a scalar per sample. A
    problem that needs three steps: a stop after one right step and an attempt whose second step is wrong both
    have progress 1/3; two right steps then a stop, 2/3; a right answer, 1."""
    from tasks.verify import oracle_judge
    one = ["a 1+1=", "<<1+1=2>>2.", "\n#### ", "2"]
    two = ["a 1+1=", "<<1+1=2>>2.", "\n", "b 2*3=", "<<2*3=6>>6.", "\n#### ", "6"]
    samples = [(one, [1], 0.0), (two, [1, 0], 0.0), (two, [1, 1], 0.0), (two, [1, 1], 1.0)]
    rollouts = [Rollout(0, [1], list(range(len(t))), [1] * len(t), reward=r) for t, _, r in samples]
    judgements = [oracle_judge(t, labels, bool(r), reference_steps=3) for t, labels, r in samples]
    assert [j.progress for j in judgements] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1.0])
    adv = token_advantages(rollouts, 4, alpha=0.5, judgements=judgements, mix="progress")
    totals = [0 + 0.5 / 3, 0 + 0.5 / 3, 0 + 1 / 3, 1 + 0.5]
    assert adv == pytest.approx([t - sum(totals) / 4 for t in totals])
    assert adv[0] == adv[1] < adv[2] < adv[3]
    # an all-wrong group still gets a signal; alpha 0 is plain GRPO
    flat = token_advantages(rollouts[:3], 3, alpha=0.5, judgements=judgements[:3], mix="progress")
    assert flat[2] > 0 > flat[0]
    assert token_advantages(rollouts, 4, alpha=0.0, judgements=judgements, mix="progress") == pytest.approx([-0.25] * 3 + [0.75])


def test_token_centring_removes_the_net_push_down_of_the_return_to_go():
    """Regression: centring step rewards leaves the return-to-go net negative over tokens (a late wrong step
    reaches every token before it). Hand-computed: samples with steps [+1, -1] ending at tokens 1, 3 and [+1]
    ending at 0, lengths 4 and 2, one scale 2/3: rewards [2/3, -2/3] and [2/3], pooled mean 2/9."""
    steps = process_advantages([[0.5, -0.5], [1.0]], [[1, 3], [0]], length=4)
    a, b, c = 2 / 3 - 2 / 9, -2 / 3 - 2 / 9, 2 / 3 - 2 / 9
    assert torch.allclose(steps, torch.tensor([[a + b, a + b, b, b], [c, 0, 0, 0]]))
    real_mean = (2 * (a + b) + 2 * b + c) / 6
    assert real_mean < 0  # the push down
    tokens = process_advantages([[0.5, -0.5], [1.0]], [[1, 3], [0]], length=4, lengths=[4, 2])
    assert torch.allclose(tokens[0], steps[0] - real_mean)
    assert torch.allclose(tokens[1, :2], steps[1, :2] - real_mean) and torch.all(tokens[1, 2:] == 0)  # padding stays 0
    assert abs(tokens[0].sum() + tokens[1, :2].sum()) < 1e-6
    # a sample without process signal is neither counted nor shifted
    none = process_advantages([[0.5, -0.5], None], [[1, 3], []], length=4, lengths=[4, 2])
    assert torch.all(none[1] == 0) and abs(none[0].sum()) < 1e-6
    # through token_advantages (the default) the process part sums to zero over a group's tokens
    rollouts = [Rollout(0, [1], [5, 6, 7, 8], [1] * 4, reward=0.0), Rollout(0, [1], [5, 6], [1, 1], reward=0.0)]
    from tasks.verify import Judgement, Verification
    judgements = [Judgement(Verification([True, False], False), 2, [1, 3], [0.5, -0.5]),
                  Judgement(Verification([True], False), 1, [0], [1.0])]
    adv = token_advantages(rollouts, 2, alpha=1.0, judgements=judgements)
    assert abs(adv[0].sum() + adv[1].sum()) < 1e-6
    with pytest.raises(ValueError):
        token_advantages(rollouts, 2, alpha=1.0, judgements=judgements, centre="bogus")


def test_balanced_choice_takes_half_of_each_class_and_fills_from_the_other():
    import random
    labels = [0] * 14 + [1] * 2  # a weak generator: 2 right of 16
    chosen = balanced_choice(labels, 8, random.Random(0))
    assert len(chosen) == len(set(chosen)) == 8 and sum(labels[i] for i in chosen) == 2  # both right ones, 6 wrong
    labels = [1, 0] * 8
    for seed in range(20):
        chosen = balanced_choice(labels, 6, random.Random(seed))
        assert sum(labels[i] for i in chosen) == 3
        odd = balanced_choice(labels, 5, random.Random(seed))
        assert sum(labels[i] for i in odd) in (2, 3)  # the odd one out goes to either class
    assert sorted(balanced_choice([0] * 5, 5, random.Random(1))) == list(range(5))  # one class only: all of it
    assert balanced_choice(labels, 6, random.Random(3)) == balanced_choice(labels, 6, random.Random(3))
    with pytest.raises(ValueError, match="cannot choose"):
        balanced_choice([0, 1], 3, random.Random(0))


def test_gated_mix_uses_the_step_signal_only_in_flat_groups():
    """--mix gated: a group whose rewards differ gets its outcome advantage untouched (no (1 - alpha) factor,
    no process term); an all-wrong group gets alpha x the process advantage, the same tensor the Tango mix
    would put there."""
    from tasks.verify import Judgement, Verification
    wrong_steps = Judgement(Verification([True, False], False), 2, [1, 3], [0.5, -0.5])
    right_steps = Judgement(Verification([True, True], False), 2, [1, 3], [0.5, 0.5])
    varied = [Rollout(0, [1], [5, 6, 7, 8], [1] * 4, reward=1.0), Rollout(0, [1], [5, 6, 7, 8], [1] * 4, reward=0.0)]
    flat = [Rollout(1, [1], [5, 6, 7, 8], [1] * 4, reward=0.0), Rollout(1, [1], [5, 6, 7, 8], [1] * 4, reward=0.0)]
    rollouts = varied + flat
    judgements = [right_steps, wrong_steps, right_steps, wrong_steps]
    gated = token_advantages(rollouts, 2, alpha=0.3, judgements=judgements, mix="gated")
    tango = token_advantages(rollouts, 2, alpha=0.3, judgements=judgements, mix="advantage")
    assert torch.equal(gated[0], torch.full((4,), 0.5)) and torch.equal(gated[1], torch.full((4,), -0.5))
    # hand-computed for the flat group: step rewards [0.5, 0.5] and [0.5, -0.5] (already on one scale), pooled
    # mean 0.25 -> centred [0.25, 0.25] and [0.25, -0.75] at tokens 1 and 3; suffix sums [0.5, 0.5, 0.25, 0.25]
    # and [-0.5, -0.5, -0.75, -0.75]; their mean over the group's 8 tokens is -0.125, subtracted; times alpha
    assert torch.allclose(gated[2], 0.3 * torch.tensor([0.625, 0.625, 0.375, 0.375]))
    assert torch.allclose(gated[3], 0.3 * torch.tensor([-0.375, -0.375, -0.625, -0.625]))
    proc = process_advantages([[0.5, 0.5], [0.5, -0.5]], [[1, 3], [1, 3]], 4, lengths=[4, 4])
    assert torch.allclose(gated[2], tango[2]) and torch.allclose(gated[3], tango[3])
    assert not torch.allclose(gated[2], torch.zeros(4))  # the flat group does get a signal
    assert not torch.allclose(tango[0], gated[0])        # and the Tango mix differs on the varied group
    # an all-right group is flat too
    all_right = [Rollout(0, [1], [5, 6, 7, 8], [1] * 4, reward=1.0)] * 2
    assert torch.allclose(token_advantages(all_right, 2, 0.3, [right_steps, wrong_steps], mix="gated")[1],
                          0.3 * proc[1])
    with pytest.raises(ValueError):
        token_advantages(rollouts, 2, alpha=0.3, judgements=judgements, mix="bogus")


# -----------------------------------------------------------------------------
# --branch: restarting all-wrong groups from their longest judged-right prefix

def judged(verdicts, ends, aligned=True):
    from tasks.verify import Judgement, Verification
    verification = Verification(step_verdicts=list(verdicts), overall=all(verdicts), format_ok=True,
                                step_numbers=list(range(1, len(verdicts) + 1)))
    return Judgement(verification, len(verdicts) if aligned else len(verdicts) + 1, list(ends), None)


def test_right_prefix_counts_leading_right_steps_of_aligned_judgements():
    from nanochat.grpo import right_prefix
    assert right_prefix(judged([True, True, False, True], [1, 3, 5, 7])) == 2
    assert right_prefix(judged([True, True], [1, 3])) == 2
    assert right_prefix(judged([False, True], [1, 3])) == 0
    assert right_prefix(judged([True, True], [1, 3], aligned=False)) == 0  # verdicts that cannot be placed
    assert right_prefix(None) == 0


def test_branch_points_pick_the_longest_right_prefix_of_all_wrong_groups_only():
    from nanochat.grpo import branch_points

    def rollout(correct, length=10):
        r = Rollout(0, [1, 2], list(range(100, 100 + length)) + [7], [1] * (length + 1), finished=True)
        r.info["correct"] = correct
        return r
    rollouts = [rollout(1), rollout(0),                 # group 0: has a right sample: left alone
                rollout(0), rollout(0),                 # group 1: the second sample has the longer right prefix
                rollout(0), rollout(0),                 # group 2: no sample has a right first step
                rollout(0, length=4), rollout(0)]       # group 3: tie at one right step: the first sample wins
    judgements = [judged([True], [3]), judged([True, True], [2, 5]),
                  judged([True, False], [2, 6]), judged([True, True, False], [1, 4, 8]),
                  judged([False], [3]), judged([False, True], [2, 6]),
                  judged([True, False], [1, 3]), judged([True], [2])]
    def where(points):
        return [(start, next(i for i, r in enumerate(rollouts) if r is source), cut) for start, source, cut in points]
    assert where(branch_points(rollouts, judgements, 2, max_new_tokens=96)) == [(2, 3, 5), (6, 6, 2)]
    # a prefix that leaves no budget (or is the whole solution) is not a branch point
    assert where(branch_points(rollouts, judgements, 2, max_new_tokens=5)) == [(6, 6, 2)]
    assert branch_points(rollouts[6:], [judged([True, True], [1, 3]), judged([True], [2])], 2, 96) == []


class CharTokenizer:
    """ids are characters' code points; two specials for the end of a reply."""
    def encode_special(self, name):
        return {"<|assistant_end|>": 1, "<|bos|>": 0}[name]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class ScriptedEngine:
    """Returns fixed continuations and records what it was asked."""
    def __init__(self, continuations):
        self.continuations, self.calls = continuations, []

    def generate_prompts(self, prompts, num_samples, max_tokens, temperature, top_k, seed, line_headers=None):
        self.calls.append((prompts, num_samples, max_tokens))
        return [(list(c), [1] * len(c)) for c in self.continuations]


def test_continue_rollouts_keep_the_prefix_as_context_and_reward_the_whole_solution():
    from nanochat.grpo import continue_rollouts

    class Task:
        def reward(self, conversation, text):
            return float(text.endswith("=12"))

        def evaluate(self, conversation, text):
            return int(self.reward(conversation, text))
    prefix = [ord(c) for c in "3*4"]
    source = Rollout(5, [0, 9], prefix + [ord("?"), ord("!"), 1], [1] * 6, text="3*4?!", finished=True)
    source.info["conversation"] = {"q": 1}
    engine = ScriptedEngine([[ord("="), ord("1"), ord("2")], [ord("="), ord("1"), ord("3")],   # point 1
                             [ord("x")] * 9, [ord("="), ord("1")]])                              # point 2
    points = [(0, source, 3), (2, source, 1)]
    out = continue_rollouts(engine, CharTokenizer(), Task(), points, 2, max_new_tokens=8, temperature=1.0, top_k=None, seed=3)
    prompts, num_samples, max_tokens = engine.calls[0]
    assert prompts == [[0, 9] + prefix, [0, 9] + prefix[:1]] and num_samples == 2 and max_tokens == 8 - 1
    assert [r.text for r in out] == ["3*4=12", "3*4=13", "3" + "x" * 7, "3=1"]
    assert [r.reward for r in out] == [1.0, 0.0, 0.0, 0.0] and [r.info["correct"] for r in out] == [1, 0, 0, 0]
    assert out[0].prompt_ids == [0, 9] + prefix and out[0].completion_ids == [ord("="), ord("1"), ord("2"), 1]
    # point 2 has 8 - 1 = 7 tokens left: a 9-token continuation is cut there and is unfinished (no end token)
    assert out[2].completion_ids == [ord("x")] * 7 and not out[2].finished and out[2].completion_mask == [1] * 7
    assert out[3].finished and out[3].completion_ids[-1] == 1
    assert all(r.example_index == 5 and r.info["conversation"] == {"q": 1} for r in out)
    assert [r.info["branch_cut"] for r in out] == [3, 3, 1, 1]


def test_bench_token_pieces_smoke():
    out = subprocess.run([sys.executable, "-m", "dev.bench_token_pieces", "--samples", "4", "--tokens", "8", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert [r["solutions"] for r in summary["results"]] == ["random ids", "task text"]
    assert all(r["before_s"] > 0 and r["now_s"] > 0 for r in summary["results"])
    bad = subprocess.run([sys.executable, "-m", "dev.bench_token_pieces", "--samples", "0"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "must be positive" in bad.stderr
