"""Tests for nanochat/execution.py: the subprocess sandbox (escapes must fail) and the safe calculator."""

import glob
import os
import subprocess
import tempfile
import time
import uuid

import pytest

from nanochat.execution import MAX_EXPR_CHARS, execute_code, use_calculator


def _scratch_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "nanochat_exec_*")))


# -----------------------------------------------------------------------------
# execute_code: normal behaviour


def test_runs_code_and_captures_output():
    result = execute_code("print('hello'); import sys; print('oops', file=sys.stderr)")
    assert result.success and not result.timed_out and not result.memory_exceeded
    assert result.stdout == "hello\n"
    assert "oops" in result.stderr
    assert result.error is None


def test_exception_reports_last_traceback_line():
    result = execute_code("def f():\n    raise ValueError('bad value')\nf()")
    assert not result.success
    assert result.error == "ValueError: bad value"


def test_failed_assertion_is_failure():
    assert not execute_code("assert 1 == 2").success
    assert execute_code("assert 1 == 1").success


def test_sys_exit_does_not_count_as_success():
    # otherwise `sys.exit(0)` before the appended tests would pass any HumanEval problem
    for code in ("import sys; sys.exit(0)", "exit()", "raise SystemExit", "import os; os._exit(0)"):
        result = execute_code(code + "\nassert False")
        assert not result.success, code


def test_stdin_is_closed():
    result = execute_code("print(input())")
    assert not result.success and "EOFError" in result.error


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    result = execute_code("import os; print(sorted(os.environ))")
    assert result.success
    assert "NANOCHAT_SECRET_TOKEN" not in result.stdout and "hunter2" not in result.stdout


def test_scratch_dir_is_cwd_writable_and_removed():
    before = _scratch_dirs()
    result = execute_code("import os\nopen('notes.txt', 'w').write('x')\nos.mkdir('sub')\nprint(os.getcwd())")
    assert result.success, result
    cwd = result.stdout.strip()
    assert os.path.basename(cwd) == "work"
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))
    assert _scratch_dirs() == before


def test_non_string_code_is_a_type_error():
    with pytest.raises(TypeError):
        execute_code(b"print(1)")


# -----------------------------------------------------------------------------
# execute_code: escapes that must fail


@pytest.mark.parametrize("template", [
    "open({path!r}, 'w').write('x')",
    "open({path!r}, 'a').write('x')",
    "import pathlib; pathlib.Path({path!r}).write_text('x')",
    "import io; io.FileIO({path!r}, 'w')",
    "import os; os.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "import os; os.symlink('/tmp', 'link'); open('link/' + {name!r}, 'w').write('x')",
    "import shutil; open('src', 'w').write('x'); shutil.copy('src', {path!r})",
])
def test_writing_outside_scratch_fails(template):
    name = f"outside_{uuid.uuid4().hex}"
    path = os.path.join("/tmp", name)
    result = execute_code(template.format(path=path, name=name))
    try:
        assert not result.success
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.remove(path)


def test_deleting_outside_scratch_fails(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("important")
    for code in (f"import os; os.remove({str(victim)!r})", f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                 f"import os; os.rename({str(victim)!r}, 'stolen.txt')"):
        assert not execute_code(code).success, code
    assert victim.read_text() == "important"


def test_process_spawning_fails(tmp_path):
    marker = tmp_path / "spawned"
    for code in (f"import os; os.system('touch {marker}')",
                 f"import subprocess; subprocess.run(['touch', '{marker}'])",
                 f"import subprocess; subprocess.check_output('touch {marker}', shell=True)",
                 f"import os; os.popen('touch {marker}')",
                 "import os; os.fork()",
                 f"import os; os.execv('/usr/bin/touch', ['touch', '{marker}'])",
                 f"import pty; pty.spawn(['touch', '{marker}'])",
                 "import multiprocessing"):
        result = execute_code(code)
        assert not result.success, code
    assert not marker.exists()


def test_killing_other_processes_fails():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        for code in (f"import os; os.kill({victim.pid}, 9)", f"import os, signal; os.killpg({victim.pid}, 9)"):
            assert not execute_code(code).success, code
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


def test_sockets_and_ctypes_unavailable():
    assert not execute_code("import socket; socket.socket()").success
    assert not execute_code("import ctypes; ctypes.CDLL(None).system(b'true')").success


def test_infinite_loop_times_out():
    start = time.time()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert time.time() - start < 5
    assert result.timed_out and not result.success
    assert "Timeout" in result.error


def test_timeout_kills_background_children():
    # a sleeping thread keeps the process alive; the kill must still take it down promptly
    start = time.time()
    result = execute_code("import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()", timeout=1.0)
    assert result.timed_out
    assert time.time() - start < 5


def test_huge_allocation_hits_memory_limit():
    result = execute_code("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", memory_limit_mb=256)
    assert not result.success
    assert result.memory_exceeded
    assert "allocated" not in result.stdout


def test_output_flood_is_bounded():
    result = execute_code("while True:\n    print('x' * 10000)", timeout=3.0)
    assert not result.success
    assert len(result.stdout) < 2 * 1024 * 1024


# -----------------------------------------------------------------------------
# use_calculator


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
