"""
Every parser that reads model output runs in linear time (issue #19, item 1).

Degenerate completions (a run of one whitespace character, a keyword repeated, a fence never closed) are
ordinary model output, and the parsers run inside the training loop with no timeout: a pattern with two
unbounded quantifiers that can trade characters turns 1,000 spaces into seconds and 10^5 into hours.

Two kinds of test:
- each parser (and each model-output pattern on its own) is fed 10^5-character crafted inputs and must
  return in < 50 ms per call;
- a source scan lists every regular expression in the package. Each must appear in REVIEWED, marked as
  applied to model output (then it is timed here automatically) or not (with the reason), so a new
  pattern fails this test until someone has looked at it.
"""

import ast
import os
import re
import time

import pytest

from tasks.answers import extract_choice_letter, extract_hash_answer, parse_number, same_number
from tasks.humaneval import build_test_program, extract_program
from tasks.verify import calculations, gold_step_labels, parse_verification, rule_verification, step_spans, to_display

N = 100_000
LIMIT_S = 0.050
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED_DIRS = ["tasks", "nanochat", "scripts", "dev"]

# every kind of whitespace a tokenizer can emit in a run, plus the markdown star runs the parsers skip
RUNS = [" ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\u00a0", "\u3000", "*", " *", "**\n"]
KEYWORDS = ["answer ", "answer is ", "the answer is (", "Answer: ", "ans ", "correct option ", "Option ", "A is ",
            "####", "#### ", "#### -", "#### $", "#### 1,", "1,", "Step 1: ", "Step 1: x -> ", "step", "Overall ",
            "Overall: ", "→ ", "-> ", "Correct ", "<<", "<<1=", "<<1 + ", "<|python_start|>", "<|python_end|>",
            "<|python_start|>1<|python_end|><|output_start|>", "```", "```python\n", "def ", "(A) ", "A) ", "1 + "]


