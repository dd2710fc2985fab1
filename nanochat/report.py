"""
The report card: each stage appends a markdown section and curve points as it runs, and
`python -m nanochat.report generate` stitches them into one report.md with a summary table,
the total wall clock, a cost estimate and PNG plots of the training curves.

Everything lives in <base dir>/report/ (NANOCHAT_BASE_DIR, default ~/.cache/nanochat):

    header.md, header.json   written by `python -m nanochat.report reset` at the start of a run
    <slug>.md                one file per section, rewritten by every Report.log(section, ...)
    curves/<slug>.jsonl      curve points, one JSON object per line: {name, step, value, kind, time}
    plots/<kind>.png         one figure per kind of curve (loss, reward, accuracy, ...), by generate
    report.md                by generate; a copy also goes to the current directory

Use from a stage (only rank 0 writes; on other ranks get_report() returns a no-op stand-in):

    from nanochat.report import get_report
    report = get_report()
    report.log_curve("sft/train_loss", step, loss)          # kind guessed from the name: "loss"
    report.log_curve("rl/reward", step, mean_reward)        # -> "reward"
    report.log_curve("sft/mmlu_acc", step, acc)             # -> "accuracy"
    report.log_curve("cotrain/verifier_f1", step, f1, kind="accuracy")   # or say it explicitly
    report.log(section="Chat SFT", data=[user_config, {"Minimum validation loss": 1.23}])

log(section, data): `data` is a list of dicts (each key/value becomes a line "- key: value"; floats
get 4 decimals, ints >= 10,000 get thousands separators) and strings (written verbatim, e.g. a
markdown table). Calling log again with the same section replaces that section.

Curve names are "<stage>/<metric>". The kind is the figure a curve is drawn in; without kind= it is
guessed from the metric name: loss/bpb -> loss, reward -> reward, acc/pass/score -> accuracy,
anything else -> other.

Section titles that `generate` knows, in pipeline order (other sections are appended after them):
    Tokenizer training, Tokenizer evaluation, Base model training, Base model loss,
    Base model evaluation, Midtraining, Chat evaluation mid, Chat SFT, Chat evaluation sft,
    Chat RL, Chat evaluation rl, Chat cotrain (or Co-training), Chat evaluation cotrain
The summary table reads "- METRIC: value" lines (metrics in SUMMARY_METRICS, matched without regard
to case) out of the sections of each stage: base -> BASE, mid -> MID, and so on.
"""

import os
import re
import sys
import json
import shutil
import socket
import datetime
import platform
import subprocess

from nanochat.common import get_base_dir

# (section title, summary-table column)
SECTIONS = [
    ("Tokenizer training", None),
    ("Tokenizer evaluation", None),
    ("Base model training", "BASE"),
    ("Base model loss", "BASE"),
    ("Base model evaluation", "BASE"),
    ("Midtraining", "MID"),
    ("Chat evaluation mid", "MID"),
    ("Chat SFT", "SFT"),
    ("Chat evaluation sft", "SFT"),
    ("Chat RL", "RL"),
    ("Chat evaluation rl", "RL"),
    ("Chat cotrain", "COTRAIN"),
    ("Co-training", "COTRAIN"),
    ("Chat evaluation cotrain", "COTRAIN"),
]
STAGE_COLUMNS = ["BASE", "MID", "SFT", "RL", "COTRAIN"]
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "AQuA",
                   "Arithmetic", "ChatCORE",
                   # co-training's verifier, on held-out labelled solutions (greedy)
                   "Verifier balanced accuracy", "Verifier AUC", "Verifier share Correct", "Verifier gold share Correct",
                   "Verifier steps aligned"]

# On-demand $/GPU-hour used for the cost estimate (list prices of common clouds, rounded)
GPU_HOURLY_RATES = [("h100", 3.00), ("h200", 3.50), ("a100", 1.79), ("v100", 0.55)]
DEFAULT_GPU_HOURLY_RATE = 2.00

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def slugify(text):
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a file name out of {text!r}")
    return slug


def guess_curve_kind(name):
    metric = name.rsplit("/", 1)[-1].lower()
    if "loss" in metric or "bpb" in metric:
        return "loss"
    if "reward" in metric:
        return "reward"
    if any(word in metric for word in ("acc", "pass", "score", "core")):
        return "accuracy"
    return "other"


