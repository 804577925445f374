#!/usr/bin/env python
"""Merge bench/gpu.sh's results in OUT (steps.json, generate.json, bench_train.json) into gpu_bench.json + gpu_bench.md.

python bench/gpu_report.py OUT [CAP_GIB ...]     # caps for "largest batch within": default 24 80
"""

import json
import os
import sys
from pathlib import Path


def fmt(v, f="{:.2f}"):
    return f.format(v) if isinstance(v, (int, float)) else ""


def largest_within(rows, cap):
    """Largest batch of a variant whose training-step peak (reserved: what the card must hold) is <= cap GiB."""
    ok = [
        r["batch"]
        for r in rows
        if "error" not in r and r.get("peak_reserved_gib") is not None and r["peak_reserved_gib"] <= cap
    ]
    return max(ok) if ok else None


def main():
    out = Path(sys.argv[1])
    caps = [float(c) for c in sys.argv[2:]] or [24.0, 80.0]
    merged = {}
    for name in ("steps", "generate", "bench_train"):
        if (out / f"{name}.json").is_file():
            merged[name] = json.loads((out / f"{name}.json").read_text())
    md = []
    for label, t in merged.get("steps", {}).items():
        md += [
            f"### {label}: {t['device']}, {t['resolution']}², `{t['common']}`, {t['steps']} steps ({t['warmup']} "
            "untimed), "
            f"torch {t['torch']}",
            "",
            "| variant | pairs/device | pairs/s | s/step | step peak allocated GiB | step peak reserved GiB | setup "
            "peak allocated GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in t["rows"]:
            if "error" in r:
                md.append(f"| {r['variant']} | {r['batch']} | {r['error']} | | | | |")
            else:
                md.append(
                    f"| {r['variant']} | {r['batch']} | {fmt(r.get('pairs_per_s'))} | "
                    f"{fmt(r.get('s_per_step'), '{:.3f}')} "
                    f"| {fmt(r.get('peak_alloc_gib'), '{:.1f}')} | {fmt(r.get('peak_reserved_gib'), '{:.1f}')} "
                    f"| {fmt(r.get('setup_peak_alloc_gib'), '{:.1f}')} |"
                )
        md.append("")
        measured = any(r.get("peak_reserved_gib") is not None for r in t["rows"])  # none on CPU
        for variant in dict.fromkeys(r["variant"] for r in t["rows"]) if measured else ():
            rows = [r for r in t["rows"] if r["variant"] == variant]
            fits = {cap: largest_within(rows, cap) for cap in caps}
            md.append(
                f"- {variant}: largest measured batch with step peak reserved within "
                + ", ".join(f"{cap:g} GiB: {fits[cap] if fits[cap] else 'none measured'}" for cap in caps)
            )
        if measured:
            md.append("- the CUDA context (a few hundred MiB, not counted by torch) comes on top of the reserved peak")
        md.append("")
    g = merged.get("generate")
    if g:
        md += [
            f"### generation: {g['device']}, {g['resolution']}², {g['steps']} steps, guidance {g['guidance_scale']}, "
            f"{g['images']} images, {g['dtype']}",
            "",
            "| how | images/s |",
            "|---|---|",
            f"| one pipeline call per prompt, PNGs saved synchronously | {g['baseline_images_per_s']:.2f} |",
            f"| generate.py: batched ({g['batch_size']}/call), background writes | {g['ours_images_per_s']:.2f} |",
            f"| ratio | {g['ratio']:.2f}x |",
            "",
        ]
    bt = merged.get("bench_train")
    if bt:
        md += [
            f"### bench_train.py (in-process step: ours vs the straightforward one), {bt['device']}",
            "",
            "| pairs/device | step | pairs/s | peak allocated GiB | TFLOP/s | of measured bf16 matmul rate | ours is "
            "x faster |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in bt["rows"]:
            md.append(
                f"| {r['batch']} | {r['step']} | {r.get('error') or fmt(r.get('pairs_per_s'))} | "
                f"{fmt(r.get('peak_gib'), '{:.1f}')} "
                f"| {fmt(r.get('tflops'), '{:.1f}')} | {fmt(r.get('mfu'), '{:.0%}')} | {fmt(r.get('ours_speedup'))} |"
            )
        md.append("")
    tmp = out / "gpu_bench.json.tmp"
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, out / "gpu_bench.json")
    (out / "gpu_bench.md.tmp").write_text("\n".join(md) + "\n")
    os.replace(out / "gpu_bench.md.tmp", out / "gpu_bench.md")
    print("\n".join(md))


if __name__ == "__main__":
    main()
