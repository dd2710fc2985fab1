"""Tests for nanochat/execution.py: the subprocess sandbox (escapes must fail)."""

import glob
import os
import subprocess
import tempfile
import time
import uuid

import pytest

from nanochat.execution import execute_code


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
