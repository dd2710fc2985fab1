"""
A model's preference between two tokens at chosen positions of given sequences, read from one forward
pass, without sampling. Co-training uses it to read a verifier's verdicts as probabilities: p("Correct")
at the token where "Correct" and "Incorrect" part ways, instead of the word that happened to be sampled.
"""

import torch

from nanochat.common import autocast_context


@torch.no_grad()
def choice_probabilities(model, sequences, queries, device, batch_size=8, pad_id=0):
    """sequences[i]: token ids; queries[i]: [(j, token_a, token_b), ...] with 1 <= j < len(sequences[i]).
    Returns per sequence, per query, p(a) = exp(l_a) / (exp(l_a) + exp(l_b)), l being the logits the model
    gives for position j (computed at position j - 1). Rows are right-padded, which causal attention
    never lets a real token see."""
    out = [[] for _ in sequences]
    rows_with_queries = [i for i, q in enumerate(queries) if q]
    for start in range(0, len(rows_with_queries), batch_size):
        rows = rows_with_queries[start:start + batch_size]
        length = max(max(j for j, _, _ in queries[i]) for i in rows)  # nothing past the last query is needed
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            seq = sequences[i][:length]
            ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        with autocast_context(device.type if isinstance(device, torch.device) else str(device)):
            logits = model(ids.to(device)).float()
        for r, i in enumerate(rows):
            for j, a, b in queries[i]:
                out[i].append(torch.softmax(logits[r, j - 1, [a, b]], dim=0)[0].item())
    return out
