"""
Synthetic multi-step arithmetic word problems with GSM8K-style step-by-step solutions, sized so that
small models can learn them, plus corrupted solutions with a known first wrong step (for training and
evaluating the process verifier).

    Mia has 7 marbles. She buys 5 more. She splits them into 3 equal piles and keeps one pile.
    How many marbles does Mia have now?

    After buying 5 more, she has 7+5=<<7+5=12>>12 marbles.
    Keeping one of 3 equal piles, she has 12/3=<<12/3=4>>4 marbles.
    #### 4

Every problem is a function of (seed, split, index) alone (a per-index RNG), so any slice is reproducible.
Train and test never share a problem: a problem's arithmetic skeleton (operations and numbers) is hashed and
the hash decides which split it may appear in. Difficulty: min_steps/max_steps (reasoning lines) and
max_number (operand size), or one of the `difficulty` presets.

Corruptions (get_labelled_solution(i, corrupt=True)) change exactly one step and then carry the wrong value
forward with correct arithmetic, like a real solver would:
  slip     the step's result is miscalculated
  operand  the step uses a number that is not the one in the question
  skip     a step is left out, so the next step works on a stale value
Step labels are 1 up to the first wrong step and 0 from it on (a solution is only as good as its first error).
"""

import hashlib
import random
from fractions import Fraction

from nanochat.calculator import format_number
from tasks.answers import extract_hash_answer, normalize_number, same_number
from tasks.common import Task
from tasks.verify import solution_to_parts

NAMES = [("Mia", "she", "her"), ("Emma", "she", "her"), ("Lily", "she", "her"), ("Zoe", "she", "her"),
         ("Nora", "she", "her"), ("Sara", "she", "her"), ("Tom", "he", "him"), ("Sam", "he", "him"),
         ("Leo", "he", "him"), ("Max", "he", "him"), ("Ben", "he", "him"), ("Jack", "he", "him")]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "coins", "shells", "cards", "balloons"]
CONTAINERS = ["bags", "boxes", "jars", "baskets"]

# (question sentence, solution phrase); {P}/{p} the pronoun (capitalized or not), {O} the object pronoun, {b} the operand
ADD_TEMPLATES = [("{P} buys {b} more.", "After buying {b} more"), ("{P} finds {b} more.", "After finding {b} more"),
                 ("A friend gives {O} {b} more.", "With {b} more from a friend")]
SUB_TEMPLATES = [("{P} gives away {b}.", "After giving away {b}"), ("{P} loses {b}.", "After losing {b}"),
                 ("{P} sells {b}.", "After selling {b}")]
MUL_TEMPLATES = {2: ("Then the number of {items} doubles.", "Doubling"), 3: ("Then the number of {items} triples.", "Tripling")}
MUL_GENERIC = ("Then {p} ends up with {b} times as many.", "With {b} times as many")
DIV_TEMPLATE = ("{P} splits them into {b} equal piles and keeps one pile.", "Keeping one of {b} equal piles")
SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

DIFFICULTY_PRESETS = {
    1: dict(min_steps=1, max_steps=2, max_number=10),
    2: dict(min_steps=2, max_steps=3, max_number=20),
    3: dict(min_steps=3, max_steps=4, max_number=50),
    4: dict(min_steps=4, max_steps=6, max_number=100),
}
TEST_FRACTION = 10  # one skeleton hash bucket in TEST_FRACTION goes to the test split
CORRUPTIONS = ("slip", "operand", "skip")


def _apply(op, x, b):
    if op == "add":
        return x + b
    if op == "sub":
        return x - b
    if op == "mul":
        return x * b
    quotient = Fraction(x) / b
    return quotient.numerator if quotient.denominator == 1 else quotient


def _fmt(value):
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else format_number(float(value))


