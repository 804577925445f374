"""generate.py: the opponent (θ_k) samples synthetic images for the training prompts (SPIN-Diffusion step 1).

    python generate.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --unet runs/x/iter_1 --dataset sayakpaul/pickapic_v2_webdataset --output_dir runs/x/synth_1
    accelerate launch --num_processes 8 generate.py ...      # the same folder, 8x faster

docs/generate_and_sample.md: the folder it writes (train_spin.py reads it), the flags, seeds, resuming.
"""

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

# Settings that change the pixels: a folder made with other values is refused (--batch_size only reorders float sums).
IMAGE_SETTINGS = tuple(
    "num_images_per_prompt num_inference_steps guidance_scale resolution scheduler seed mixed_precision".split()
)
SDXL = "StableDiffusionXLPipeline"  # micro-conditioning, a force_upcast VAE, latents_mean/std in decoding
SD3 = "StableDiffusion3Pipeline"  # flow matching: a transformer (not a UNet), T5 prompts, a shifted latent space
# The pipeline classes we run (model_index.json's "_class_name") and what each loads without: the safety checker (its
# black images would poison the training data), the watermark (make_images decodes the latents itself).
PIPELINE_ARGS = {
    "StableDiffusionPipeline": {"safety_checker": None, "requires_safety_checker": False},
    SDXL: {"add_watermarker": False},
    SD3: {},
}
SUPPORTED = "SD-1.x, SD-2.x, SDXL or SD3/SD3.5"  # what those classes run
# The denoiser each class runs (class name, + extra inputs): SDXL's UNet takes pooled text and size ids, SD3 has no UNet
DENOISERS = {SDXL: "UNet2DConditionModel+text_time", SD3: "SD3Transformer2DModel"}  # else UNet2DConditionModel
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed_precision
BLACK_MAX_PIXEL = 2  # an image whose brightest value is <= this (0..255) counts as all-black


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--unet", default="base", help="opponent UNet (SD3 transformer): train_spin.py folder, hub id, base")
    p.add_argument("--max_train_samples", type=int, help="read the first N usable rows of --dataset, as train_spin.py")
    p.add_argument("--per_row", action="store_true", help="a prompt per usable row of --dataset (Algorithm 1)")
    return parse_image_args(p, argv, split="train", images_per_prompt=1)