def _fill(piece, n=N):
    return (piece * (n // len(piece) + 1))[:n]


def crafted_inputs():
    """(name, text) pairs of ~10^5 characters: runs with and without a keyword in front, keywords repeated,
    and nothing that would close what they open."""
    out = []
    for run in RUNS:
        body = _fill(run)
        out.append((f"run {run!r}", body))
        out.append((f"run {run!r} then x", body + "x"))
        for keyword in ("answer", "The answer is", "####", "#### $", "#### -", "Step 1:", "Overall", "<<1",
                        "<|python_start|>", "```", "def", "A", "Option"):
            out.append((f"{keyword!r} + run {run!r} + x", keyword + body + "x"))
        out.append((f"Step 1: x + run {run!r} + -", "Step 1: x" + body + "-" + body[:100] + "x"))
    for keyword in KEYWORDS:
        out.append((f"{keyword!r} repeated", _fill(keyword)))
        out.append((f"{keyword!r} + space repeated", _fill(keyword + " ")))
    out.append(("digits", _fill("9")))
    out.append(("digits and commas", _fill("1,")))
    return out


CRAFTED = crafted_inputs()

PARSERS = {
    "extract_choice_letter": lambda t: extract_choice_letter(t, "ABCDE", ["600", "1", "x", "a b", "E"]),
    "extract_choice_letter (no options)": lambda t: extract_choice_letter(t, "ABCD"),
    "extract_hash_answer": extract_hash_answer,
    "parse_number": parse_number,
    "same_number": lambda t: same_number(t, "1"),
    "parse_verification": parse_verification,
    "to_display": to_display,
    "step_spans": step_spans,
    "calculations": calculations,
    "extract_program": extract_program,
    "build_test_program": lambda t: build_test_program("def f(x):\n", t, "def check(f):\n    pass\n", "f"),
}
# gold labels do Python work per step (a calculator call per calculation), so a 10^5-character solution of
# 33,000 one-character steps costs ~40 ms of plain loop on a quiet core: still linear, held to a looser bound
LABELLERS = {
    "gold_step_labels": lambda t: gold_step_labels(t, [1, 2, 3]),
    "rule_verification (crafted verifier text)": lambda t: rule_verification("a 1+1=<<1+1=2>>2\n#### 2", t),
    "rule_verification (crafted solution)": lambda t: rule_verification(t, "Step 1: 1+1=<<1+1=2>>2\nOverall: answer 2"),
}
LABELLER_LIMIT_S = 0.250


def _best_time(fn, text, limit=LIMIT_S, repeats=3):
    # best of a few: the machine is shared, and one slow call from a busy CPU is not what we measure
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - start)
        if best < limit:
            break
    return best


@pytest.mark.parametrize("parser", sorted(PARSERS) + sorted(LABELLERS))
def test_parser_is_linear_on_crafted_inputs(parser):
    fn, limit = (PARSERS[parser], LIMIT_S) if parser in PARSERS else (LABELLERS[parser], LABELLER_LIMIT_S)
    slow = []
    for name, text in CRAFTED:
        elapsed = _best_time(fn, text, limit)
        if elapsed >= limit:
            slow.append(f"{name}: {elapsed * 1000:.0f} ms")
    assert not slow, f"{parser} is not linear on: " + "; ".join(slow)


def test_parsers_still_parse_at_normal_length():
    # the cap on scanned text must not cut normal answers: these are ordinary completions
    assert extract_hash_answer("3*4=12\n#### 1,234") == "1234"
    assert extract_hash_answer("#### " + "\n" * 1000) is None
    assert extract_choice_letter("Let me think.\n" * 50 + "The answer is (C).", "ABCD") == "C"
    v = parse_verification("Step 1: 3*4 is 12 → Correct\nStep  2 :  12+5 is 17,  not 18  ->  Incorrect\nOverall: Incorrect")
    assert v.step_verdicts == [True, False] and v.overall is False and v.format_ok
    assert parse_verification("Overall" + " " * 300 + "x").overall is None


# -----------------------------------------------------------------------------
# The project-wide list of regular expressions

MODEL = "model output"
# pattern source (or, for a computed pattern, the source of the expression) -> MODEL or why it is not model output
REVIEWED = {
    # tasks/answers.py: answer extraction from completions
    r"\b(?:answer|ans|correct\s++(?:option|choice))\b[*\s]*+(?:(?:is|would\s++be|will\s++be|should\s++be)\b)?[*\s]*+[:=\-,]?[*\s]*+"
    r"(?:(?:option|choice)\b\s*+[:\-]?\s*+)?(?:\(([A-Za-z])\)|\[([A-Za-z])\]|\\boxed\{([A-Za-z])\}|([A-Za-z])(?![A-Za-z0-9]))": MODEL,
    r"(?<![A-Za-z0-9'])(?:[Oo]ption\s++|[Cc]hoice\s++)?\(?([A-Z])\)?\s++is\s++(?:the\s++)?(?:(?:correct|right)\b(?:\s++(?:answer|option|choice)\b)?|answer\b)": MODEL,
    r"^[*`'\"\s]*+(?:(?:option|choice)\s*+[:\-]?\s*+)?[(\[]?([A-Za-z])[)\]]?[.:]?[*`'\"\s]*+$": MODEL,
    r"(?:\(([A-Z])\)|(?<![A-Za-z0-9/])([A-Z])\))": MODEL,
    r"\banswer\b[*\s]*+(?:(?:is|would\s++be|will\s++be|should\s++be)\b)?[*\s]*+[:=\-,]?\s*+(.+)": MODEL,
    r"(?<![ \t*.)\]!,;:])[ \t*]*+[.)\]!,;:]*+[ \t*]*+(?:\n|$)": MODEL,
    r"\s+": MODEL,
    r"####\s*+\$?\s*+(-?\s*+(?:[\d,]*+\.\d++|(?:,*+\d)++))": MODEL,
    r"-?(\d+(\.\d*)?|\.\d+)": MODEL,
    # tasks/verify.py: generator solutions and verifier verdicts
    r"<\|python_start\|>((?:[^<]++|<(?!\|python_(?:start|end)\|>))*+)<\|python_end\|>"
    r"(?:<\|output_start\|>((?:[^<]++|<(?!\|output_end\|>|\|python_start\|>|\|output_start\|>))*+)<\|output_end\|>)?": MODEL,
    r"<<([^<>=]*+)=([^<>]*+)>>": MODEL,
    r"(?<=[\d.)\s])[-+*/](?=[\d.(\s-])": MODEL,
    r"####.*$": MODEL,
    r"^\s*+\**+\s*+step\s*+(\d{1,9}+)\s*+\**+\s*+[:.)-]\s*+((?:.*?\S)??)\s*+(?:→|->|=>|:|-)"
    r"\s*+\**+\s*+(correct|incorrect)\s*+\**+\s*+\.?\s*+$": MODEL,
    r"^\s*+\**+\s*+overall\s*+\**+\s*+[:\-]?\s*+\**+\s*+(correct|incorrect)\b": MODEL,
    r"\b(?:in)?correct\b": MODEL,
    # tasks/verify.py: the expectations format (rule_verification)
    r"^\s*+\**+\s*+step\s*+(\d{1,9}+)\s*+\**+\s*+[:.)-]([^\n]*+)$": MODEL,
    r"^\s*+\**+\s*+overall\s*+\**+\s*+:([^\n]*+)$": MODEL,
    r"\banswer\s*+:?\s*+(-?\$?\d[\d,]*+(?:\.\d++)?)": MODEL,
    # scripts/chat_web.py: the served model's reply
    r"<<([^<>=]*)=([^<>]*)>>": MODEL,
    # tasks/humaneval.py: the completion's code (timed through extract_program / build_test_program above)
    r"```(?:python|py|Python)?[ \t]*+\n(.*?)(?:```|\Z)": MODEL,
    r"f'^[^\\S\\n]*+def\\s++{re.escape(entry_point)}\\s*+\\('": MODEL,
    r"\s*(import|from)\s+\S+": "HumanEval prompt lines (dataset text)",
    # the calculator formats numbers it computed itself
    r"\d{3}(?!\d)": MODEL,
    # dataset, file-name and report parsing
    r"<<(.*?)>>": "GSM8K reference solutions (dataset text)",
    r"^\s*\(?([A-Ea-e])\s*\)\s*": "AQuA option strings (dataset text)",
    r"[A-Za-z]+": "spelling-bee word list (dataset text)",
    r"[^a-z0-9]+": "report section titles we write",
    r"^timestamp: (.+)$": "report files we write",
    r"^- ([^:\n]+): *([-+0-9.eE,]+)\s*$": "report files we write",
    r"meta_(\d+)\.json": "checkpoint file names",
    r"(?:model_(\d+)\.pt|optim_(\d+)_rank\d+\.pt)": "checkpoint file names",
    r"[0-9a-f]{64}": "shard hash files we write and a server's ETag header",
    r"d(\d+)": "checkpoint tag names",
    r"<\|[a-z_]+\|>": "dev/gen_synthetic_data: a teacher API's output, offline tool, not the training loop",
    r"```(?:json)?\s*(.*?)```": "dev/gen_synthetic_data: a teacher API's output, offline tool, not the training loop",
    r"^V +\d+ .*said-correct ([\d.]+) \| gold-correct ([\d.]+)": "dev/replay_collapse_guard: the 'V' lines chat_cotrain "
                                                                  "prints (numbers only), offline tool",
    r"^eval \[([^\]]+)\] (.*)$": "dev/verifier_bars: the 'eval' lines chat_cotrain prints (labels and numbers only), "
                                   "offline tool",
}

PER_MATCH_S = 1e-5  # a match object costs ~1 µs; a quadratic pattern costs O(n) = ~10^5 µs per match
RE_FUNCTIONS = {"compile", "search", "match", "fullmatch", "findall", "finditer", "sub", "subn", "split"}


def _flags(call):
    flags = 0
    for node in list(call.args[1:]) + [k.value for k in call.keywords]:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "re" \
                    and sub.attr.isupper() and isinstance(getattr(re, sub.attr, None), re.RegexFlag):
                flags |= getattr(re, sub.attr)
    return flags


def regexes_in_source():
    """[(file, line, key, flags)] for every `re.<function>(pattern, ...)` call in the scanned packages."""
    found = []
    for folder in SCANNED_DIRS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.module == "re":
                        found.append((path, node.lineno, "from re import ...", 0))  # would bypass the scan
                    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and isinstance(node.func.value, ast.Name) and node.func.value.id == "re"
                            and node.func.attr in RE_FUNCTIONS and node.args):
                        continue
                    pattern = node.args[0]
                    key = pattern.value if isinstance(pattern, ast.Constant) and isinstance(pattern.value, str) \
                        else ast.unparse(pattern)
                    found.append((os.path.relpath(path, ROOT), node.lineno, key, _flags(node)))
    return found


