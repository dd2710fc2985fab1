"""
Running model-written code: a sandbox for Python programs (HumanEval-style evaluation, code rewards).
The chat model's python tool uses nanochat/calculator.py instead, which executes nothing.

execute_code() runs a program in a fresh interpreter. Two layers:

1. Isolation by the kernel (when Debian's `bubblewrap` is installed and namespaces work; setup.sh
   installs it): the program runs as an unprivileged user (uid 65534; when we are root we drop to it
   before starting bwrap) in its own user, pid, network, ipc and uts namespaces: no network at all (not
   even loopback), a read-only view of the filesystem except its scratch directory, root's home hidden,
   a private /proc (no other process, so no /proc/<ppid>/environ), an empty environment, limits on
   memory, file size and process count, and the whole process tree dies with the pid namespace when we
   kill it at the timeout.
2. Guards inside the interpreter (always): no process spawning, signals, sockets or ctypes, writes only
   inside the scratch directory. These stop accidents; model code can undo them (they live in its own
   interpreter), which is why layer 1 matters.

Where bubblewrap is missing or namespaces are unavailable (some containers), execute_code falls back to
layer 2 alone and says so loudly, once per process, on stderr (`isolation()` reports which is in use;
NANOCHAT_SANDBOX=none forces the fallback). The fallback is NOT a security boundary.

The verdict cannot be forged the easy ways: success needs the interpreter to exit normally AND a
completion record carrying a random per-run token on a pipe only our runner writes after the program
returned (os._exit(0), printing, or exit codes do not make one), and every call inside an `assert` must
return a plain built-in value (exact int/float/str/list/... types), so an object whose __eq__ always
answers True fails the test instead of passing it. A program that searches its own interpreter's memory
for the token can still forge its own pass: it cannot reach the host, the network or anyone's secrets.
"""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# Sandboxed execution

MAX_CAPTURED_BYTES = 1 << 20     # stdout/stderr kept per stream; the rest is dropped
MAX_FILE_BYTES = 16 << 20        # RLIMIT_FSIZE: biggest file (incl. stdout/stderr) the child may write


@dataclass
class ExecutionResult:
    success: bool            # ran to the end of the program without an uncaught exception or exit
    stdout: str
    stderr: str
    error: str | None        # one-line reason when success is False
    timed_out: bool
    memory_exceeded: bool

    def __repr__(self):
        parts = [f"success={self.success}"]
        if self.timed_out:
            parts.append("timed_out=True")
        if self.memory_exceeded:
            parts.append("memory_exceeded=True")
        if self.error:
            parts.append(f"error={self.error!r}")
        if self.stdout:
            parts.append(f"stdout={self.stdout[:200]!r}")
        return f"ExecutionResult({', '.join(parts)})"