def parse_image_args(p, argv, split, images_per_prompt):
    """Adds the flags generate.py and sample.py share (docs/generate_and_sample.md), parses and checks them."""
    sd15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    p.add_argument("--pretrained_model_name_or_path", default=sd15, help=f"base pipeline: {SUPPORTED}")
    p.add_argument("--revision", help="git revision of the base's hub repo (its parts and the 'base' UNet)")
    p.add_argument("--variant", help="weights variant of the base's parts and the 'base' UNet, e.g. fp16")
    p.add_argument("--dataset", help="prompts: the unique captions of a dataset (hub id or local); ties dropped")
    p.add_argument("--split", default=split, help="split of --dataset")
    p.add_argument("--caption_column", default="caption", help="caption column of --dataset")
    p.add_argument("--prompts_file", help="prompts: one per line")
    p.add_argument("--max_prompts", type=int, help="use only the first N prompts")
    p.add_argument("--streaming", action="store_true", help="stream --dataset instead of downloading it whole")
    p.add_argument("--num_images_per_prompt", type=int, default=images_per_prompt, help="images per prompt")
    p.add_argument("--num_inference_steps", type=int, default=50, help="sampler steps")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's own, 512 for SD-1.5)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the pipeline's own; not SD3)")
    p.add_argument(
        "--max_sequence_length", type=int, default=256, help="SD3: T5 prompt tokens (train_spin.py must use the same)"
    )
    p.add_argument("--no_t5", action="store_true", help="SD3: without its T5 encoder, as the pipeline allows (zeros)")
    p.add_argument("--batch_size", type=int, default=8, help="images per pipeline call (per process)")
    p.add_argument("--seed", type=int, default=0, help="default 0: image i of prompt p uses image_seed(seed, p, i)")
    p.add_argument("--mixed_precision", choices=sorted(DTYPES), help="default: fp16 on CUDA, no on CPU")
    p.add_argument("--output_dir", required=True, help="the image folder (rerun the command to resume)")
    args = p.parse_args(argv)
    for name in ("num_images_per_prompt", "num_inference_steps", "batch_size", "max_prompts", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if not 1 <= args.max_sequence_length <= 512:
        raise UserError("--max_sequence_length must be 1 to 512 (T5's limit in SD3)")
    return args


def load_prompts(args):
    """The prompts of exactly one source, in prompt_index order, duplicates dropped (first seen wins); --per_row:
    every usable row's caption, duplicates kept, so prompt_index is the training row (train_spin.py pairs by it)."""
    per_row, max_rows = getattr(args, "per_row", False), getattr(args, "max_train_samples", None)
    given = [f"--{k}" for k in ("prompt", "prompts_file", "dataset") if getattr(args, k, None)]
    if len(given) != 1:
        sources = "--dataset or --prompts_file" + (" or --prompt" if hasattr(args, "prompt") else "")
        raise UserError(f"give the prompts with exactly one of {sources} (got {' and '.join(given) or 'none'})")
    if per_row and not args.dataset:
        raise UserError("--per_row needs --dataset (one image per training row of that dataset)")
    if args.dataset:
        ds = open_dataset(args.dataset, args.split, args.streaming)
        if per_row:
            rows = itertools.islice(iter_examples(ds, args.caption_column, with_images=False), max_rows)
            found = [ex["caption"] for ex in itertools.islice(rows, args.max_prompts)]
        else:
            found = unique_prompts(ds, args.caption_column, args.max_prompts, max_rows)
    else:
        lines = getattr(args, "prompt", None)
        if args.prompts_file:
            try:
                lines = Path(args.prompts_file).expanduser().read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--prompts_file {args.prompts_file}: cannot read it ({type(e).__name__})") from None
        found = list(dict.fromkeys(line.strip() for line in lines if line.strip()))[: args.max_prompts]
    if not found:
        raise UserError(f"no prompts in {given[0]} {args.dataset or args.prompts_file or ''}".rstrip())
    return found


def pipeline_class_name(args):
    """The pipeline class the base's model_index.json names (read as from_pretrained reads it); others are refused."""
    from diffusers import DiffusionPipeline  # seconds to import: only once a model is named

    base = args.pretrained_model_name_or_path
    check_model_path(base)
    try:
        name = DiffusionPipeline.load_config(base, revision=args.revision).get("_class_name")
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the model_index.json of {base}: {str(e).splitlines()[0]}") from None
    if name not in PIPELINE_ARGS:
        raise UserError(f"{base} is a {name}: not supported; supported: {SUPPORTED} ({', '.join(PIPELINE_ARGS)})")
    if name != SD3 and args.no_t5:
        raise UserError(f"--no_t5: {base} is a {name}, which has no T5 encoder; drop --no_t5")
    if name == SD3 and args.scheduler:  # the SD samplers step a noise schedule; SD3's transformer predicts a flow
        raise UserError(f"--scheduler {args.scheduler}: {base} is SD3, sampled by flow matching; drop --scheduler")
    return name


def load_pipeline(args, unet, unet_where, device, pipe=None):
    """The base's pipeline around `unet` (the denoiser: SD3's is a transformer) in --mixed_precision, or `pipe` with
    `unet` swapped in (sample.py's next model); --resolution defaults to the model's own. SDXL's fp16 VAE with
    force_upcast stays float32, as diffusers' SDXL pipeline decodes (make_images decodes with it)."""
    import diffusers  # diffusers and transformers take seconds to import: only once a pipeline is loaded
    import transformers

    class_name = type(pipe).__name__ if pipe is not None else pipeline_class_name(args)
    role = "transformer" if class_name == SD3 else "unet"  # the pipeline's name for its denoiser
    got = "+".join(filter(None, (type(unet).__name__, unet.config.get("addition_embed_type"))))
    if got != (want := DENOISERS.get(class_name, "UNet2DConditionModel")):
        raise UserError(f"{unet_where}: its {got} does not fit the base's {class_name}, which runs a {want}")
    # diffusers' ModelMixin.to warns of fp32-only modules, which the denoisers have none of: torch's own cast
    unet = torch.nn.Module.to(unet, dtype=DTYPES[args.mixed_precision])
    if pipe is not None:
        setattr(pipe, role, unet.to(pipe.device))
        return pipe
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    base, variant = args.pretrained_model_name_or_path, args.variant
    load = dict(revision=args.revision, variant=variant, **PIPELINE_ARGS[class_name])
    load.update(dict(text_encoder_3=None, tokenizer_3=None) if args.no_t5 else {})  # T5's part of the prompt: zeros
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(base, dtype=unet.dtype, **{role: unet}, **load)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the pipeline {base!r}: {variant_hint(e, variant)}") from None
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            check_tokenizer(getattr(pipe, name), f"the pipeline {base!r}", name)
    if args.scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    if class_name == SDXL and pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    net = getattr(pipe, role)
    args.resolution = args.resolution or net.config.sample_size * pipe.vae_scale_factor
    factor = pipe.vae_scale_factor * net.config.get("patch_size", 1)  # SD3's transformer takes 2x2 latent patches
    if args.resolution % factor:
        raise UserError(f"--resolution must be a multiple of {factor}")
    return pipe.to(device)


def micro_conditioning(pipe, resolution):
    """SDXL's size/crop conditioning, passed explicitly and recorded: original = target size = the image's own, crop
    (0, 0), as train_spin.py conditions the opponent's images. {} for other pipelines."""
    if type(pipe).__name__ != SDXL:
        return {}
    return {"original_size": (resolution,) * 2, "crops_coords_top_left": (0, 0), "target_size": (resolution,) * 2}


def folder_config(stage, args, pipe, prompts, unet_arg, fingerprint, **model):
    """run_config.json of an image folder: its model, and the settings that decide its images (check_folder)."""
    base = Path(args.pretrained_model_name_or_path).expanduser()
    settings = {k: getattr(args, k) for k in IMAGE_SETTINGS}
    settings.update(
        pretrained_model_name_or_path=str(base.resolve()) if base.exists() else args.pretrained_model_name_or_path,
        unet_fingerprint=fingerprint,
        prompts_sha256="sha256:" + hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        num_prompts=len(prompts),
        scheduler=type(pipe.scheduler).__name__,
    )
    # recorded only where given (revision, variant) or taken (SDXL, SD3), so older folders keep theirs and resume
    settings.update({k: getattr(args, k) for k in ("revision", "variant") if getattr(args, k)})
    if type(pipe).__name__ == SD3:
        settings.update(max_sequence_length=args.max_sequence_length, **({"no_t5": True} if args.no_t5 else {}))
    if conditioning := micro_conditioning(pipe, args.resolution):
        settings["micro_conditioning"] = {k: list(v) for k, v in conditioning.items()}
    model.update(pretrained_model_name_or_path=args.pretrained_model_name_or_path, unet=unet_arg)
    model.update(unet_fingerprint=fingerprint, pipeline_class=type(pipe).__name__)
    model["vae_dtype"] = str(pipe.vae.dtype).removeprefix("torch.")
    return run_config(stage, args, model=model, settings=settings)


@torch.inference_mode()
def make_images(pipe, prompts, jobs, args, writer, desc=None):
    """Make the images `jobs` [(prompt_index, image_index)] name, in batches, each from its own seed's noise, and hand
    them to `writer`. Returns the counts: non-finite results are not written, all-black ones are listed."""
    from tqdm.auto import tqdm  # a dependency of diffusers

    side, conditioning = args.resolution // pipe.vae_scale_factor, micro_conditioning(pipe, args.resolution)
    call = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, output_type="latent")
    call.update(height=args.resolution, width=args.resolution, **conditioning)
    if sd3 := type(pipe).__name__ == SD3:  # a transformer, and T5 prompt tokens too
        call["max_sequence_length"] = args.max_sequence_length
    net = pipe.transformer if sd3 else pipe.unet
    shape, stats = (net.config.in_channels, side, side), {"written": 0, "nonfinite": [], "black": []}
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=desc, unit="batch", disable=desc is None):
        batch = jobs[start : start + args.batch_size]
        noise, generators = initial_noise([image_seed(args.seed, *job) for job in batch], shape)
        prompt, noise = [prompts[p] for p, _ in batch], noise.to(net.device, net.dtype)
        latents = pipe(prompt=prompt, latents=noise, generator=generators, **call).images
        images = decode_latents(pipe.vae, latents, bool(conditioning))  # here: one call gives latent and image
        finite = (torch.isfinite(latents).flatten(1).all(1) & torch.isfinite(images).flatten(1).all(1)).tolist()
        pixels, keys = to_pixels(images).numpy(), [image_key(*job) for job in batch]
        keep = [j for j in range(len(batch)) if finite[j]]
        stats["nonfinite"] += [keys[j] for j in range(len(batch)) if not finite[j]]
        stats["black"] += [keys[j] for j in keep if pixels[j].max() <= BLACK_MAX_PIXEL]
        stats["written"] += len(keep)
        writer.submit([keys[j] for j in keep], pixels[keep], latents[keep].float().cpu())
    return stats