def format_value(value):
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _now():
    return datetime.datetime.now().strftime(TIME_FORMAT)


def _parse_time(text):
    try:
        return datetime.datetime.strptime(text.strip(), TIME_FORMAT)
    except ValueError:
        return None


# -----------------------------------------------------------------------------
# Facts for the header

def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info():
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if not commit:
        return {"branch": "unknown", "commit": "unknown", "dirty": False, "message": ""}
    return {
        "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]),
        "commit": commit,
        "dirty": bool(_run(["git", "status", "--porcelain"])),
        "message": _run(["git", "log", "-1", "--pretty=%s"]),
    }


def memory_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def gpu_info():
    import torch
    if not torch.cuda.is_available():
        return {"count": 0, "names": [], "memory_gib": [], "cuda": None}
    count = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    return {"count": count, "names": [p.name for p in props],
            "memory_gib": [round(p.total_memory / 2**30, 1) for p in props], "cuda": torch.version.cuda}


def gpu_hourly_rate(gpu_names):
    """$/hour for one GPU of the first kind present; None on a machine without GPUs."""
    if not gpu_names:
        return None
    name = gpu_names[0].lower()
    for key, rate in GPU_HOURLY_RATES:
        if key in name:
            return rate
    return DEFAULT_GPU_HOURLY_RATE


def code_size():
    """Files and lines of the project's Python (what a reader has to get through)."""
    files = [f for f in _run(["git", "ls-files"]).splitlines() if f.endswith(".py")]
    lines = 0
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                lines += sum(1 for _ in fh)
        except OSError:
            pass
    return len(files), lines


# -----------------------------------------------------------------------------
# Writing

