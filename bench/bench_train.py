#!/usr/bin/env python
"""Training-step benchmark: train_spin.py's step against the straightforward ones, in one run, one table.

    python bench/bench_train.py                                   # CPU, tiny SD-shaped model built on the spot
    python bench/bench_train.py --model sd15 --mixed_precision bf16   # GPU, SD-1.5 architecture, random weights

Rows, per batch size (pairs per device):
  ours            cached latents and prompt embeddings; one policy call on [real; synthetic], one no-grad
                  reference call on the same precision path (train_spin.pair_loss)
  ours+encode     the same step, but decoding the real JPEG, VAE-encoding it and text-encoding the prompt every
                  step: what the on-disk cache saves (issue 2's "uncached path")
  straightforward the Diffusion-DPO-style step: both images decoded and VAE-encoded and the prompt encoded every
                  step, separate policy calls for real and synthetic, an fp16 reference (fp32 on CPU) called twice
Variants of ours: --gradient_checkpointing and/or --use_8bit_adam (each combination listed in --variants).
"""

import argparse
import copy
import io
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import train_spin as ts  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, n=8192, iters=20):
    """Measured dense matrix rate (TFLOP/s) in `dtype`: the ceiling the step is compared against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def make_data(batch, resolution, latent_shape, text_dim, device):
    """JPEG bytes (what the dataset holds), PNG bytes of a synthetic image, and their cached equivalents."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8))
    jpg, png = io.BytesIO(), io.BytesIO()
    img.save(jpg, format="JPEG")
    img.save(png, format="PNG")
    return {
        "jpeg": [jpg.getvalue()] * batch,
        "png": [png.getvalue()] * batch,
        "captions": ["a photo of a cat"] * batch,
        "real": torch.randn(batch, *latent_shape, device=device),
        "syn": torch.randn(batch, *latent_shape, device=device),
        "text": torch.randn(batch, 77, text_dim, device=device),
    }


