"""
Answer formats: how a prompt asks for an answer and how a completion's answer is read back.

  multiple choice   render_mc (the letter-bound prompt), letters_for, extract_choice_letter (the letter a
                    free-form response commits to)
  numbers           "#### N" (GSM8K style): extract_hash_answer, parse_number, same_number, normalize_number

Everything here runs on model output, so it never raises on garbage: it returns None.
"""

import re
from decimal import Decimal, InvalidOperation


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt. Each choice is followed by '=LETTER' with no space, so the letter the
    model must produce is the same token it saw bound to the choice (' A' and 'A' are different tokens).
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines.append("")
    lines.append("Respond only with the letter of the correct answer.")
    return "\n".join(lines)


def letters_for(n):
    if not 1 <= n <= 26:
        raise ValueError(f"cannot letter {n} choices")
    return [chr(ord("A") + k) for k in range(n)]


# Model output is parsed with linear-time patterns only (possessive runs, no two unbounded quantifiers that
# can trade characters) and only its last/first MAX_PARSE_CHARS characters are scanned: a degenerate
# completion (a run of whitespace, a keyword repeated) must never stall the training loop.
# tests/test_parsers_linear.py times every parser on 10^5-character inputs and lists every such pattern.
MAX_PARSE_CHARS = 20_000

# Explicit answer statements, forward: "Answer: C", "the answer is (c)", "**Answer:** C", "Ans - C",
# "correct option is C)", "CORRECT OPTION: OPTION E", "\boxed{C}"
_ANSWER_FORWARD = re.compile(
    r"\b(?:answer|ans|correct\s++(?:option|choice))\b[*\s]*+(?:(?:is|would\s++be|will\s++be|should\s++be)\b)?[*\s]*+[:=\-,]?[*\s]*+"
    r"(?:(?:option|choice)\b\s*+[:\-]?\s*+)?(?:\(([A-Za-z])\)|\[([A-Za-z])\]|\\boxed\{([A-Za-z])\}|([A-Za-z])(?![A-Za-z0-9]))",
    re.IGNORECASE)
# ... and backward: "D is the answer", "Option B is correct", "(C) is the right choice" (capital letters only)
_ANSWER_BACKWARD = re.compile(
    r"(?<![A-Za-z0-9'])(?:[Oo]ption\s++|[Cc]hoice\s++)?\(?([A-Z])\)?\s++is\s++(?:the\s++)?(?:(?:correct|right)\b(?:\s++(?:answer|option|choice)\b)?|answer\b)")
# a last line that is only a letter: "D", "(B)", "Option C", "c."
_LETTER_LINE = re.compile(r"^[*`'\"\s]*+(?:(?:option|choice)\s*+[:\-]?\s*+)?[(\[]?([A-Za-z])[)\]]?[.:]?[*`'\"\s]*+$", re.IGNORECASE)
_MARKED_LETTER = re.compile(r"(?:\(([A-Z])\)|(?<![A-Za-z0-9/])([A-Z])\))")   # "(C)" or "C)", not "P(A/B)"
_ANSWER_TAIL = re.compile(r"\banswer\b[*\s]*+(?:(?:is|would\s++be|will\s++be|should\s++be)\b)?[*\s]*+[:=\-,]?\s*+(.+)", re.IGNORECASE)
# after a lowercase letter only punctuation may follow on its line ("the answer is a number" is not an answer)
# (applied right after a letter; the lookbehind only keeps a search over a long run linear)
_LINE_END = re.compile(r"(?<![ \t*.)\]!,;:])[ \t*]*+[.)\]!,;:]*+[ \t*]*+(?:\n|$)")


def _normalize_option_text(text):
    text = text.strip().lower().strip("$*`'\" ").rstrip(".")
    return re.sub(r"\s+", " ", text)


def extract_choice_letter(text, letters, options=None):
    """
    The choice letter a free-form response commits to, or None.
    1. the last explicit statement ("Answer: C", "the answer is (c)", "C is the correct answer", ...);
    2. a last line that is just a letter ("C", "(C)", "Option C");
    3. an answer stated as an option's text ("the answer is 600"), when `options` are given and exactly one matches;
    4. the last "(C)" / "C)" marker.
    Letters outside `letters` never count; None when nothing qualifies.
    """
    if not isinstance(text, str):
        return None
    text = text[-MAX_PARSE_CHARS:]  # the answer a response commits to is near its end
    allowed = {letter.upper() for letter in letters}
    explicit = []
    for m in _ANSWER_FORWARD.finditer(text):
        letter = next(g for g in m.groups() if g)
        if m.group(4) and letter.islower() and not _LINE_END.match(text, m.end()):
            continue
        if letter.upper() in allowed:
            explicit.append((m.start(), letter.upper()))
    for m in _ANSWER_BACKWARD.finditer(text):
        if m.group(1) in allowed:
            explicit.append((m.start(), m.group(1)))
    if explicit:
        return max(explicit)[1]
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        m = _LETTER_LINE.match(lines[-1])
        if m and m.group(1).upper() in allowed:
            return m.group(1).upper()
    if options:
        tails = [m.group(1) for m in _ANSWER_TAIL.finditer(text)]
        if tails:
            stated = _normalize_option_text(tails[-1].splitlines()[0])
            hits = [letter for letter, option in zip(letters, options) if _normalize_option_text(option) == stated]
            if len(hits) == 1:
                return hits[0].upper()
    marked = [next(g for g in m.groups() if g) for m in _MARKED_LETTER.finditer(text)]
    marked = [letter for letter in marked if letter in allowed]
    return marked[-1] if marked else None


# -----------------------------------------------------------------------------
# Numeric answers ("#### N", GSM8K style)

_HASH_ANSWER = re.compile(r"####\s*+\$?\s*+(-?\s*+(?:[\d,]*+\.\d++|(?:,*+\d)++))")


def parse_number(text):
    """'1,234', '$18', '18.0', '-3.' -> Decimal; None if it is not a plain number."""
    if text is None:
        return None
    s = str(text).strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def extract_hash_answer(text):
    """The number after the first '####' in text (commas, '$' and a trailing '.' tolerated), as a string; else None."""
    if not isinstance(text, str):
        return None
    m = _HASH_ANSWER.search(text[:MAX_PARSE_CHARS])  # the first '####' counts
    if m is None:
        return None
    number = parse_number(m.group(1))
    return None if number is None else m.group(1).replace(",", "").replace(" ", "")


def same_number(a, b):
    """Numeric equality of two answer strings (18 == 18.0 == '18.'); False if either is not a number."""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


def normalize_number(text):
    """A numeric answer string in one canonical spelling ('18.0', '18', '18.' -> '18'), so equal answers
    compare (and vote, in majority rewards) equal; None if it is not a number."""
    number = parse_number(text)
    if number is None:
        return None
    if number == number.to_integral_value():
        return str(int(number))
    return str(number.normalize())
