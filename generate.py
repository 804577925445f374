"""generate.py: the opponent (θ_k) samples synthetic images for the training prompts (SPIN-Diffusion step 1).

    python generate.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --unet runs/x/iter_1 --dataset yuvalkirstain/pickapic_v2 --output_dir runs/x/synth_1
    accelerate launch --num_processes 8 generate.py ...      # the same folder, 8x faster

The pipeline class is the one the model's model_index.json names: StableDiffusionPipeline (SD-1.x, SD-2.x with
v-prediction) or StableDiffusionXLPipeline (SDXL: two text encoders, pooled embedding, micro-conditioning with
original = target size = --resolution and crop (0, 0), an fp16 VAE decoded in float32 where its config says
force_upcast).

Output (train_spin.py reads it):
    run_config.json   model identity (pipeline class, the UNet's sha256 fingerprint) + every setting
    metadata.jsonl    one line per image: file_name, latent_file, prompt, prompt_index, image_index, seed
    images/<key>.png, latents/<key>.safetensors ("latent": float32 [4, h, w], the pipeline's final latent,
                      in the scaled space: what vae.encode(x).latent_dist.mean * scaling_factor gives)
    stats.json        counts, and the keys of all-black / non-finite results
Every image's noise comes from its own seed, image_seed(seed, prompt_index, image_index), so the result does
not depend on batch size, process count or where a killed run was resumed. Rerun the same command to resume.
"""

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from safetensors.torch import save_file