# The runner executed by the child interpreter (`python -I -B -c RUNNER scratch_dir program_path memory_mb max_file_bytes`).
# It installs the guards, then runs the program with fresh globals. A program that calls
# sys.exit()/exit() does not count as having run to the end: otherwise `import sys; sys.exit(0)`
# would "pass" any test suite appended after it.
_RUNNER = r'''
import sys, os, builtins, io, _io, ast
_scratch = os.path.realpath(sys.argv[1])
_program_path = sys.argv[2]
_mem_bytes = int(sys.argv[3]) * 1024 * 1024
_fsize_bytes = int(sys.argv[4])
_result_fd, _token_fd = int(sys.argv[5]), int(sys.argv[6])

# the per-run token: read and its pipe closed before any program code runs
_token = b""
while True:
    _chunk = os.read(_token_fd, 64)
    if not _chunk:
        break
    _token += _chunk
os.close(_token_fd)

try:
    import resource
    for _lim, _val in ((resource.RLIMIT_AS, _mem_bytes), (resource.RLIMIT_DATA, _mem_bytes),
                       (resource.RLIMIT_FSIZE, _fsize_bytes), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NPROC, 16)):
        try:
            resource.setrlimit(_lim, (_val, _val))
        except (ValueError, OSError):
            pass  # e.g. RLIMIT_AS on macOS
except ImportError:
    pass

with open(_program_path, "r", encoding="utf-8") as _f:
    _source = _f.read()

class SandboxViolation(PermissionError):
    pass

def _inside_scratch(path):
    if isinstance(path, int):
        return True  # an already-open descriptor; it came through the guarded open
    path = os.fsdecode(os.fspath(path))
    real = os.path.realpath(os.path.join(_scratch, path))
    return real == _scratch or real.startswith(_scratch + os.sep)

def _deny(name):
    def denied(*args, **kwargs):
        raise SandboxViolation(f"{name} is disabled in the sandbox")
    return denied

def _writes_only_inside(name, func, npaths=1):
    # wraps an os function whose first `npaths` arguments are paths it modifies
    def guarded(*args, **kwargs):
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None or kwargs.get("dst_dir_fd") is not None:
            raise SandboxViolation(f"{name} with dir_fd is disabled in the sandbox")
        for p in args[:npaths]:
            if not _inside_scratch(p):
                raise SandboxViolation(f"{name}: writing outside the sandbox directory is not allowed: {p!r}")
        return func(*args, **kwargs)
    return guarded

_WRITE_MODE_CHARS = set("wax+")
_real_open = _io.open

def _guarded_open(file, mode="r", *args, **kwargs):
    if _WRITE_MODE_CHARS & set(str(mode)) and not _inside_scratch(file):
        raise SandboxViolation(f"open: writing outside the sandbox directory is not allowed: {file!r}")
    return _real_open(file, mode, *args, **kwargs)

_real_os_open = os.open
_OS_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _guarded_os_open(path, flags, *args, **kwargs):
    if kwargs.get("dir_fd") is not None:
        raise SandboxViolation("os.open with dir_fd is disabled in the sandbox")
    if flags & _OS_WRITE_FLAGS and not _inside_scratch(path):
        raise SandboxViolation(f"os.open: writing outside the sandbox directory is not allowed: {path!r}")
    return _real_os_open(path, flags, *args, **kwargs)

class _GuardedFileIO(_io.FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if _WRITE_MODE_CHARS & set(str(mode)) and not _inside_scratch(file):
            raise SandboxViolation(f"FileIO: writing outside the sandbox directory is not allowed: {file!r}")
        super().__init__(file, mode, *args, **kwargs)

builtins.open = _guarded_open
io.open = _guarded_open
_io.open = _guarded_open
io.FileIO = _GuardedFileIO
_io.FileIO = _GuardedFileIO

import posix, shutil, subprocess
_PATH_WRITERS = {"remove": 1, "unlink": 1, "rmdir": 1, "mkdir": 1, "makedirs": 1, "removedirs": 1,
                 "rename": 2, "renames": 2, "replace": 2, "link": 2, "symlink": 2,
                 "truncate": 1, "utime": 1, "mkfifo": 1, "mknod": 1}
_DISABLED = ["system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "abort", "_exit",
             "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
             "posix_spawn", "posix_spawnp", "pidfd_open",
             "chdir", "fchdir", "chroot", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
             "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid",
             "setresuid", "setresgid", "setsid", "setpgid", "setpgrp", "nice", "plock", "ftruncate",
             "sched_setaffinity", "setpriority"]
for _mod in (os, posix):
    for _name, _n in _PATH_WRITERS.items():
        if hasattr(_mod, _name):
            setattr(_mod, _name, _writes_only_inside(f"os.{_name}", getattr(_mod, _name), _n))
    for _name in _DISABLED:
        if hasattr(_mod, _name):
            setattr(_mod, _name, _deny(f"os.{_name}"))
    _mod.open = _guarded_os_open

subprocess.Popen = _deny("subprocess.Popen")
for _name in ("_fork_exec", "_posixsubprocess", "_USE_POSIX_SPAWN", "_USE_VFORK"):
    if hasattr(subprocess, _name):
        delattr(subprocess, _name)
shutil.chown = _deny("shutil.chown")

# Modules that would give the program a way around the guards (or off the machine) simply fail to import.
for _name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing",
              "socket", "_socket", "ssl", "_ssl", "select", "selectors", "resource", "pty", "fcntl",
              "mmap", "ipdb", "pdb", "psutil", "tkinter", "webbrowser"):
    sys.modules[_name] = None

# Inside every `assert`, each call's result must be a plain built-in value (exact types, containers
# checked all the way down): an object whose __eq__/__bool__/__sub__ always says "pass" fails instead.
_PLAIN_SCALARS = (int, float, complex, str, bytes, bool, type(None))
_PLAIN_CONTAINERS = (list, tuple, set, frozenset, dict)
# lazy built-ins a test iterates over (`all(f(x) == y for x, y in zip(xs, ys))`): accepted as they are,
# their items reach the comparison through calls that are checked themselves
_PLAIN_ITERATORS = (range, map, filter, zip, enumerate, reversed, type(iter([])), type(iter(())), type(iter("")),
                    type(iter(range(0))), type(x for x in ()), type({}.items()), type({}.keys()), type({}.values()))
_type, _id = type, id

def _plain(value, _depth=0):
    kind = _type(value)
    if kind in _PLAIN_SCALARS or kind in _PLAIN_ITERATORS:
        return value
    if kind in _PLAIN_CONTAINERS and _depth < 50:
        items = [k for pair in value.items() for k in pair] if kind is dict else value
        for item in items:
            _plain(item, _depth + 1)
        return value
    raise AssertionError(f"a value of type {kind.__name__} is not a plain value a test can compare")

class _PlainCalls(ast.NodeTransformer):
    def __init__(self):
        self.in_assert = 0
    def visit_Assert(self, node):
        self.in_assert += 1
        self.generic_visit(node)
        self.in_assert -= 1
        return node
    def visit_Call(self, node):
        self.generic_visit(node)
        if not self.in_assert:
            return node
        checker = ast.Name(id=_CHECKER_NAME, ctx=ast.Load())
        return ast.copy_location(ast.Call(func=checker, args=[node], keywords=[]), node)

_CHECKER_NAME = "__nanochat_plain_" + _token.decode()[:8]
_tree = _PlainCalls().visit(ast.parse(_source, "<program>"))
ast.fix_missing_locations(_tree)
_code = compile(_tree, "<program>", "exec")

# let the program see the world as a fresh __main__ with nothing of ours in scope
_globals = {"__name__": "__main__", "__builtins__": builtins, _CHECKER_NAME: _plain}
del _f, _mod, _name, _n, _tree
try:
    exec(_code, _globals)
except SystemExit as e:
    sys.stderr.write(f"SystemExit: the program exited early (code {e.code!r})\n")
    sys.stderr.flush()
    sys.stdout.flush()
    raise SystemExit(3)
sys.stdout.flush()
sys.stderr.flush()
# the program returned normally: only now does the completion record go out
os.write(_result_fd, _token)
'''


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _read_capped(path):
    with open(path, "rb") as f:
        data = f.read(MAX_CAPTURED_BYTES + 1)
    text = data[:MAX_CAPTURED_BYTES].decode("utf-8", errors="replace")
    if len(data) > MAX_CAPTURED_BYTES:
        text += "\n[... output truncated ...]"
    return text


