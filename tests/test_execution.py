"""Tests for nanochat/execution.py: the subprocess sandbox (escapes must fail)."""

import glob
import os
import subprocess
import tempfile
import time
import uuid

import pytest

from nanochat.execution import SANDBOX_UID, execute_code, isolation


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
# execute_code: forged verdicts (either isolation)

def test_exit_zero_does_not_forge_a_pass():
    # os._exit(0) from the original posix module (a fresh import undoes the in-process guard) exits 0
    # before the tests run; the missing completion record still makes it a failure
    for code in ("import sys; sys.modules.pop('posix'); import posix; posix._exit(0)",
                 "import sys; sys.modules.pop('posix'); import posix; posix.write(1, b'ok'); posix._exit(0)"):
        result = execute_code(code + "\nassert False")
        assert not result.success, code
        assert "completion record" in result.error


def test_always_equal_object_does_not_pass_a_test():
    solution = ("class Anything:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
                "    def __bool__(self): return True\n    def __sub__(self, other): return 0\n    def __rsub__(self, other): return 0\n"
                "def add(a, b):\n    return Anything()\n")
    for test in ("assert add(1, 2) == 3", "assert add(1, 2) == 4", "assert add(1, 2)", "assert abs(add(1, 2) - 3) < 1e-6",
                 "assert [add(1, 2)] == [3]", "class Int(int):\n    def __eq__(self, o): return True\n"
                 "def add(a, b): return Int(0)\nassert add(1, 2) == 3"):
        result = execute_code(solution + test)
        assert not result.success, test
    # plain values still compare as usual, containers and the usual test idioms included
    assert execute_code("def add(a, b):\n    return a + b\nassert add(1, 2) == 3\nassert [add(1, 1), (add(0, 0),)] == [2, (0,)]\n"
                        "assert all(add(x, y) == z for x, y, z in zip([1, 2], [3, 4], [4, 6]))\n"
                        "assert list(map(abs, range(-2, 0))) == [2, 1] and sorted({3: 1}.items()) == [(3, 1)]\n"
                        "assert abs(add(0.1, 0.2) - 0.3) < 1e-9 and add(None or 1, 1) is not None\n").success


# -----------------------------------------------------------------------------
# execute_code: escapes the kernel isolation must stop. Each program first undoes the in-process guards
# (fresh imports of the modules they patch), so only bwrap stands between it and the host.

UNGUARD = ("import sys\n"
           "for _m in ('posix', 'os', 'subprocess', '_posixsubprocess', 'socket', '_socket', 'select', 'selectors', "
           "'ctypes', '_ctypes', 'signal', 'sqlite3', '_sqlite3', 'fcntl', 'mmap'):\n"
           "    sys.modules.pop(_m, None)\n"
           "import posix\n")

needs_bwrap = pytest.mark.skipif(isolation() != "bwrap", reason="bubblewrap isolation unavailable here (see isolation())")


def test_unguard_prelude_really_undoes_the_guards():
    # otherwise the escape tests below would prove nothing: under the fallback the same program does escape
    result = execute_code(UNGUARD + "import os\nprint(os.fork.__name__ != 'denied', posix._exit.__name__)")
    assert result.success, result
    assert result.stdout.split() == ["True", "_exit"]


@needs_bwrap
def test_runs_as_the_unprivileged_sandbox_user_with_an_empty_environment(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    result = execute_code("import os\nprint(os.getuid(), os.getgid(), os.geteuid())\nprint(' '.join(sorted(os.environ)))")
    assert result.success, result
    ids, names = result.stdout.splitlines()
    assert [int(x) for x in ids.split()] == [SANDBOX_UID] * 3
    # nothing of ours: only the few variables the sandbox sets itself
    assert set(names.split()) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONIOENCODING", "OMP_NUM_THREADS",
                                  "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PWD"}, names


@needs_bwrap
def test_host_survives_and_other_processes_are_unreachable():
    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)  # its own group: -pid names only it
    try:
        # only pids we own: were the isolation ever to regress, this must not take the machine down with it
        code = UNGUARD + (f"for pid in ({victim.pid}, -{victim.pid}):\n"
                          "    try:\n        posix.kill(pid, 9)\n    except OSError as e:\n        print('refused', pid, e)\n")
        execute_code(code)
        assert victim.poll() is None  # still running, and so are we
    finally:
        victim.kill()
        victim.wait()