# ---- flags ----
# Flags that change the pixels. A folder made with other values is refused, never mixed. Not here: --batch_size
# (only the order of float sums changes) and --max_prompts/--dataset (the prompt list itself is compared).
IMAGE_SETTINGS = (
    "num_images_per_prompt",
    "num_inference_steps",
    "guidance_scale",
    "resolution",
    "scheduler",
    "seed",
    "mixed_precision",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--pretrained_model_name_or_path",
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="base pipeline (hub id or local folder): text encoder(s), VAE, tokenizer(s), scheduler; its "
        "model_index.json names the class: StableDiffusionPipeline (SD-1.x, SD-2.x) or "
        "StableDiffusionXLPipeline",
    )
    add_base_weights_flags(p)
    p.add_argument(
        "--unet",
        default="base",
        help="the opponent UNet: a train_spin.py folder (holding unet/), a bare "
        "UNet folder, a hub id (UCLA-AGI/SPIN-Diffusion-iter1) or 'base'",
    )
    p.add_argument("--dataset", help="prompts: unique captions of a dataset (hub id or local), Pick-a-Pic ties dropped")
    p.add_argument("--split", default="train")
    p.add_argument("--caption_column", default="caption")
    p.add_argument("--prompts_file", help="prompts: one per line (instead of --dataset)")
    p.add_argument("--max_prompts", type=int, help="use only the first N unique prompts")
    p.add_argument(
        "--max_train_samples",
        type=int,
        help="read only the first N usable rows of --dataset (after "
        "dropping ties), as train_spin.py does: pass both scripts the same value",
    )
    p.add_argument("--streaming", action="store_true", help="stream --dataset instead of downloading it whole")
    p.add_argument(
        "--per_row",
        action="store_true",
        help="one prompt per usable training row (duplicate captions "
        "kept), as the paper's Algorithm 1 draws one synthetic image per row; train_spin.py pairs row i "
        "with its own image. Default: one prompt per unique caption (cheaper: rows / unique captions "
        "times fewer images), each caption's rows sharing its images",
    )
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument(
        "--resolution",
        type=int,
        help="image side in pixels (default: the model's own: 512 for SD-1.5, 768 for SD-2.1, 1024 for SDXL)",
    )
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the pipeline's own)")
    p.add_argument("--batch_size", type=int, default=8, help="images per pipeline call (per process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: fp16 on CUDA, no on CPU")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    for name in (
        "num_images_per_prompt",
        "num_inference_steps",
        "batch_size",
        "max_prompts",
        "max_train_samples",
        "resolution",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    return args


def add_base_weights_flags(p):
    """--revision and --variant, diffusers' flags: which weights of --pretrained_model_name_or_path load (sample.py
    takes them too)."""
    p.add_argument(
        "--revision",
        help="git revision (branch, tag or commit) of the base pipeline's hub repo to load its parts from, and its "
        "UNet with --unet base (a --unet of another model is its own; a local folder ignores it)",
    )
    p.add_argument(
        "--variant",
        help="weights variant of the base pipeline's parts, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors), "
        "and of its UNet with --unet base (a --unet of another model is its own)",
    )


# ---- the stage: prompts, seeds, the pipeline, images (also run by sample.py, which imports them) ----
# Pipeline classes (model_index.json's "_class_name") that generate.py and sample.py run: the arguments each is loaded
# with, whether it decodes with its VAE upcast to float32 when the VAE is float16 and its config says force_upcast
# (diffusers' SDXL pipeline does; its StableDiffusionPipeline does not), whether it takes SDXL's micro-conditioning,
# whether its decoding applies the VAE config's latents_mean/latents_std where there are some, and the UNet
# addition embedding it drives (SDXL's UNet takes pooled text + size/crop ids: "text_time"). SD-1.x and SD-2.x
# (768-v: v-prediction is the scheduler's business) are StableDiffusionPipeline.
PIPELINES = {
    "StableDiffusionPipeline": {
        "load": {"safety_checker": None, "requires_safety_checker": False},
        "upcast_vae": False,
        "micro_conditioning": False,
        "latents_mean_std": False,
        "unet_addition_embed_type": None,
    },
    "StableDiffusionXLPipeline": {
        "load": {"add_watermarker": False},  # we decode ourselves: no watermark either way
        "upcast_vae": True,
        "micro_conditioning": True,
        "latents_mean_std": True,
        "unet_addition_embed_type": "text_time",
    },
}
BLACK_MAX_PIXEL = 2  # an image whose brightest value is <= this (0..255) counts as all-black


def shard(num_prompts, rank, world_size):
    """Prompt i belongs to process i % world_size: balanced, and independent of what is already done."""
    return range(rank, num_prompts, world_size)


def plan(prompt_indices, num_images_per_prompt, done):
    """(prompt_index, image_index) still to make, in order."""
    return [(p, i) for p in prompt_indices for i in range(num_images_per_prompt) if (p, i) not in done]


def prompts_digest(prompts):
    return "sha256:" + hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def metadata_row(prompt, prompt_index, image_index, seed, with_latent):
    key = image_key(prompt_index, image_index)
    row = {"file_name": f"images/{key}.png"}
    if with_latent:
        row["latent_file"] = f"latents/{key}.safetensors"
    row.update(prompt=prompt, prompt_index=prompt_index, image_index=image_index, seed=seed)
    return row


def resolve_precision(name, device):
    """--mixed_precision: default fp16 on CUDA (the usual SD-1.5 inference precision), float32 elsewhere."""
    name = name or ("fp16" if torch.device(device).type == "cuda" else "no")
    return name, {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def micro_conditioning(pipe, resolution):
    """SDXL's size/crop conditioning for an image generated at `resolution`: original size = target size = the
    image's own, crop (0, 0), as diffusers' defaults are, but passed explicitly and recorded in the settings (the
    training side conditions synthetic images on the size they were generated at). {} for other pipelines."""
    if not PIPELINES[type(pipe).__name__]["micro_conditioning"]:
        return {}
    return {
        "original_size": (resolution, resolution),
        "crops_coords_top_left": (0, 0),
        "target_size": (resolution, resolution),
    }


def model_record(pipe):
    """What run_config.json's "model" says about the pipeline besides the UNet: its class and its VAE's dtype."""
    return {"pipeline_class": type(pipe).__name__, "vae_dtype": str(pipe.vae.dtype).replace("torch.", "")}


def folder_settings(args, pipe, prompts, fingerprint):
    """Everything that determines the images of a folder (compared by check_folder on every rerun)."""
    pretrained = args.pretrained_model_name_or_path
    if Path(pretrained).expanduser().exists():
        pretrained = str(Path(pretrained).expanduser().resolve())
    settings = {
        "pretrained_model_name_or_path": pretrained,
        "unet_fingerprint": fingerprint,
        "prompts_sha256": prompts_digest(prompts),
        "num_prompts": len(prompts),
    }
    settings.update({k: getattr(args, k) for k in IMAGE_SETTINGS})
    settings["scheduler"] = type(pipe.scheduler).__name__
    # the base's text encoder and VAE weights; recorded only when given, so folders made without them keep resuming
    settings.update({k: getattr(args, k) for k in ("revision", "variant") if getattr(args, k)})
    extra = micro_conditioning(pipe, args.resolution)
    if extra:  # only where the pipeline takes it, so folders of SD-1.x/2.x keep their settings (and resume)
        settings["micro_conditioning"] = {k: list(v) for k, v in extra.items()}
    return settings


def load_prompts(
    prompts=None,
    prompts_file=None,
    dataset=None,
    split="train",
    caption_column="caption",
    max_prompts=None,
    max_train_samples=None,
    streaming=False,
    per_row=False,
):
    """The prompt list from exactly one source, duplicates dropped (first seen wins). Its order defines
    prompt_index, so the same source always gives the same indices. `per_row`: the caption of every usable row
    of `dataset` (ties dropped, duplicates kept), so prompt_index is the training row (train_spin.py pairs by it)."""
    given = [name for name, v in (("--prompt", prompts), ("--prompts_file", prompts_file), ("--dataset", dataset)) if v]
    if len(given) != 1:
        raise UserError(
            f"give the prompts with exactly one of --dataset, --prompts_file"
            f"{' or --prompt' if prompts is not None else ''} (got {' and '.join(given) or 'none'})"
        )
    if per_row and not dataset:
        raise UserError("--per_row needs --dataset (one image per training row of that dataset)")
    if dataset and per_row:
        rows = iter_examples(open_dataset(dataset, split, streaming), caption_column, with_images=False)
        limit = min(filter(None, (max_train_samples, max_prompts)), default=None)
        out = [ex["caption"] for ex in itertools.islice(rows, limit)]
    elif dataset:
        # Pick-a-Pic ties are dropped here exactly as in training, so every prompt has a training row.
        out = unique_prompts(
            open_dataset(dataset, split, streaming), caption_column, max_prompts, max_rows=max_train_samples
        )
    else:
        if prompts_file:
            try:
                prompts = Path(prompts_file).expanduser().read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--prompts_file {prompts_file}: cannot read it ({type(e).__name__})") from None
        out = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))[: max_prompts or None]
    if not out:
        raise UserError(f"no prompts in {given[0]} {dataset or prompts_file or ''}".rstrip())
    return out