class Report:
    """Writes sections and curve points under report_dir. See the module docstring."""

    def __init__(self, report_dir):
        self.report_dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section, data):
        if isinstance(data, (dict, str)):
            data = [data]
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        lines = [f"## {section}", f"timestamp: {_now()}", ""]
        for item in data:
            if item is None:
                continue
            if isinstance(item, str):
                if lines[-1] != "":
                    lines.append("")  # markdown needs a blank line before a table or paragraph
                lines.append(item)
            elif isinstance(item, dict):
                lines.extend(f"- {key}: {format_value(value)}" for key, value in item.items())
            else:
                raise TypeError(f"report data items must be dicts or strings, got {type(item).__name__}")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")
        return path

    def log_curve(self, name, step, value, kind=None):
        kind = kind or guess_curve_kind(name)
        curves_dir = os.path.join(self.report_dir, "curves")
        os.makedirs(curves_dir, exist_ok=True)
        record = {"name": name, "step": int(step), "value": float(value), "kind": kind, "time": _now()}
        with open(os.path.join(curves_dir, slugify(name) + ".jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def reset(self):
        """Start a new run: delete the previous run's sections, curves and plots, write the header."""
        for entry in os.listdir(self.report_dir):
            path = os.path.join(self.report_dir, entry)
            if entry in ("curves", "plots") and os.path.isdir(path):
                shutil.rmtree(path)
            elif entry.endswith((".md", ".json")):
                os.remove(path)
        import torch
        gpus = gpu_info()
        n_files, n_lines = code_size()
        header = {
            "start_time": _now(),
            "git": git_info(),
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "memory_gib": memory_gib(),
            "gpus": gpus,
            "gpu_hourly_rate": gpu_hourly_rate(gpus["names"]),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "code_files": n_files,
            "code_lines": n_lines,
        }
        with open(os.path.join(self.report_dir, "header.json"), "w", encoding="utf-8") as f:
            json.dump(header, f, indent=2)
        with open(os.path.join(self.report_dir, "header.md"), "w", encoding="utf-8") as f:
            f.write(render_header(header))
        return header

    def generate(self, copy_to=None):
        """Write report.md (and copy it to copy_to, default the current directory). Returns its path."""
        text = build_report(self.report_dir)
        path = os.path.join(self.report_dir, "report.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        copy_to = os.getcwd() if copy_to is None else copy_to
        if copy_to and os.path.abspath(copy_to) != os.path.abspath(self.report_dir):
            # the copy points at the plots where they are, since it lives elsewhere
            plots_dir = os.path.join(os.path.abspath(self.report_dir), "plots")
            with open(os.path.join(copy_to, "report.md"), "w", encoding="utf-8") as f:
                f.write(text.replace("](plots/", f"]({plots_dir}/"))
        return path


class DummyReport:
    """What ranks other than 0 get: every call does nothing."""

    def log(self, *args, **kwargs):
        pass

    def log_curve(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report_dir():
    return os.path.join(get_base_dir(), "report")


def get_report():
    if int(os.environ.get("RANK", 0)) != 0:
        return DummyReport()
    return Report(get_report_dir())


# -----------------------------------------------------------------------------
# Reading back and generating

def render_header(header):
    git, gpus = header["git"], header["gpus"]
    mem = header.get("memory_gib")
    if gpus["count"]:
        gpu_line = f"{gpus['count']} x {gpus['names'][0]} ({gpus['memory_gib'][0]} GiB), CUDA {gpus['cuda']}"
        rate_line = f"${header['gpu_hourly_rate']:.2f} per GPU-hour, ${header['gpu_hourly_rate'] * gpus['count']:.2f}/hour"
    else:
        gpu_line, rate_line = "none", "n/a (no GPU)"
    return "\n".join([
        "# nanochat-cotrain report card",
        "",
        f"Run started: {header['start_time']}",
        "",
        "## Environment",
        f"- Git: branch {git['branch']}, commit {git['commit']}{' (dirty)' if git['dirty'] else ''}"
        + (f", \"{git['message']}\"" if git["message"] else ""),
        f"- Host: {header['hostname']}, {header['platform']}",
        f"- CPU: {header['cpu_count']} cores" + (f", {mem:.1f} GiB RAM" if mem else ""),
        f"- GPU: {gpu_line}",
        f"- Hourly cost: {rate_line}",
        f"- Python {header['python']}, torch {header['torch']}",
        f"- Code: {header['code_files']} Python files, {header['code_lines']:,} lines",
        "", "",
    ])


def read_sections(report_dir):
    """[(slug, text, timestamp or None)] in pipeline order, then any other sections by file time."""
    known = [slugify(title) for title, _ in SECTIONS]
    present = {f[:-3] for f in os.listdir(report_dir)
               if f.endswith(".md") and f not in ("header.md", "report.md")}
    extra = sorted(present - set(known), key=lambda s: os.path.getmtime(os.path.join(report_dir, s + ".md")))
    sections = []
    for slug in [s for s in known if s in present] + extra:
        with open(os.path.join(report_dir, slug + ".md"), encoding="utf-8", errors="replace") as f:
            text = f.read()
        m = re.search(r"^timestamp: (.+)$", text, re.MULTILINE)
        sections.append((slug, text, _parse_time(m.group(1)) if m else None))
    return sections


def extract_metrics(text):
    """{metric (canonical spelling): float} from the "- key: value" lines of a section."""
    canonical = {m.lower(): m for m in SUMMARY_METRICS}
    found = {}
    for m in re.finditer(r"^- ([^:\n]+): *([-+0-9.eE,]+)\s*$", text, re.MULTILINE):
        key = m.group(1).strip().lower()
        if key in canonical:
            try:
                found[canonical[key]] = float(m.group(2).replace(",", ""))
            except ValueError:
                pass
    return found


def summary_table(sections):
    column_of = {slugify(title): column for title, column in SECTIONS}
    values = {}  # (metric, column) -> value; later sections of a stage win
    for slug, text, _ in sections:
        column = column_of.get(slug)
        if column is None:
            continue
        for metric, value in extract_metrics(text).items():
            values[(metric, column)] = value
    if not values:
        return ""
    columns = [c for c in STAGE_COLUMNS if any(col == c for _, col in values)]
    rows = ["| Metric | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for metric in SUMMARY_METRICS:
        if not any(m == metric for m, _ in values):
            continue
        cells = [f"{values[(metric, c)]:.4f}" if (metric, c) in values else "-" for c in columns]
        rows.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def read_curves(report_dir):
    """{kind: {name: [(step, value), ...] by step}}; malformed lines are skipped with a warning."""
    curves = {}
    curves_dir = os.path.join(report_dir, "curves")
    if not os.path.isdir(curves_dir):
        return curves
    for fname in sorted(os.listdir(curves_dir)):
        if not fname.endswith(".jsonl"):
            continue
        with open(os.path.join(curves_dir, fname), encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    point = (int(rec["step"]), float(rec["value"]))
                    name, kind = str(rec["name"]), str(rec.get("kind") or guess_curve_kind(rec["name"]))
                except (ValueError, KeyError, TypeError):
                    print(f"report: skipping malformed line {lineno} of curves/{fname}", file=sys.stderr)
                    continue
                # a resumed run logs its steps again: the latest value of a step wins
                curves.setdefault(kind, {}).setdefault(name, {})[point[0]] = point[1]
    return {kind: {name: sorted(points.items()) for name, points in named.items()} for kind, named in curves.items()}


def plot_curves(curves, plots_dir):
    """One PNG per kind, one panel per curve (stages run for very different numbers of steps, so
    they do not share an x axis). Returns [(kind, file name)]."""
    if not curves:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed, so no plots (pip install matplotlib)", file=sys.stderr)
        return []
    os.makedirs(plots_dir, exist_ok=True)
    written = []
    kind_order = ["loss", "reward", "accuracy"]
    for kind in sorted(curves, key=lambda k: (kind_order.index(k) if k in kind_order else len(kind_order), k)):
        named = curves[kind]
        ncols = min(3, len(named))
        nrows = (len(named) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
        for ax, (name, points) in zip(axes.flat, sorted(named.items())):
            points = sorted(points)
            ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(kind)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(named):]:
            ax.axis("off")
        fig.tight_layout()
        fname = f"{slugify(kind)}.png"
        fig.savefig(os.path.join(plots_dir, fname), dpi=100)
        plt.close(fig)
        written.append((kind, fname))
    return written


def build_report(report_dir):
    header_path = os.path.join(report_dir, "header.md")
    header_json = os.path.join(report_dir, "header.json")
    header = None
    if os.path.exists(header_json):
        try:
            with open(header_json, encoding="utf-8") as f:
                header = json.load(f)
        except ValueError:
            print("report: header.json is corrupt; wall clock and cost will be estimated without it", file=sys.stderr)
    parts = []
    if os.path.exists(header_path):
        with open(header_path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    else:
        parts.append("# nanochat-cotrain report card\n\n(no header: run `python -m nanochat.report reset` "
                     "at the start of a run)\n\n")

    sections = read_sections(report_dir)
    for _, text, _ in sections:
        parts.append(text.rstrip() + "\n\n")

    parts.append("## Summary\n\n")
    table = summary_table(sections)
    parts.append((table or "(no metrics logged yet)") + "\n\n")

    # wall clock: from the reset (or the first section) to the last section written
    times = [t for _, _, t in sections if t is not None]
    start = _parse_time(header["start_time"]) if header and header.get("start_time") else (min(times) if times else None)
    if start is not None and times:
        seconds = max(0.0, (max(times) - start).total_seconds())
        hours = seconds / 3600
        parts.append(f"Total wall clock time: {int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m "
                     f"({seconds:,.0f} s)\n\n")
        rate = header.get("gpu_hourly_rate") if header else None
        gpus = header["gpus"]["count"] if header else 0
        if rate and gpus:
            parts.append(f"Estimated cost: ${hours * rate * gpus:,.2f} ({gpus} GPU x {hours:.2f} h x ${rate:.2f}/GPU-hour)\n\n")
        else:
            parts.append("Estimated cost: n/a (no GPU recorded in the header)\n\n")
    else:
        parts.append("Total wall clock time: unknown\n\n")

    plots = plot_curves(read_curves(report_dir), os.path.join(report_dir, "plots"))
    if plots:
        parts.append("## Curves\n\n")
        for kind, fname in plots:
            parts.append(f"![{kind}](plots/{fname})\n\n")
    return "".join(parts)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Manage the report card under <base dir>/report")
    parser.add_argument("command", choices=["reset", "generate"],
                        help="reset: start a new run (clears sections, writes the header); "
                             "generate: write report.md (and a copy in the current directory)")
    args = parser.parse_args(argv)
    report = Report(get_report_dir())
    if args.command == "reset":
        report.reset()
        print(f"report reset: {report.report_dir}")
    else:
        path = report.generate()
        print(f"report written: {path} (and ./report.md)")


if __name__ == "__main__":
    main()
