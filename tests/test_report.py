"""
Tests for nanochat/report.py: sections, curves, the summary table, wall clock, plots, the CLI.
"""

import os
import json
import datetime

import pytest

from nanochat import report as report_mod
from nanochat.report import DummyReport, get_report, extract_metrics, slugify, guess_curve_kind


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path / "base"


def _set_timestamp(path, when):
    text = open(path, encoding="utf-8").read()
    lines = text.split("\n")
    lines[1] = "timestamp: " + when.strftime(report_mod.TIME_FORMAT)
    open(path, "w", encoding="utf-8").write("\n".join(lines))


def test_log_formats_values_and_replaces_section(base_dir):
    report = get_report()
    path = report.log("Chat SFT", [{"lr": 0.00012345, "steps": 123456, "small": 42, "flag": True,
                                    "nested": {"a": 1}}, "| a | b |"])
    text = open(path, encoding="utf-8").read()
    assert os.path.basename(path) == "chat-sft.md"
    assert text.startswith("## Chat SFT\ntimestamp: ")
    assert "- lr: 0.0001\n" in text
    assert "- steps: 123,456\n" in text
    assert "- small: 42\n" in text
    assert "- flag: True\n" in text
    assert '- nested: {"a": 1}\n' in text
    assert "- nested: {\"a\": 1}\n\n| a | b |" in text  # a blank line before the table
    report.log("Chat SFT", [{"only": 1}])  # logging again replaces the section
    text = open(path, encoding="utf-8").read()
    assert "- only: 1" in text and "steps" not in text
    with pytest.raises(TypeError):
        report.log("Chat SFT", [3.0])


def test_non_zero_rank_gets_dummy(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    report = get_report()
    assert isinstance(report, DummyReport)
    report.log("Chat SFT", [{"x": 1}])
    report.log_curve("sft/loss", 1, 2.0)
    assert not (base_dir / "report").exists()


def test_helpers():
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"
    assert slugify("Co-training") == "co-training"
    with pytest.raises(ValueError):
        slugify("???")
    assert guess_curve_kind("sft/val_loss") == "loss"
    assert guess_curve_kind("base/val_bpb") == "loss"
    assert guess_curve_kind("rl/mean_reward") == "reward"
    assert guess_curve_kind("sft/mmlu_acc") == "accuracy"
    assert guess_curve_kind("rl/pass@1") == "accuracy"
    assert guess_curve_kind("base/lrm") == "other"
    text = "- ARC-Easy: 0.5000\n- mmlu: 0.25\n- GSM8K: 1,234\n- Not a metric: 3\n- ChatCORE: -0.0300\n- CORE: n/a\n"
    assert extract_metrics(text) == {"ARC-Easy": 0.5, "MMLU": 0.25, "GSM8K": 1234.0, "ChatCORE": -0.03}


def test_generate_on_run_directory(base_dir, tmp_path, monkeypatch):
    """A whole fake run: header, sections out of order, curves (one malformed line), then generate."""
    report = get_report()
    header = report.reset()
    assert header["torch"] and "start_time" in header
    report_dir = base_dir / "report"
    start = datetime.datetime.strptime(header["start_time"], report_mod.TIME_FORMAT)

    # sections written out of pipeline order; generate must reorder them
    p_sft_eval = report.log("Chat evaluation sft", [{"ARC-Easy": 0.5, "MMLU": 0.4, "ChatCORE": 0.2}])
    p_base = report.log("Base model evaluation", [{"CORE": 0.2219}])
    p_mid_eval = report.log("Chat evaluation mid", [{"ARC-Easy": 0.35, "GSM8K": 0.025, "ChatCORE": 0.07}])
    p_custom = report.log("My extra stage", [{"note": "hello"}])
    p_tok = report.log("Tokenizer training", [{"vocab_size": 32768}])
    for i, p in enumerate([p_tok, p_base, p_mid_eval, p_sft_eval, p_custom]):
        _set_timestamp(p, start + datetime.timedelta(minutes=30 * i))
    # pretend the header said one H100 so the cost is computable
    hj = json.load(open(report_dir / "header.json"))
    hj["gpus"] = {"count": 8, "names": ["NVIDIA H100 80GB HBM3"] * 8, "memory_gib": [79.1] * 8, "cuda": "12.8"}
    hj["gpu_hourly_rate"] = report_mod.gpu_hourly_rate(hj["gpus"]["names"])
    json.dump(hj, open(report_dir / "header.json", "w"))

    for step in range(10):
        report.log_curve("sft/train_loss", step, 3.0 - 0.1 * step)
        report.log_curve("rl/reward", step, 0.1 * step)
    report.log_curve("sft/mmlu_acc", 5, 0.3)
    with open(report_dir / "curves" / "rl-reward.jsonl", "a") as f:
        f.write("{not json\n")

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = report.generate()
    text = open(path, encoding="utf-8").read()

    # pipeline order, extra sections after the known ones
    order = [text.index(h) for h in ("## Tokenizer training", "## Base model evaluation", "## Chat evaluation mid",
                                     "## Chat evaluation sft", "## My extra stage", "## Summary")]
    assert order == sorted(order)
    assert "Run started:" in text and "torch" in text
    # summary table: columns present in pipeline order, '-' where a stage lacks the metric
    assert "| Metric | BASE | MID | SFT |" in text
    assert "| CORE | 0.2219 | - | - |" in text
    assert "| ARC-Easy | - | 0.3500 | 0.5000 |" in text
    assert "| GSM8K | - | 0.0250 | - |" in text
    assert "| ChatCORE | - | 0.0700 | 0.2000 |" in text
    # 4 x 30 minutes after the start; 8 GPUs x 2 h x $3
    assert "Total wall clock time: 2h00m" in text
    assert "Estimated cost: $48.00" in text
    # plots exist, are PNGs and are referenced
    for kind in ("loss", "reward", "accuracy"):
        png = report_dir / "plots" / f"{kind}.png"
        assert png.exists() and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{kind}.png)" in text
    # the copy in the cwd points at the plots by absolute path
    copy = open(cwd / "report.md", encoding="utf-8").read()
    assert f"]({report_dir}/plots/loss.png)" in copy
    # reset clears the previous run
    report.reset()
    assert sorted(os.listdir(report_dir)) == ["header.json", "header.md"]