def pipeline_class_name(pretrained, revision=None):
    """The pipeline class a model folder or hub id names (its model_index.json's "_class_name", read through
    diffusers' own loading path, so a hub id is downloaded/cached as from_pretrained does it); one that we do not run
    is refused."""
    from diffusers import DiffusionPipeline  # diffusers takes seconds to import: only once a model is named

    try:
        name = DiffusionPipeline.load_config(pretrained, revision=revision).get("_class_name")
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not read the model_index.json of --pretrained_model_name_or_path {pretrained}: "
            f"{str(e).splitlines()[0]}"
        ) from None
    if name not in PIPELINES:
        raise UserError(
            f"--pretrained_model_name_or_path {pretrained} is a {name} (model_index.json), which is not "
            f"supported; supported: {', '.join(PIPELINES)} (SD-1.x, SD-2.x, SDXL)"
        )
    return name


def check_unet_fits(unet, class_name, where="--unet"):
    """A UNet of another model family (an SD-1.5 UNet with an SDXL base, or the reverse) is refused in one line, before
    any image is made."""
    want, got = PIPELINES[class_name]["unet_addition_embed_type"], unet.config.get("addition_embed_type")
    if got != want:
        raise UserError(
            f"{where}: the UNet (addition_embed_type {got!r}) does not fit the base's {class_name} "
            f"(which needs {want!r}): pass a UNet of the base's model family"
        )


def cast_unet(unet, dtype, device=None):
    """Cast the UNet (after its fingerprint was taken): from_pretrained(dtype=) leaves a passed-in UNet as it is.
    ModelMixin.to warns about fp32-only modules even when a model has none (UNet2DConditionModel): then the
    plain torch cast does the same thing quietly."""
    if getattr(unet, "_keep_in_fp32_modules", None):
        return unet.to(device=device, dtype=dtype)
    return torch.nn.Module.to(unet, device=device, dtype=dtype)


def load_pipeline(
    pretrained, unet, scheduler, dtype, device, class_name=None, unet_where="--unet", revision=None, variant=None
):
    """The pipeline class that `pretrained` names (see PIPELINES) around `unet`, with everything that class loads
    (SDXL: both text encoders and tokenizers), safety checker off (its black images would poison the synthetic data
    and bias comparisons), inner progress bar off, SDPA attention (diffusers' default). Where the class decodes with an
    fp32 VAE (SDXL's fp16 VAE overflows; its config says force_upcast), the VAE is kept in float32 here: make_images
    decodes with it, so the pipeline itself never needs to. `revision`/`variant`: which weights of `pretrained` load."""
    import diffusers  # diffusers and transformers take seconds to import: only once a pipeline is loaded
    import transformers

    class_name = class_name or pipeline_class_name(pretrained, revision)
    check_unet_fits(unet, class_name, unet_where)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(
            pretrained,
            unet=cast_unet(unet, dtype),
            dtype=dtype,
            revision=revision,
            variant=variant,
            **PIPELINES[class_name]["load"],
        )
    except (OSError, ValueError) as e:
        msg = variant_hint(e, variant)
        raise UserError(f"could not load the pipeline {pretrained!r}: {msg}") from None
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            check_tokenizer(getattr(pipe, name), f"the pipeline {pretrained!r}", name)
    if scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    if PIPELINES[class_name]["upcast_vae"] and pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.inference_mode()
