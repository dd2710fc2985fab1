"""GRPO pieces checked against hand-computed values: advantages, the loss and its gradient, process
advantages, both co-training mixes, alpha's schedule, class balancing, and the update's variants."""

import math

import pytest
import torch

from nanochat.grpo import (Rollout, group_advantages, process_advantages, mix_advantages, alpha_schedule,
                           policy_gradient_loss, collate_rollouts, ClassBalancer, majority_answers, grpo_update)
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
    adv = process_advantages([[0.5, -0.5], [0.5, 0.5]], [[1, 3], [0, 2]], length=4)
    pooled = torch.tensor([0.5, -0.5, 0.5, 0.5])
    mean, std = pooled.mean(), pooled.std(unbiased=False)
    up, down = (0.5 - mean) / (std + 1e-6), (-0.5 - mean) / (std + 1e-6)
    expected = torch.tensor([[up + down, up + down, down, down], [2 * up, up, up, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert up.item() == pytest.approx(0.57735, abs=1e-4) and down.item() == pytest.approx(-1.73205, abs=1e-4)
    # a sample without a process signal (step-count mismatch) gets zeros
    adv = process_advantages([None, [1.0]], [[0], [0]], length=2)
    assert torch.all(adv[0] == 0)


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
    balancer = ClassBalancer(power=0.5, margin=0.3, patience=3)
    assert not balancer.check_collapse(0.95, 0.5) and not balancer.check_collapse(0.9, 0.5)
    assert not balancer.check_collapse(0.6, 0.5)  # tracking again: the count restarts
    assert [balancer.check_collapse(0.0, 0.5) for _ in range(3)] == [False, False, True]
    assert balancer.power == 1.0 and not balancer.check_collapse(0.0, 0.5)  # escalates once
    restored = ClassBalancer()
    restored.load_state_dict(balancer.state_dict())
    assert restored.power == 1.0 and restored.strikes == balancer.strikes