class FolderWriter:
    """Writes images and latents in background threads (PNG encoding is slow), so the pipeline never waits on it."""

    def __init__(self, folder, with_latents, threads=4):
        self.folder, self.with_latents = Path(folder), with_latents
        self.pool, self.pending, self.max_pending = ThreadPoolExecutor(threads), [], 2 * threads

    def submit(self, keys, pixels, latents):
        """keys: image keys; pixels: uint8 [B, H, W, 3] numpy; latents: float32 [B, C, h, w] on the CPU."""
        while len(self.pending) >= self.max_pending:  # bounds memory, and raises a writer's error (disk full) here
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self.write, keys, pixels, latents))

    def write(self, keys, pixels, latents):
        for key, image, latent in zip(keys, pixels, latents):
            if self.with_latents:
                tensors = {"latent": latent.clone()}
                save_atomic(self.folder / "latents" / f"{key}.safetensors", lambda tmp: save_file(tensors, tmp))
            save_atomic(self.folder / "images" / f"{key}.png", lambda tmp: Image.fromarray(image).save(tmp, "PNG"))

    def close(self):
        """Waits for every file, raising a writer's error."""
        self.pool.shutdown()
        for write in self.pending:
            write.result()


def save_atomic(path, save):
    """save(tmp_path), then rename: a killed run leaves a .tmp file (removed by the next run), never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    save(tmp)
    os.replace(tmp, path)


def plan(num_prompts, images_per_prompt, rank=0, world_size=1, done=frozenset()):
    """This process's (prompt_index, image_index) not `done`: image n of the run is process n % world_size's, so the
    shares never overlap, whatever is done."""
    jobs = itertools.product(range(num_prompts), range(images_per_prompt))
    # accelerate's split_between_processes shares the same way in blocks, but needs the process state: this is pure
    return [job for job in itertools.islice(jobs, rank, None, world_size) if job not in done]


def metadata_rows(folder, prompts, args, with_latents):
    """metadata.jsonl's rows, in order: one per image whose files are all there (each is written whole or not)."""
    present, rows = {f"{f.parent.name}/{f.name}" for f in folder.glob("*/*")}, []  # a listing, not a stat per file
    for p, i in plan(len(prompts), args.num_images_per_prompt):
        files = {"file_name": f"images/{image_key(p, i)}.png"}
        if with_latents:
            files["latent_file"] = f"latents/{image_key(p, i)}.safetensors"
        if all(f in present for f in files.values()):
            seed = image_seed(args.seed, p, i)
            rows.append({**files, "prompt": prompts[p], "prompt_index": p, "image_index": i, "seed": seed})
    return rows