def make_images(pipe, prompts, jobs, args, writer, with_latents, progress=None):
    """Run the pipeline over `jobs` [(prompt_index, image_index)] in batches and hand results to `writer`.
    Returns counts; non-finite results are not written, all-black ones are written and listed."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    shape = (
        pipe.unet.config.in_channels,
        args.resolution // pipe.vae_scale_factor,
        args.resolution // pipe.vae_scale_factor,
    )
    stats = {"written": 0, "nonfinite": [], "black": []}
    extra = micro_conditioning(pipe, args.resolution)
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        seeds = [image_seed(args.seed, p, i) for p, i in batch]
        noise, gens = initial_noise(seeds, shape)
        latents = pipe(
            prompt=[prompts[p] for p, _ in batch],
            latents=noise.to(device, dtype),
            generator=gens,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            height=args.resolution,
            width=args.resolution,
            output_type="latent",
            **extra,
        ).images
        # Decode ourselves: one pipeline call gives both the final latent and the image.
        x = decode_latents(pipe.vae, latents, PIPELINES[type(pipe).__name__]["latents_mean_std"])
        finite = (torch.isfinite(latents).flatten(1).all(1) & torch.isfinite(x).flatten(1).all(1)).tolist()
        pixels = to_pixels(x)
        latents = latents.float().cpu()
        keep = []
        for j, (p, i) in enumerate(batch):
            if not finite[j]:
                stats["nonfinite"].append(image_key(p, i))
                continue
            if pixels[j].max() <= BLACK_MAX_PIXEL:
                stats["black"].append(image_key(p, i))
            keep.append(j)
        if keep:
            rows = [metadata_row(prompts[batch[j][0]], *batch[j], seeds[j], with_latents) for j in keep]
            writer.submit(rows, pixels[keep].numpy(), latents[keep] if with_latents else None)
            stats["written"] += len(keep)
        if progress is not None:
            progress.update(len(batch))
    return stats


class FolderRun(NamedTuple):
    """What fill_folder did in this process."""

    stats: dict  # make_images' counts: written, and the keys of non-finite and all-black results
    skipped_done: int  # images the folder held already, from an earlier run
    seconds: float  # time spent making images


def fill_folder(folder, config, pipe, prompts, args, state, with_latents, desc):
    """Make the images `folder` still lacks, in every process: refuse a folder made by another model or with other
    settings (check_folder), prepare it (main process), then this process's prompts (shard), every image from its own
    seed, finished ones skipped, each batch written by a FolderWriter into this process's metadata part. The caller
    merges the parts (merge_metadata) once every process is done. generate.py and sample.py fill folders with it."""
    from tqdm.auto import tqdm  # a dependency of diffusers, imported only once there is work to show

    check_folder(folder, config)  # every process checks, so a refusal never leaves the others waiting
    if state.is_main_process:
        prepare_folder(folder, config, with_latents=with_latents)
    state.wait_for_everyone()

    done = {(r["prompt_index"], r["image_index"]) for r in read_jsonl(folder / "metadata.jsonl")}
    jobs = plan(shard(len(prompts), state.process_index, state.num_processes), args.num_images_per_prompt, done)
    writer = FolderWriter(folder, state.process_index)
    progress = tqdm(total=len(jobs), unit="img", desc=desc, disable=not state.is_main_process)
    t0 = time.time()
    try:
        stats = make_images(pipe, prompts, jobs, args, writer, with_latents=with_latents, progress=progress)
    finally:
        writer.close()  # what finished is kept, even on Ctrl-C
        progress.close()
    return FolderRun(stats, len(done), time.time() - t0)


def folder_stats(old, all_stats, run, expected, present, processes):
    """stats.json after a run: this run's counts over every process (`all_stats`: their make_images counts), and the
    all-black keys of every run so far (`old`: the stats.json before this run, {} when there was none)."""
    written = sum(s["written"] for s in all_stats)
    nonfinite = sorted(k for s in all_stats for k in s["nonfinite"])
    black = sorted(set(old.get("black_keys", [])) | {k for s in all_stats for k in s["black"]})
    return {
        "images_expected": expected,
        "images_present": present,
        "last_run": {
            "written": written,
            "skipped_done": run.skipped_done,
            "seconds": round(run.seconds, 2),
            "images_per_s": round(written / max(run.seconds, 1e-9), 3),
            "processes": processes,
            "nonfinite_keys": nonfinite,
        },
        "black_keys": black,
    }


def finish_folder(out, all_stats, run, expected, processes):
    """Main process, once every process is done: merge the metadata parts, write stats.json, say what happened."""
    rows = merge_metadata(out)
    old = json.loads((out / "stats.json").read_text()) if (out / "stats.json").is_file() else {}
    stats = folder_stats(old, all_stats, run, expected, len(rows), processes)
    write_json_atomic(out / "stats.json", stats)
    written, nonfinite, black = stats["last_run"]["written"], stats["last_run"]["nonfinite_keys"], stats["black_keys"]
    if nonfinite:
        print(
            f"warning: {len(nonfinite)} result(s) had NaN/inf values and were not written (e.g. {nonfinite[0]}); "
            "try --mixed_precision no or bf16 for them",
            file=sys.stderr,
        )
    if black:
        print(
            f"warning: {len(black)} all-black image(s) (listed in stats.json black_keys): check them before "
            "training on them",
            file=sys.stderr,
        )
    print(
        f"generate: wrote {written} image(s) in {run.seconds:.1f}s "
        f"({written / max(run.seconds, 1e-9):.2f} images/s), "
        f"{run.skipped_done} already there, {len(nonfinite)} non-finite, {len(black)} all-black; "
        f"{len(rows)}/{expected} images in {out / 'metadata.jsonl'}"
    )


def main():
    args = parse_args()
    from accelerate import PartialState  # accelerate takes seconds to import: not for --help or sample.py's import

    state = start_processes(PartialState)
    check_model_path(args.pretrained_model_name_or_path)
    # an unsupported model fails before any work
    class_name = pipeline_class_name(args.pretrained_model_name_or_path, args.revision)
    prompts = on_main_process(
        state,
        lambda: load_prompts(
            None,
            args.prompts_file,
            args.dataset,
            args.split,
            args.caption_column,
            args.max_prompts,
            args.max_train_samples,
            args.streaming,
            per_row=args.per_row,
        ),
    )

    # The fingerprint is taken on the float32 weights, before any cast: train_spin.py compares it with the
    # UNet it trains, so the opponent that made these images is known exactly.
    unet = load_unet(args.unet, args.pretrained_model_name_or_path, args.revision, args.variant)
    fingerprint = unet_fingerprint(unet)
    args.mixed_precision, dtype = resolve_precision(args.mixed_precision, state.device)
    pipe = load_pipeline(
        args.pretrained_model_name_or_path,
        unet,
        args.scheduler,
        dtype,
        state.device,
        class_name,
        f"--unet {args.unet}",
        args.revision,
        args.variant,
    )
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    args.resolution = args.resolution or native
    if args.resolution % pipe.vae_scale_factor:
        raise UserError(f"--resolution must be a multiple of {pipe.vae_scale_factor}")

    out = Path(args.output_dir)
    model = {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "unet": args.unet or "base",
        "unet_fingerprint": fingerprint,
        **model_record(pipe),
    }
    config = run_config("generate", args, model=model, settings=folder_settings(args, pipe, prompts, fingerprint))
    run = fill_folder(out, config, pipe, prompts, args, state, with_latents=True, desc="generate")

    all_stats = [run.stats]
    if state.num_processes > 1:  # accelerate's collectives only where several processes run
        from accelerate.utils import gather_object

        all_stats = gather_object([run.stats])
    end_processes(state)
    if state.is_main_process:
        finish_folder(out, all_stats, run, len(prompts) * args.num_images_per_prompt, state.num_processes)


# ---- plumbing: resumable image folders, several processes ----
WRITER_THREADS = 4  # PNG encoding + disk writes run here, so the accelerator never waits for the disk


def read_folder_rows(folder):
    """Finished images of a folder: metadata.jsonl plus leftover per-process parts, deduplicated by
    (prompt_index, image_index), keeping only rows whose files exist, sorted."""
    folder = Path(folder)
    rows = {}
    for path in [folder / "metadata.jsonl"] + sorted(folder.glob("metadata.rank*.jsonl")):
        if path.is_file():
            for r in read_jsonl(path):
                rows[(r["prompt_index"], r["image_index"])] = r
    files = ("file_name", "latent_file")
    return [r for _, r in sorted(rows.items()) if all((folder / r[f]).is_file() for f in files if f in r)]


def merge_metadata(folder):
    """Fold the per-process parts into one sorted metadata.jsonl (atomically), then drop the parts.
    Idempotent: a run killed in between merges the same rows again next time."""
    folder = Path(folder)
    rows = read_folder_rows(folder)
    tmp = folder / "metadata.jsonl.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "metadata.jsonl")
    for part in folder.glob("metadata.rank*.jsonl"):
        part.unlink()
    return rows


def check_folder(folder, config):
    """Refuse a folder that holds images made by another model or with other settings (never mix them)."""
    folder = Path(folder)
    cfg = folder / "run_config.json"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output_dir {folder} is a file, not a folder")
    if not cfg.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(f"--output_dir {folder} is not empty and has no run_config.json: use a new folder")
        return
    try:
        old = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{cfg} is unreadable: use a new --output_dir") from None
    if old.get("stage") != config["stage"]:
        raise UserError(
            f"--output_dir {folder} holds a {old.get('stage')!r} run, not {config['stage']!r}: use a new folder"
        )
    was, now = old.get("settings", {}), config["settings"]
    # a setting recorded there and unset now differs too (--variant given there only)
    diff = [f"{k}: {was.get(k)!r} there, {now.get(k)!r} now" for k in {**was, **now} if was.get(k) != now.get(k)]
    if diff:
        raise UserError(
            f"--output_dir {folder} holds images made with other settings ({'; '.join(diff)}); "
            "use a new --output_dir, or the original settings to resume"
        )


def prepare_folder(folder, config, with_latents):
    """Main process only, after check_folder: create the folder, record the config once (it describes how the
    images were made), delete temp files of a killed run and merge its metadata parts."""
    folder = Path(folder)
    for sub in ("images", "latents") if with_latents else ("images",):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if not (folder / "run_config.json").is_file():
        write_json_atomic(folder / "run_config.json", config)
    for tmp in [*folder.glob("*.tmp"), *folder.glob("images/*.tmp"), *folder.glob("latents/*.tmp")]:
        tmp.unlink()
    return merge_metadata(folder)


def save_atomic(path, save):
    """save(tmp_path), then rename: a killed run leaves a .tmp file (cleaned up next run), never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    save(tmp)
    os.replace(tmp, path)


