"""dev/gpu_checks.sh runs on a lent GPU whose minutes are few: every command it names must at least parse and
every rollout mode it asks for must exist, checked here so that a typo cannot cost a device run (one did: a flag
passed as `--cotrain_args "--keep_graphs"`, which argparse reads as a flag of its own)."""

import importlib
import re
import shlex
import sys

import pytest

from tests.test_engine import StandInTokenizer, tiny_model

SCRIPT = "dev/gpu_checks.sh"


def commands():
    """(module, argv) of every `$PY -m dev.X ...` / `$PY -m scripts.X ...` line, continuation lines joined."""
    text = open(SCRIPT, encoding="utf-8").read().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        match = re.search(r"\$PY -m ((?:dev|scripts)\.\w+)(.*)", line)
        if match:
            found.append((match.group(1), shlex.split(match.group(2))))
    return found


def test_the_script_names_commands():
    modules = {module for module, _ in commands()}
    assert {"dev.bench_rollout", "dev.bench_cotrain"} <= modules and len(commands()) > 20


@pytest.mark.parametrize("module,argv", commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_command_parses(module, argv, monkeypatch, capsys):
    """Each command's flags as its parser reads them: --help at the end exits 0 only if nothing before it failed."""
    monkeypatch.setattr(sys, "argv", [module] + argv + ["--help"])
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err


def test_every_rollout_mode_exists():
    from dev.bench_rollout import make_engine
    model = tiny_model()
    modes = {mode for module, argv in commands() if module == "dev.bench_rollout"
             for flag, value in zip(argv, argv[1:]) if flag in ("--modes", "--profile") for mode in value.split(",")}
    assert "compiled_graph-fusedqkv" in modes and len(modes) > 20
    for mode in sorted(modes):
        make_engine(model, StandInTokenizer(), mode)  # raises ValueError on a mode or option it does not know


def test_a_broken_command_is_caught(monkeypatch):
    """The check can fail: the command part 14 ran, as it was."""
    monkeypatch.setattr(sys, "argv", ["dev.bench_cotrain", "--steps", "3", "--cotrain_args", "--keep_graphs", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module("dev.bench_cotrain").main()
    assert exit_info.value.code == 2
