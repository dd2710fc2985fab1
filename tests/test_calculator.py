"""Tests for nanochat/calculator.py: values, refusals (injections, huge or complex results), never raising, a quiet stderr."""

import subprocess
import sys

import pytest

from nanochat.calculator import MAX_EXPR_CHARS, format_number, use_calculator


@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"), ("16-3-4", "9"), ("80000*1.5", "120000"), ("6/3", "2"), ("2/3", "0.6666666667"),
    ("0.1+0.2", "0.3"), ("7//2", "3"), ("7%3", "1"), ("(1+2)*3", "9"), ("-3*-2", "6"), ("-(4)", "-4"),
    ("1,000+2", "1002"), ("1,234,567*2", "2469134"), ("12,345.5*2", "24691"), ("2**10", "1024"), ("2**-2", "0.25"),
    ("1.5e3", "1500"), ("3/4", "0.75"), ("  5 * 5 ", "25"),
    ("'strawberry'.count('r')", "3"), ('"banana".count("a")', "3"), ("len('word')", "4"),
    ("'Word'.upper()", "WORD"), ("'Word'.lower()", "word"), ("'a,b,c'.count(',')", "2"),
    ("max(1,2)", "2"), ("abs(-3)", "3"), ("round(2.567, 2)", "2.57"),
])
def test_calculator_values(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')", "__import__('os').system('ls')", "().__class__", "().__class__.__bases__[0].__subclasses__()",
    "(1).__class__", "'abc'.__len__()", "'a'.__class__.__mro__", "lambda: 1", "(lambda x: x)(1)",
    "open('/etc/passwd').read()", "eval('1+1')", "exec('x=1')", "getattr(1, 'real')", "globals()",
    "x", "x + 1", "[1, 2]", "{'a': 1}", "[c for c in 'abc']", "f'{1+1}'", "1 if 1 else 2", "1 == 1", "not 1",
    "True + 1", "b'abc'", "1j * 2", "'a' * 10", "'a' + 'b'", "'ab'.count(x)", "'ab'.join('cd')", "'ab'.format()",
    "9**9**9", "10**100", "2**10000", "10**59 * 10**59", "1e308 * 10", "1/0", "5//0", "5%0", "0**-1",
    "1;2", "import os", "a = 1", "(", "", "   ", "1 +", "$5", "1,00",
    "1" * (MAX_EXPR_CHARS + 1), "(" * 200 + "1" + ")" * 200,
])
def test_calculator_refuses(expr):
    result = use_calculator(expr)
    assert isinstance(result, str) and result.startswith("Error:"), (expr, result)


def test_calculator_handles_deep_nesting_within_the_length_limit():
    assert use_calculator("(" * 140 + "1" + ")" * 140) == "1"
    assert use_calculator("-" * (MAX_EXPR_CHARS - 1) + "1") == "-1"


def test_calculator_never_raises_on_non_strings():
    for value in (None, 3, b"1+1", ["1+1"]):
        assert use_calculator(value).startswith("Error:")


def test_calculator_agrees_with_python_on_random_arithmetic():
    import random
    rng = random.Random(0)
    for _ in range(300):
        a, b, c = rng.randint(-999, 999), rng.randint(1, 999), rng.randint(-50, 50)
        op1, op2 = rng.choice("+-*"), rng.choice("+-*/")
        expr = f"{a}{op1}{b}{op2}({c})" if op2 != "/" or c != 0 else f"{a}{op1}{b}"
        expected = eval(expr)  # the oracle; the expressions are generated right here
        got = use_calculator(expr)
        assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-9), expr


@pytest.mark.parametrize("expr", ["(-8)**0.5", "(-1)**0.5", "(-2.5)**(1/3)", "-8**0.5+(-8)**0.5"])
def test_calculator_refuses_complex_results(expr):
    result = use_calculator(expr)
    assert result.startswith("Error:") and "j" not in result, (expr, result)
    assert use_calculator("8**0.5") == format_number(8 ** 0.5)  # a real root still works


# each of these makes Python's compiler print a SyntaxWarning (or DeprecationWarning) while parsing
WARNING_EXPRS = ["'a'(1)", "1 is 1", "(1)(2)", "'\\d'.count('d')", "[1](2)", "1 is not 'a'"]


@pytest.mark.parametrize("expr", WARNING_EXPRS)
def test_calculator_writes_nothing_to_stderr(expr, capfd):
    result = use_calculator(expr)
    assert isinstance(result, str)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_calculator_quiet_in_a_fresh_interpreter():
    # a fresh interpreter with every warning shown (-W default) is where a warning would surface once per site
    code = ("from nanochat.calculator import use_calculator\n"
            f"for e in {WARNING_EXPRS!r}: use_calculator(e)\n"
            "print(use_calculator('(-8)**0.5'))\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("Error:")