def check_folder(folder, config):
    """Refuse a folder that holds images made by another stage or model or with other settings: never mix them."""
    if not (folder / "run_config.json").is_file():
        if folder.exists() and (folder.is_file() or any(folder.iterdir())):
            raise UserError(f"--output_dir {folder} is not an empty folder and has no run_config.json: use a new one")
        return
    try:
        old = json.loads((folder / "run_config.json").read_text())
    except ValueError:
        raise UserError(f"{folder / 'run_config.json'} is unreadable: use a new --output_dir") from None
    was = {"stage": old.get("stage"), **old.get("settings", {})}  # another stage's folder differs in "stage"
    now = {"stage": config["stage"], **config["settings"]}
    diff = [f"{k}: {was.get(k)!r} there, {now.get(k)!r} now" for k in {**was, **now} if was.get(k) != now.get(k)]
    if diff:
        raise UserError(
            f"--output_dir {folder} holds images made with other settings ({'; '.join(diff)}); "
            "use a new --output_dir, or the original settings to resume"
        )


def fill_folder(folder, config, pipe, prompts, args, state, with_latents, desc):
    """Make the images `folder` lacks, each process its share; then the main process writes metadata.jsonl and gets
    the run's counts (stats.json's), the others None. Every process checks the folder: a refusal leaves none waiting."""
    from accelerate.utils import gather_object

    check_folder(folder, config)
    if state.is_main_process:
        for sub in ("images", "latents") if with_latents else ("images",):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        if not (folder / "run_config.json").is_file():  # written once: it says how the images were made
            write_json_atomic(folder / "run_config.json", config)
        for tmp in folder.glob("**/*.tmp"):  # a killed run's
            tmp.unlink()
    state.wait_for_everyone()
    done = {(r["prompt_index"], r["image_index"]) for r in metadata_rows(folder, prompts, args, with_latents)}
    jobs = plan(len(prompts), args.num_images_per_prompt, state.process_index, state.num_processes, done)
    writer, start = FolderWriter(folder, with_latents), time.time()
    try:
        stats = make_images(pipe, prompts, jobs, args, writer, desc if state.is_main_process else None)
    finally:
        writer.close()  # what finished is kept, even on Ctrl-C
    stats = gather_object([stats])  # every process's, once every file is written
    if not state.is_main_process:
        return None
    rows = metadata_rows(folder, prompts, args, with_latents)
    save_atomic(folder / "metadata.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return {
        "images_expected": len(prompts) * args.num_images_per_prompt,
        "images_present": len(rows),
        "written": sum(s["written"] for s in stats),
        "skipped_done": len(done),
        "seconds": round(time.time() - start, 2),
        "nonfinite_keys": sorted(key for s in stats for key in s["nonfinite"]),
        "black_keys": sorted(key for s in stats for key in s["black"]),
    }


