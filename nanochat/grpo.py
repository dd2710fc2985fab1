"""
GRPO building blocks shared by single-model RL (scripts/chat_rl.py) and co-training
(scripts/chat_cotrain.py): rollouts, group advantages, the process (step-level) advantage, the
advantage mix, and the policy-gradient update.

The defaults are the nanochat flavour of GRPO: on-policy, one optimizer step per batch, advantage =
reward - group mean, token-level normalisation of the loss, no reference model and no KL. The known
variants are flags: std division, sequence-level normalisation, a PPO-style clipped ratio when one batch
feeds several optimizer steps, and a k3 KL penalty to a frozen reference policy.
"""

import codecs
import functools
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import all_gather_list, all_reduce_dict, all_reduce_sums, autocast_context, is_distributed


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


def token_pieces(tokenizer, ids):
    """The text each token adds, so that the pieces join into exactly the decoded text (steps are located in
    it): a multi-byte character belongs to the token that completes it.

    A token whose bytes are whole characters, met with no character left open, is its own text (a table
    lookup); only from a partial character until the characters close again do the bytes go through an
    incremental decoder. The co-training step does this for every sample (at 256 samples of 256 tokens,
    0.072 s a step on our CPU when every token went through the decoder)."""
    texts = tokenizer.token_texts()
    pieces, decoder = [], None
    for t in ids:
        text = texts[t] if decoder is None else None
        if text is None:
            decoder = decoder or codecs.getincrementaldecoder("utf-8")(errors="replace")
            text = decoder.decode(tokenizer.decode_bytes([t]))
            if not decoder.getstate()[0]:  # no bytes of a character pending: the next token starts afresh
                decoder = None
        pieces.append(text)
    return pieces


def generate_rollouts(engine, tokenizer, prompts, example_indices, num_samples, max_new_tokens, temperature, top_k, seed,
                      line_headers=None):
    """Sample `num_samples` completions of every prompt in one batched pass (prompt-major order). The one
    place that turns Engine outputs into rollouts, and so the one place that handles <|assistant_end|>:
    the engine drops the terminal token, and a completion shorter than the budget ended with it.
    max_new_tokens: one budget, or one per prompt (the pass runs to the largest and each completion is cut
    to its prompt's, which is what a pass with that budget would have given that row)."""
    per_prompt = isinstance(max_new_tokens, (list, tuple))
    budgets = max_new_tokens if per_prompt else [max_new_tokens] * len(prompts)
    longest = max(budgets, default=0) if per_prompt else max_new_tokens
    outputs = engine.generate_prompts(prompts, num_samples=num_samples, max_tokens=longest, temperature=temperature,
                                      top_k=top_k, seed=seed, line_headers=line_headers)
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    rollouts = []
    for i, (tokens, mask) in enumerate(outputs):
        p = i // num_samples
        tokens, mask = list(tokens)[:budgets[p]], list(mask)[:budgets[p]]
        text = tokenizer.decode(tokens)
        finished = len(tokens) < budgets[p]
        if finished:
            tokens.append(assistant_end)
            mask.append(1)
        rollouts.append(Rollout(example_indices[p], list(prompts[p]), tokens, mask, text=text, finished=finished))
    return rollouts


def score_rollout(task, rollout, conversation):
    """Reward a rollout by the task's exact checker: its reward, and whether it is correct."""
    rollout.info["conversation"] = conversation
    rollout.reward = float(task.reward(conversation, rollout.text))
    rollout.info["correct"] = int(task.evaluate(conversation, rollout.text))


