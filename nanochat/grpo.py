"""
GRPO building blocks shared by single-model RL (scripts/chat_rl.py) and co-training
(scripts/chat_cotrain.py): rollouts, group advantages, the process (step-level) advantage, the
advantage mix, and the policy-gradient update.

The defaults are the nanochat flavour of GRPO: on-policy, one optimizer step per batch, advantage =
reward - group mean, token-level normalisation of the loss, no reference model and no KL. The known
variants are flags: std division, sequence-level normalisation, a PPO-style clipped ratio when one batch
feeds several optimizer steps, and a k3 KL penalty to a frozen reference policy.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat.common import autocast_context, all_gather_list, all_reduce_sums, is_distributed


@dataclass
class Rollout:
    """One sampled completion of one prompt. `completion_ids` ends with <|assistant_end|> when the sample
    finished (so the policy is trained to stop); `text` is the completion decoded without it."""
    example_index: int
    prompt_ids: list
    completion_ids: list
    completion_mask: list            # 1 = sampled by the policy, 0 = forced (tool output)
    text: str = ""
    reward: float = 0.0
    info: dict = field(default_factory=dict)
    finished: bool = False

    @property
    def body_ids(self):
        """The completion without its terminal token: what the model said."""
        return self.completion_ids[:-1] if self.finished else self.completion_ids


def generate_rollouts(engine, tokenizer, prompts, example_indices, num_samples, max_new_tokens, temperature, top_k, seed):
    """Sample `num_samples` completions of every prompt in one batched pass (prompt-major order). The one
    place that turns Engine outputs into rollouts, and so the one place that handles <|assistant_end|>:
    the engine drops the terminal token, and a completion shorter than the budget ended with it."""
    outputs = engine.generate_prompts(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, seed=seed)
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    rollouts = []
    for i, (tokens, mask) in enumerate(outputs):
        p = i // num_samples
        tokens, mask = list(tokens), list(mask)
        text = tokenizer.decode(tokens)
        finished = len(tokens) < max_new_tokens
        if finished:
            tokens.append(assistant_end)
            mask.append(1)
        rollouts.append(Rollout(example_indices[p], list(prompts[p]), tokens, mask, text=text, finished=finished))
    return rollouts


def group_advantages(rewards, normalize_std=False, eps=1e-6):
    """rewards (..., G) -> reward minus group mean, optionally divided by the group std."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    adv = rewards - rewards.mean(dim=-1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)
    return adv


def process_advantages(step_rewards, step_ends, length, normalize=True, eps=1e-6):
    """Step-level advantage per token for one group (DeepSeekMath's process-supervision GRPO, as in Tango).

    step_rewards[i]: list of rewards for the steps of sample i (or None: no process signal for it);
    step_ends[i]: the completion-token index where each step ends. All step rewards of the group are
    pooled and normalised, then each token gets the sum of the normalised rewards of its own step and
    every later step (a suffix sum), so early tokens are credited for what follows them.
    Returns (G, length)."""
    pooled = [r for rewards in step_rewards if rewards for r in rewards]
    out = torch.zeros(len(step_rewards), length)
    if not pooled:
        return out
    pooled_t = torch.tensor(pooled)
    mean = pooled_t.mean()
    std = pooled_t.std(unbiased=False) if len(pooled) > 1 else torch.tensor(0.0)
    for i, (rewards, ends) in enumerate(zip(step_rewards, step_ends)):
        if not rewards:
            continue
        per_token = torch.zeros(length)
        for r, end in zip(rewards, ends):
            if end < length:
                per_token[end] += ((r - mean) / (std + eps)) if normalize else r
        out[i] = per_token.flip(0).cumsum(0).flip(0)
    return out


def mix_advantages(outcome_adv, process_adv, alpha):
    """Tango's advantage-level mix: (1 - alpha) * A_out (broadcast over tokens) + alpha * A_proc."""
    return (1.0 - alpha) * outcome_adv.unsqueeze(-1) + alpha * process_adv