def report(label, folder, run):
    """The run's one-line summary, and a warning for each kind of bad result."""
    written, seconds = run["written"], run["seconds"]
    print(
        f"{label}: wrote {written} image(s) in {seconds:.1f}s ({written / max(seconds, 1e-9):.2f} images/s), "
        f"{run['skipped_done']} already there; {run['images_present']}/{run['images_expected']} images in {folder}"
    )
    for name, what in (("nonfinite_keys", "NaN/inf result(s) not written"), ("black_keys", "all-black image(s)")):
        if run[name]:
            print(f"warning: {label}: {len(run[name])} {what}, e.g. {run[name][0]}", file=sys.stderr)


def main():
    args = parse_args()
    state = start_processes(args)
    pipeline_class_name(args)  # an unsupported model fails before any work
    prompts = on_main_process(state, lambda: load_prompts(args))
    unet = load_unet(args.unet, args.pretrained_model_name_or_path, args.revision, args.variant)
    fingerprint = unet_fingerprint(unet)  # of the float32 weights: train_spin.py checks it trains this opponent
    pipe = load_pipeline(args, unet, f"--unet {args.unet}", state.device)
    config = folder_config("generate", args, pipe, prompts, args.unet, fingerprint)
    out = Path(args.output_dir)
    run = fill_folder(out, config, pipe, prompts, args, state, with_latents=True, desc="generate")
    end_processes(state)
    if state.is_main_process:
        write_stats(out / "stats.json", run, state.num_processes)
        report("generate", out, run)


