"""Images/s of generate.py's sampling path against the straightforward loop, on one loaded pipeline.

    python bench/bench_generate.py                       # tiny random SD-shaped model on CPU (built on the fly)
    python bench/bench_generate.py --pipeline PATH_OR_ID --resolution 512 --num_prompts 64 --steps 50   # real model

Baseline: one pipeline call per prompt (num_images_per_prompt images, PIL output), PNGs saved synchronously.
generate.py: make_images() = batched calls across prompts with per-image seeds, decode once, PNG + latent writes
in background threads (FolderWriter). Both runs are repeated alternately and the best of each is reported, so
load from other jobs on the machine hurts both alike.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
import generate  # noqa: E402


def baseline(pipe, prompts, args, out):
    """What one writes first: a pipeline call per prompt, then save each PNG before the next call."""
    out.mkdir(parents=True)
    for p, prompt in enumerate(prompts):
        g = torch.Generator("cpu").manual_seed(args.seed + p)
        images = pipe(
            prompt,
            num_images_per_prompt=args.images_per_prompt,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            height=args.resolution,
            width=args.resolution,
            generator=g,
        ).images
        for i, img in enumerate(images):
            img.save(out / f"{generate.image_key(p, i)}.png")


def ours(pipe, prompts, args, out):
    for sub in ("images", "latents"):
        (out / sub).mkdir(parents=True)
    gen_args = argparse.Namespace(
        batch_size=args.batch_size,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        resolution=args.resolution,
    )
    jobs = generate.plan(len(prompts), args.images_per_prompt)
    writer = generate.FolderWriter(out, with_latents=True)
    generate.make_images(pipe, prompts, jobs, gen_args, writer)
    writer.close()  # all files on disk: part of the measured time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", help="pipeline folder or hub id (default: build the tiny test model)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--num_prompts", type=int, default=32)
    ap.add_argument("--images_per_prompt", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        if args.pipeline is None:
            import tiny

            args.pipeline = str(tiny.build_tiny_pipeline(tmp / "pipeline"))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        args.mixed_precision = args.mixed_precision or ("fp16" if device == "cuda" else "no")
        dtype = generate.DTYPES[args.mixed_precision]
        pipe_args = argparse.Namespace(
            pretrained_model_name_or_path=args.pipeline,
            revision=None,
            variant=None,
            scheduler=None,
            resolution=args.resolution,
            mixed_precision=args.mixed_precision,
        )
        unet = generate.load_unet("base", args.pipeline)
        pipe = generate.load_pipeline(pipe_args, unet, "--unet base", device)
        prompts = [
            f"a {c} {s} number {k}"
            for k, (c, s) in enumerate(
                (c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "star")
            )
        ]
        prompts = (prompts * (args.num_prompts // len(prompts) + 1))[: args.num_prompts]
        n = len(prompts) * args.images_per_prompt
        for f in (baseline, ours):  # warm-up (allocator, kernels, first-call setup)
            f(pipe, prompts[:2], args, tmp / f"warm_{f.__name__}")
        best = {}
        for r in range(args.repeats):
            for f in (baseline, ours):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                f(pipe, prompts, args, tmp / f"{f.__name__}_{r}")
                if device == "cuda":
                    torch.cuda.synchronize()
                best[f.__name__] = max(best.get(f.__name__, 0), n / (time.perf_counter() - t0))
        print(
            f"device={device} dtype={dtype} resolution={args.resolution} steps={args.steps} prompts={len(prompts)} "
            f"images={n} batch_size={args.batch_size} torch_threads={torch.get_num_threads()}"
        )
        print(f"baseline (one call per prompt, sync PNG): {best['baseline']:.2f} images/s")
        print(f"generate.py (batched, background writes):  {best['ours']:.2f} images/s")
        print(f"ratio: {best['ours'] / best['baseline']:.2f}x")
        if args.json:
            result = {
                "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
                "dtype": str(dtype),
                "resolution": args.resolution,
                "steps": args.steps,
                "guidance_scale": 7.5,
                "prompts": len(prompts),
                "images": n,
                "batch_size": args.batch_size,
                "baseline_images_per_s": best["baseline"],
                "ours_images_per_s": best["ours"],
                "ratio": best["ours"] / best["baseline"],
            }
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
