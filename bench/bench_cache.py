#!/usr/bin/env python
"""Cache-build benchmark: rows/s of train_spin.py's real-image cache with 1 and with N processes (torchrun, CPU).

    python bench/bench_cache.py                     # 4 parquet files x 64 rows of 512x512 JPEG pairs, streamed
    python bench/bench_cache.py --files 8 --rows 128 --nproc 2

Each process reads only its own pieces of the streamed dataset (its files / row groups), decodes their JPEGs and
VAE-encodes them; the cache it leaves is the same whatever the number of processes (the script checks its files,
tensors and metadata). The
tiny test pipeline's VAE is used at --resolution 64, so the time is mostly reading and decoding the 512x512 JPEGs
(what each process no longer repeats for the others); on a GPU the SD VAE adds its own share.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tiny  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rows", type=int, default=64, help="rows per parquet file")
    ap.add_argument("--size", type=int, default=512, help="JPEG side in pixels (Pick-a-Pic images are 512-1024)")
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    pipe = tiny.build_tiny_pipeline(work / "pipe")
    for i in range(args.files):  # one tie per 16 rows, as real data has
        tiny.build_pickapic_parquet(
            work / "data" / f"train-{i:05d}-of-{args.files:05d}.parquet",
            n_rows=args.rows,
            size=args.size,
            seed=i,
            tie_rows=tuple(range(3, args.rows, 16)),
            corrupt_rows=(),
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    results = {}
    for nproc in (1, args.nproc):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        cmd = [
            sys.executable,
            *launcher,
            str(HERE.parent / "train_spin.py"),
            "--pretrained_model_name_or_path",
            str(pipe),
            "--dataset",
            str(work / "data"),
            "--streaming",
            "--loss",
            "sft",
            "--resolution",
            "64",
            "--train_batch_size",
            "1",
            "--max_train_steps",
            "1",
            "--output_dir",
            str(work / f"out{nproc}"),
            "--cache_dir",
            str(work / f"cache{nproc}"),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        m = re.search(r"encoded (\d+) rows in ([\d.]+)s \(([\d.]+) rows/s", p.stdout)
        if p.returncode or not m:
            sys.exit(p.stdout[-2000:] + p.stderr[-2000:])
        results[nproc] = float(m.group(3))
        print(f"{nproc} process(es): {m.group(1)} rows in {m.group(2)} s = {m.group(3)} rows/s", flush=True)
    a, b = (sorted((work / f"cache{n}").glob("latents-*"))[0] for n in (1, args.nproc))
    print(
        f"{args.nproc} processes / 1: {results[args.nproc] / results[1]:.2f}x rows/s; "
        f"same cache (files, tensors, metadata): {same_cache(a, b)}"
    )


def same_cache(a, b):
    """Same file names, tensors and header metadata (the header's byte order is not deterministic in safetensors)."""
    import torch
    from safetensors import safe_open

    if sorted(f.name for f in a.iterdir()) != sorted(f.name for f in b.iterdir()):
        return False
    for f in a.iterdir():
        if f.suffix != ".safetensors":
            if f.read_bytes() != (b / f.name).read_bytes():
                return False
            continue
        with safe_open(str(f), "pt") as x, safe_open(str(b / f.name), "pt") as y:
            if x.metadata() != y.metadata() or sorted(x.keys()) != sorted(y.keys()):
                return False
            if not all(torch.equal(x.get_tensor(k), y.get_tensor(k)) for k in x.keys()):
                return False
    return True


if __name__ == "__main__":
    main()
