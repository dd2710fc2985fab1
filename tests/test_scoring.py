"""nanochat/scoring.py and the verdict readout built on it (tasks.verify.verdict_queries): probabilities of
one token against another equal a hand-computed softmax of the model's logits, and the queries sit where
the verifier's "Correct" / "Incorrect" is decided."""

import torch

from nanochat.scoring import choice_probabilities
from tasks import verify
from tests.fixtures.chat.chat_helpers import tiny_gpt


def noisy_model(vocab_size):
    model = tiny_gpt(vocab_size, seed=3, n_layer=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # init_weights zeroes the output layers: give the logits a shape
    return model.eval()


def test_choice_probabilities_equal_a_hand_computed_softmax():
    model = noisy_model(64)
    sequences = [[5, 9, 14, 3, 22, 7], [1, 2, 3]]
    queries = [[(3, 10, 20), (5, 7, 8)], [(2, 4, 6)]]
    probs = choice_probabilities(model, sequences, queries, torch.device("cpu"), batch_size=2)
    for seq, qs, ps in zip(sequences, queries, probs):
        for (j, a, b), p in zip(qs, ps):
            with torch.no_grad():
                logits = model(torch.tensor([seq[:j]]))[0, -1].float()
            expected = torch.exp(logits[a]) / (torch.exp(logits[a]) + torch.exp(logits[b]))
            assert abs(p - expected.item()) < 1e-5
    assert choice_probabilities(model, [[1, 2]], [[]], torch.device("cpu")) == [[]]


def test_verdict_queries_sit_where_the_verdict_is_decided(tiny_tokenizer):
    text = "Step 1: 3*4 is 12 → Correct\nStep 2: 12+5 is 17, not 18 → Incorrect\nOverall: incorrect"
    ids = tiny_tokenizer.encode(text)
    queries = verify.verdict_queries(tiny_tokenizer, ids, text)
    assert len(queries) == 3 and None not in queries
    for (j, correct_id, incorrect_id), said_correct in zip(queries, [True, False, False]):
        assert correct_id != incorrect_id
        assert ids[j] == (correct_id if said_correct else incorrect_id)  # the written token is one of the two


def test_probabilities_become_process_rewards():
    tokens = ["He has 3*4=12.", "\n", "Then 12+5=17.", "\n#### 17"]
    text = "Step 1: ok → Correct\nStep 2: ok → Correct\nOverall: Correct"
    j = verify.judge(tokens, text, probs=[0.9, 0.25, 0.8])
    assert j.step_probs == [0.9, 0.25] and j.overall_prob == 0.8
    assert [round(r, 6) for r in j.step_rewards] == [round((2 * 0.9 - 1) / 2, 6), round((2 * 0.25 - 1) / 2, 6)]
    assert abs(j.process_fraction - (0.9 + 0.25) / 2) < 1e-12
    assert verify.judge(tokens, text, probs=[]).step_rewards is None  # verdicts that could not be located: no signal
    assert verify.auc([0.9, 0.2, 0.6, 0.6], [1, 0, 1, 0]) == 0.875