def test_curves_keep_the_latest_value_of_a_step(base_dir):
    """A resumed run logs some steps again; those points replace the old ones instead of zigzagging."""
    report = get_report()
    for step, value in [(1, 5.0), (2, 4.0), (3, 3.0), (2, 4.5), (3, 3.5), (4, 2.0)]:
        report.log_curve("mid/train_loss", step, value)
    curves = report_mod.read_curves(str(base_dir / "report"))
    assert curves == {"loss": {"mid/train_loss": [(1, 5.0), (2, 4.5), (3, 3.5), (4, 2.0)]}}


def test_generate_without_header_or_metrics(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = get_report()
    text = open(report.generate(), encoding="utf-8").read()
    assert "no header" in text and "(no metrics logged yet)" in text and "unknown" in text
    corrupt = base_dir / "report" / "header.json"
    corrupt.write_text("{oops")
    report.log("Chat SFT", [{"x": 1}])
    text = open(report.generate(), encoding="utf-8").read()  # still generates
    assert "## Chat SFT" in text


def test_cli_reset_and_generate(base_dir, tmp_path, monkeypatch, capsys):
    """The `python -m nanochat.report reset|generate` entry point (called in-process: a subprocess
    would spend seconds importing torch)."""
    monkeypatch.chdir(tmp_path)
    report_mod.main(["reset"])
    assert (base_dir / "report" / "header.md").exists()
    report_mod.main(["generate"])
    assert (tmp_path / "report.md").exists() and (base_dir / "report" / "report.md").exists()
    with pytest.raises(SystemExit):
        report_mod.main(["bogus"])
    assert "invalid choice" in capsys.readouterr().err