class FolderWriter:
    """Writes finished batches in background threads (PNG encoding is slow), then appends their metadata lines
    to this process's part file, flushed and fsynced: a line is only written once its files exist."""

    def __init__(self, folder, rank, threads=WRITER_THREADS):
        self.folder, self.threads = Path(folder), threads
        self.pool, self.pending, self.lock = ThreadPoolExecutor(threads), deque(), threading.Lock()
        self.part = open(self.folder / f"metadata.rank{rank}.jsonl", "a")
        self.images_written = 0
        # Test hook: die like `kill -9` after this many image files, before their metadata line is written.
        self.kill_after = int(os.environ.get("SPIN_TEST_KILL_AFTER_IMAGES", "0"))

    def submit(self, rows, images, latents=None):
        """rows: metadata rows; images: uint8 [B, H, W, 3] numpy; latents: float32 [B, C, h, w] CPU or None."""
        while len(self.pending) >= 2 * self.threads:  # bound memory; also surfaces a worker's error (disk full)
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, rows, images, latents))

    def _write(self, rows, images, latents):
        for j, row in enumerate(rows):
            save_atomic(self.folder / row["file_name"], lambda p: Image.fromarray(images[j]).save(p, format="PNG"))
            if latents is not None:
                save_atomic(
                    self.folder / row["latent_file"],
                    lambda p: save_file({"latent": latents[j].clone().contiguous()}, str(p)),
                )
            with self.lock:
                self.images_written += 1
                if self.kill_after and self.images_written >= self.kill_after:
                    os._exit(137)
        with self.lock:
            self.part.writelines(json.dumps(r) + "\n" for r in rows)
            self.part.flush()
            os.fsync(self.part.fileno())

    def close(self):
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown()
        self.part.close()


def start_processes(partial_state):
    """This process's place among `accelerate launch` / torchrun processes (or the only one). Without CUDA,
    several processes need accelerate's CPU mode (gloo); a launch it does not see would make every process
    write every image, so that is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = partial_state(cpu=world > 1 and not torch.cuda.is_available())
    if state.num_processes != world:
        raise UserError(f"launched as {world} processes but accelerate sees {state.num_processes}")
    return state


def end_processes(state):
    """Leave the process group together: a process that exits with it still open can abort at interpreter shutdown
    (gloo: 'terminate called without an active exception') while the others finish."""
    state.wait_for_everyone()
    if state.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def on_main_process(state, fn, broadcast=None):
    """fn() run by the main process only, its result (or its one-line error) handed to every process: reading the
    prompts of a streamed Pick-a-Pic once, not once per GPU."""
    box = [None]
    if state.is_main_process:
        try:
            box = [("ok", fn())]
        except UserError as e:
            box = [("error", str(e))]
    if state.num_processes > 1:
        if broadcast is None:  # accelerate only where several processes run
            from accelerate.utils import broadcast_object_list as broadcast
        broadcast(box)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


# ---- helpers every script carries: each is the same text wherever it appears (tests/test_shared.py checks) ----
class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code 2."""