def encode_bytes(vae, blobs, resolution):
    x = torch.stack([ts.preprocess_image(ts.decode_image(b), resolution) for b in blobs])
    return ts.encode_images(vae, x)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny (built on the spot), sd15 (SD-1.5 architecture, random weights) or a pipeline folder",
    )
    p.add_argument("--resolution", type=int, default=None, help="default 32 for tiny, 512 otherwise")
    p.add_argument("--batch_sizes", default="1,4,8")
    p.add_argument("--variants", default="plain,gc,8bit,gc+8bit", help="comma list of ours' variants")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--straightforward", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path("/tmp/spin_bench")
    if args.model == "tiny":
        import tiny

        model_dir = work / "tiny"
        if not (model_dir / "model_index.json").is_file():
            tiny.build_tiny_pipeline(model_dir)
        res = args.resolution or 32
    elif args.model == "sd15":
        from make_sd15 import build_sd15

        model_dir = work / "sd15"
        if not (model_dir / "model_index.json").is_file():
            build_sd15(model_dir)
        res = args.resolution or 512
    else:
        model_dir, res = Path(args.model), args.resolution or 512
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    half = (
        torch.float16 if device.type == "cuda" else torch.float32
    )  # the DPO code's fp16 reference; CPU lacks fast fp16

    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    enc_dtype = amp or torch.float32
    vae = (
        AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=enc_dtype)
        .to(device)
        .requires_grad_(False)
    )
    te = (
        CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=enc_dtype)
        .to(device)
        .requires_grad_(False)
    )
    base = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32)
    latent_shape = (
        4,
        res // (2 ** (len(vae.config.block_out_channels) - 1)),
    ) * 1
    latent_shape = (4, latent_shape[1], latent_shape[1])
    text_dim = te.config.hidden_size

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False)

    def make_policy(gc, bnb8):
        unet = copy.deepcopy(base).to(device).train()
        if gc:
            unet.enable_gradient_checkpointing()
        if bnb8:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(unet.parameters(), lr=1e-6)
        else:
            opt = torch.optim.AdamW(unet.parameters(), lr=1e-6, fused=device.type == "cuda")
        return unet, opt

    def step_ours(unet, ref, opt, d, encode_every_step):
        b = d["real"].shape[0]
        if encode_every_step:  # what the cache avoids
            real = encode_bytes(vae, d["jpeg"], res)
            text = ts.encode_prompts([te], [tok], d["captions"])[0]
        else:
            real, text = d["real"], d["text"]
        t = torch.randint(0, 1000, (b,), device=device)
        noise = torch.randn_like(real)
        with autocast():
            draws, cond = ts.Draws(t, noise, t, noise), ts.Conditioning(torch.cat([text, text]))
            loss, _ = ts.pair_loss(unet, ref, sched, real, d["syn"], draws, cond, beta=5000.0, autocast=autocast)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def step_straightforward(unet, ref_half, opt, d):
        b = d["real"].shape[0]
        real = encode_bytes(vae, d["jpeg"], res)
        syn = encode_bytes(vae, d["png"], res)
        text = ts.encode_prompts([te], [tok], d["captions"])[0]
        t = torch.randint(0, 1000, (b,), device=device)
        noise = torch.randn_like(real)
        with autocast():
            m_r = ts.denoising_errors(unet, sched, real, noise, t, ts.Conditioning(text))
            m_s = ts.denoising_errors(unet, sched, syn, noise, t, ts.Conditioning(text))
        with torch.no_grad():
            r_r = ts.denoising_errors(ref_half, sched, real.to(half), noise.to(half), t, ts.Conditioning(text.to(half)))
            r_s = ts.denoising_errors(ref_half, sched, syn.to(half), noise.to(half), t, ts.Conditioning(text.to(half)))
        loss = ts.spin_loss(m_r, m_s, r_r, r_s, 5000.0).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(device)
        dt = (time.perf_counter() - t) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        return dt, peak

    def flops_per_step(fn):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    peak_rate = matmul_rate(device, torch.bfloat16) if device.type == "cuda" else None
    rows = []
    ref = copy.deepcopy(base).to(device).requires_grad_(False).eval()
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        d = make_data(b, res, latent_shape, text_dim, device)
        base_dt = None
        for variant in args.variants.split(","):
            gc, bnb8 = "gc" in variant, "8bit" in variant
            unet, opt = make_policy(gc, bnb8)
            try:
                flops = flops_per_step(lambda: step_ours(unet, ref, opt, d, False))
                dt, peak = timed(lambda: step_ours(unet, ref, opt, d, False))
            except torch.OutOfMemoryError:
                rows.append({"batch": b, "step": f"ours {variant}", "error": "out of memory"})
                continue
            finally:
                del unet, opt
            base_dt = base_dt or dt
            rows.append(
                {
                    "batch": b,
                    "step": f"ours {variant}",
                    "s_per_step": dt,
                    "pairs_per_s": b / dt,
                    "peak_gib": peak,
                    "tflops": flops / dt / 1e12,
                    "mfu": flops / dt / 1e12 / peak_rate if peak_rate else None,
                }
            )
        if "plain" in args.variants.split(","):
            unet, opt = make_policy(False, False)
            dt, peak = timed(lambda: step_ours(unet, ref, opt, d, True))
            rows.append(
                {
                    "batch": b,
                    "step": "ours+encode (no cache)",
                    "s_per_step": dt,
                    "pairs_per_s": b / dt,
                    "peak_gib": peak,
                    "ours_speedup": dt / base_dt,
                }
            )
            del unet, opt
        if args.straightforward:
            unet, opt = make_policy(False, False)
            ref_half = copy.deepcopy(base).to(device, half).requires_grad_(False).eval()
            try:
                dt, peak = timed(lambda: step_straightforward(unet, ref_half, opt, d))
                rows.append(
                    {
                        "batch": b,
                        "step": "straightforward",
                        "s_per_step": dt,
                        "pairs_per_s": b / dt,
                        "peak_gib": peak,
                        "ours_speedup": dt / base_dt,
                    }
                )
            except torch.OutOfMemoryError:
                rows.append({"batch": b, "step": "straightforward", "error": "out of memory"})
            del unet, opt, ref_half
        if device.type == "cuda":
            torch.cuda.empty_cache()

    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"\ntrain step, model {args.model}, {res}px, mixed precision {args.mixed_precision}, {dev_name}, "
        f"torch {torch.__version__}" + (f", measured bf16 matmul {peak_rate:.0f} TFLOP/s" if peak_rate else "")
    )
    print("| pairs/device | step | ms/step | pairs/s | peak GiB | TFLOP/s | of bf16 peak | ours is x faster |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['step']} | {r['error']} | | | | | |")
            continue
        f = lambda k, fmt: fmt.format(r[k]) if r.get(k) is not None and r[k] == r[k] else ""  # noqa: E731
        print(
            f"| {r['batch']} | {r['step']} | {r['s_per_step'] * 1e3:.1f} | {r['pairs_per_s']:.2f} | "
            f"{f('peak_gib', '{:.1f}')} "
            f"| {f('tflops', '{:.3f}')} | {f('mfu', '{:.0%}')} | {f('ours_speedup', '{:.2f}')} |"
        )
    # Largest per-device batch within 24 and 80 GiB: peak memory is close to linear in the batch (weights and
    # optimizer state + activations per pair), so fit the measured peaks and solve; say it is a fit.
    if device.type == "cuda":
        for variant in args.variants.split(","):
            pts = [(r["batch"], r["peak_gib"]) for r in rows if r["step"] == f"ours {variant}" and "peak_gib" in r]
            if len(pts) >= 2:
                (b0, m0), (b1, m1) = pts[0], pts[-1]
                per_pair = (m1 - m0) / (b1 - b0)
                fits = {cap: int((cap - (m0 - per_pair * b0)) / per_pair) for cap in (24, 80)}
                print(
                    f"ours {variant}: {m0 - per_pair * b0:.1f} GiB fixed + {per_pair:.2f} GiB/pair -> largest batch "
                    f"in 24 GiB ~{fits[24]}, in 80 GiB ~{fits[80]} (linear fit of the measured peaks)"
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev_name, "model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