def group_advantages(rewards, normalize_std=False, eps=1e-6):
    """rewards (..., G) -> reward minus group mean, optionally divided by the group std."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    adv = rewards - rewards.mean(dim=-1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)
    return adv


def process_advantages(step_rewards, step_ends, length, normalize_std=False, eps=1e-6, lengths=None):
    """Step-level advantage per token for one group (DeepSeekMath's process-supervision GRPO, as in Tango).

    step_rewards[i]: list of rewards for the steps of sample i (or None: no process signal for it), +-1/K_i
    for K_i steps (or (2p - 1)/K_i); step_ends[i]: the completion-token index where each step ends. Each
    sample's rewards are put on one scale for the whole group, +-1 / (mean step count of the group), then
    pooled and centred (and divided by their std with normalize_std, like the outcome advantages); each
    token gets the sum of the centred rewards of its own step and every later step (a suffix sum), so early
    tokens are credited for what follows them.

    Why one scale per group: with +-1/K_i per sample, a solution's first token gets (sum of its rewards)
    - K_i x (pooled mean), and where most steps are wrong (the mean is negative) more lines earned more:
    six wrong lines at -1/6 each scored above one wrong line at -1. With one scale every extra wrong line
    adds a non-positive amount. Why not always divide by the std, as DeepSeekMath does: step rewards are
    small, so the division blows them up to ~+-1 each and a K-step suffix sum to ~K, several times the
    scale of the outcome advantage (centred 0/1) it is mixed with. At alpha 0.3 that swamped the outcome:
    an oracle-verifier run wrote garbage after its calculations by update 50. Centred only, a suffix sum
    stays on the outcome's scale.

    lengths (each sample's number of completion tokens; --process_centre tokens, the default): the result is
    also centred over the group's tokens. Why: centring step rewards does not centre the return-to-go over
    tokens, because a step's reward reaches every token before it, and late steps (most often wrong: an error
    carries forward) reach the most tokens. Measured on the SFT d4 generator at arithmetic preset 2 (16 groups
    x 8): mean process advantage per token -0.08, 69-78 % of sampled tokens pushed down, where the outcome
    advantage of an all-wrong group is 0. That net push down raised the entropy until the oracle generator wrote
    garbage mid-line (held-out pass@1 0.08 -> 0.02 in 100 updates against GRPO's 0.12, dev/cotrain_hard.md).
    Returns (G, length)."""
    out = torch.zeros(len(step_rewards), length)
    signalled = [rewards for rewards in step_rewards if rewards]
    if not signalled:
        return out
    scale = len(signalled) / sum(len(rewards) for rewards in signalled)  # 1 / mean step count
    scaled = [[r * len(rewards) * scale for r in rewards] if rewards else None for rewards in step_rewards]
    pooled_t = torch.tensor([r for rewards in scaled if rewards for r in rewards])
    mean = pooled_t.mean()
    std = pooled_t.std(unbiased=False) if len(pooled_t) > 1 else torch.tensor(0.0)
    for i, (rewards, ends) in enumerate(zip(scaled, step_ends)):
        if not rewards:
            continue
        per_token = torch.zeros(length)
        for r, end in zip(rewards, ends):
            if end < length:
                per_token[end] += ((r - mean) / (std + eps)) if normalize_std else (r - mean)
        out[i] = per_token.flip(0).cumsum(0).flip(0)
    if lengths is not None:
        signal = torch.tensor([bool(rewards) for rewards in step_rewards])
        real = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]) & signal[:, None]
        if real.any():
            out = torch.where(real, out - out[real].mean(), out)
    return out


def within_solution_advantages(step_rewards, step_ends, lengths, length):
    """Step-level credit inside each solution only (--process_credit within), for one group: every token
    gets its step's judgement rescaled to +-1 (x K, so +-1/K verdicts become +-1 and probability scores
    2p - 1), tokens after the last step (the answer line, the terminal token) the last step's, and then
    the solution's own token mean is subtracted. The result sums to zero over each solution, so it moves
    credit from the wrong steps of a solution to its right ones and never makes one solution preferable to
    another: that stays the outcome's job.

    Tried as an alternative to the return-to-go of process_advantages when that still gave extra wrong
    lines credit (since fixed there); with the labels of that time it did worse (dev/cotrain_experiment.md)
    and is off by default.
    lengths[i]: sample i's number of completion tokens. Returns (G, length), zero past each solution."""
    out = torch.zeros(len(step_rewards), length)
    for i, (rewards, ends) in enumerate(zip(step_rewards, step_ends)):
        if not rewards or lengths[i] == 0:
            continue
        values = torch.empty(lengths[i])
        start = 0
        for k, (r, end) in enumerate(zip(rewards, ends)):
            stop = lengths[i] if k == len(rewards) - 1 else min(end + 1, lengths[i])
            values[start:stop] = r * len(rewards)
            start = max(start, stop)
        out[i, :lengths[i]] = values - values.mean()
    return out


def mix_advantages(outcome_adv, process_adv, alpha):
    """Tango's advantage-level mix: (1 - alpha) * A_out (broadcast over tokens) + alpha * A_proc."""
    return (1.0 - alpha) * outcome_adv.unsqueeze(-1) + alpha * process_adv


def gated_advantages(outcome_adv, process_adv, rewards, alpha):
    """--mix gated, for one group: the outcome advantage alone where the group's rewards differ, and
    alpha * A_proc where every sample got the same reward (all wrong or all right), where the outcome
    advantage is zero and only the step signal can tell samples apart.

    Why: the Tango mix adds the process signal to groups the outcome already ranks, and it takes (1 - alpha)
    of the outcome with it; at arithmetic preset 2 most groups are flat (63 % of the baseline's), so the step
    signal is wanted there and nowhere else. outcome_adv, rewards: (G,); process_adv: (G, length)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if bool((rewards == rewards[0]).all()):
        return alpha * process_adv
    return outcome_adv.unsqueeze(-1).expand_as(process_adv).clone()


def reward_level_score(judgement, mix):
    """The one number per solution that a reward-level mix adds to the outcome (times alpha): the Judgement's
    progress for mix="progress", its share of steps judged correct otherwise (mix="reward", and what the
    advantage mixes log as their process reward)."""
    return judgement.progress if mix == "progress" else judgement.process_fraction


def token_advantages(rollouts, num_samples, alpha=0.0, judgements=None, mix="advantage", normalize_std=False, credit="return",
                     centre="tokens"):
    """The advantage of every rollout (prompt-major groups of `num_samples`), ready for grpo_update: a scalar
    per rollout from the outcome rewards alone, or a per-token tensor once a process signal is mixed in.

    judgements[i] (tasks.verify.Judgement, or None without a verifier) carries rollout i's step rewards and
    step ends. mix="advantage" (Tango): (1 - alpha) A_out + alpha A_proc, each normalised on its own;
    mix="gated": A_out in groups whose rewards differ, alpha A_proc in flat groups (gated_advantages);
    mix="reward": one group baseline over r_out + alpha * (share of steps judged correct); mix="progress": one
    group baseline over r_out + alpha * (share of the problem's chain right before the first error, the
    Judgement's progress: no per-token credit, so leaving a step out never pays). credit: the
    process advantage of the advantage mix, "return" (process_advantages, DeepSeekMath's return-to-go over
    group-centred step rewards) or "within" (within_solution_advantages: credit moved inside a solution);
    centre: "tokens" also centres the return-to-go over the group's tokens, "steps" only its step rewards
    (the behaviour before 2026-11-26; see process_advantages)."""
    if centre not in ("tokens", "steps"):
        raise ValueError(f"centre must be 'tokens' or 'steps', got {centre!r}")
    rewards = torch.tensor([r.reward for r in rollouts]).view(-1, num_samples)
    if judgements is None or alpha <= 0:
        return group_advantages(rewards, normalize_std=normalize_std).view(-1).tolist()
    if mix in ("reward", "progress"):
        scores = torch.tensor([reward_level_score(j, mix) for j in judgements]).view(-1, num_samples)
        return group_advantages(rewards + alpha * scores, normalize_std=normalize_std).view(-1).tolist()
    if mix not in ("advantage", "gated"):
        raise ValueError(f"mix must be 'advantage', 'gated', 'reward' or 'progress', got {mix!r}")
    outcome = group_advantages(rewards, normalize_std=normalize_std).view(-1)
    out = []
    for start in range(0, len(rollouts), num_samples):
        group = range(start, start + num_samples)
        lengths = [len(rollouts[i].completion_ids) for i in group]
        length = max(lengths)
        step_rewards, step_ends = [judgements[i].step_rewards for i in group], [judgements[i].step_ends for i in group]
        if credit == "within":
            process = within_solution_advantages(step_rewards, step_ends, lengths, length)
        elif credit == "return":
            process = process_advantages(step_rewards, step_ends, length, normalize_std=normalize_std,
                                         lengths=lengths if centre == "tokens" else None)
        else:
            raise ValueError(f"credit must be 'return' or 'within', got {credit!r}")
        if mix == "gated":
            mixed = gated_advantages(outcome[start:start + num_samples], process, rewards[start // num_samples], alpha)
        else:
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


def balanced_choice(labels, n, rng):
    """Indices of n of the samples with binary `labels`, half of each class where the pool has enough and
    the rest from the other class, in random order (rng: a random.Random). Loss weights cannot stand in
    for this: a verifier group (several readings of one solution) whose readings all agree has zero
    advantage whatever its weight, so a verifier that has stopped saying "Correct" learns nothing from the
    few right solutions a weak generator writes, and needs them in every batch before it drifts there."""
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot choose {n} of {len(labels)} samples")
    wrong = [i for i, label in enumerate(labels) if not int(label)]
    right = [i for i, label in enumerate(labels) if int(label)]
    rng.shuffle(wrong)
    rng.shuffle(right)
    num_wrong = min(len(wrong), n - min(len(right), n // 2 + n % 2 * rng.randrange(2)))
    chosen = right[:n - num_wrong] + wrong[:num_wrong]  # one class short: the other fills the rest
    rng.shuffle(chosen)
    return chosen


class ClassBalancer:
    """How the verifier's training batches weigh the two classes (right and wrong generator solutions).

    Loss weights: per sample proportional to 1/count^power of its class (running count), renormalised to mean 1
    over the batch. Keeps a verifier from learning "always Incorrect" from a generator that is right 5% of the
    time. Counts are an exponential moving average across batches (Tango: decay 0.8, power 0.5; power 1 gives
    both classes equal total weight). `pool`: how many times more solutions the generator writes than the
    verifier reads, so that each batch can be a class-balanced choice (chat_cotrain --ver_pool).

    Collapse guard: a verifier step "strays" when its share of "Correct" verdicts is more than `margin` off the
    gold share, or when, in moving averages of both shares (`share_decay`: ~10 steps, since one step's batch
    is small), either verdict is said less than `relative` times as often as it is true. After `patience`
    straying steps in a row the weights become 1/count and the pool grows to `collapse_pool`.
    Why the relative test: at a gold share of 0.12 a verifier that never says Correct is only 0.12 off, so the
    absolute margin never fires. Why a pool: once no reading says Correct, a group of readings that all agree
    has zero advantage whatever its weight, so only batches that hold right solutions bring Correct back
    (dev/cotrain_experiment.md, section 4). share_decay 0.9 and relative 0.5 were chosen by replaying the guard
    over the shares logged by 11 co-training runs (dev/replay_collapse_guard.py): it fires on the one that
    collapsed (at verifier step 18 of 33; before that its small batches mostly held no right solution, so the
    collapse could not be told from a healthy verifier's lull) and on none of the other 10; with the counts'
    decay 0.8 it also fired on two healthy runs."""

    def __init__(self, decay=0.8, power=0.5, margin=0.3, patience=3, relative=0.5, share_decay=0.9, pool=1,
                 collapse_pool=1):
        self.decay, self.power, self.margin, self.patience, self.relative = decay, power, margin, patience, relative
        self.share_decay = share_decay
        self.pool, self.collapse_pool = pool, collapse_pool
        self.counts = {0: 0.0, 1: 0.0}
        self.shares = None  # moving averages of (share said Correct, gold share)
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
        """Call once per verifier step with global shares. Returns True on the step that escalates."""
        if self.power == 0 or self.patience <= 0:
            return False
        if self.shares is None:
            self.shares = (share_said_correct, gold_share)
        else:
            self.shares = tuple(self.share_decay * old + (1 - self.share_decay) * new
                                for old, new in zip(self.shares, (share_said_correct, gold_share)))
        said, gold = self.shares
        strayed = (abs(share_said_correct - gold_share) > self.margin or said < self.relative * gold
                   or 1 - said < self.relative * (1 - gold))
        self.strikes = self.strikes + 1 if strayed else 0
        if self.strikes >= self.patience and (self.power < 1.0 or self.pool < self.collapse_pool):
            self.power, self.pool = max(self.power, 1.0), max(self.pool, self.collapse_pool)
            return True
        return False

    def state_dict(self):
        return {"decay": self.decay, "power": self.power, "strikes": self.strikes, "pool": self.pool,
                "shares": list(self.shares) if self.shares is not None else None,
                "counts": {str(k): v for k, v in self.counts.items()}}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.power, self.strikes = state.get("power", 0.5), state.get("strikes", 0)
        self.pool = state.get("pool", self.pool)
        self.shares = tuple(state["shares"]) if state.get("shares") is not None else None
        self.counts = {int(k): v for k, v in state["counts"].items()}


# -----------------------------------------------------------------------------
# What TRL and verl users expect around the update: overlong handling, dynamic sampling, rewards as
# functions, an LR schedule, and the flags for all of it (both RL scripts add them)

def apply_overlong(rollouts, mode, max_new_tokens, buffer):
    """Completions cut off at the budget (not finished). mode "mask": they leave the loss (DAPO's overlong
    filtering: a cut answer is not a wrong answer); "penalty": DAPO's soft overlong punishment, a reward
    penalty rising linearly from 0 to 1 over the last `buffer` tokens of the budget; "none": nothing.
    Changes the rollouts in place; returns the penalties (0 for untouched rollouts)."""
    penalties = [0.0] * len(rollouts)
    for i, r in enumerate(rollouts):
        if mode == "mask" and not r.finished:
            r.completion_mask = [0] * len(r.completion_mask)
        elif mode == "penalty" and buffer > 0:
            over = len(r.body_ids) - (max_new_tokens - buffer)
            penalties[i] = min(1.0, max(0.0, over / buffer))
            r.reward -= penalties[i]
    return penalties


def dynamic_sampling(sample_round, group_size, wanted_groups, max_extra_rounds, device):
    """DAPO's dynamic sampling. Groups whose samples all got the same reward carry no gradient, so keep
    drawing rounds of fresh questions (sample_round(r) -> this rank's rollouts, prompt-major groups) until
    this rank holds `wanted_groups` groups with mixed rewards on every rank, or `max_extra_rounds` extra
    rounds are spent. A rank short of mixed groups fills up with constant ones (they train nothing, but
    keep the batch shape). Returns (rollouts, extra rounds drawn, True if it stopped at the cap short, the
    rollouts drawn and left out: they cost sampling, so the compute-matched view counts them)."""
    mixed, constant, rounds = [], [], 0
    while True:
        rollouts = sample_round(rounds)
        for start in range(0, len(rollouts), group_size):
            group = rollouts[start:start + group_size]
            (mixed if len({r.reward for r in group}) > 1 else constant).append(group)
        short = all_reduce_sums([max(0, wanted_groups - len(mixed))], device)[0]
        if short == 0 or rounds >= max_extra_rounds:
            break
        rounds += 1
    groups = mixed + constant
    kept, left_out = groups[:wanted_groups], groups[wanted_groups:]
    return [r for group in kept for r in group], rounds, short > 0, [r for group in left_out for r in group]


@functools.lru_cache(maxsize=None)
def load_reward_fn(spec):
    """'path/to/file.py:function' or 'package.module:function' -> the function. It is called as
    fn(conversation, completion_text) and must return a number. Raises ValueError with one clear line."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--reward_fn {spec!r}: expected 'path/to/file.py:function' or 'module:function'")
    try:
        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                raise ValueError(f"--reward_fn: no file {where!r}")
            module_spec = importlib.util.spec_from_file_location(f"reward_fn_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"--reward_fn {spec!r} could not be loaded: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward_fn {spec!r}: {where} has no function {name!r}")
    return fn


def checked_reward(fn, conversation, text):
    """fn(conversation, text) as a float; a ValueError naming the problem if it is not a finite number."""
    try:
        value = fn(conversation, text)
    except Exception as e:
        raise ValueError(f"--reward_fn raised {type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ValueError(f"--reward_fn must return a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"--reward_fn returned {value}, not a finite number")
    return value


def rl_lr_multiplier(step, num_steps, schedule="linear", warmup_steps=0):
    """The LR multiplier of RL step `step` of `num_steps`: a linear warm-up over `warmup_steps`, then constant,
    linear decay to 0 (nanochat's), or cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(num_steps - warmup_steps, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {schedule!r}")


def add_grpo_flags(parser):
    """The GRPO flags chat_rl and chat_cotrain (its generator) share."""
    parser.add_argument("--loss_agg", "--normalization", dest="loss_agg", default="token-mean",
                        choices=list(LOSS_AGGREGATIONS) + list(_AGGREGATION_ALIASES),
                        help="how the token losses are summed and divided (see nanochat/grpo.py)")
    parser.add_argument("--ppo_epochs", type=int, default=1, help=">1 reuses a batch with a clipped ratio")
    parser.add_argument("--clip_low", "--clip_eps", dest="clip_low", type=float, default=0.2,
                        help="the ratio is clipped below at 1 - clip_low (with --ppo_epochs > 1)")
    parser.add_argument("--clip_high", type=float, default=None,
                        help="the ratio is clipped above at 1 + clip_high (default: clip_low; DAPO: 0.28)")
    parser.add_argument("--kl_coef", type=float, default=0.0, help="k3 KL penalty to the frozen starting policy")
    parser.add_argument("--dynamic_sampling", type=int, default=0,
                        help="extra rounds of questions drawn to replace groups whose rewards are all equal (0: off)")
    parser.add_argument("--overlong", default="none", choices=["none", "mask", "penalty"],
                        help="completions cut at the budget: leave them out of the loss, or a soft length penalty")
    parser.add_argument("--overlong_buffer", type=int, default=None,
                        help="tokens before the budget where the overlong penalty starts (default: a quarter of it)")
    parser.add_argument("--reward_fn", default=None,
                        help="'path/file.py:function' or 'module:function' called as fn(conversation, completion) -> number, "
                             "replacing the task's reward (accuracy still uses the task's checker)")
    parser.add_argument("--lr_schedule", default="linear", choices=["constant", "linear", "cosine"])
    parser.add_argument("--warmup_steps", type=int, default=0, help="linear LR warm-up steps")
    parser.add_argument("--max_batch_rows", type=int, default=None,
                        help="the most sequences sampled in one batched pass (default: no limit); bounds sampling memory "
                             "(the evaluation's examples x samples at once: ~2.8 GB at d4 for 256 x 4 on CPU). Larger "
                             "requests are sampled in chunks, each with its own seed (nanochat.engine.Engine)")


def check_grpo_flags(parser, args):
    """One-line errors (through parser.error) for contradictory GRPO flags, before any work starts."""
    if args.ppo_epochs < 1:
        parser.error("--ppo_epochs must be >= 1")
    if not 0 < args.clip_low < 1:
        parser.error(f"--clip_low must be in (0, 1), got {args.clip_low}")
    if args.clip_high is not None and not args.clip_high > 0:
        parser.error(f"--clip_high must be > 0, got {args.clip_high}")
    if args.kl_coef < 0 or args.dynamic_sampling < 0 or args.warmup_steps < 0:
        parser.error("--kl_coef, --dynamic_sampling and --warmup_steps must be >= 0")
    if args.overlong_buffer is not None and args.overlong_buffer < 1:
        parser.error("--overlong_buffer must be >= 1")
    if args.max_batch_rows is not None and args.max_batch_rows < 1:
        parser.error(f"--max_batch_rows must be >= 1, got {args.max_batch_rows}")
    if args.reward_fn is not None:
        try:
            load_reward_fn(args.reward_fn)  # the script calls it once on a real example before training, too
        except ValueError as e:
            parser.error(str(e))
    args.loss_agg = loss_aggregation(args.loss_agg)


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


def token_logprobs(model, inputs, targets, with_entropy=False):
    """log p(target) per position (0 where target is -1); with_entropy also the policy's entropy at every
    position (detached), read from the same logits."""
    with autocast_context(inputs.device.type):
        if not with_entropy:
            return -model(inputs, targets=targets, loss_reduction="none").float()
        logits = model(inputs)
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none")
    with torch.no_grad():
        logp_all = torch.log_softmax(logits.detach().float(), dim=-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return -nll.view(targets.shape).float(), entropy


# How the per-token loss is summed and divided (TRL's loss_type, verl's loss_agg_mode):
#   token-mean           sum over every trained token of the batch / their number (nanochat, DAPO, TRL "dapo")
#   seq-mean-token-mean  each sequence's mean over its tokens, averaged over sequences (original GRPO, TRL "grpo"):
#                        a token of a short answer weighs more than one of a long answer
#   seq-mean-token-sum   each sequence's token sum, averaged over sequences: long answers weigh more
#   dr-grpo              token sums / (sequences x the generation budget), a constant (Dr. GRPO, TRL "dr_grpo")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dr-grpo")
_AGGREGATION_ALIASES = {"token": "token-mean", "sequence": "seq-mean-token-mean"}


def loss_aggregation(name):
    """The canonical name of a loss aggregation ('token' and 'sequence' are the older names)."""
    name = _AGGREGATION_ALIASES.get(name, name)
    if name not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {', '.join(LOSS_AGGREGATIONS)}, got {name!r}")
    return name


def aggregation_count(targets, normalization, max_completion_tokens=None):
    """What the loss of this batch is divided by, before summing over ranks (tokens or sequences)."""
    mode = loss_aggregation(normalization)
    if mode == "token-mean":
        return (targets != -1).sum().item()
    if mode == "dr-grpo":
        if not max_completion_tokens:
            raise ValueError("the dr-grpo aggregation needs the generation budget (max_completion_tokens)")
        return len(targets) * max_completion_tokens
    return len(targets)


def policy_gradient_loss(logp, targets, advantages, weights=None, old_logp=None, ref_logp=None, clip_eps=0.2,
                         kl_coef=0.0, normalization="token", normalizer=None, clip_high=None, max_completion_tokens=None):
    """The GRPO objective, as a loss to minimise, summed over this micro-batch and divided by `normalizer`.

    - ratio: exp(logp - old_logp), where old_logp is the sampling policy (detached logp when on-policy,
      so the value is 1 and the gradient is the plain REINFORCE gradient A * grad log p);
    - PPO clipping of the ratio to [1 - clip_eps, 1 + clip_high] (clip_high defaults to clip_eps; DAPO's
      clip-higher raises it so that unlikely tokens with a positive advantage can grow, against entropy
      collapse). Only matters when old_logp is given;
    - optional k3 KL estimate to a frozen reference policy, exp(ref - logp) - (ref - logp) - 1;
    - the aggregation `normalization` (see LOSS_AGGREGATIONS). `normalizer` is the global count over all
      micro-batches and ranks (aggregation_count summed); without it the micro-batch's own count is used."""
    mode = loss_aggregation(normalization)
    clip_high = clip_eps if clip_high is None else clip_high
    mask = (targets != -1).float()
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if ref_logp is not None and kl_coef > 0:
        log_ratio = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(log_ratio) - log_ratio - 1.0)
    per_token = per_token * mask
    if weights is not None:
        per_token = per_token * weights.unsqueeze(1)
    if mode == "seq-mean-token-mean":
        total = (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()
    else:
        total = per_token.sum()
    if normalizer is None:
        normalizer = max(aggregation_count(targets, mode, max_completion_tokens), 1)
    return total / normalizer


def grpo_update(model, optimizer, rollouts, token_advantages, pad_id, device, device_batch_size,
                sample_weights=None, normalization="token", ppo_epochs=1, clip_eps=0.2, ref_model=None,
                kl_coef=0.0, grad_clip=0.0, lr_multiplier=1.0, clip_high=None, max_completion_tokens=None):
    """One batch of rollouts -> `ppo_epochs` optimizer steps. With ppo_epochs=1 this is on-policy: no
    ratio, no clipping (the ratio is exactly 1). Returns stats for logging: loss, true token entropy, clip
    fraction, KL to the reference, grad norm (before clipping), trained tokens, and the micro-batches
    skipped for having no trained token (a batch with none at all leaves the weights untouched).

    Under DDP each rank holds its own rollouts. Each rank divides by (global count / world size): the
    optimizer averages gradients over ranks, so the result is the gradient of the global objective."""
    world = dist.get_world_size() if is_distributed() else 1
    inputs, targets, advantages, weights = collate_rollouts(rollouts, token_advantages, pad_id, device, sample_weights)
    num_tokens = (targets != -1).sum().item()
    count, global_tokens = all_reduce_sums([aggregation_count(targets, normalization, max_completion_tokens), num_tokens], device)
    normalizer = max(count, 1.0) / world  # the optimizer averages over ranks
    stats = {"loss": 0.0, "num_tokens": num_tokens, "clip_frac": 0.0, "entropy": 0.0, "entropy_proxy": 0.0, "kl": 0.0,
             "skipped_microbatches": 0, "skipped_step": 0}
    if global_tokens == 0:  # nothing to learn from anywhere: no step (momentum alone would still move the weights)
        stats["skipped_step"] = 1
        return stats
    slices = [slice(i, i + device_batch_size) for i in range(0, len(inputs), device_batch_size)]
    trainable = [sl for sl in slices if (targets[sl] != -1).any()]
    stats["skipped_microbatches"] = len(slices) - len(trainable)

    old_logp, ref_logp = None, None
    if ppo_epochs > 1 or (ref_model is not None and kl_coef > 0):
        with torch.no_grad():
            if ppo_epochs > 1:
                old_logp = torch.zeros(targets.shape, device=device)
                for sl in trainable:
                    old_logp[sl] = token_logprobs(model, inputs[sl], targets[sl])
            if ref_model is not None and kl_coef > 0:
                ref_logp = torch.zeros(targets.shape, device=device)
                for sl in trainable:
                    ref_logp[sl] = token_logprobs(ref_model, inputs[sl], targets[sl])

    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_multiplier
    high = clip_eps if clip_high is None else clip_high
    for epoch in range(ppo_epochs):
        model.zero_grad(set_to_none=True)
        for sl in trainable:
            logp, entropy = token_logprobs(model, inputs[sl], targets[sl], with_entropy=True)
            loss = policy_gradient_loss(
                logp, targets[sl], advantages[sl], weights[sl],
                old_logp=None if old_logp is None else old_logp[sl],
                ref_logp=None if ref_logp is None else ref_logp[sl],
                clip_eps=clip_eps, clip_high=clip_high, kl_coef=kl_coef, normalization=normalization,
                normalizer=normalizer, max_completion_tokens=max_completion_tokens)
            loss.backward()
            stats["loss"] += loss.item()
            mask = targets[sl] != -1
            if epoch == 0:
                stats["entropy"] += entropy[mask].sum().item()
                stats["entropy_proxy"] += (-logp.detach()[mask]).sum().item()  # mean NLL of the sampled tokens
                if ref_logp is not None:
                    log_ratio = ref_logp[sl][mask] - logp.detach()[mask]
                    stats["kl"] += (torch.exp(log_ratio) - log_ratio - 1.0).sum().item()
            if old_logp is not None:
                ratio = torch.exp(logp.detach() - old_logp[sl])[mask]
                stats["clip_frac"] += ((ratio < 1 - clip_eps) | (ratio > 1 + high)).float().sum().item()
        if not trainable:  # every rank must hand the optimizer the same set of gradients (all zero here)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        # grad_clip=inf measures the norm without changing the gradient
        grad_norm = optimizer.step(grad_clip=grad_clip if grad_clip > 0 else float("inf"))
        model.zero_grad(set_to_none=True)
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
    denom = max(num_tokens, 1)
    for key in ("entropy", "entropy_proxy", "kl"):
        stats[key] /= denom
    stats["clip_frac"] /= denom * ppo_epochs
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
        score_rollout(task, r, conversations[j // num_samples])
    return rollouts


def right_prefix(judgement):
    """Steps judged right before the first one judged wrong (0 without one verdict per step)."""
    if judgement is None or not judgement.aligned:
        return 0
    verdicts = judgement.verification.step_verdicts
    return next((k for k, v in enumerate(verdicts) if not v), len(verdicts))


def branch_points(rollouts, judgements, num_samples, max_new_tokens):
    """`--branch`: where to restart the groups whose samples are all wrong. For each such group, the sample
    with the longest prefix of steps judged right (the first such sample on a tie), cut after that prefix.
    Returns [(first rollout of the group, that sample, cut in completion tokens)]; a group where no sample
    has a right step, or whose best prefix leaves no budget, is not branched.

    Why: in an all-wrong group every sample's outcome advantage is zero, so GRPO learns nothing from it.
    Sampling again from the right prefix gives the later steps a second chance from a state the policy
    already reached, and groups with mixed outcomes to learn from (the verifier's judgments steer which
    states the generator explores, rather than adding to its reward)."""
    points = []
    for start in range(0, len(rollouts), num_samples):
        group = range(start, start + num_samples)
        if any(rollouts[i].info["correct"] for i in group):
            continue
        best = max(group, key=lambda i: (right_prefix(judgements[i]), -i))
        steps = right_prefix(judgements[best])
        if steps == 0:
            continue
        cut = judgements[best].step_ends[steps - 1] + 1
        if cut < min(len(rollouts[best].body_ids), max_new_tokens):
            points.append((start, rollouts[best], cut))
    return points


def continue_rollouts(engine, tokenizer, task, points, num_samples, max_new_tokens, temperature, top_k, seed):
    """Sample num_samples continuations of each branch point (source rollout, cut). A continuation's prompt is
    the source's prompt plus its first `cut` completion tokens (context, never trained on), its completion
    what was sampled after them, within what is left of the budget; its text and reward are those of the
    whole solution, prefix included. Returns the rollouts, point-major."""
    prompts = [r.prompt_ids + r.completion_ids[:cut] for _, r, cut in points]
    continued = generate_rollouts(engine, tokenizer, prompts, [r.example_index for _, r, _ in points], num_samples,
                                  [max_new_tokens - cut for _, _, cut in points], temperature, top_k, seed)
    for i, r in enumerate(continued):
        _, source, cut = points[i // num_samples]
        r.text = tokenizer.decode(source.completion_ids[:cut] + r.body_ids)  # in one piece: a character may span the cut
        score_rollout(task, r, source.info["conversation"])
        r.info["task_reward"], r.info["overlong_penalty"], r.info["branch_cut"] = r.reward, 0.0, cut
    return continued


def rank_indices(step, per_step, rank, world_size, num_examples, from_end=False):
    """This rank's example indices for one step: the step's block of `per_step` examples (all ranks), strided
    over ranks, wrapping around the task. from_end counts from the other end of the split (co-training's
    verifier steps use it so their questions differ from the generator's)."""
    positions = [step * per_step + rank + world_size * i for i in range(per_step // world_size)]
    return [((num_examples - 1 - i) if from_end else i) % num_examples for i in positions]


def sample_batch(engine, tokenizer, task, step, num_steps, args, rank, world_size, device, reward_fn=None):
    """One RL step's rollouts, the same way for chat_rl and co-training's generator: this rank's questions of
    `step`, `args.num_samples` samples each, rewarded by the task (or `reward_fn`), the overlong penalty or
    mask applied, and with args.dynamic_sampling > 0 extra rounds of questions for groups without variance.
    args needs examples_per_step, num_samples, the sampling flags (max_new_tokens, temperature, top_k, seed)
    and add_grpo_flags' flags. Returns (rollouts, extra rounds drawn, rollouts dynamic sampling drew and left out)."""
    buffer = args.overlong_buffer or max(1, args.max_new_tokens // 4)

    def sample_round(extra_round):
        # round 0 is the step's own questions; dynamic sampling draws later rounds from other steps' blocks
        indices = rank_indices(step + extra_round * num_steps, args.examples_per_step, rank, world_size, len(task))
        rollouts = sample_and_score(engine, tokenizer, task, indices, args.num_samples, args.max_new_tokens, args.temperature,
                                    args.top_k, seed=args.seed + 1_000_003 * step + rank + 7_919 * extra_round)
        for r in rollouts:
            r.info["task_reward"] = r.reward
            if reward_fn is not None:
                r.reward = checked_reward(reward_fn, r.info["conversation"], r.text)
        penalties = apply_overlong(rollouts, "penalty" if args.overlong == "penalty" else "none", args.max_new_tokens, buffer)
        for r, penalty in zip(rollouts, penalties):
            r.info["overlong_penalty"] = penalty
        return rollouts

    extra_rounds, left_out = 0, []
    if args.dynamic_sampling > 0:
        rollouts, extra_rounds, short, left_out = dynamic_sampling(sample_round, args.num_samples, args.examples_per_step // world_size,
                                                         args.dynamic_sampling, device)
        if short and rank == 0:
            print(f"warning: dynamic sampling stopped at its cap ({args.dynamic_sampling} extra rounds) without enough groups "
                  "with mixed rewards; training on what it has", flush=True)
    else:
        rollouts = sample_round(0)
    if args.overlong == "mask":
        apply_overlong(rollouts, "mask", args.max_new_tokens, buffer)
    return rollouts, extra_rounds, left_out


def update_passes(ppo_epochs=1, kl_coef=0.0):
    """How many training passes grpo_update makes over a batch, in units of forward + backward: one per
    epoch, plus a forward (a third) for the old log-probs when ppo_epochs > 1 and one for the reference
    model's with a KL penalty. For rollout_flops."""
    return ppo_epochs + ((ppo_epochs > 1) + (kl_coef > 0)) / 3


def rollout_flops(model, rollouts, num_samples=1, train_passes=0):
    """Approximate FLOPs `model` spent on `rollouts`, for the compute-matched view of co-training: sampling
    them (a forward pass over each group's prompt once, then over every completion token) plus, with
    train_passes, training on them (forward and backward over prompt and completion, once per pass).
    Per token, GPT.estimate_flops (6 per matmul weight plus attention) for training, a third of it for a
    forward pass. Rollouts sampled and then not trained on (left out by dynamic sampling, replaced by
    --branch's continuations) are counted by a second call without train_passes."""
    per_token = model.estimate_flops()
    prompts = sum(len(r.prompt_ids) for r in rollouts[::num_samples])
    completions = sum(len(r.completion_ids) for r in rollouts)
    trained = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    return per_token / 3 * (prompts + completions) + per_token * train_passes * trained


def batch_metrics(rollouts, num_samples, stats, extra_rounds, device):
    """What to log about one RL batch and its update, over all ranks: reward and its parts, accuracy, lengths,
    groups without variance (no gradient), truncation, and the update's diagnostics (rank 0's entropy, KL,
    clip fraction and grad norm). These catch the runs that fail silently."""
    rewards = torch.tensor([r.reward for r in rollouts]).view(-1, num_samples)
    lengths = [len(r.body_ids) for r in rollouts]
    world = dist.get_world_size() if is_distributed() else 1
    s = all_reduce_dict({"reward": rewards.sum().item(), "n": rewards.numel(), "correct": sum(r.info["correct"] for r in rollouts),
                         "length": sum(len(r.completion_ids) for r in rollouts), "groups": rewards.size(0),
                         "zero_var": float(((rewards.max(1).values - rewards.min(1).values) == 0).sum()),
                         "truncated": sum(not r.finished for r in rollouts),
                         "task_reward": sum(r.info.get("task_reward", r.reward) for r in rollouts),
                         "overlong_penalty": sum(r.info.get("overlong_penalty", 0.0) for r in rollouts),
                         "skipped_microbatches": stats["skipped_microbatches"], "extra_rounds": extra_rounds}, device)
    n = max(s["n"], 1)
    return {"reward": s["reward"] / n, "accuracy": s["correct"] / n, "seq_len": s["length"] / n,
            "zero_variance_groups": s["zero_var"] / max(s["groups"], 1), "truncated": s["truncated"] / n,
            "length_min": min(lengths), "length_max": max(lengths), "reward/task": s["task_reward"] / n,
            "reward/overlong_penalty": s["overlong_penalty"] / n, "loss": stats["loss"], "entropy": stats["entropy"],
            "entropy_proxy": stats["entropy_proxy"], "kl": stats["kl"], "clip_frac": stats["clip_frac"],
            "grad_norm": stats.get("grad_norm", 0.0), "skipped_microbatches": s["skipped_microbatches"],
            "skipped_step": stats["skipped_step"], "dynamic_sampling_rounds": s["extra_rounds"] / world}


def majority_vote(task, rollouts):
    """Self-play labels: 1 for the rollouts whose answer (as the task reads it) is the group's majority answer.
    `rollouts` is one group (all of one prompt)."""
    answers = [task.extract_answer(r.info["conversation"], r.text) for r in rollouts]
    majority = majority_answers(answers)
    return [int(majority is not None and a == majority) for a in answers]


def majority_correct(task, groups):
    """How many groups (the k samples of one problem each) have a right majority answer (majority@k): the
    first sample that voted with the majority stands for the group, or the first sample where no answer won."""
    return sum(next((r for r, vote in zip(group, majority_vote(task, group)) if vote), group[0]).info["correct"]
               for group in groups)


# chat_cotrain samples its held-out evaluation with --seed + this (dev/eval_checkpoints.py replays it)
HELDOUT_SEED_OFFSET = 5_000_011


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