def cli(main):
    """Run main(); known failures end in one line: bad input (exit 2), disk full (28), Ctrl-C (130)."""
    import errno

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = e.filename or "while writing"
        print(
            f"error: disk full ({where}): free space and rerun the same command; finished work is kept", file=sys.stderr
        )
        sys.exit(28)


def write_json_atomic(path, obj):
    """Write JSON under a temp name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_jsonl(path):
    """The rows of a jsonl file; a truncated last line (a run killed mid-write) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def run_config(stage, args, **extra):
    """What made a folder, with which settings: the same shape for every stage."""
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "args": dict(vars(args)),
        "versions": versions,
        **extra,
    }


def check_model_path(path, what="--pretrained_model_name_or_path"):
    """A path-looking model argument that does not exist is a typo, not a hub id."""
    if (path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]) and not Path(path).exists():
        raise UserError(f"{what} {path}: folder not found; pass a local pipeline folder or a hub id")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds "(default: X)" only where the help text does not state the default already and there is one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action)


def quiet_known_noise():
    """Drop two import-time messages known to be harmless at their source (every other warning still shows):
    bitsandbytes' missing optional 4-bit CPU kernel, transformers' torchvision fallback (torchvision is not needed)."""
    import logging

    for logger, text in (
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
        ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    ):
        logging.getLogger(logger).addFilter(lambda record, text=text: text not in record.getMessage())


# ---- model and data helpers (train_spin.py, generate.py; sample.py imports generate.py's) ----
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's checkpoint-N/: the adapter's weights (peft names)


def unet_fingerprint(unet):
    """sha256 of every UNet tensor (names and float32 values): identifies the weights, not the path."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def is_checkpoint(unet_path):
    """A checkpoint-N/ folder written by train_spin.py (accelerate's save_state + train_state.json)."""
    return unet_path not in (None, "", "base") and Path(unet_path, "train_state.json").is_file()


def unet_source(unet_path, base_path):
    """(where, subfolder) of a UNet given as None/'base', a folder holding unet/, a bare UNet folder or a hub id."""
    if unet_path in (None, "", "base"):
        return base_path, "unet"
    if Path(unet_path, "unet", "config.json").is_file():
        return unet_path, "unet"
    if Path(unet_path, "config.json").is_file():
        return unet_path, None
    if Path(unet_path).exists() or unet_path.startswith((".", "/", "~")):
        raise UserError(
            f"--unet {unet_path}: no UNet there (expected {unet_path}/unet/config.json); "
            "pass a folder written by train_spin.py, one of its checkpoint-N folders, a hub id, or 'base'"
        )
    return unet_path, "unet"


def load_unet(unet_path, base_path, revision=None, variant=None):
    """A UNet in float32: None/'base' (the base pipeline's, at its --revision and --variant), a folder holding unet/, a
    bare UNet folder, a hub id (subfolder unet/, as UCLA-AGI/SPIN-Diffusion-iter*) or a train_spin.py checkpoint-N/."""
    from diffusers import UNet2DConditionModel

    if is_checkpoint(unet_path):
        return load_checkpoint_unet(Path(unet_path))
    where, sub = unet_source(unet_path, base_path)
    pin = {"revision": revision, "variant": variant} if unet_path in (None, "", "base") else {}
    try:
        return UNet2DConditionModel.from_pretrained(where, subfolder=sub, torch_dtype=torch.float32, **pin)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the UNet from {where!r}{'/' + sub if sub else ''}: {variant_hint(e, pin.get('variant'))}"
            "; check the path or hub id (and HF_HUB_OFFLINE)"
        ) from None


def load_checkpoint_unet(ckpt):
    """A train_spin.py checkpoint-N/ as a UNet in float32: the run's starting UNet (named by its run_config.json) with
    the checkpoint's weights, or, for a LoRA run, its adapter fused: what the run's unet/ would hold at step N."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        cfg = json.loads((ckpt.parent / "run_config.json").read_text())
        start, base, args = cfg["model"]["unet"], cfg["model"]["pretrained_model_name_or_path"], cfg["args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"--unet {ckpt}: a checkpoint, but {ckpt.parent / 'run_config.json'} does not name the run's starting "
            "UNet (model.unet); pass a checkpoint inside a train_spin.py output folder"
        ) from None
    lora = args.get("lora_rank")
    weights = ckpt / (ADAPTER_FILE if lora else "model.safetensors")
    if not weights.is_file():
        raise UserError(f"--unet {ckpt}: a checkpoint without its weights ({weights.name}); pass another checkpoint")
    # loaded, not built from its config: diffusers' loading in another thread can leave a built model on meta tensors
    unet = load_unet(start, base, args.get("revision"), args.get("variant"))
    state = load_file(str(weights))
    try:
        if lora:
            unet.add_adapter(lora_config(lora, args.get("lora_alpha"), args["lora_target_modules"]))
            unexpected = set_peft_model_state_dict(unet, state).unexpected_keys
            if unexpected:
                raise RuntimeError(f"unexpected {unexpected[0]}")
            unet.fuse_lora()
            unet.unload_lora()
        else:  # a multi-process run saves the DDP wrapper's names, behind "module."
            torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, "module.")
            unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"--unet {ckpt}: its {weights.name} does not fit the run's starting UNet: {str(e).splitlines()[0]}"
        ) from None
    return unet.to(torch.float32)


def lora_config(rank, alpha, target_modules):
    """peft's LoraConfig of train_spin.py's adapters: scale alpha / rank (alpha None: the rank), the comma-separated
    target modules, B initialised to zero (so the adapted UNet starts as the UNet itself)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("LoRA needs peft: pip install peft") from None
    targets = [m.strip() for m in target_modules.split(",") if m.strip()]
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)


