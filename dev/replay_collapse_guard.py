"""
Replay the verifier's collapse guard (nanochat.grpo.ClassBalancer.check_collapse) over the shares that finished
co-training runs logged ("V <step> | ... said-correct S | gold-correct G"), to see on which verifier step it
would have fired. Until the guard fires a run does not depend on it, so the first firing step is exactly what
the run would have done (up to the logs' two decimals). How share_decay 0.9 and relative 0.5 were chosen:

    python -m dev.replay_collapse_guard dev/logs/cotrain_hard_learned/cotrain_s*.log \
        dev/logs/cotrain_hard_pool/cotrain_s*.log dev/logs/cotrain_strict/cotrain_s*.log dev/logs/runcpu/*.log
"""

import argparse
import re

from nanochat.grpo import ClassBalancer

SHARES = re.compile(r"^V +\d+ .*said-correct ([\d.]+) \| gold-correct ([\d.]+)", re.M)


def first_firing(shares, share_decay, relative, patience):
    """Index of the verifier step on which the guard escalates, or None."""
    guard = ClassBalancer(power=0.5, patience=patience, relative=relative, share_decay=share_decay, collapse_pool=4)
    return next((i for i, (said, gold) in enumerate(shares) if guard.check_collapse(said, gold)), None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("logs", nargs="+", help="chat_cotrain logs")
    p.add_argument("--share_decays", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--relatives", type=float, nargs="+", default=[0.0, 0.33, 0.5])
    p.add_argument("--patience", type=int, default=3)
    args = p.parse_args(argv)
    runs = {}
    for path in args.logs:
        with open(path) as f:
            runs[path] = [(float(said), float(gold)) for said, gold in SHARES.findall(f.read())]
    for path, shares in runs.items():
        n = max(len(shares), 1)
        print(f"{path}: {len(shares)} verifier steps, mean share said Correct {sum(s for s, _ in shares) / n:.3f}, "
              f"gold {sum(g for _, g in shares) / n:.3f}")
    print("\nfirst verifier step on which the guard fires ('-': never), per log in the order above")
    for share_decay in args.share_decays:
        for relative in args.relatives:
            fired = [first_firing(shares, share_decay, relative, args.patience) for shares in runs.values()]
            marks = " ".join("-" if f is None else str(f) for f in fired)
            print(f"share_decay {share_decay:<5} relative {relative:<5} | {marks}")


if __name__ == "__main__":
    main()