def token_advantages(rollouts, num_samples, alpha=0.0, judgements=None, mix="advantage", normalize_std=False):
    """The advantage of every rollout (prompt-major groups of `num_samples`), ready for grpo_update: a scalar
    per rollout from the outcome rewards alone, or a per-token tensor once a process signal is mixed in.

    judgements[i] (tasks.verify.Judgement, or None without a verifier) carries rollout i's step rewards and
    step ends. mix="advantage" (Tango): (1 - alpha) A_out + alpha A_proc, each normalised on its own;
    mix="reward": one group baseline over r_out + alpha * (share of steps judged correct)."""
    rewards = torch.tensor([r.reward for r in rollouts]).view(-1, num_samples)
    if judgements is None or alpha <= 0:
        return group_advantages(rewards, normalize_std=normalize_std).view(-1).tolist()
    if mix == "reward":
        fractions = torch.tensor([j.process_fraction for j in judgements]).view(-1, num_samples)
        return group_advantages(rewards + alpha * fractions, normalize_std=normalize_std).view(-1).tolist()
    if mix != "advantage":
        raise ValueError(f"mix must be 'advantage' or 'reward', got {mix!r}")
    outcome = group_advantages(rewards, normalize_std=normalize_std).view(-1)
    out = []
    for start in range(0, len(rollouts), num_samples):
        group = range(start, start + num_samples)
        length = max(len(rollouts[i].completion_ids) for i in group)
        process = process_advantages([judgements[i].step_rewards for i in group],
                                     [judgements[i].step_ends for i in group], length)
        mixed = mix_advantages(outcome[start:start + num_samples], process, alpha)
        out += [mixed[k, :len(rollouts[i].completion_ids)] for k, i in enumerate(group)]
    return out


def alpha_schedule(step, total_steps, alpha_start=0.1, alpha_end=0.001):
    """Exponential decay from alpha_start at step 0 to alpha_end at total_steps (then held)."""
    if alpha_start <= 0:
        return 0.0
    if total_steps <= 0:
        return alpha_start
    kappa = math.log(alpha_start / alpha_end) / total_steps
    return max(alpha_end, alpha_start * math.exp(-kappa * step))


def majority_answers(answers):
    """The most common non-None answer of a group (ties: the first seen), for self-play rewards."""
    counts = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    return max(counts, key=counts.get) if counts else None


class ClassBalancer:
    """Per-sample loss weights proportional to 1/count^power of the sample's class (running count), renormalised
    to mean 1 over the batch. Keeps a verifier from learning "always Incorrect" from a generator that is right
    5% of the time. Counts are an exponential moving average across batches (Tango: decay 0.8, power 0.5;
    power 1 gives both classes equal total weight).

    It also watches for collapse: a verifier whose share of "Correct" verdicts strays more than `margin` from
    the gold share for `patience` verifier steps in a row gets 1/count weights from then on."""

    def __init__(self, decay=0.8, power=0.5, margin=0.3, patience=3):
        self.decay, self.power, self.margin, self.patience = decay, power, margin, patience
        self.counts = {0: 0.0, 1: 0.0}
        self.strikes = 0

    def update(self, labels):
        """Count this step's labels, gathered from every rank (the weights must agree across ranks)."""
        labels = all_gather_list(labels)
        for c in (0, 1):
            n = sum(1 for l in labels if int(l) == c)
            self.counts[c] = self.decay * self.counts[c] + (1 - self.decay) * n if self.counts[c] else float(n)

    def weights(self, labels):
        if self.power == 0:
            return [1.0] * len(labels)
        if self.power == 0.5:
            raw = [1.0 / math.sqrt(max(self.counts[int(l)], 1e-3)) for l in labels]
        else:
            raw = [max(self.counts[int(l)], 1e-3) ** -self.power for l in labels]
        mean = sum(raw) / len(raw) if raw else 1.0
        return [w / mean for w in raw]

    def check_collapse(self, share_said_correct, gold_share):
        """Call once per verifier step with global shares. Returns True on the step that escalates to 1/count."""
        if self.power == 0 or self.patience <= 0:
            return False
        self.strikes = self.strikes + 1 if abs(share_said_correct - gold_share) > self.margin else 0
        if self.strikes >= self.patience and self.power < 1.0:
            self.power = 1.0
            return True
        return False

    def state_dict(self):
        return {"decay": self.decay, "power": self.power, "strikes": self.strikes,
                "counts": {str(k): v for k, v in self.counts.items()}}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.power, self.strikes = state.get("power", 0.5), state.get("strikes", 0)
        self.counts = {int(k): v for k, v in state["counts"].items()}


# -----------------------------------------------------------------------------
# Batches and the loss