def write_stats(path, run, processes):
    """stats.json: the run's counts, and the all-black images of every run so far (a rerun makes only missing ones)."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    black = sorted(set(old.get("black_keys", [])) | set(run["black_keys"]))
    write_json_atomic(path, {**run, "black_keys": black, "processes": processes})


def start_processes(args):
    """This process's place among `accelerate launch` / torchrun processes (without CUDA in accelerate's CPU mode,
    gloo); a launch accelerate does not see is refused. --mixed_precision defaults to fp16 on CUDA, else no."""
    from accelerate import PartialState  # seconds to import: not for --help

    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=world > 1 and not torch.cuda.is_available())
    if state.num_processes != world:
        raise UserError(f"launched as {world} processes but accelerate sees {state.num_processes}")
    args.mixed_precision = args.mixed_precision or ("fp16" if state.device.type == "cuda" else "no")
    return state


def end_processes(state):
    """Leave the process group together: one left open can abort at interpreter exit (gloo) while others finish."""
    state.wait_for_everyone()
    if state.num_processes > 1:
        torch.distributed.destroy_process_group()


def on_main_process(state, read):
    """read() in the main process only (a streamed dataset is read once, not once per GPU); its result, or its
    one-line error, reaches every process."""
    from accelerate.utils import broadcast_object_list

    try:
        box = [read() if state.is_main_process else None]
    except UserError as e:
        box = [e]
    broadcast_object_list(box)  # nothing to do in a single process
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


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
        if "default" in text or action.default is None or action.default is False or action.required:
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


def load_unet(unet_path, base_path, revision=None, variant=None):
    """The denoiser in float32 (SD, SDXL: a UNet; SD3: a transformer), the class its config names: None/'base' (the
    base pipeline's, at its --revision and --variant), a folder holding unet/ or transformer/, a bare model folder, a
    hub id (laid out as the base: unet/ as UCLA-AGI/SPIN-Diffusion-iter*) or a train_spin.py checkpoint-N/."""
    from diffusers import AutoModel

    where, sub, pin = unet_path, None, {}
    if unet_path in (None, "", "base"):
        where, sub, pin = base_path, denoiser_folder(base_path, revision), {"revision": revision, "variant": variant}
    elif Path(unet_path, "train_state.json").is_file():  # accelerate's save_state + train_state.json
        return load_checkpoint_unet(Path(unet_path))
    elif found := [s for s in ("unet", "transformer") if Path(unet_path, s, "config.json").is_file()]:
        sub = found[0]
    elif not Path(unet_path, "config.json").is_file():  # else a bare model folder
        if Path(unet_path).exists() or unet_path.startswith((".", "/", "~")):
            raise UserError(
                f"--unet {unet_path}: no UNet there (expected {unet_path}/unet/config.json, or transformer/); "
                "pass a folder written by train_spin.py, one of its checkpoint-N folders, a hub id, or 'base'"
            )
        sub = denoiser_folder(base_path, revision)
    try:
        return AutoModel.from_pretrained(where, subfolder=sub, torch_dtype=torch.float32, **pin)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load the UNet from {where!r}{'/' + sub if sub else ''}: {variant_hint(e, pin.get('variant'))}"
            "; check the path or hub id (and HF_HUB_OFFLINE)"
        ) from None


def denoiser_folder(base, revision=None):
    """Where the base pipeline keeps its denoiser, as model_index.json says: unet/ (SD, SDXL), transformer/ (SD3)."""
    from diffusers import DiffusionPipeline

    try:
        return "transformer" if DiffusionPipeline.load_config(base, revision=revision).get("transformer") else "unet"
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the model_index.json of {base}: {str(e).splitlines()[0]}") from None


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
    """Refuse the empty tokenizer transformers builds where a pipeline folder lacks its files (it fails in its call)."""
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
            kind, data_files = kinds[files[0].suffix], {split: [str(f) for f in files]}
            return datasets.load_dataset(kind, data_files=data_files, split=split, streaming=streaming)
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
    """The .tar or .parquet files of a local folder that name `split`: in a folder of that name, or <split>.tar,
    <split>_00000.tar... (`datasets` reads test_unique_00000.tar as 'test'); [] where none, both kinds or a card."""
    readme = folder / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="replace").split("\n---", 1)[0], re.M):
        return []  # the folder's dataset card (a downloaded hub copy) names each split's files: `datasets` reads it
    named = re.compile(rf"{re.escape(split)}(?:[-_.][0-9][^/]*)?\.(?:tar|parquet)")
    files = sorted(f for f in folder.rglob("*") if f.suffix in (".tar", ".parquet") and f.is_file())
    files = [f for f in files if split in f.relative_to(folder).parts[:-1] or named.fullmatch(f.name)]
    return files if len({f.suffix for f in files}) == 1 else []


# Pick-a-Pic's caption column in its copies: the original parquet's, or a webdataset sample's file
PICKAPIC_CAPTIONS = ("caption", "caption.txt", "original_prompt.txt")


def pickapic_columns(column_names, caption_column="caption"):
    """{field: column} for caption, jpg_0, jpg_1, label_0, label_1 when the dataset is Pick-a-Pic, in its parquet
    layout or as webdataset tars (jpg_0.jpg, label_0.txt...), else None. A --caption_column of its own is kept."""
    names = list(column_names)

    def column(field):  # the original name, else the name with one extension
        with_extension = (c for c in names if c.split(".")[0] == field and c.count(".") == 1)
        return field if field in names else next(with_extension, None)

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
    else:  # SD3's also shifted back
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0)
    return vae.decode(latents, return_dict=False)[0]


def to_pixels(images):
    """Decoded images in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3] on the CPU, as generate.py writes them."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


quiet_known_noise()  # before the libraries that log the known noise are imported (they are imported lazily)


if __name__ == "__main__":
    cli(main)
