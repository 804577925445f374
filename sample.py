"""sample.py: every model draws images for the same prompts with the same seeds, for paired comparison.

    python sample.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --unet base --unet runs/x/iter_1 --unet iter3=UCLA-AGI/SPIN-Diffusion-iter3 \
        --dataset yuvalkirstain/pickapic_v2 --split test_unique --output_dir runs/x/samples

Output: <output_dir>/<model>/ (run_config.json, metadata.jsonl, images/) per model, in generate.py's folder
schema (without latents), and <output_dir>/grid.png: rows prompts, columns models (first image of each).
Image (prompt_index, image_index) gets the seed image_seed(seed, prompt_index, image_index) in every model.
Rerun the same command to resume; add a --unet to sample one more model into the same comparison.
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

# ---- shared helpers: the same text in every script (tests/test_shared.py checks) ----
class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code 2."""


def cli(main):
    """Run main() and turn known failures into a one-line message and a non-zero exit code."""
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
        if e.errno == errno.ENOSPC:
            print(f"error: disk full ({e.filename or 'while writing'}): free space and rerun the same command; "
                  "finished work is kept", file=sys.stderr)
            sys.exit(28)
        raise


def write_json_atomic(path, obj):
    """Write JSON so that a reader never sees half a file (write to a temp name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_jsonl(path):
    """Read a jsonl file; a truncated last line (a run killed mid-write) is ignored."""
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
    return {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
            "args": dict(vars(args)), "versions": versions, **extra}


def check_model_path(path, what="--pretrained_model_name_or_path"):
    """A path-looking model argument that does not exist is a typo, not a hub id."""
    if (path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]) and not Path(path).exists():
        raise UserError(f"{what} {path}: folder not found; pass a local pipeline folder or a hub id")


def decode_image(value):
    """bytes / {"bytes", "path"} / PIL -> RGB PIL image, or None when it cannot be decoded."""
    import io

    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        img = Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value)
        img.load()
        return img.convert("RGB")
    except Exception:
        return None

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds "(default: X)" only where the help text does not state the default already and there is one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action)


def quiet_known_noise():
    """Drop, at their source, import-time messages known to be harmless here, so that a user's first screen is our
    own output; every other warning still shows. bitsandbytes' CPU build logs that an optional 4-bit kernel package
    is missing (we use only its 8-bit AdamW); transformers logs that torchvision is missing and it uses the PIL image
    processors instead (what we want: torchvision is not a dependency)."""
    import logging

    for logger, text in (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
                         ("transformers.utils.import_utils", "requires torchvision (not installed)")):
        logging.getLogger(logger).addFilter(lambda record, text=text: text not in record.getMessage())
# ---- end shared helpers ----


quiet_known_noise()


# ---- shared model and data helpers: the same text in train_spin.py, generate.py, sample.py ----
def unet_fingerprint(unet):
    """sha256 of every UNet tensor (names and float32 values): identifies the weights, not the path."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def load_unet(unet_path, base_path):
    """Load a UNet in float32 from `unet_path`: None/'base' (the base pipeline's UNet), a folder holding
    unet/, a bare UNet folder, or a hub id (subfolder unet/, as UCLA-AGI/SPIN-Diffusion-iter*)."""
    from diffusers import UNet2DConditionModel

    if unet_path in (None, "", "base"):
        where, sub = base_path, "unet"
    elif Path(unet_path, "unet", "config.json").is_file():
        where, sub = unet_path, "unet"
    elif Path(unet_path, "config.json").is_file():
        where, sub = unet_path, None
    elif Path(unet_path).exists() or unet_path.startswith((".", "/", "~")):
        raise UserError(f"--unet {unet_path}: no UNet there (expected {unet_path}/unet/config.json); "
                        "pass a folder written by train_spin.py, a hub id, or 'base'")
    else:
        where, sub = unet_path, "unet"
    try:
        return UNet2DConditionModel.from_pretrained(where, subfolder=sub, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the UNet from {where!r}{'/' + sub if sub else ''}: "
                        f"{str(e).splitlines()[0]}; check the path or hub id (and HF_HUB_OFFLINE)") from None


def open_dataset(name, split, streaming=False):
    """Load `name` (hub id, local folder in any `datasets` format, or one parquet/json/jsonl/csv file)."""
    import datasets

    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or p.exists()
    if looks_local and not p.exists():
        raise UserError(f"--dataset {name}: no such file or folder; pass a local dataset path or a hub id")
    try:
        if p.is_file():
            kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(p.suffix)
            if kind is None:
                raise UserError(f"--dataset {name}: unknown file type {p.suffix!r}; use parquet, json(l) or csv")
            return datasets.load_dataset(kind, data_files={split: str(p)}, split=split, streaming=streaming)
        return datasets.load_dataset(str(p) if looks_local else name, split=split, streaming=streaming)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, ConnectionError...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load --dataset {name} split {split!r}: {msg}") from None