def collate_rollouts(rollouts, token_advantages, pad_id, device, sample_weights=None):
    """Rollouts -> (inputs, targets, advantages, weights), each (N, T) over the concatenated prompt+completion.

    targets are -1 on prompt tokens, forced tokens and padding: only sampled tokens are trained.
    token_advantages[i] is a scalar or a 1-D tensor over rollout i's completion tokens."""
    seqs = [r.prompt_ids + r.completion_ids for r in rollouts]
    T = max(len(s) for s in seqs) - 1
    N = len(rollouts)
    inputs = torch.full((N, T), pad_id, dtype=torch.long)
    targets = torch.full((N, T), -1, dtype=torch.long)
    advantages = torch.zeros(N, T)
    for i, (r, seq) in enumerate(zip(rollouts, seqs)):
        ids = torch.tensor(seq, dtype=torch.long)
        inputs[i, :len(seq) - 1] = ids[:-1]
        start = len(r.prompt_ids) - 1  # position whose target is the first completion token
        n = len(r.completion_ids)
        if n == 0:
            continue
        sampled = torch.tensor(r.completion_mask, dtype=torch.bool)
        target_span = torch.tensor(r.completion_ids, dtype=torch.long)
        targets[i, start:start + n] = torch.where(sampled, target_span, torch.full_like(target_span, -1))
        adv = torch.as_tensor(token_advantages[i], dtype=torch.float32)
        advantages[i, start:start + n] = adv if adv.dim() == 0 else adv[:n]
    weights = torch.ones(N) if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.float32)
    return inputs.to(device), targets.to(device), advantages.to(device), weights.to(device)


def token_logprobs(model, inputs, targets):
    """log p(target) per position (0 where target is -1)."""
    with autocast_context(inputs.device.type):
        nll = model(inputs, targets=targets, loss_reduction="none")
    return -nll.float()


