#!/usr/bin/env python
"""Host time per training micro-step: what the training loop's own thread spends outside the GPU's work.

    python bench/bench_host.py            # SD-1.5 recipe's global batch: 8 per GPU x 8 GPUs, 4x64x64 latents, 600k rows

Each micro-step's GPU work is stood in for by a sleep (the host is idle while the GPU computes), so the time the
loop's thread spends outside it is the host work that can delay the next launch. Two ways, in one run:
  in the loop     the permutation of the epoch recomputed for every micro-step, the whole global batch's timesteps
                  and noise drawn on the loop's thread, the pair count made a device tensor each micro-step
  in the pipeline train_spin.StepBatches in DataLoader workers (batch, draws, kept permutation), prefetched: the
                  loop's thread takes a finished batch (and, on a GPU, issues pinned non-blocking copies)
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_spin as ts  # noqa: E402


class Rows(torch.utils.data.Dataset):
    """Pairs of cached latents and a prompt embedding, already in memory (the cache read is the same both ways)."""

    def __init__(self, n, shape):
        self.n, self.real, self.text = n, torch.randn(shape), torch.randn(77, 768, dtype=torch.float16)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"real": self.real, "other": self.real, "text": self.text}


def in_the_loop(rows, args, gpu_seconds):
    """The loop's thread: sampler with a fresh permutation per step, then the draws and the count per step."""
    per_device, global_batch = args.per_device, args.per_device * args.processes
    sampler = (ts.batch_indices(len(rows), 0, global_batch, m, 0, per_device) for m in range(args.steps))
    loader = torch.utils.data.DataLoader(rows, batch_sampler=sampler, num_workers=args.workers)
    host = []
    it = iter(loader)
    for m in range(args.steps):
        t0 = time.perf_counter()
        batch = next(it)
        ts.draw_step(0, m, global_batch, 0, per_device, args.shape, 1000, "shared", 0.0)
        torch.tensor(float(batch["real"].shape[0]))
        host.append(time.perf_counter() - t0)
        time.sleep(gpu_seconds)
    return host


def in_the_pipeline(rows, args, gpu_seconds):
    from types import SimpleNamespace

    pairs = ts.Pairs(rows, args.shape, args.per_device * args.processes, None, None)
    flags = SimpleNamespace(seed=0, train_batch_size=args.per_device, pair_noise="shared", caption_dropout=0.0)
    steps = ts.StepBatches(pairs, flags, 0, 1000)
    loader = torch.utils.data.DataLoader(
        steps, batch_size=None, sampler=range(args.steps), num_workers=args.workers, persistent_workers=args.workers > 0
    )
    host = []
    it = iter(loader)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        next(it)
        host.append(time.perf_counter() - t0)
        time.sleep(gpu_seconds)
    return host


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=600_000, help="training pairs (Pick-a-Pic v2's order of magnitude)")
    p.add_argument("--per_device", type=int, default=8)
    p.add_argument("--processes", type=int, default=8, help="GPUs: the draws are made for the whole global batch")
    p.add_argument("--latent", type=int, default=64, help="latent side (512 px / 8)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (the recipes' setting)")
    p.add_argument("--gpu_ms", type=float, default=180.0, help="GPU time per micro-step the sleep stands in for")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.shape = (4, args.latent, args.latent)
    torch.set_num_threads(1)
    rows = Rows(args.rows, args.shape)
    result = {}
    for name, fn in (("in the loop", in_the_loop), ("in the pipeline", in_the_pipeline)):
        host = fn(rows, args, args.gpu_ms / 1000)[5:]  # after the workers' start
        result[name] = {"median_ms": 1000 * statistics.median(host), "max_ms": 1000 * max(host)}
    print(
        f"host time per micro-step, global batch {args.per_device} x {args.processes}, latents {args.shape}, "
        f"{args.rows} rows, {args.workers} workers, {args.gpu_ms:.0f} ms of GPU work per micro-step stood in by a sleep"
    )
    for name, r in result.items():
        print(f"  {name:16s} median {r['median_ms']:7.2f} ms   max {r['max_ms']:7.2f} ms")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": {k: v for k, v in vars(args).items() if k != "shape"}, **result}, indent=2)
        )


if __name__ == "__main__":
    main()
