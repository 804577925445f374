#!/usr/bin/env python
"""loop_report.py: the two steps of spin_loop.sh that are not a stage of their own.

    python loop_report.py select RUN_DIR METRIC --unet NAME=PATH ...   # validation: the best model of each family
    python loop_report.py plots RUN_DIR ITERATIONS [--toy]             # training curves, metrics across models

`select` reads RUN_DIR/val_eval/summary.json (evaluate.py's), writes RUN_DIR/val_eval/selection.json and prints the
chosen SFT model's path (empty without an SFT family). `plots` writes RUN_DIR/eval/training_curves.png and, unless
--toy (the demo's scorers are random stand-ins, so their plot would be flat lines), metrics_across_iterations.png.
"""

import argparse
import json
import os
import sys
from pathlib import Path

CURVES = [
    ("loss", "loss"),
    ("implicit_acc", "implicit accuracy"),
    ("real_logratio", "real term -(m_r - r_r)"),
    ("syn_logratio", "synthetic term -(m_s - r_s)"),
]


def family(name):
    """iter_k -> spin, sft-N -> sft, dpo -> dpo, base -> base."""
    return "spin" if name.startswith("iter_") else name.split("-")[0]


def select_best(scores):
    """The best model of each family (base excluded) and overall, by score (higher is better)."""
    best = {}
    for n, s in scores.items():
        f = family(n)
        if f != "base" and (f not in best or s > scores[best[f]]):
            best[f] = n
    best["overall"] = max(scores, key=scores.get)
    return best


def select(run, metric, paths):
    summary = json.loads((run / "val_eval" / "summary.json").read_text())
    if metric not in summary.get("metrics", []):
        sys.exit(f"error: --val_metric {metric} was not scored (evaluate.py scored {summary.get('metrics')})")
    # the mean over prompts of each prompt's mean score: every image counts, so few validation images still rank
    table = summary["summary"]
    scores = {n: table[n][metric]["mean"]["mean"] for n in paths if n in table}
    unscored = sorted(n for n in paths if scores.get(n) is None)
    if unscored:
        sys.exit(
            f"error: validation has no {metric} score for {', '.join(unscored)} (see {run / 'val_eval'}); "
            "rerun the loop to finish its samples and scores"
        )
    best = select_best(scores)
    selection = {
        "metric": metric,
        "statistic": "mean over prompts of the per-prompt mean (higher is better)",
        "scores": scores,
        "best": best,
        "unets": paths,
        "validation": {k: summary.get(k) for k in ("hps_version", "mixed_precision")},
    }
    tmp = run / "val_eval" / f"selection.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(selection, indent=2) + "\n")
    os.replace(tmp, run / "val_eval" / "selection.json")
    for n, s in scores.items():
        mark = "  <- best " + ", ".join(f for f, b in best.items() if b == n) if n in best.values() else ""
        print(f"  {n:>12}  {metric} {s:.4f}{mark}", file=sys.stderr)
    print(paths[best["sft"]] if "sft" in best else "")


def plots(run, iterations, toy):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(16, 3.4))
    for k in range(1, iterations + 1):
        text = (run / f"iter_{k}" / "metrics.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        for ax, (key, title) in zip(axes, CURVES):
            ax.plot([r["step"] for r in rows], [r.get(key) for r in rows], label=f"iteration {k}")
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].axhline(0.6931, color="grey", lw=0.5, ls="--")  # ln 2: the first SPIN loss
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(run / "eval" / "training_curves.png", dpi=110)
    if toy:
        return
    summary = json.loads((run / "eval" / "summary.json").read_text())
    models, metrics, table = summary["models"], summary["metrics"], summary["summary"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        mean = [table[n][m]["mean"]["mean"] for n in models]
        std = [table[n][m]["mean"]["std"] for n in models]
        ax.errorbar(range(len(models)), mean, yerr=std, fmt="o-", capsize=4)
        ax.set_xticks(range(len(models)), models)
        ax.set_title(f"{m} (mean ± std over prompts)")
    fig.tight_layout()
    fig.savefig(run / "eval" / "metrics_across_iterations.png", dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("select", help="the best model of each family on validation")
    s.add_argument("run_dir", type=Path)
    s.add_argument("metric")
    s.add_argument("--unet", action="append", required=True, help="NAME=PATH, as sample.py was given (repeat)")
    p = sub.add_parser("plots", help="training curves and metrics across models")
    p.add_argument("run_dir", type=Path)
    p.add_argument("iterations", type=int)
    p.add_argument("--toy", action="store_true", help="a toy-world run: no plot of its random scorers")
    args = ap.parse_args(argv)
    if args.command == "select":
        select(args.run_dir, args.metric, dict(u.split("=", 1) for u in args.unet))
    else:
        plots(args.run_dir, args.iterations, args.toy)


if __name__ == "__main__":
    main()