def policy_gradient_loss(logp, targets, advantages, weights=None, old_logp=None, ref_logp=None, clip_eps=0.2,
                         kl_coef=0.0, normalization="token", normalizer=None):
    """The GRPO objective, as a loss to minimise, summed over this micro-batch and divided by `normalizer`.

    - ratio: exp(logp - old_logp), where old_logp is the sampling policy (detached logp when on-policy,
      so the value is 1 and the gradient is the plain REINFORCE gradient A * grad log p);
    - PPO clipping of the ratio at 1 +- clip_eps (only matters when old_logp is given);
    - optional k3 KL estimate to a frozen reference policy, exp(ref - logp) - (ref - logp) - 1;
    - normalization "token": sum over tokens / total tokens of the batch (DAPO, nanochat);
      "sequence": each sequence's mean over its tokens, summed / number of sequences (original GRPO).
    `normalizer` is the global count (tokens or sequences) over all micro-batches and ranks."""
    mask = (targets != -1).float()
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if ref_logp is not None and kl_coef > 0:
        log_ratio = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(log_ratio) - log_ratio - 1.0)
    per_token = per_token * mask
    if weights is not None:
        per_token = per_token * weights.unsqueeze(1)
    if normalization == "token":
        total = per_token.sum()
        normalizer = normalizer if normalizer is not None else mask.sum().clamp(min=1.0)
    elif normalization == "sequence":
        total = (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()
        normalizer = normalizer if normalizer is not None else float(len(targets))
    else:
        raise ValueError(f"normalization must be 'token' or 'sequence', got {normalization!r}")
    return total / normalizer


def grpo_update(model, optimizer, rollouts, token_advantages, pad_id, device, device_batch_size,
                sample_weights=None, normalization="token", ppo_epochs=1, clip_eps=0.2, ref_model=None,
                kl_coef=0.0, grad_clip=0.0, lr_multiplier=1.0):
    """One batch of rollouts -> `ppo_epochs` optimizer steps. With ppo_epochs=1 this is on-policy: no
    ratio, no clipping (the ratio is exactly 1). Returns stats for logging.

    Under DDP each rank holds its own rollouts. Each rank divides by (global count / world size): the
    optimizer averages gradients over ranks, so the result is the gradient of the global objective."""
    world = dist.get_world_size() if is_distributed() else 1
    inputs, targets, advantages, weights = collate_rollouts(rollouts, token_advantages, pad_id, device, sample_weights)
    num_tokens = (targets != -1).sum().item()
    count = num_tokens if normalization == "token" else len(rollouts)
    normalizer = max(all_reduce_sums([count], device)[0], 1.0) / world  # the optimizer averages over ranks

    old_logp, ref_logp = None, None
    if ppo_epochs > 1 or (ref_model is not None and kl_coef > 0):
        with torch.no_grad():
            if ppo_epochs > 1:
                old_logp = torch.cat([token_logprobs(model, inputs[i:i + device_batch_size], targets[i:i + device_batch_size])
                                      for i in range(0, len(inputs), device_batch_size)])
            if ref_model is not None and kl_coef > 0:
                ref_logp = torch.cat([token_logprobs(ref_model, inputs[i:i + device_batch_size], targets[i:i + device_batch_size])
                                      for i in range(0, len(inputs), device_batch_size)])

    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
    stats = {"loss": 0.0, "num_tokens": num_tokens, "clip_frac": 0.0, "entropy_proxy": 0.0}
    for _ in range(ppo_epochs):
        model.zero_grad(set_to_none=True)
        for i in range(0, len(inputs), device_batch_size):
            sl = slice(i, i + device_batch_size)
            logp = token_logprobs(model, inputs[sl], targets[sl])
            loss = policy_gradient_loss(
                logp, targets[sl], advantages[sl], weights[sl],
                old_logp=None if old_logp is None else old_logp[sl],
                ref_logp=None if ref_logp is None else ref_logp[sl],
                clip_eps=clip_eps, kl_coef=kl_coef, normalization=normalization, normalizer=normalizer)
            loss.backward()
            stats["loss"] += loss.item()
            mask = targets[sl] != -1
            stats["entropy_proxy"] += (-logp[mask]).sum().item()  # mean NLL of sampled tokens ~ entropy
            if old_logp is not None:
                ratio = torch.exp(logp.detach() - old_logp[sl])[mask]
                stats["clip_frac"] += ((ratio - 1).abs() > clip_eps).float().sum().item()
        grad_norm = optimizer.step(grad_clip=grad_clip if grad_clip > 0 else None)
        model.zero_grad(set_to_none=True)
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
    denom = max(num_tokens, 1) * ppo_epochs
    stats["entropy_proxy"] /= denom
    stats["clip_frac"] /= denom
    stats["loss"] /= ppo_epochs
    return stats


# -----------------------------------------------------------------------------
# Sampling and scoring a task, shared by chat_rl, chat_cotrain and their evaluations

def sample_and_score(engine, tokenizer, task, indices, num_samples, max_new_tokens, temperature, top_k, seed):
    """Rollouts for task examples `indices` (num_samples each), rewarded by the task's exact checker."""
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    rollouts = generate_rollouts(engine, tokenizer, prompts, indices, num_samples, max_new_tokens, temperature, top_k, seed)
    for j, r in enumerate(rollouts):
        r.info["conversation"] = conversations[j // num_samples]
        r.reward = float(task.reward(r.info["conversation"], r.text))
        r.info["correct"] = int(task.evaluate(r.info["conversation"], r.text))
    return rollouts


def rank_indices(step, per_step, rank, world_size, num_examples, from_end=False):
    """This rank's example indices for one step: the step's block of `per_step` examples (all ranks), strided
    over ranks, wrapping around the task. from_end counts from the other end of the split (co-training's
    verifier steps use it so their questions differ from the generator's)."""
    positions = [step * per_step + rank + world_size * i for i in range(per_step // world_size)]
    return [((num_examples - 1 - i) if from_end else i) % num_examples for i in positions]


def majority_vote(task, rollouts):
    """Self-play labels: 1 for the rollouts whose answer (as the task reads it) is the group's majority answer.
    `rollouts` is one group (all of one prompt)."""
    answers = [task.extract_answer(r.info["conversation"], r.text) for r in rollouts]
    majority = majority_answers(answers)
    return [int(majority is not None and a == majority) for a in answers]


def pass_at_k(engine, tokenizer, task, indices, k, max_new_tokens, temperature, top_k, seed):
    """Per-example counts, to be summed over ranks by the caller: pass@1 (estimated without bias as the
    fraction of the k samples that are correct) and pass@k (any of the k is correct).
    Returns (num_examples, pass1_sum, passk_count, rollouts)."""
    rollouts = sample_and_score(engine, tokenizer, task, indices, k, max_new_tokens, temperature, top_k, seed)
    pass1 = passk = 0
    for p in range(len(indices)):
        group = rollouts[p * k:(p + 1) * k]
        pass1 += sum(r.info["correct"] for r in group) / k
        passk += any(r.info["correct"] for r in group)
    return len(indices), pass1, passk, rollouts
