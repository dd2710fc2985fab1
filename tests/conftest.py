"""
Shared pytest fixtures. The tiny tokenizer here lets every module's tests tokenize real text
without a trained tokenizer on disk (and never touches /work/shared or the network).

    def test_x(tiny_tokenizer):                 # a nanochat.tokenizer.Tokenizer, vocab 512
        ids = tiny_tokenizer.encode("hello", prepend="<|bos|>")

    def test_y(tiny_base_dir, monkeypatch):     # a base dir holding tokenizer/ and token_bytes.pt
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base_dir))
        tok = nanochat.tokenizer.get_tokenizer()

    def test_z(sft_base):                       # NANOCHAT_BASE_DIR set to a fresh dir with tiny SFT checkpoints d2, d1
        scripts.chat_rl.main(["--model_tag", "d2", ...])
"""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

TINY_VOCAB_SIZE = 512

# A small English + digits corpus written for these tests; enough distinct pairs for 247 merges.
_TINY_PARAGRAPHS = [
    "The river ran past the old mill, and the miller's daughter counted the sacks of flour as they "
    "came down the chute: 12 in the morning, 17 after lunch, and 9 more before the light went out.",
    "She kept her numbers in a green notebook. Each page had a date at the top (2019-04-23, 2020-11-02) "
    "and a column of sums that never quite added up to what the buyers paid.",
    "On market days the town filled with carts. Farmers brought cheese, apples, wool and eggs; "
    "children ran between the stalls asking for a taste of everything and getting very little.",
    "What is 345 plus 678? It is 1023. What is 12 times 12? It is 144. Can you divide 100 by 8? "
    "Yes: 100 / 8 = 12.5, which we round to 13 when we buy whole boxes.",
    "Q: How many legs do three spiders have? A: Each spider has 8 legs, so 3 * 8 = 24 legs in total.",
    "The weather report said it would rain on Tuesday and clear on Wednesday, but it rained all week "
    "and the bridge over the stream was closed for 4 days while the water was high.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, i * 2))\n",
    "In 1969 people watched the first landing on the Moon; in 2024 a student wrote a short essay "
    "about why the pictures still look so sharp after more than fifty years.",
    "I don't think we'll finish today, she said, but we've done the hard part and they're ready to help.",
    "Prices: bread $2.50, milk $1.25, coffee $4.75, total $8.50. Change from a ten: $1.50.",
    "A good teacher asks questions that have more than one answer, then listens carefully to each one "
    "before saying which answers are better and why.",
    "Lists help: first, gather the tools; second, read the instructions twice; third, start slowly; "
    "fourth, check your work against the example; fifth, clean up the table when you are done.",
]
TINY_CORPUS = [p for _ in range(3) for p in _TINY_PARAGRAPHS]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and with other processes on a 2-core machine two
    threads can run many times slower (they wait on each other)."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_corpus():
    return list(TINY_CORPUS)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(iter(TINY_CORPUS), TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_tokenizer, tmp_path_factory):
    """A NANOCHAT_BASE_DIR-style directory with tokenizer/tokenizer.json and tokenizer/token_bytes.pt."""
    from nanochat.tokenizer import save_token_bytes
    base_dir = tmp_path_factory.mktemp("nanochat_base")
    tokenizer_dir = base_dir / "tokenizer"
    tiny_tokenizer.save(str(tokenizer_dir))
    save_token_bytes(tiny_tokenizer, str(tokenizer_dir))
    return base_dir


def clean_lucky_wrong(task, index=0):
    """Three solutions of task[index] from its reference calculations: every step right and the right answer
    ("clean"), the right answer through a wrong first step (its restated value is off: "lucky"), and every step
    right but a wrong answer ("wrong")."""
    reference = task.reference_calculations(index)
    answer = reference[-1][1]
    steps = [f"x {e}=<<{e}={v}>>{v}" for e, v in reference]
    first_expr, first_value = reference[0]
    lucky = [f"x {first_expr}=<<{first_expr}={first_value}>>{int(first_value) + 7}"] + steps[1:]
    return {"clean": "\n".join(steps) + f"\n#### {answer}", "lucky": "\n".join(lucky) + f"\n#### {answer}",
            "wrong": "\n".join(steps) + "\n#### 99999"}


def make_tiny_checkpoint(base_dir, source_dir, tag, n_layer, vocab_size, seed):
    """A random GPT of width 32 saved as step 0 under <base_dir>/<source_dir>/<tag>. Its output layers get
    noise: init_weights zeros them, and a model whose logits are all equal samples no useful variety."""
    from dataclasses import asdict
    import torch
    from nanochat.checkpoint_manager import save_checkpoint
    from tests.fixtures.chat.chat_helpers import tiny_gpt
    model = tiny_gpt(vocab_size, seed=seed, n_layer=n_layer, sequence_len=512)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(os.path.join(base_dir, source_dir, tag), 0, model.state_dict(), None,
                    {"model_config": asdict(model.config)})


@pytest.fixture()
def sft_base(tiny_base_dir, tiny_tokenizer, monkeypatch, tmp_path):
    """A fresh base dir (NANOCHAT_BASE_DIR) with the tiny tokenizer and random tiny SFT checkpoints d2 and d1."""
    base = tmp_path / "base"
    base.mkdir()
    os.symlink(tiny_base_dir / "tokenizer", base / "tokenizer")
    vocab = tiny_tokenizer.get_vocab_size()
    make_tiny_checkpoint(str(base), "chatsft_checkpoints", "d2", 2, vocab, seed=1)
    make_tiny_checkpoint(str(base), "chatsft_checkpoints", "d1", 1, vocab, seed=2)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return base
