#!/usr/bin/env python
"""Memory of the shipped recipes: bytes per component (counted, no weights needed) and a measured peak RSS.

    python bench/bench_memory.py bytes                  # table: weights / gradients / optimizer state, GiB
    python bench/bench_memory.py rss --train_spin PATH --work DIR [--resolution 512]
        # peak RSS of one SDXL LoRA rank 8 training step (random weights, bf16 autocast, batch 1) on CPU

`bytes` instantiates the real configs (bench/sd15, bench/sdxl, bench/sd35) on the meta device, so it allocates nothing.
It counts what is held for the whole run, not activations (those depend on batch, resolution and checkpointing: the
GPU bench, bench/gpu.sh, measures totals; it has no SD3.5 run yet).

`rss` runs `python TRAIN_SPIN --lora_rank 8 --mixed_precision bf16 --max_train_steps 1 ...` (any copy of
train_spin.py: it imports only its own file) on a random-weight SDXL pipeline folder, a 2-row Pick-a-Pic parquet
and a generate.py-format synthetic_dir (random latents, so --allow_opponent_mismatch), built once under --work;
the latent/text cache is rebuilt by every run (as in a first iteration). The child's peak RSS (VmHWM) is read per phase,
resetting the kernel's high-water mark between phases (/proc/PID/clear_refs): setup (load, cache build, optimizer)
until run_config.json appears, the step until metrics.jsonl has its line, then the final save. Only one SDXL process
runs at a time (fp32 SDXL weights are ~10 GiB).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
GiB = 2**30


# ---------------------------------------------------------------------------------------------------- bytes
def meta_models(cfg_dir):
    """The denoiser (UNet, or SD3's transformer), then the VAE and text encoder(s) of a bench/<model>/ config folder,
    on the meta device: parameters and buffers (SD3's position table) alike, so nothing is allocated."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    sd3 = (cfg_dir / "transformer").is_dir()
    cls, folder = (SD3Transformer2DModel, "transformer") if sd3 else (UNet2DConditionModel, "unet")
    with torch.device("meta"):
        denoiser = cls.from_config(cls.load_config(cfg_dir / folder))
        cache_only = [AutoencoderKL.from_config(AutoencoderKL.load_config(cfg_dir / "vae"))]
        for sub in sorted(cfg_dir.glob("text_encoder*")):  # CLIP(s), and SD3's T5-XXL: the class its config names
            config = transformers.AutoConfig.from_pretrained(sub)
            cache_only.append(getattr(transformers, config.architectures[0])(config))
    return denoiser, cache_only


def numel(params):
    return sum(p.numel() for p in params)


def adam8_bytes(sizes):
    """bitsandbytes AdamW8bit: two uint8 states + two fp32 absmax per 256-block; tensors under 4096 elements keep
    two fp32 states (its min_8bit_size)."""
    return sum(2 * n + 8 * -(-n // 256) if n >= 4096 else 8 * n for n in sizes)


def lora_sizes(unet, rank, targets=("to_k", "to_q", "to_v", "to_out.0")):
    """Parameter tensor sizes of a rank-r LoRA adapter (A: r x in, B: out x r) on every targeted Linear, as peft
    matches train_spin.py's default --lora_target_modules."""
    import torch

    return [
        s
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(tuple("." + t for t in targets))
        for s in (rank * m.in_features, m.out_features * rank)
    ]


def norm_params(model):
    """Parameters train_spin.py's cast_frozen keeps in fp32: those of normalisation layers."""
    import torch

    return numel(
        p
        for m in model.modules()
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "Norm" in type(m).__name__
        for p in m.parameters(recurse=False)
    )


def bytes_table():
    rows = []  # (recipe, component, GiB, note)

    sd_unet, sd_cache = meta_models(HERE / "sd15")
    n, n_norm = numel(sd_unet.parameters()), norm_params(sd_unet)
    sizes = [p.numel() for p in sd_unet.parameters()]
    half = (2 * (n - n_norm) + 4 * n_norm) / GiB  # frozen copy in bf16, norms kept in fp32
    sd = {
        "weights": 4 * n / GiB,
        "grads": 4 * n / GiB,
        "adamw": 8 * n / GiB,
        "adam8": adam8_bytes(sizes) / GiB,
        "ref32": 4 * n / GiB,
        "ref16": half,
        "cast": 2 * n / GiB,
        "cache": 2 * numel(p for m in sd_cache for p in m.parameters()) / GiB,
    }
    r = "SD-1.5 full fine-tune"
    rows += [
        (r, f"UNet weights, fp32 (trained; {n / 1e6:.0f}M parameters)", sd["weights"], ""),
        (r, "its gradients, fp32", sd["grads"], ""),
        (r, "AdamW state: 2 x fp32", sd["adamw"], ""),
        (r, "8-bit AdamW state: 2 x uint8 + block absmax", sd["adam8"], "--use_8bit_adam"),
        (r, "frozen reference UNet, fp32", sd["ref32"], ""),
        (r, "frozen reference UNet, bf16 (norms fp32)", sd["ref16"], ""),
        (r, "autocast's bf16 copy of the trained weights", sd["cast"], "during each forward+backward"),
        (r, "text encoder + VAE, bf16", sd["cache"], "cache build only, freed before training"),
    ]

    xl_unet, xl_cache = meta_models(HERE / "sdxl")
    n, n_norm = numel(xl_unet.parameters()), norm_params(xl_unet)
    lora = lora_sizes(xl_unet, 8)
    nl = sum(lora)
    xl = {
        "base32": 4 * n / GiB,
        "base16": (2 * (n - n_norm) + 4 * n_norm) / GiB,
        "lora": 4 * nl / GiB,
        "grads": 4 * nl / GiB,
        "adamw": 8 * nl / GiB,
        "adam8": adam8_bytes(lora) / GiB,
        "cast": 2 * (n - n_norm) / GiB,
        "cache": 2 * numel(p for m in xl_cache for p in m.parameters()) / GiB,
    }
    r = "SDXL LoRA rank 8"
    rows += [
        (r, f"frozen base UNet, fp32 ({n / 1e9:.2f}B parameters)", xl["base32"], "also the reference (adapter off)"),
        (r, "frozen base UNet, bf16 (norms fp32)", xl["base16"], ""),
        (
            r,
            "autocast's bf16 copies of an fp32 base, saved for backward",
            xl["cast"],
            "during each step without gradient checkpointing (with it: one block's); none with a bf16 base",
        ),
        (r, f"LoRA adapter, fp32 ({nl / 1e6:.1f}M parameters)", xl["lora"], ""),
        (r, "its gradients, fp32", xl["grads"], ""),
        (r, "AdamW state: 2 x fp32", xl["adamw"], ""),
        (r, "8-bit AdamW state", xl["adam8"], "--use_8bit_adam"),
        (
            r,
            "text encoders (CLIP-L + OpenCLIP bigG) + VAE, bf16",
            xl["cache"],
            "cache build only, freed before training",
        ),
    ]

    # bench/sd35: stabilityai/stable-diffusion-3.5-medium (gated: its files were not read). Sources of the values:
    # - transformer: Stability-AI/sd3.5 sd3_impls.py reads the MMDiT from its checkpoint (hidden = 64 x depth,
    #   heads = depth, rms qk-norm, dual-attention "x_block attn2" layers); the model card: QK norm, "self-attention
    #   modules in the first 13 layers" (0..12; its summary line says "first 12"); diffusers 0.42.1
    #   single_file_utils.py tells SD3.5-Medium by pos_embed's 147456 = 384^2 patches (pos_embed_max_size 384) and
    #   adaLN bias 9216 = 6 x 1536; the full diffusers config as tenstorrent/tt-forge-models vendors it (commit
    #   129eb1fc43, stable_diffusion_3_5_fp8/pytorch/src/model_utils.py: 24 layers, sample_size 128,
    #   joint_attention_dim 4096, pooled_projection_dim 2048, patch_size 2, the pipeline's classes).
    # - VAE: sd3_impls.py's SDVAE (128/256/512/512, 2 res blocks, 16 channels, no quant convs, 1.5305 / 0.0609).
    # - text encoders: sd3_infer.py's CLIP-L, OpenCLIP bigG and T5-v1.1-XXL configs (the T5 file in full as
    #   kohya-ss/sd-scripts library/flux_utils.py writes it).
    # - scheduler: shift 3.0 (sd3_infer.py's sd3.5_medium); its other keys (use_dynamic_shifting) unverified, omitted.
    t, t_cache = meta_models(HERE / "sd35")
    n, n_norm, n_buf = numel(t.parameters()), norm_params(t), numel(t.buffers())
    lora = lora_sizes(t, 32)  # recipes/sd35.sh: LORA_RANK 32 on train_spin.py's default --lora_target_modules
    nl = sum(lora)
    s3 = {
        "base16": (2 * (n - n_norm) + 4 * n_norm) / GiB,
        "buffers": 4 * n_buf / GiB,
        "lora": 4 * nl / GiB,
        "grads": 4 * nl / GiB,
        "adamw": 8 * nl / GiB,
        "adam8": adam8_bytes(lora) / GiB,
        "vae": 2 * numel(t_cache[0].parameters()) / GiB,
        "encoders": 2 * numel(p for m in t_cache[1:] for p in m.parameters()) / GiB,
    }
    r = "SD3.5-Medium LoRA rank 32"
    rows += [
        (
            r,
            f"frozen base transformer, bf16 (norms fp32; {n / 1e9:.2f}B parameters)",
            s3["base16"],
            "also the reference (adapter off)",
        ),
        (r, "its 384² position table, fp32 (a buffer: not cast)", s3["buffers"], ""),
        (r, f"LoRA adapter, fp32 ({nl / 1e6:.1f}M parameters)", s3["lora"], ""),
        (r, "its gradients, fp32", s3["grads"], ""),
        (r, "AdamW state: 2 x fp32", s3["adamw"], ""),
        (r, "8-bit AdamW state", s3["adam8"], "--use_8bit_adam (the recipe's)"),
        (
            r,
            "text encoders (CLIP-L + OpenCLIP bigG + T5-XXL), bf16",
            s3["encoders"],
            "cache build; not resident in training (on the GPU only during a watch step)",
        ),
        (r, "VAE, bf16", s3["vae"], "cache build; not resident in training (on the GPU only during a watch step)"),
    ]

    # (recipe, setting, held for the whole run,
    #  + autocast's bf16 weight copies held through a step without checkpointing)
    totals = []
    for opt in ("adamw", "adam8"):
        for ref in ("ref32", "ref16"):
            totals.append(
                (
                    "SD-1.5 full fine-tune",
                    f"{'AdamW' if opt == 'adamw' else '8-bit AdamW'}, {'fp32' if ref == 'ref32' else 'bf16'} reference",
                    sd["weights"] + sd["grads"] + sd[opt] + sd[ref],
                    sd["cast"],
                )
            )
    for opt in ("adamw", "adam8"):
        for base in ("base32", "base16"):
            totals.append(
                (
                    "SDXL LoRA rank 8",
                    f"{'AdamW' if opt == 'adamw' else '8-bit AdamW'}, {'fp32' if base == 'base32' else 'bf16'} base",
                    xl[base] + xl["lora"] + xl["grads"] + xl[opt],
                    xl["cast"] if base == "base32" else 0.0,
                )
            )
    for opt in ("adamw", "adam8"):
        held = s3["base16"] + s3["buffers"] + s3["lora"] + s3["grads"] + s3[opt]
        totals.append(
            ("SD3.5-Medium LoRA rank 32", f"{'AdamW' if opt == 'adamw' else '8-bit AdamW'}, bf16 base", held, 0.0)
        )
    return rows, totals


def print_bytes(rows, totals):
    print("| recipe | component | GiB | when |\n|---|---|---|---|")
    for r, c, g, note in rows:
        print(f"| {r} | {c} | {g:.2f} | {note or 'whole run'} |")
    print("\nBefore activations (they depend on batch, resolution and checkpointing: bench/gpu.sh measures totals):\n")
    print(
        "| recipe | optimizer, frozen copy | held for the run, GiB | + autocast copies in a step without checkpointing "
        "| left of 24 GiB | left of 80 GiB |\n|---|---|---|---|---|---|"
    )
    for r, c, g, cast in totals:
        print(f"| {r} | {c} | {g:.2f} | {cast:.2f} | {24 - g - cast:.1f} | {80 - g - cast:.1f} |")


# ------------------------------------------------------------------------------------------------------ rss
def prepare(work, resolution):
    """The SDXL pipeline folder (once, ~14 GB fp32), a 2-row parquet and a synthetic_dir at `resolution`."""
    from bench_steps import build_data
    from make_sdxl import build_sdxl

    pipe = build_sdxl(work / "sdxl")
    return (pipe, *build_data(work, pipe, 2, resolution))


def status(pid):
    """VmHWM, VmRSS and RssAnon of a process, bytes (None once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return {k: int(v) * 1024 for k, v in re.findall(r"(VmHWM|VmRSS|RssAnon):\s+(\d+) kB", text)}


def available():
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024


def measure(cmd, out, env, min_available):
    """Run cmd; peak RSS per phase (setup, step, save) from VmHWM, reset between phases; plus the whole run's.
    The child is killed if the machine's available memory falls under `min_available` bytes (other jobs share it)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    phases, anon, phase, t0, times, reset_ok = {}, {}, "setup", time.time(), {}, True
    markers = {
        "setup": lambda: (out / "run_config.json").is_file(),
        "step": lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0,
    }
    while proc.poll() is None:
        if available() < min_available:
            proc.kill()
            log.append(
                f"\nkilled by bench_memory.py: the machine's available memory fell under {min_available / GiB:.1f} GiB "
                f"during the {phase} phase (peak RSS so far {max(phases.values(), default=0) / GiB:.2f} GiB)"
            )
            break
        s = status(proc.pid)
        if s:
            phases[phase] = max(phases.get(phase, 0), s["VmHWM"])
            # RSS also counts touched pages of mmapped weight files (reclaimable): the anonymous part, sampled
            # every 50 ms, is the memory the process really holds
            anon[phase] = max(anon.get(phase, 0), s.get("RssAnon", 0))
        if phase in markers and markers[phase]():
            times[phase] = time.time() - t0
            try:  # start the next phase's high-water mark from the current RSS
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            except OSError:  # then each phase's peak includes the earlier phases'
                reset_ok = False
            phase = {"setup": "step", "step": "save"}[phase]
        time.sleep(0.05)
    proc.wait()
    reader.join()
    times[phase] = time.time() - t0
    whole = max(phases.values(), default=0)  # the phases cover the run, so the largest is the run's peak
    return (
        proc.returncode,
        "".join(log),
        {k: v / GiB for k, v in phases.items()},
        whole / GiB,
        times,
        {k: v / GiB for k, v in anon.items()},
        reset_ok,
    )


def rss(args):
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pipe, data, synth = prepare(work, args.resolution)
    out, cache = work / "out", work / "cache"
    for d in (out, cache):  # a fresh cache: every measured run builds it, as a first iteration does
        shutil.rmtree(d, ignore_errors=True)
    cmd = [
        sys.executable,
        str(Path(args.train_spin).resolve()),
        "--pretrained_model_name_or_path",
        str(pipe),
        "--dataset",
        str(data),
        "--synthetic_dir",
        str(synth),
        "--allow_opponent_mismatch",
        "--output_dir",
        str(out),
        "--cache_dir",
        str(cache),
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        "1",
        "--max_train_steps",
        "1",
        "--lr_warmup_steps",
        "0",
        "--lora_rank",
        "8",
        "--mixed_precision",
        "bf16",
        *args.extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    print("$ " + " ".join(cmd), flush=True)
    rc, log, phases, whole, times, anon, reset_ok = measure(cmd, out, env, args.min_available_gib * GiB)
    if rc:
        sys.exit(log[-4000:] + f"\nerror: train_spin.py exited with {rc}")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    result = {
        "train_spin": str(Path(args.train_spin).resolve()),
        "resolution": args.resolution,
        "batch": 1,
        "lora_rank": 8,
        "mixed_precision": "bf16",
        "extra": args.extra,
        "peak_rss_gib": whole,
        "phase_peak_rss_gib": phases,
        "phase_peaks_reset_between_phases": reset_ok,
        "phase_max_anon_rss_gib": anon,
        "phase_end_s": times,
        "first_loss": first["loss"],
        "step_s": 1 / first["pairs_per_s"],
        "torch_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(json.dumps(result, indent=1))
    print(
        f"peak RSS {whole:.2f} GiB (setup {phases.get('setup', 0):.2f}, training step {phases.get('step', 0):.2f}, "
        f"final save {phases.get('save', 0):.2f}); anonymous RSS at most {anon.get('setup', 0):.2f} / "
        f"{anon.get('step', 0):.2f} / {anon.get('save', 0):.2f}; step {result['step_s']:.0f} s at {args.resolution}px"
    )
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)
    if not args.keep_output:
        shutil.rmtree(out, ignore_errors=True)  # the merged UNet it wrote is another 10 GiB of disk


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bytes", help="weights / gradients / optimizer state per component (meta device)")
    b.add_argument("--json", default=None)
    r = sub.add_parser("rss", help="peak RSS of one SDXL LoRA step through train_spin.py's command line")
    r.add_argument(
        "--train_spin", required=True, help="the train_spin.py to measure (e.g. a saved copy of an older one)"
    )
    r.add_argument("--work", required=True, help="folder for the SDXL pipeline, data and caches (reused across runs)")
    r.add_argument("--resolution", type=int, default=512)
    r.add_argument("--json", default=None, help="also write the result here")
    r.add_argument(
        "--min_available_gib",
        type=float,
        default=1.5,
        help="kill the run if the machine's available memory falls under this",
    )
    r.add_argument("--keep_output", action="store_true", help="keep the output_dir (its merged unet/ is ~10 GiB)")
    r.add_argument("extra", nargs="*", help="more train_spin.py flags, after --")
    args = ap.parse_args()
    if args.what == "bytes":
        rows, totals = bytes_table()
        print_bytes(rows, totals)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "totals": totals}, indent=1))
    else:
        rss(args)


if __name__ == "__main__":
    main()
