"""
A safe calculator for the chat model's python tool.

use_calculator() never executes code: it parses the expression with `ast` and evaluates a small whitelist
of node types itself, with bounds on every number and string it makes. Anything outside the whitelist,
or any result that is not a finite real number or a short string, comes back as a string starting with
"Error:"; it never raises and never writes to stderr (the parser's SyntaxWarnings are swallowed).
"""

import ast
import math
import re
import warnings

MAX_EXPR_CHARS = 300
MAX_INT_DIGITS = 60           # any intermediate integer beyond this is refused
MAX_POW_RESULT_DIGITS = 60
MAX_STR_CHARS = 200           # longest string a method may return (upper/lower/replace)
_STR_METHODS = {"count", "upper", "lower", "strip", "find", "startswith", "endswith", "replace", "index"}
_FUNCTIONS = {"len": len, "abs": abs, "round": round, "min": min, "max": max}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


class CalculatorError(Exception):
    pass


def _check_number(x):
    if isinstance(x, int) and abs(x) >= 10 ** MAX_INT_DIGITS:
        raise CalculatorError("number too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not finite")
    return x


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _checked_pow(base, exponent):
    if not (_is_number(base) and _is_number(exponent)):
        raise CalculatorError("** needs numbers")
    if abs(exponent) > 1000:
        raise CalculatorError("exponent too large")
    if base != 0 and abs(base) != 1:
        digits = abs(exponent) * math.log10(abs(base)) if abs(base) > 0 else 0
        if digits > MAX_POW_RESULT_DIGITS:
            raise CalculatorError("result too large")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    result = base ** exponent
    if isinstance(result, complex):  # (-8)**0.5: Python answers with a complex number, a calculator refuses
        raise CalculatorError("result is not a real number")
    return result


def _evaluate_node(node):
    if isinstance(node, ast.Expression):
        return _evaluate_node(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
            raise CalculatorError(f"constant {node.value!r} is not allowed")
        if isinstance(node.value, str) and len(node.value) > MAX_STR_CHARS:
            raise CalculatorError("string too long")
        return _check_number(node.value) if _is_number(node.value) else node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate_node(node.operand)
        if not _is_number(value):
            raise CalculatorError("unary minus needs a number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate_node(node.left), _evaluate_node(node.right)
        if not (_is_number(left) and _is_number(right)):
            raise CalculatorError("arithmetic is only allowed on numbers")
        if isinstance(node.op, ast.Pow):
            return _check_number(_checked_pow(left, right))
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        return _check_number(op(left, right))
    if isinstance(node, ast.Call):
        if node.keywords:
            raise CalculatorError("keyword arguments are not allowed")
        if len(node.args) > 3:
            raise CalculatorError("too many arguments")
        args = [_evaluate_node(a) for a in node.args]
        func = node.func
        if isinstance(func, ast.Name):
            if func.id not in _FUNCTIONS:
                raise CalculatorError(f"function {func.id!r} is not allowed")
            if func.id == "len" and not (len(args) == 1 and isinstance(args[0], str)):
                raise CalculatorError("len() takes one string")
            if func.id != "len" and not all(_is_number(a) for a in args):
                raise CalculatorError(f"{func.id}() takes numbers")
            if func.id == "round" and len(args) == 2 and not (isinstance(args[1], int) and abs(args[1]) <= 20):
                raise CalculatorError("round() digits out of range")
            return _check_number(_FUNCTIONS[func.id](*args))
        if isinstance(func, ast.Attribute):
            if func.attr not in _STR_METHODS:
                raise CalculatorError(f"method {func.attr!r} is not allowed")
            receiver = _evaluate_node(func.value)
            if not isinstance(receiver, str) or not all(isinstance(a, str) for a in args):
                raise CalculatorError("string methods need string arguments")
            result = getattr(receiver, func.attr)(*args)
            if isinstance(result, str) and len(result) > MAX_STR_CHARS:
                raise CalculatorError("string too long")
            return result
        raise CalculatorError("only plain function and string-method calls are allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed")


_THOUSANDS_GROUP = re.compile(r"\d{3}(?!\d)")


def _strip_number_commas(expr):
    # "1,234,567+5" -> "1234567+5"; only thousands separators go, so max(1,2) and 'a,b'.count(',') keep theirs
    out, quote = [], None
    for i, ch in enumerate(expr):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "," and i > 0 and expr[i - 1].isdigit() and _THOUSANDS_GROUP.match(expr, i + 1):
            continue
        out.append(ch)
    return "".join(out)


def format_number(value):
    """Calculator-style rendering: integers without '.0', floats rounded to 10 decimal places."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        value = round(value, 10)
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return repr(value)
    return str(value)


def use_calculator(expr: str) -> str:
    """
    Evaluate a calculator expression from the model's python tool and return the result as a string.
    Allowed: numbers, + - * / // % and bounded **, parentheses, unary minus, commas inside numbers,
    len/abs/round/min/max, and simple string methods such as 'strawberry'.count('r').
    Anything else, or anything malformed, returns a string starting with "Error:". Never raises.
    """
    try:
        if not isinstance(expr, str):
            return "Error: expression must be a string"
        expr = expr.strip()
        if not expr:
            return "Error: empty expression"
        if len(expr) > MAX_EXPR_CHARS:
            return f"Error: expression longer than {MAX_EXPR_CHARS} characters"
        expr = _strip_number_commas(expr)
        try:
            # compiling "'a'(1)" or "1 is 1" emits a SyntaxWarning on stderr; the model's nonsense must not
            # clutter a training log, and the evaluator refuses those expressions anyway
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(expr, mode="eval")
        except SyntaxError:
            return "Error: invalid syntax"
        value = _evaluate_node(tree)
        return format_number(value)
    except CalculatorError as e:
        return f"Error: {e}"
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as e:
        return f"Error: {type(e).__name__}: {e}"
    except Exception as e:  # the contract is "never raises"; anything unexpected is still just an error string
        return f"Error: {type(e).__name__}"