def variant_hint(error, variant):
    """The first line of a loading error; where it names --variant's files, also their likely cause and the fix."""
    first = str(error).splitlines()[0].rstrip(".") if str(error) else type(error).__name__
    if variant and variant in str(error):
        return f"{first}; no --variant {variant} weight files there? drop --variant, or pass one the model has"
    return first


def check_tokenizer(tokenizer, what, subfolder):
    """transformers builds an empty tokenizer where a pipeline folder lacks its files (no vocabulary, no length
    limit), which would fail later inside its call: refused here in one line."""
    if tokenizer.model_max_length > 10**6:  # transformers' "no limit recorded": no tokenizer_config.json was read
        raise UserError(
            f"could not load {what}: no tokenizer in its {subfolder}/ (vocab.json, merges.txt, tokenizer_config.json "
            "with model_max_length); save the pipeline with save_pretrained or point at a complete copy"
        )
    return tokenizer


def open_dataset(name, split, streaming=False):
    """A `datasets` dataset from a hub id, a local folder in any format `datasets` reads (parquet files, webdataset
    .tar shards, an image folder with metadata.jsonl) or one parquet/json/jsonl/csv/tar file."""
    import datasets

    p = Path(name).expanduser()
    local = name.startswith((".", "/", "~")) or p.exists()
    if local and not p.exists():
        raise UserError(f"--dataset {name}: no such file or folder; pass a local dataset path or a hub id")
    kinds = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tar": "webdataset"}
    if p.is_file() and p.suffix not in kinds:
        raise UserError(f"--dataset {name}: unknown file type {p.suffix!r}; use parquet, json(l), csv or tar")
    files = [p] if p.is_file() else split_files(p, split) if p.is_dir() else []
    try:
        if files:
            data_files = {split: [str(f) for f in files]}
            return datasets.load_dataset(
                kinds[files[0].suffix], data_files=data_files, split=split, streaming=streaming
            )
        return datasets.load_dataset(str(p) if local else name, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, ConnectionError...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        unresolved = ("DatasetNotFoundError", "RepositoryNotFoundError")
        if not local and (isinstance(e, ConnectionError) or type(e).__name__ in unresolved):
            raise UserError(f"--dataset {name} does not resolve ({msg.rstrip('.')}){unresolved_hint(name)}") from None
        raise UserError(f"could not load --dataset {name} split {split!r}: {msg}") from None


def unresolved_hint(name):
    """What to say after a dataset id that does not resolve: the original Pick-a-Pic is gone, its copies work."""
    if name.strip("/").lower() not in ("yuvalkirstain/pickapic_v2", "yuvalkirstain/pickapic_v1"):
        return ": check the hub id (and HF_HUB_OFFLINE: offline, only cached datasets load) or pass a local folder"
    return (
        ": the original Pick-a-Pic was removed from the Hugging Face Hub in 2025; copies work in either layout, "
        "parquet (caption, jpg_0, jpg_1, label_0, label_1) or webdataset tar shards (original_prompt.txt, jpg_0.jpg, "
        "jpg_1.jpg, label_0.txt, label_1.txt; e.g. sayakpaul/pickapic_v2_webdataset): pass one with --dataset "
        "(a hub id or a local folder)"
    )


def split_files(folder, split):
    """The .tar or .parquet files of a local folder that name `split`: under a folder of that name, or called
    `<split>.tar`, `<split>_00000.tar`, `<split>-00000-of-00009.parquet`... (`datasets`' own inference would mix
    test_unique_00000.tar into 'test'). None, both kinds, or a dataset card that lists the files: [] (`datasets`
    decides)."""
    readme = folder / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="replace").split("\n---", 1)[0], re.M):
        return []  # the folder's dataset card (a downloaded hub copy) names each split's files: `datasets` reads it
    named = re.compile(rf"{re.escape(split)}(?:[-_.][0-9][^/]*)?\.(?:tar|parquet)")
    files = sorted(
        f
        for f in folder.rglob("*")
        if f.suffix in (".tar", ".parquet")
        and f.is_file()
        and (split in f.relative_to(folder).parts[:-1] or named.fullmatch(f.name))
    )
    return files if len({f.suffix for f in files}) == 1 else []


# Pick-a-Pic's caption column in its copies: the original parquet's, or a webdataset sample's file
PICKAPIC_CAPTIONS = ("caption", "caption.txt", "original_prompt.txt")


