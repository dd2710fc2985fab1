"""
Evaluating a chat model on tasks, and the ChatCORE metric. Used by scripts/chat_eval.py and by
chat_sft's periodic accuracy checks.

Two kinds of task (tasks/*.py say which through eval_type):

  categorical  multiple choice (ARC, MMLU). One forward pass over a batch of prompts, right-padded;
               at each row's last prompt position the logits are restricted to the token ids of the
               allowed letters (conversation["letters"]) and the argmax is the answer. No sampling,
               so a model that has never learnt to stop or to format still gets a fair score.
  generative   sample num_samples completions per problem with the Engine (tool use included);
               a problem passes if any sample passes task.evaluate (pass@num_samples).

Problems are strided over ranks (rank r takes r, r+W, ...) and the counts are summed with an
all-reduce, so every rank returns the same accuracy.

ChatCORE = mean over tasks of (accuracy - chance) / (1 - chance): 0 at chance, 1 when perfect.
Chance is 0.25 for the 4-way multiple choice tasks, 0.2 for AQuA (5 options) and 0 for the others.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import autocast_context, is_distributed

# display name -> chance accuracy
CHANCE = {
    "ARC-Easy": 0.25,
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "AQuA": 0.2,
    "GSM8K": 0.0,
    "HumanEval": 0.0,
    "SpellingBee": 0.0,
    "SimpleSpelling": 0.0,
    "Arithmetic": 0.0,
}


def centered_accuracy(accuracy, chance):
    if not 0.0 <= chance < 1.0:
        raise ValueError(f"chance must be in [0, 1), got {chance}")
    return (accuracy - chance) / (1.0 - chance)


def chatcore(results):
    """Mean centred accuracy over the tasks of results {display name: accuracy}. Tasks without a known
    chance level raise KeyError rather than silently counting as chance 0."""
    if not results:
        raise ValueError("ChatCORE of no tasks")
    return sum(centered_accuracy(acc, CHANCE[name]) for name, acc in results.items()) / len(results)


def rank_indices(num_problems, max_problems, rank, world_size):
    n = num_problems if max_problems is None or max_problems <= 0 else min(num_problems, max_problems)
    return list(range(rank, n, world_size))


def _sum_over_ranks(passed, total, device):
    counts = torch.tensor([passed, total], dtype=torch.float64, device=device)
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0].item()), int(counts[1].item())


def letter_token_ids(tokenizer, letters, cache):
    """The single token id of each answer letter (the letter alone, as render_mc binds it)."""
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens with this tokenizer; "
                                 f"categorical evaluation needs single-token letters")
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


@torch.no_grad()
def categorical_counts(task, tokenizer, model, indices, batch_size=8):
    """(passed, total) over task[i] for i in indices; see the module docstring."""
    device = model.get_device()
    pad_id = tokenizer.get_bos_token_id()
    cache = {}
    passed = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        # right padding: causal attention means the pad after a prompt cannot change its logits
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        with autocast_context(device.type):
            logits = model(ids)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            choice_ids = letter_token_ids(tokenizer, letters, cache)
            scores = logits[row, len(prompt) - 1, choice_ids]
            predicted = letters[int(scores.argmax())]
            passed += int(task.evaluate(conversation, predicted))
    return passed, len(indices)


def generative_counts(task, tokenizer, engine, indices, num_samples=1, max_new_tokens=512, temperature=0.0,
                      top_k=50, batch_size=8, seed=42):
    """(passed, total): pass@num_samples over task[i] for i in indices, batch_size problems (x num_samples rows)
    decoding at a time, a waiting problem starting as soon as a problem's rows free (Engine.generate_queue:
    no batch waits for its longest answer). One seed for the whole set: a rerun with the same problems and
    batch_size repeats itself (greedy results do not depend on the batching at all)."""
    if not indices:
        return 0, 0
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    results = engine.generate_queue(prompts, batch_size * num_samples, num_samples=num_samples, max_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, seed=seed)
    if len(results) != len(prompts) * num_samples:
        raise RuntimeError(f"engine returned {len(results)} completions for {len(prompts)} prompts x {num_samples} samples")
    passed = 0
    for p, conversation in enumerate(conversations):
        samples = results[p * num_samples:(p + 1) * num_samples]
        texts = [tokenizer.decode(tokens) for tokens, _ in samples]
        passed += int(any(task.evaluate(conversation, text) for text in texts))
    return passed, len(indices)


def run_task_eval(task, tokenizer, model, engine=None, max_problems=None, batch_size=8, num_samples=1,
                  max_new_tokens=512, temperature=0.0, top_k=50, seed=42):
    """Accuracy of the model on a task (all ranks together; call it on every rank). nan if no problem."""
    from nanochat.common import get_dist_info
    _, rank, _, world_size = get_dist_info()
    indices = rank_indices(len(task), max_problems, rank, world_size)
    if task.eval_type == "categorical":
        passed, total = categorical_counts(task, tokenizer, model, indices, batch_size=batch_size)
    elif task.eval_type == "generative":
        if engine is None:
            from nanochat.engine import Engine
            engine = Engine(model, tokenizer)
        passed, total = generative_counts(task, tokenizer, engine, indices, num_samples=num_samples,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          batch_size=batch_size, seed=seed)
    else:
        raise ValueError(f"unknown eval_type {task.eval_type!r}")
    passed, total = _sum_over_ranks(passed, total, model.get_device())
    return passed / total if total else math.nan