class ArithmeticTask(Task):

    def __init__(self, split="train", size=10000, min_steps=1, max_steps=3, max_number=20, difficulty=None, seed=0, **slice_kwargs):
        super().__init__(**slice_kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if difficulty is not None:
            if difficulty not in DIFFICULTY_PRESETS:
                raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY_PRESETS)}, got {difficulty!r}")
            min_steps, max_steps, max_number = (DIFFICULTY_PRESETS[difficulty][k] for k in ("min_steps", "max_steps", "max_number"))
        if not (1 <= min_steps <= max_steps <= 20):
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 20, got {min_steps}, {max_steps}")
        if not (5 <= max_number <= 10**6):
            raise ValueError(f"max_number must be in [5, 1e6], got {max_number}")
        if not (isinstance(size, int) and size >= 0):
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        self.split, self.size, self.seed = split, size, seed
        self.min_steps, self.max_steps, self.max_number = min_steps, max_steps, max_number
        self.max_value = max(100, max_number * max_number)  # cap on intermediate values

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    # --- problem generation ---------------------------------------------------------------------

    def _choose_op(self, rng, x):
        options = ["add"]
        if x > 1:
            options.append("sub")
        if x * 2 <= self.max_value:
            options.append("mul")
        if any(x % b == 0 for b in range(2, 10) if b < x):
            options.append("div")
        op = rng.choice(options)
        if op == "add":
            b = rng.randint(1, self.max_number)
        elif op == "sub":
            b = rng.randint(1, min(x - 1, self.max_number))
        elif op == "mul":
            b = rng.choice([b for b in (2, 3, 4, 5) if x * b <= self.max_value])
        else:
            b = rng.choice([b for b in range(2, 10) if b < x and x % b == 0])
        return op, b

    def _generate(self, rng):
        name, pronoun, obj = rng.choice(NAMES)
        items = rng.choice(ITEMS)
        fields = dict(P=pronoun.capitalize(), p=pronoun, O=obj, items=items)
        num_steps = rng.randint(self.min_steps, self.max_steps)
        sentences, steps = [], []
        if rng.random() < 0.4:
            # "3 bags with 4 apples in each": the first reasoning step is the multiplication
            a = rng.randint(2, max(2, min(9, self.max_number // 2)))
            c = rng.randint(2, self.max_number)
            container = rng.choice(CONTAINERS)
            sentences.append(f"{name} has {a} {container} with {c} {items} in each.")
            steps.append(dict(op="mul", x=a, b=c, lead=f"{name} starts with", is_start=True))
            x = a * c
        else:
            x = rng.randint(2, self.max_number)
            sentences.append(f"{name} has {x} {items}.")
        while len(steps) < num_steps:
            op, b = self._choose_op(rng, x)
            if op == "add":
                question, phrase = rng.choice(ADD_TEMPLATES)
            elif op == "sub":
                question, phrase = rng.choice(SUB_TEMPLATES)
            elif op == "mul":
                question, phrase = MUL_TEMPLATES.get(b, MUL_GENERIC) if rng.random() < 0.7 else MUL_GENERIC
            else:
                question, phrase = DIV_TEMPLATE
            sentences.append(question.format(b=b, **fields))
            steps.append(dict(op=op, x=x, b=b, lead=phrase.format(b=b, **fields) + f", {pronoun} has", is_start=False))
            x = _apply(op, x, b)
        sentences.append(f"How many {items} does {name} have {'now' if len(sentences) > 1 else 'in total'}?")
        for step in steps:
            step["used_b"] = step["b"]
            step["y"] = _apply(step["op"], step["x"], step["b"])
        skeleton = [steps[0]["x"]] + [(s["op"], s["b"]) for s in steps]
        return dict(question=" ".join(sentences), steps=steps, items=items, answer=steps[-1]["y"], skeleton=skeleton)

    def _split_of(self, skeleton):
        digest = hashlib.sha256(repr(skeleton).encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") % TEST_FRACTION == 0 else "train"

    def problem(self, i):
        """The structured problem behind task[i]."""
        return self._problem_at(self.underlying_index(i))

    def _problem_at(self, index):
        for attempt in range(10000):
            rng = random.Random(f"arithmetic/{self.seed}/{self.split}/{index}/{attempt}")
            problem = self._generate(rng)
            if self._split_of(problem["skeleton"]) == self.split:
                problem["index"] = index
                return problem
        raise RuntimeError("could not generate a problem for this split; the difficulty settings leave too few problems")

    # --- rendering ------------------------------------------------------------------------------

    @staticmethod
    def _expression(step):
        return f"{step['x'] if isinstance(step['x'], int) else _fmt(step['x'])}{SYMBOLS[step['op']]}{step['used_b']}"

    @staticmethod
    def _line(step, items):
        expr = ArithmeticTask._expression(step)
        y = _fmt(step["y"])
        return f"{step['lead']} {expr}=<<{expr}={y}>>{y} {items}."

    def _render(self, problem, steps):
        lines = [self._line(step, problem["items"]) for step in steps]
        final = steps[-1]["y"]
        return lines, "\n".join(lines) + f"\n#### {_fmt(final)}", final

    def get_example(self, index):
        problem = self._problem_at(index)
        _, solution, final = self._render(problem, problem["steps"])
        return {
            "messages": [{"role": "user", "content": problem["question"]},
                         {"role": "assistant", "content": solution_to_parts(solution)}],
            "answer": _fmt(final),
        }

    # --- corruption ------------------------------------------------------------------------------

    def _corrupt(self, problem, rng):
        """A copy of the steps with one error injected at a random step; (steps, first_error, kind)."""
        original = problem["steps"]
        kinds = [k for k in CORRUPTIONS if k != "skip" or len(original) >= 2]
        for _ in range(50):
            kind = rng.choice(kinds)
            steps = [dict(s) for s in original]
            k = rng.randrange(len(steps) - 1) if kind == "skip" else rng.randrange(len(steps))
            if kind == "skip":
                if (steps[k]["op"], steps[k]["b"]) == (steps[k + 1]["op"], steps[k + 1]["b"]):
                    continue  # skipping one of two identical steps is the same as skipping the other: no clear first error
                stale = steps[k]["x"]
                del steps[k]
                steps[k]["x"] = stale
                steps[k]["y"] = _apply(steps[k]["op"], stale, steps[k]["used_b"])
            elif kind == "operand":
                s = steps[k]
                if s["op"] == "mul" and not s["is_start"]:  # a wrong multiplier ("Doubling ... 12*3")
                    candidates = [b for b in (2, 3, 4, 5, 6) if b != s["b"]]
                elif s["op"] == "div":
                    candidates = [b for b in range(2, 10) if b != s["b"] and s["x"] % b == 0 and b < s["x"]]
                else:
                    candidates = [s["b"] + d for d in (-2, -1, 1, 2) if s["b"] + d >= 1]
                if s["op"] == "sub":
                    candidates = [b for b in candidates if b < s["x"]]
                if not candidates:
                    continue
                s["used_b"] = rng.choice(candidates)
                s["y"] = _apply(s["op"], s["x"], s["used_b"])
            else:  # slip
                s = steps[k]
                deltas = [d for d in (-2, -1, 1, 2, 10, -10) if s["y"] + d >= 0]
                s["y"] = s["y"] + rng.choice(deltas)
            # later steps redo their (correct) arithmetic on the wrong value
            for j in range(k + 1, len(steps)):
                steps[j]["x"] = steps[j - 1]["y"]
                steps[j]["y"] = _apply(steps[j]["op"], steps[j]["x"], steps[j]["used_b"])
            if all(Fraction(s["y"]).denominator == 1 and s["y"] >= 0 for s in steps) and steps[-1]["y"] != problem["answer"]:
                return steps, k, kind
        # everything tried produced fractions or negatives: a plain slip on the last step always works
        steps = [dict(s) for s in original]
        steps[-1]["y"] = steps[-1]["y"] + 1
        return steps, len(steps) - 1, "slip"

    def get_labelled_solution(self, i, corrupt=False):
        """
        task[i]'s problem with a reference (corrupt=False) or corrupted solution:
        {"question", "solution", "steps" (solution lines, without '#### N'), "step_labels" (1 = correct so far),
         "first_error" (index into steps, -1 if none), "final_correct", "answer" (the gold answer), "corruption"}.
        """
        problem = self.problem(i)
        if corrupt:
            rng = random.Random(f"arithmetic-corrupt/{self.seed}/{self.split}/{problem['index']}")
            steps, first_error, kind = self._corrupt(problem, rng)
        else:
            steps, first_error, kind = problem["steps"], -1, None
        lines, solution, final = self._render(problem, steps)
        labels = [1 if first_error < 0 or j < first_error else 0 for j in range(len(lines))]
        return {
            "question": problem["question"],
            "solution": solution,
            "steps": lines,
            "step_labels": labels,
            "first_error": first_error,
            "final_correct": final == problem["answer"],
            "answer": _fmt(problem["answer"]),
            "corruption": kind,
        }

    def evaluate(self, conversation, assistant_response):
        return int(same_number(extract_hash_answer(assistant_response), conversation["answer"]))

    # --- answer knowledge for RL and co-training (see Task)

    def extract_answer(self, conversation, assistant_response):
        return normalize_number(extract_hash_answer(assistant_response))

    def labelled_solution(self, index, rng):
        item = self.get_labelled_solution(index, corrupt=rng.random() < 0.5)
        return {"question": item["question"], "solution": item["solution"], "step_labels": item["step_labels"],
                "overall_correct": bool(item["final_correct"]), "first_error": item["first_error"]}

    def reference_chain(self, index):
        return [step["y"] for step in self.problem(index)["steps"]]

    def reference_calculations(self, index):
        problem = self.problem(index)
        return [(self._expression(step), _fmt(step["y"])) for step in problem["steps"]]
