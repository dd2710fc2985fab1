"""
Synthetic spelling tasks that teach a small model to look inside its tokens.

SpellingBee: "How many r are in strawberry?" The assistant spells the word, counts by hand, checks with
the python tool ('strawberry'.count('r')) and ends with '#### N'; graded like GSM8K.
SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e"; graded by exact match.

Examples are generated from the index (a per-index RNG), so any slice is reproducible and nothing is
downloaded. A small word list is bundled; pass words=[...] or words_file=... (one word per line) for more.
"""

import random
import re

from tasks.common import Task
from tasks.answers import extract_hash_answer, same_number

BUNDLED_WORDS = """
apple banana cherry strawberry raspberry blueberry orange lemon melon mango papaya pineapple coconut
grape peach pear plum apricot avocado tomato potato carrot cabbage lettuce broccoli spinach pepper
onion garlic pumpkin zucchini cucumber mushroom almond walnut hazelnut peanut pistachio
bread butter cheese coffee chocolate cookie pancake spaghetti noodle cinnamon vanilla caramel
mississippi tennessee massachusetts connecticut philadelphia california alabama arizona
bookkeeper committee balloon coffee address success necessary occasion accommodate embarrass
possession millennium parallel recommend tomorrow occurrence beginning different separate
giraffe elephant hippopotamus rhinoceros kangaroo crocodile alligator octopus squirrel rabbit
penguin dolphin butterfly caterpillar mosquito grasshopper chimpanzee gorilla cheetah leopard
turtle tortoise hamster parrot peacock pelican flamingo ostrich buffalo camel donkey
computer keyboard monitor printer internet software hardware algorithm network database
program function variable language compiler terminal browser password language
mountain river valley ocean island desert forest meadow glacier volcano canyon waterfall
thunder lightning rainbow weather sunshine blizzard hurricane tornado breeze horizon
library museum hospital restaurant theater stadium airport station village country
teacher student doctor engineer scientist musician painter farmer pilot sailor
happiness kindness sadness darkness brightness loneliness friendship neighbor
abracadabra assessment bubble cocoon daddy mammal pepperoni lollipop hullabaloo referee
tattoo toffee woodpecker yellow zigzag bazaar bookshelf coffeepot seesaw teepee
beautiful wonderful terrible horrible incredible comfortable vegetable miserable
question answer problem solution example sentence paragraph dictionary alphabet
january february september october november december wednesday saturday
umbrella bicycle motorcycle helicopter submarine skateboard wheelbarrow trampoline
puzzle jigsaw quizzical jazz pizza fizzy dizzy buzzing razzle
strength rhythm syzygy crypt lynx nymph glyph myth
"""

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def load_words(words=None, words_file=None):
    if words is None and words_file is not None:
        with open(words_file, "r", encoding="utf-8") as f:
            words = f.read().split()
    if words is None:
        words = BUNDLED_WORDS.split()
    cleaned = sorted({w.strip().lower() for w in words if re.fullmatch(r"[A-Za-z]+", w.strip())})
    if not cleaned:
        raise ValueError("the spelling tasks need at least one alphabetic word")
    return cleaned


class _SyntheticWordTask(Task):

    def __init__(self, split="train", size=1000, seed=0, words=None, words_file=None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not (isinstance(size, int) and size >= 0):
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        self.split, self.size, self.seed = split, size, seed
        self.words = load_words(words, words_file)

    def num_examples(self):
        return self.size

    def rng_for(self, index):
        # a string seed is hashed deterministically (unlike hash()), and train/test draw from different streams
        return random.Random(f"{type(self).__name__}/{self.split}/{self.seed}/{index}")

    @property
    def eval_type(self):
        return "generative"


_COUNT_QUESTIONS = [
    "How many {letter} are in {word}?",
    "How many {letter}s are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter}'s in {word}.",
    "how many {letter} in {word}",
    "In the word {word}, how many times does {letter} occur?",
    "What is the count of the letter {letter} in {word}?",
]


class SpellingBee(_SyntheticWordTask):

    def get_example(self, index):
        rng = self.rng_for(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
        quoted_letter = rng.choice([letter, f"'{letter}'", f'"{letter}"', letter.upper()])
        quoted_word = rng.choice([word, f"'{word}'", f'"{word}"'])
        question = rng.choice(_COUNT_QUESTIONS).format(letter=quoted_letter, word=quoted_word)
        if rng.random() < 0.3:
            question = question[0].upper() + question[1:]
        count = word.count(letter)
        positions = [str(k + 1) for k, ch in enumerate(word) if ch == letter]
        if positions:
            hand_count = f"The letter '{letter}' is at position{'s' if len(positions) > 1 else ''} {', '.join(positions)}, so I count {count}."
        else:
            hand_count = f"The letter '{letter}' does not appear, so I count 0."
        parts = [
            {"type": "text", "text": f"Let me spell '{word}': {','.join(word)}\n{hand_count}\nChecking with Python: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\nSo '{word}' has {count} '{letter}'.\n#### {count}"},
        ]
        return {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "answer": str(count),
            "word": word,
            "letter": letter,
        }

    def evaluate(self, conversation, assistant_response):
        return int(same_number(extract_hash_answer(assistant_response), conversation["answer"]))


_SPELL_QUESTIONS = ["Spell the word: {word}", "Spell {word}", "How do you spell {word}?", "spell out {word} letter by letter"]


class SimpleSpelling(_SyntheticWordTask):

    def get_example(self, index):
        rng = self.rng_for(index)
        word = rng.choice(self.words)
        answer = f"{word}:{','.join(word)}"
        return {
            "messages": [{"role": "user", "content": rng.choice(_SPELL_QUESTIONS).format(word=word)},
                         {"role": "assistant", "content": answer}],
            "answer": answer,
        }

    def evaluate(self, conversation, assistant_response):
        if not isinstance(assistant_response, str):
            return 0
        return int(assistant_response.strip() == conversation["answer"])