@needs_bwrap
def test_parent_environment_is_unreadable():
    # /proc/<pid>/environ shows a process's environment as it started: the secret goes into a process started
    # with it (as a trainer holding a token would be), and the program looks for it there and in its ancestors
    secret = "hunter2-" + uuid.uuid4().hex
    holder = subprocess.Popen(["sleep", "30"], env={**os.environ, "NANOCHAT_SECRET_TOKEN": secret}, start_new_session=True)
    try:
        code = UNGUARD + (f"for pid in ({holder.pid}, {os.getpid()}, posix.getppid(), 1):\n"
                          "    for what in ('environ', 'cmdline'):\n"
                          "        try:\n            print(open(f'/proc/{pid}/{what}', 'rb').read())\n"
                          "        except OSError as e:\n            print('refused', pid, what, e)\n")
        result = execute_code(code)
        assert secret not in result.stdout and secret not in result.stderr
    finally:
        holder.kill()
        holder.wait()


@needs_bwrap
def test_nothing_is_written_outside_scratch(tmp_path):
    name = f"outside_{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}.db", f"/dev/shm/{name}", str(tmp_path / name), f"/var/tmp/{name}"]
    victim = tmp_path / "keep.txt"
    victim.write_text("important")
    code = UNGUARD + (
        "import sqlite3, os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        sqlite3.connect(path).execute('create table t(x)')\n"
        "    except Exception as e:\n        print('sqlite refused', path, e)\n"
        "    try:\n"
        "        fd = posix.open(path, posix.O_WRONLY | posix.O_CREAT, 0o644); posix.write(fd, b'x')\n"
        "    except OSError as e:\n        print('open refused', path, e)\n"
        f"for call in (lambda: posix.setxattr({str(victim)!r}, 'user.x', b'1'), lambda: posix.unlink({str(victim)!r}),\n"
        f"             lambda: posix.chmod({str(victim)!r}, 0o777)):\n"
        "    try:\n        call()\n    except OSError as e:\n        print('refused', e)\n"
        "open('inside.txt', 'w').write('fine')\n")
    result = execute_code(code)
    assert result.success, result  # the program itself ran; every write outside simply failed
    for path in targets:
        assert not os.path.exists(path), path
    assert victim.read_text() == "important"
    assert oct(victim.stat().st_mode & 0o777) != oct(0o777)
    assert not hasattr(os, "getxattr") or "user.x" not in os.listxattr(victim)


def _processes_with(marker):
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


@needs_bwrap
@pytest.mark.parametrize("wait", [False, True])
def test_no_process_outlives_the_sandbox(wait):
    marker = f"{uuid.uuid4().int % 10**6 + 10**6}.25"  # a unique sleep duration names the orphan
    code = UNGUARD + ("pid = posix.fork()\n"
                      "if pid == 0:\n"
                      "    posix.setsid()\n"
                      "    if posix.fork() == 0:\n"
                      f"        posix.execv('/bin/sleep', ['sleep', {marker!r}])\n"
                      "    posix._exit(0)\n"
                      "import time; time.sleep(0.5)\n"
                      + ("while True: pass\n" if wait else ""))
    result = execute_code(code, timeout=3.0)
    assert result.timed_out == wait
    time.sleep(0.5)
    assert _processes_with(marker) == []


@needs_bwrap
def test_no_network_not_even_loopback():
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = UNGUARD + ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
                          f"try:\n    s.connect(('127.0.0.1', {port})); print('connected')\n"
                          "except OSError as e:\n    print('refused', e)\n")
        result = execute_code(code)
        assert "connected" not in result.stdout
        with pytest.raises(OSError):  # socket.timeout is an OSError
            server.accept()
    finally:
        server.close()


def test_fallback_warns_loudly(monkeypatch, capfd):
    from nanochat import execution
    monkeypatch.setattr(execution, "_isolation", None)
    monkeypatch.setattr(execution, "_sandbox_python", execution._sandbox_python)  # restored after the test too
    monkeypatch.setenv("NANOCHAT_SANDBOX", "none")
    assert execution.isolation() == "none"
    assert "WARNING" in capfd.readouterr().err
    assert execute_code("print(2 + 2)").stdout == "4\n"  # the fallback still runs code


@needs_bwrap
def test_process_count_is_limited():
    # bounded at 40 attempts whatever happens, so even a broken limit cannot turn this into a fork bomb
    code = UNGUARD + ("made = 0\n"
                      "for _ in range(40):\n"
                      "    try:\n        pid = posix.fork()\n    except OSError:\n        break\n"
                      "    if pid == 0:\n        import time; time.sleep(30); posix._exit(0)\n"
                      "    made += 1\n"
                      "print(made)\n")
    result = execute_code(code, timeout=10.0)
    assert result.success, result
    assert int(result.stdout.split()[-1]) < 20  # RLIMIT_NPROC in the sandbox is 16 processes