def _read_pipe(fd, limit):
    # what is already in the pipe, up to limit bytes, never waiting: the runner has exited by now, and an
    # orphan that inherited the write end (possible under the fallback) must not keep us waiting for EOF
    os.set_blocking(fd, False)
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _force_rmtree(path):
    def make_writable_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=make_writable_and_retry)


SANDBOX_UID = 65534            # "nobody": the user model code runs as
SANDBOX_DIR = "/tmp/sandbox"   # inside bwrap (on a private, read-only /tmp): work/ is the scratch dir, ro/ holds the runner
_isolation = None              # "bwrap" or "none", decided once per process
_sandbox_python = None         # the interpreter bwrap runs


def _as_sandbox_user():
    """Popen arguments that start bwrap itself unprivileged when we are root (set between fork and exec by
    subprocess, which unlike a preexec_fn is safe in a threaded process such as the web server)."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


def _bwrap_command(inner, scratch, ro):
    """bwrap arguments for running `inner` isolated, with `scratch` writable at SANDBOX_DIR/work and `ro` at SANDBOX_DIR/ro."""
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
           "--cap-drop", "ALL", "--ro-bind", "/", "/", "--tmpfs", "/root", "--tmpfs", "/home", "--proc", "/proc",
           "--dev", "/dev", "--size", str(1 << 20), "--tmpfs", "/tmp", "--bind", scratch, f"{SANDBOX_DIR}/work",
           "--ro-bind", ro, f"{SANDBOX_DIR}/ro", "--remount-ro", "/tmp",
           "--chdir", f"{SANDBOX_DIR}/work", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--clearenv"]
    env = {"PATH": "/usr/bin:/bin", "HOME": f"{SANDBOX_DIR}/work", "TMPDIR": f"{SANDBOX_DIR}/work", "LANG": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    return cmd + ["--"] + inner


def _make_run_dir():
    """A fresh run directory: work/ (the scratch dir, the sandbox user's) and ro/ (runner and program, read-only).
    The directory is traversable but not listable by others, so the unprivileged sandbox user can reach both."""
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    os.chmod(root, 0o711)
    os.mkdir(os.path.join(root, "work"))
    os.mkdir(os.path.join(root, "ro"))
    os.chmod(os.path.join(root, "ro"), 0o755)
    if os.geteuid() == 0:
        os.chown(os.path.join(root, "work"), SANDBOX_UID, SANDBOX_UID)
    return root


def _probe_bwrap(python):
    """True when bwrap can run `python` in fresh namespaces here (as the sandbox user when we are root)."""
    root = _make_run_dir()
    try:
        cmd = _bwrap_command([python, "-I", "-S", "-c", "print('ok')"], os.path.join(root, "work"), os.path.join(root, "ro"))
        proc = subprocess.run(cmd, capture_output=True, timeout=30, stdin=subprocess.DEVNULL, **_as_sandbox_user())
        return proc.returncode == 0 and proc.stdout.strip() == b"ok"
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        _force_rmtree(root)


def _choose_isolation():
    # our own interpreter when the sandbox user can run it; else the system's (e.g. ours lives under /root);
    # the runner and HumanEval programs need only the standard library
    if os.environ.get("NANOCHAT_SANDBOX", "") == "none" or shutil.which("bwrap") is None or not sys.platform.startswith("linux"):
        return "none", None
    candidates = [os.path.realpath(sys.executable)] + [p for p in ("/usr/bin/python3",) if os.path.exists(p)]
    for python in candidates:
        if _probe_bwrap(python):
            return "bwrap", python
    return "none", None


def isolation():
    """'bwrap' when model code runs in namespaces as an unprivileged user, 'none' for the in-process guards only.
    The first call decides (it runs bwrap once) and warns loudly on stderr when it has to fall back."""
    global _isolation, _sandbox_python
    if _isolation is None:
        _isolation, _sandbox_python = _choose_isolation()
        if _isolation == "none":
            sys.stderr.write(
                "WARNING: nanochat.execution: model-written code runs WITHOUT kernel isolation (no working bubblewrap "
                "/ namespaces here, or NANOCHAT_SANDBOX=none). It can read the parent's environment, write outside "
                "its scratch dir and reach the network; install bubblewrap (setup.sh does) before running untrusted code.\n")
            sys.stderr.flush()
    return _isolation


def execute_code(code: str, timeout: float = 5.0, memory_limit_mb: int = 256) -> ExecutionResult:
    """
    Run `code` as a Python program in a separate, freshly started interpreter and report what happened.
    success is True only if the program ran to its end (no uncaught exception, no exit of any kind, no
    timeout) and our runner's completion record came back; see the module docstring for the isolation.
    The whole process tree is killed on timeout; the scratch directory is always removed.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    isolated = isolation() == "bwrap"
    root = _make_run_dir()
    fds = []
    try:
        scratch, ro = os.path.join(root, "work"), os.path.join(root, "ro")
        for name, text in (("program.py", code), ("runner.py", _RUNNER)):
            with open(os.path.join(ro, name), "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(os.path.join(ro, name), 0o644)
        # the completion channel: the runner writes the token it was handed to result_w only after the program returned
        token = secrets.token_hex(16).encode()
        result_r, result_w = os.pipe()
        token_r, token_w = os.pipe()
        fds += [result_r, result_w, token_r, token_w]
        os.write(token_w, token)
        os.close(token_w)
        fds.remove(token_w)
        if isolated:
            inner = [_sandbox_python, "-I", "-B", f"{SANDBOX_DIR}/ro/runner.py", f"{SANDBOX_DIR}/work",
                     f"{SANDBOX_DIR}/ro/program.py", str(int(memory_limit_mb)), str(MAX_FILE_BYTES), str(result_w), str(token_r)]
            cmd, env, cwd = _bwrap_command(inner, scratch, ro), {}, "/"
            pass_fds = [result_w, token_r]
        else:
            cmd = [sys.executable, "-I", "-B", os.path.join(ro, "runner.py"), scratch, os.path.join(ro, "program.py"),
                   str(int(memory_limit_mb)), str(MAX_FILE_BYTES), str(result_w), str(token_r)]
            env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
                   "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1"}
            cwd, pass_fds = scratch, [result_w, token_r]
        # stdout/stderr go to files outside the scratch dir: bounded by RLIMIT_FSIZE, and the program cannot tamper with them
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        timed_out = False
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                    start_new_session=True, close_fds=True, pass_fds=pass_fds,
                                    **(_as_sandbox_user() if isolated else {}))
            for fd in (result_w, token_r):
                os.close(fd)
                fds.remove(fd)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # kill the whole group (bwrap, and with it the pid namespace: everything the program started)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        record = _read_pipe(result_r, len(token) + 1)
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
        returncode = proc.returncode
    finally:
        for fd in fds:
            os.close(fd)
        _force_rmtree(root)

    completed = record == token
    memory_exceeded = (not timed_out) and returncode != 0 and any(
        marker in stderr for marker in ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory"))
    if timed_out:
        error = f"Timeout: the program did not finish within {timeout:g} s"
    elif returncode == 0 and completed:
        error = None
    elif returncode == 0:
        error = "Exited before the end of the program (no completion record)"
    elif memory_exceeded:
        error = f"MemoryError: the program exceeded the {memory_limit_mb} MB memory limit"
    elif returncode < 0:
        error = f"Killed by signal {signal.Signals(-returncode).name}" if -returncode in signal.valid_signals() else f"Killed by signal {-returncode}"
    else:
        error = _last_line(stderr) or f"Exited with status {returncode}"
    success = (not timed_out) and returncode == 0 and completed
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                           timed_out=timed_out, memory_exceeded=memory_exceeded)
