"""
Fixed prompts and their greedy completions: a glance at what a base model has learned, printed by
base_train during training and by base_eval at the end.
"""

import torch

from nanochat.common import autocast_context, print0

# Facts, a little reasoning and a little arithmetic: a model that completes these sensibly has learned something.
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


@torch.no_grad()
def complete(model, tokenizer, prompt, max_tokens=16, temperature=0.0, seed=42):
    """The text the model appends to `prompt` (BOS-prefixed), greedy unless temperature > 0."""
    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
    out = list(model.generate(ids, max_tokens=max_tokens, temperature=temperature, seed=seed))
    return tokenizer.decode(out)


def print_samples(model, tokenizer, device, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """Greedy completions of the prompts, printed on rank 0 and returned as 'prompt + completion' lines."""
    with autocast_context(device.type):
        lines = [prompt + complete(model, tokenizer, prompt, max_tokens) for prompt in prompts]
    for line in lines:
        print0(f"  {line!r}")
    return lines