def pickapic_columns(column_names, caption_column="caption"):
    """{field: column} for caption, jpg_0, jpg_1, label_0, label_1 when the dataset is Pick-a-Pic, in its parquet
    layout or as webdataset tars (jpg_0.jpg, label_0.txt...), else None. A --caption_column of its own is kept."""
    names = list(column_names)

    def column(field):  # the original name, else the name with one extension
        return (
            field
            if field in names
            else next((c for c in names if c.split(".")[0] == field and c.count(".") == 1), None)
        )

    cols = {f: column(f) for f in ("jpg_0", "jpg_1", "label_0", "label_1")}
    if None in cols.values():
        return None
    if caption_column == "caption":
        caption_column = next((c for c in PICKAPIC_CAPTIONS if c in names), caption_column)
    return {"caption": caption_column, **cols}


def iter_examples(ds, caption_column="caption", image_column=None, with_images=True, with_loser=False, stats=None):
    """{"caption", "image", "image_lose"} per usable row, images undecoded (bytes, path dict or PIL). A Pick-a-Pic row
    gives its image labelled 1 as "image" and the other as "image_lose"; ties are dropped and counted.
    stats["rows_read"] counts every row read, ties included, stats["ties_dropped"] the ties."""
    import datasets

    stats = {} if stats is None else stats
    stats.setdefault("rows_read", 0)
    stats.setdefault("ties_dropped", 0)
    names = list(ds.column_names or ds.features or [])
    cols = pickapic_columns(names, caption_column)
    if cols and image_column in ("jpg_0", "jpg_1", cols["jpg_0"], cols["jpg_1"]):
        raise UserError(
            f"--image_column {image_column}: in Pick-a-Pic the real image is jpg_0 or jpg_1 by each row's "
            "labels (the one labelled 1); drop --image_column and it is picked by label, ties dropped"
        )
    pickapic = cols is not None and image_column is None
    caption_column = cols["caption"] if pickapic else caption_column
    if image_column is None and not pickapic:
        image_column = next((c for c in ("image", "jpg", "png", "img") if c in names), "image")
    need = [caption_column] + ([cols["label_0"], cols["label_1"]] if pickapic else [])
    images = ([cols["jpg_0"], cols["jpg_1"]] if pickapic else [image_column]) if with_images else []
    missing = [c for c in need + images if c not in names]
    if missing:
        raise UserError(f"dataset has no column(s) {missing} (it has {names}); set --caption_column / --image_column")
    if with_loser and not pickapic:
        raise UserError(
            "--loss dpo needs winner/loser pairs: a Pick-a-Pic-format dataset (jpg_0, jpg_1, label_0, label_1)"
        )
    ds = ds.select_columns(need + images)
    for c in images:
        if isinstance((ds.features or {}).get(c), datasets.Image):
            ds = ds.cast_column(c, datasets.Image(decode=False))  # decoded by decode_image: corrupt files are skipped
    for row in ds:
        stats["rows_read"] += 1
        caption = row[caption_column]
        ex = {"caption": caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption}
        if pickapic:
            try:  # the parquet layout holds floats, the webdataset one text ("1.0", "0", "0.5")
                l0, l1 = float(row[cols["label_0"]]), float(row[cols["label_1"]])
            except (TypeError, ValueError):
                raise UserError(
                    f"row {stats['rows_read']}: Pick-a-Pic labels {row[cols['label_0']]!r}, {row[cols['label_1']]!r} "
                    "are not numbers (1, 0 or 0.5); check --dataset"
                ) from None
            if l0 == l1:
                stats["ties_dropped"] += 1
                continue
            win = 0 if l0 > l1 else 1
            if with_images:
                ex["image"] = row[cols[f"jpg_{win}"]]
            if with_loser:
                ex["image_lose"] = row[cols[f"jpg_{1 - win}"]]
        elif with_images:
            ex["image"] = row[image_column]
        yield ex


def image_seed(seed, prompt_index, image_index):
    """Seed of one image, from (run seed, prompt index, image index) only: independent of batch size, process count
    and resume point, and the same for every model, so that comparisons are paired."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def unique_prompts(ds, caption_column="caption", max_prompts=None, max_rows=None):
    """Unique captions in first-seen order, Pick-a-Pic ties dropped as in training; `max_rows`: of the first usable
    rows only, as train_spin.py --max_train_samples reads them, so that both see the same prompts."""
    seen = {}
    for ex in itertools.islice(iter_examples(ds, caption_column, with_images=False), max_rows):
        seen.setdefault(ex["caption"], len(seen))
        if max_prompts and len(seen) >= max_prompts:
            break
    return list(seen)


def image_key(prompt_index, image_index):
    """File stem of one image: the same in every folder of images (generate.py, sample.py, validation)."""
    return f"p{prompt_index:07d}_i{image_index:03d}"


# Sampler names (generate.py and sample.py --scheduler, train_spin.py --validation_scheduler) -> diffusers classes
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def initial_noise(seeds, shape):
    """Starting noise of each image from its own CPU generator: the same on every device, batch size and process.
    The generators are returned too, already advanced, for samplers that draw noise at every step."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def decode_latents(vae, latents, latents_mean_std):
    """A pipeline's final latent (output_type="latent") -> image in [-1, 1], decoded as the pipeline decodes it: in the
    VAE's dtype, un-normalised with the VAE config's latents_mean/latents_std where it has them and
    `latents_mean_std` (SDXL's pipeline), else divided by scaling_factor."""
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if latents_mean_std and mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    return vae.decode(latents, return_dict=False)[0]


def to_pixels(images):
    """Decoded images in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3] on the CPU, as generate.py writes them."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


quiet_known_noise()  # before the libraries that log the known noise are imported (they are imported lazily)


if __name__ == "__main__":
    cli(main)