def is_pickapic(column_names):
    return {"jpg_0", "jpg_1", "label_0", "label_1"} <= set(column_names)


def iter_examples(ds, caption_column="caption", image_column=None, with_images=True, with_loser=False, stats=None):
    """Yield {"caption", "image", "image_lose"} from a dataset. Pick-a-Pic rows (jpg_0/jpg_1/label_0/label_1)
    give the image labelled 1 as "image" and the other as "image_lose"; ties are dropped and counted in
    stats["ties_dropped"] (stats["rows_read"] counts every row read, ties included; usable rows are what is
    yielded). Images are returned undecoded (bytes, path dict or PIL): see decode_image()."""
    import datasets

    stats = {} if stats is None else stats
    stats.setdefault("rows_read", 0)
    stats.setdefault("ties_dropped", 0)
    names = list(ds.column_names or ds.features or [])
    pickapic = is_pickapic(names) and image_column is None
    if image_column is None and not pickapic:
        image_column = next((c for c in ("image", "jpg", "png", "img") if c in names), "image")
    need = [caption_column] + (["label_0", "label_1"] if pickapic else [])
    if with_images:
        need += ["jpg_0", "jpg_1"] if pickapic else [image_column]
    missing = [c for c in need if c not in names]
    if missing:
        raise UserError(f"dataset has no column(s) {missing} (it has {names}); "
                        "set --caption_column / --image_column to the right names")
    ds = ds.select_columns(need)
    if with_images and not pickapic and isinstance((ds.features or {}).get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decode ourselves: corrupt files are skipped
    for row in ds:
        stats["rows_read"] += 1
        ex = {"caption": row[caption_column]}
        if pickapic:
            l0, l1 = float(row["label_0"]), float(row["label_1"])
            if l0 == l1:
                stats["ties_dropped"] += 1
                continue
            win = 0 if l0 > l1 else 1
            if with_images:
                ex["image"] = row[f"jpg_{win}"]
                if with_loser:
                    ex["image_lose"] = row[f"jpg_{1 - win}"]
        elif with_images:
            ex["image"] = row[image_column]
        if with_loser and "image_lose" not in ex:
            raise UserError("--loss dpo needs winner/loser pairs: a Pick-a-Pic-format dataset "
                            "(jpg_0, jpg_1, label_0, label_1)")
        yield ex


def unique_prompts(ds, caption_column="caption", max_prompts=None, stats=None, max_rows=None):
    """Unique captions in first-seen order (ties in Pick-a-Pic are dropped, as in training); `max_rows` reads
    only the first usable rows, as train_spin.py --max_train_samples does, so both see the same prompts."""
    import itertools

    seen = {}
    for ex in itertools.islice(iter_examples(ds, caption_column, with_images=False, stats=stats), max_rows):
        if ex["caption"] not in seen:
            seen[ex["caption"]] = len(seen)
            if max_prompts and len(seen) >= max_prompts:
                break
    return list(seen)


def image_key(prompt_index, image_index):
    """File stem of one image: the same in every folder of images (generate.py, sample.py)."""
    return f"p{prompt_index:07d}_i{image_index:03d}"


def image_seed(seed, prompt_index, image_index):
    """Seed of one image, from (run seed, prompt index, image index) only: independent of batch size,
    process count and resume point, and the same for every model so comparisons are paired."""
    import hashlib

    digest = hashlib.sha256(f"{seed}/{prompt_index}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
# ---- end shared model and data helpers ----


# ---- shared image-folder helpers: the same text in generate.py and sample.py ----
# --scheduler names -> diffusers classes (None keeps the pipeline's own scheduler).
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler",
              "unipc": "UniPCMultistepScheduler"}
# Flags that change the pixels. A folder made with other values is refused, never mixed. Not here: --batch_size
# (only the order of float sums changes) and --max_prompts/--dataset (the prompt list itself is compared).
IMAGE_SETTINGS = ("num_images_per_prompt", "num_inference_steps", "guidance_scale", "resolution", "scheduler", "seed",
                  "mixed_precision")
BLACK_MAX_PIXEL = 2  # an image whose brightest value is <= this (0..255) counts as all-black
WRITER_THREADS = 4   # PNG encoding + disk writes run here, so the accelerator never waits for the disk


def load_prompts(prompts=None, prompts_file=None, dataset=None, split="train", caption_column="caption",
                 max_prompts=None, max_train_samples=None, streaming=False):
    """The prompt list from exactly one source, duplicates dropped (first seen wins). Its order defines
    prompt_index, so the same source always gives the same indices."""
    given = [name for name, v in (("--prompt", prompts), ("--prompts_file", prompts_file), ("--dataset", dataset)) if v]
    if len(given) != 1:
        raise UserError(f"give the prompts with exactly one of --dataset, --prompts_file"
                        f"{' or --prompt' if prompts is not None else ''} (got {' and '.join(given) or 'none'})")
    if dataset:
        # Pick-a-Pic ties are dropped here exactly as in training, so every prompt has a training row.
        out = unique_prompts(open_dataset(dataset, split, streaming), caption_column, max_prompts, max_rows=max_train_samples)
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


def prompts_digest(prompts):
    import hashlib

    return "sha256:" + hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def shard(num_prompts, rank, world_size):
    """Prompt i belongs to process i % world_size: balanced, and independent of what is already done."""
    return range(rank, num_prompts, world_size)


def plan(prompt_indices, num_images_per_prompt, done):
    """(prompt_index, image_index) still to make, in order."""
    return [(p, i) for p in prompt_indices for i in range(num_images_per_prompt) if (p, i) not in done]


def initial_noise(seeds, shape):
    """Starting noise of each image from its own CPU generator: the same on every device, batch size and process.
    The generators are returned too, already advanced, for schedulers that draw noise at every step."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def metadata_row(prompt, prompt_index, image_index, seed, with_latent):
    key = image_key(prompt_index, image_index)
    row = {"file_name": f"images/{key}.png"}
    if with_latent:
        row["latent_file"] = f"latents/{key}.safetensors"
    row.update(prompt=prompt, prompt_index=prompt_index, image_index=image_index, seed=seed)
    return row


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
        raise UserError(f"--output_dir {folder} holds a {old.get('stage')!r} run, not {config['stage']!r}: use a new folder")
    was, now = old.get("settings", {}), config["settings"]
    diff = [f"{k}: {was.get(k)!r} there, {now[k]!r} now" for k in now if was.get(k) != now[k]]
    if diff:
        raise UserError(f"--output_dir {folder} holds images made with other settings ({'; '.join(diff)}); "
                        "use a new --output_dir, or the original settings to resume")


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
        import threading
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

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
        from PIL import Image

        for j, row in enumerate(rows):
            save_atomic(self.folder / row["file_name"], lambda p: Image.fromarray(images[j]).save(p, format="PNG"))
            if latents is not None:
                from safetensors.torch import save_file

                save_atomic(self.folder / row["latent_file"],
                            lambda p: save_file({"latent": latents[j].clone().contiguous()}, str(p)))
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


def cast_unet(unet, dtype, device=None):
    """Cast the UNet (after its fingerprint was taken): from_pretrained(dtype=) leaves a passed-in UNet as it is.
    ModelMixin.to warns about fp32-only modules even when a model has none (UNet2DConditionModel): then the
    plain torch cast does the same thing quietly."""
    if getattr(unet, "_keep_in_fp32_modules", None):
        return unet.to(device=device, dtype=dtype)
    return torch.nn.Module.to(unet, device=device, dtype=dtype)


def load_pipeline(pretrained, unet, scheduler, dtype, device):
    """The Stable Diffusion pipeline around `unet`, safety checker off (its black images would poison the
    synthetic data and bias comparisons), inner progress bar off, SDPA attention (diffusers' default)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            pretrained, unet=cast_unet(unet, dtype), safety_checker=None, requires_safety_checker=False, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the pipeline {pretrained!r}: {str(e).splitlines()[0]}") from None
    if scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def resolve_precision(name, device):
    """--mixed_precision: default fp16 on CUDA (the usual SD-1.5 inference precision), float32 elsewhere."""
    name = name or ("fp16" if torch.device(device).type == "cuda" else "no")
    return name, {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def folder_settings(args, pipe, prompts, fingerprint):
    """Everything that determines the images of a folder (compared by check_folder on every rerun)."""
    pretrained = args.pretrained_model_name_or_path
    if Path(pretrained).expanduser().exists():
        pretrained = str(Path(pretrained).expanduser().resolve())
    settings = {"pretrained_model_name_or_path": pretrained, "unet_fingerprint": fingerprint,
                "prompts_sha256": prompts_digest(prompts), "num_prompts": len(prompts)}
    settings.update({k: getattr(args, k) for k in IMAGE_SETTINGS})
    settings["scheduler"] = type(pipe.scheduler).__name__
    return settings


@torch.inference_mode()
def make_images(pipe, prompts, jobs, args, writer, with_latents, progress=None):
    """Run the pipeline over `jobs` [(prompt_index, image_index)] in batches and hand results to `writer`.
    Returns counts; non-finite results are not written, all-black ones are written and listed."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    shape = (pipe.unet.config.in_channels, args.resolution // pipe.vae_scale_factor,
             args.resolution // pipe.vae_scale_factor)
    stats = {"written": 0, "nonfinite": [], "black": []}
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        seeds = [image_seed(args.seed, p, i) for p, i in batch]
        noise, gens = initial_noise(seeds, shape)
        latents = pipe(prompt=[prompts[p] for p, _ in batch], latents=noise.to(device, dtype), generator=gens,
                       num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       height=args.resolution, width=args.resolution, output_type="latent").images
        # Decode ourselves: one pipeline call gives both the final latent and the image.
        x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        finite = (torch.isfinite(latents).flatten(1).all(1) & torch.isfinite(x).flatten(1).all(1)).tolist()
        pixels = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
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
# ---- end shared image-folder helpers ----

GRID_CELL_MAX = 256      # grid cells are the images downscaled to at most this many pixels a side
GRID_LABEL_WIDTH = 200   # left column with the prompts
GRID_HEADER_HEIGHT = 24  # top row with the model names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="base pipeline (hub id or local folder): text encoder, VAE, tokenizer, scheduler")
    p.add_argument("--unet", action="append", help="a model to sample (repeat): 'base', a train_spin.py folder, a "
                   "bare UNet folder or a hub id, optionally named: iter3=UCLA-AGI/SPIN-Diffusion-iter3 (default: base)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat)")
    p.add_argument("--prompts_file", help="prompts, one per line")
    p.add_argument("--dataset", help="prompts: unique captions of a dataset (Pick-a-Pic test_unique is the paper's)")
    p.add_argument("--split", default="test_unique")
    p.add_argument("--caption_column", default="caption")
    p.add_argument("--max_prompts", type=int, help="use only the first N unique prompts")
    p.add_argument("--streaming", action="store_true", help="stream --dataset instead of downloading it whole")
    p.add_argument("--num_images_per_prompt", type=int, default=5)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's own, 512 for SD-1.5)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the pipeline's own)")
    p.add_argument("--batch_size", type=int, default=8, help="images per pipeline call (per process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: fp16 on CUDA, no on CPU")
    p.add_argument("--grid_prompts", type=int, default=8, help="rows of grid.png (0: no grid)")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    for name in ("num_images_per_prompt", "num_inference_steps", "batch_size", "max_prompts", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    args.unet = args.unet or ["base"]
    return args


def parse_models(specs):
    """--unet values -> [(name, where)]. A name is given as name=where or derived: base, the folder's name
    (runs/x/iter_1 and runs/x/iter_1/unet -> iter_1), or the hub id's name (SPIN-Diffusion-iter3)."""
    models = []
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep or "/" in name:
            where = spec
            path = Path(spec.rstrip("/"))
            name = "base" if spec in ("", "base") else (path.parent.name if path.name == "unet" else path.name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name or ""):
            raise UserError(f"--unet {spec}: {name!r} is not usable as a folder name; name it: --unet NAME={where}")
        models.append((name, where or "base"))
    names = [n for n, _ in models]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UserError(f"two --unet models are both called {dups[0]!r}; name them: --unet NAME=PATH")
    return models


def fit_text(draw, text, font, width):
    """The longest prefix of text (with '...') that fits in width pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def wrap_text(draw, text, font, width, max_lines):
    """Greedy word wrap into at most max_lines lines; the last one is truncated with '...'."""
    lines, words = [], text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words:
        lines[-1] = fit_text(draw, lines[-1] + " " + " ".join(words), font, width)
    return [fit_text(draw, line, font, width) for line in lines]


def make_grid(cells, model_names, prompts, cell):
    """cells[r][c]: PIL image (or None: grey) of prompt r by model c -> one labelled PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    grid = Image.new("RGB", (GRID_LABEL_WIDTH + cell * len(model_names), GRID_HEADER_HEIGHT + cell * len(prompts)),
                     "white")
    draw = ImageDraw.Draw(grid)
    safe = lambda s: s.encode("latin-1", "replace").decode("latin-1")  # the bitmap default font is latin-1 only
    line_h = max(10, font.getbbox("Ag")[3] + 2)
    for c, name in enumerate(model_names):
        draw.text((GRID_LABEL_WIDTH + c * cell + 2, 4), fit_text(draw, safe(name), font, cell - 4), fill="black", font=font)
    for r, prompt in enumerate(prompts):
        y = GRID_HEADER_HEIGHT + r * cell
        for i, line in enumerate(wrap_text(draw, safe(prompt), font, GRID_LABEL_WIDTH - 8, max(1, (cell - 4) // line_h))):
            draw.text((4, y + 2 + i * line_h), line, fill="black", font=font)
        for c in range(len(model_names)):
            img = cells[r][c]
            img = img.convert("RGB").resize((cell, cell)) if img is not None else Image.new("RGB", (cell, cell), "grey")
            grid.paste(img, (GRID_LABEL_WIDTH + c * cell, y))
    return grid


def grid_from_folders(out, model_names, prompts, n_rows, resolution):
    """grid.png from what is on disk: the first image (image_index 0) of the first n_rows prompts per model."""
    from PIL import Image

    cells = []
    for p in range(min(n_rows, len(prompts))):
        row = []
        for name in model_names:
            f = Path(out, name, "images", image_key(p, 0) + ".png")
            row.append(Image.open(f) if f.is_file() else None)
        cells.append(row)
    return make_grid(cells, model_names, prompts[:len(cells)], min(resolution, GRID_CELL_MAX))


def main():
    args = parse_args()
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = start_processes(PartialState)
    check_model_path(args.pretrained_model_name_or_path)
    models = parse_models(args.unet)
    prompts = load_prompts(args.prompt, args.prompts_file, args.dataset, args.split, args.caption_column,
                           args.max_prompts, streaming=args.streaming)
    args.mixed_precision, dtype = resolve_precision(args.mixed_precision, state.device)
    out = Path(args.output_dir)

    pipe = None
    for name, where in models:
        # Fingerprint on the float32 weights before any cast: names the weights each folder was sampled from.
        unet = load_unet(where, args.pretrained_model_name_or_path)
        fingerprint = unet_fingerprint(unet)
        if pipe is None:  # text encoder, VAE and tokenizer are loaded once and shared by every model
            pipe = load_pipeline(args.pretrained_model_name_or_path, unet, args.scheduler, dtype, state.device)
            args.resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
            if args.resolution % pipe.vae_scale_factor:
                raise UserError(f"--resolution must be a multiple of {pipe.vae_scale_factor}")
        else:
            pipe.unet = cast_unet(unet, dtype, state.device)
        folder = out / name
        model = {"name": name, "pretrained_model_name_or_path": args.pretrained_model_name_or_path, "unet": where,
                 "unet_fingerprint": fingerprint}
        config = run_config("sample", args, model=model, settings=folder_settings(args, pipe, prompts, fingerprint))
        check_folder(folder, config)
        if state.is_main_process:
            prepare_folder(folder, config, with_latents=False)
        state.wait_for_everyone()

        done = {(r["prompt_index"], r["image_index"]) for r in read_jsonl(folder / "metadata.jsonl")}
        jobs = plan(shard(len(prompts), state.process_index, state.num_processes), args.num_images_per_prompt, done)
        writer = FolderWriter(folder, state.process_index)
        progress = tqdm(total=len(jobs), unit="img", desc=name, disable=not state.is_main_process)
        t0 = time.time()
        try:
            stats = make_images(pipe, prompts, jobs, args, writer, with_latents=False, progress=progress)
        finally:
            writer.close()
            progress.close()
        seconds = time.time() - t0
        state.wait_for_everyone()
        if state.is_main_process:
            rows = merge_metadata(folder)
            print(f"sample: {name}: wrote {stats['written']} image(s) in {seconds:.1f}s "
                  f"({stats['written'] / max(seconds, 1e-9):.2f} images/s), {len(done)} already there; "
                  f"{len(rows)}/{len(prompts) * args.num_images_per_prompt} images in {folder}")
        for kind, keys in (("non-finite (not written)", stats["nonfinite"]), ("all-black", stats["black"])):
            if keys:
                print(f"warning: {name}: {len(keys)} {kind} image(s), e.g. {keys[0]}", file=sys.stderr)
        del unet

    if state.is_main_process and args.grid_prompts > 0:
        grid = grid_from_folders(out, [n for n, _ in models], prompts, args.grid_prompts, args.resolution)
        save_atomic(out / "grid.png", lambda p: grid.save(p, format="PNG"))
        print(f"sample: grid of {min(args.grid_prompts, len(prompts))} prompts x {len(models)} models -> {out / 'grid.png'}")


if __name__ == "__main__":
    cli(main)
