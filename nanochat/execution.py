"""
Running model-written code: a subprocess sandbox for Python programs (HumanEval-style evaluation,
code rewards). The chat model's python tool uses nanochat/calculator.py instead, which executes nothing.

execute_code() runs a program in a fresh interpreter with a wall-clock timeout, an address-space
limit, a throwaway working directory, a scrubbed environment, no stdin, and a guard prelude that
disables the obvious ways to touch the rest of the machine (process spawning, signals, writes
outside the scratch directory, sockets, ctypes).

This is NOT a security boundary. The guard lives inside the same interpreter as the untrusted code,
so determined code can get around it (reading any file the user can read is allowed; the original
FileIO class is reachable by introspection; CPU and memory are only bounded, not isolated). It is
meant to stop accidents and casual reward hacking by a small model, not an adversary. Run it in a
container or VM if the code may be hostile.
"""

import os
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
import sys, os, builtins, io, _io
_scratch = os.path.realpath(sys.argv[1])
_program_path = sys.argv[2]
_mem_bytes = int(sys.argv[3]) * 1024 * 1024
_fsize_bytes = int(sys.argv[4])

try:
    import resource
    for _lim, _val in ((resource.RLIMIT_AS, _mem_bytes), (resource.RLIMIT_DATA, _mem_bytes),
                       (resource.RLIMIT_FSIZE, _fsize_bytes), (resource.RLIMIT_CORE, 0)):
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

# let the program see the world as a fresh __main__ with nothing of ours in scope
_globals = {"__name__": "__main__", "__builtins__": builtins}
_code = compile(_source, "<program>", "exec")
del _f, _mod, _name, _n
try:
    exec(_code, _globals)
except SystemExit as e:
    sys.stderr.write(f"SystemExit: the program exited early (code {e.code!r})\n")
    sys.stderr.flush()
    sys.stdout.flush()
    raise SystemExit(3)
sys.stdout.flush()
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


def _force_rmtree(path):
    def make_writable_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=make_writable_and_retry)


def execute_code(code: str, timeout: float = 5.0, memory_limit_mb: int = 256) -> ExecutionResult:
    """
    Run `code` as a Python program in a separate, freshly started interpreter and report what happened.
    success is True only if the program ran to its end: no uncaught exception, no sys.exit(), no timeout.
    The whole process group is killed on timeout; the scratch directory is always removed.
    Not a security boundary: see the module docstring.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        scratch = os.path.join(root, "work")
        os.mkdir(scratch)
        program_path = os.path.join(root, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-I", "-B", "-c", _RUNNER, scratch, program_path, str(int(memory_limit_mb)), str(MAX_FILE_BYTES)]
        # stdout/stderr go to files outside the scratch dir: bounded by RLIMIT_FSIZE, and the program cannot tamper with them
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        timed_out = False
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                    start_new_session=True, close_fds=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # kill the whole group: also catches anything the program managed to spawn
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
        returncode = proc.returncode
    finally:
        _force_rmtree(root)

    memory_exceeded = (not timed_out) and returncode != 0 and any(
        marker in stderr for marker in ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory"))
    if timed_out:
        error = f"Timeout: the program did not finish within {timeout:g} s"
    elif returncode == 0:
        error = None
    elif memory_exceeded:
        error = f"MemoryError: the program exceeded the {memory_limit_mb} MB memory limit"
    elif returncode < 0:
        error = f"Killed by signal {signal.Signals(-returncode).name}" if -returncode in signal.valid_signals() else f"Killed by signal {-returncode}"
    else:
        error = _last_line(stderr) or f"Exited with status {returncode}"
    success = (not timed_out) and returncode == 0
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                           timed_out=timed_out, memory_exceeded=memory_exceeded)