SOURCE_REGEXES = regexes_in_source()


def test_every_regex_is_reviewed():
    assert len(SOURCE_REGEXES) > 20  # the scan itself works
    unreviewed = [f"{path}:{line}: {key!r}" for path, line, key, _ in SOURCE_REGEXES if key not in REVIEWED]
    assert not unreviewed, ("new regular expressions: add each to REVIEWED in tests/test_parsers_linear.py, marked "
                            "MODEL (then make it linear: it is timed here) or with why it never sees model output:\n"
                            + "\n".join(unreviewed))


def test_reviewed_list_has_no_stale_entries():
    in_source = {key for _, _, key, _ in SOURCE_REGEXES}
    stale = [key for key in REVIEWED if key not in in_source]
    assert not stale, f"REVIEWED lists patterns no longer in the source (remove them): {stale}"


MODEL_PATTERNS = sorted({(key, flags) for _, _, key, flags in SOURCE_REGEXES if REVIEWED.get(key) == MODEL
                         and not key.startswith("f'")})


@pytest.mark.parametrize("key,flags", MODEL_PATTERNS, ids=[f"pattern{i}" for i in range(len(MODEL_PATTERNS))])
def test_model_output_pattern_is_linear(key, flags):
    # every way a pattern can be applied, on every crafted input: search/finditer try every start position.
    # finditer may return ~10^5 matches (one per operator in "+ + + ..."), each a Python object: its budget
    # grows by PER_MATCH_S per match, which a quadratic pattern (O(n) work per match) still blows through
    pattern = re.compile(key, flags)
    slow = []
    for name, text in CRAFTED:
        matches = sum(1 for _ in pattern.finditer(text))
        for how, limit in ((pattern.search, LIMIT_S), (pattern.match, LIMIT_S), (pattern.fullmatch, LIMIT_S),
                           (lambda t: list(pattern.finditer(t)), LIMIT_S + PER_MATCH_S * matches)):
            elapsed = _best_time(how, text, limit)
            if elapsed >= limit:
                slow.append(f"{name}: {elapsed * 1000:.0f} ms")
                break
    assert not slow, f"{key!r} is not linear on: " + "; ".join(slow)
