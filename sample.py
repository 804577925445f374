"""sample.py: every model draws images for the same prompts with the same seeds, for paired comparison.

    python sample.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --unet base --unet runs/x/iter_1 --unet iter3=UCLA-AGI/SPIN-Diffusion-iter3 \
        --dataset yuvalkirstain/pickapic_v2 --split test_unique --output_dir runs/x/samples

Output: <output_dir>/<model>/ (run_config.json, metadata.jsonl, images/) per model, in generate.py's folder
schema (without latents), and <output_dir>/grid.png: rows prompts, columns models (first image of each).
Image (prompt_index, image_index) gets the seed image_seed(seed, prompt_index, image_index) in every model.
Rerun the same command to resume; add a --unet to sample one more model into the same comparison.

sample.py builds on generate.py, its sibling: it is generate.py's machinery (prompts, seeds, the pipeline of every
supported model family - SD-1.x, SD-2.x, SDXL -, resumable image folders) applied to several UNets, plus a grid:
each model's folder is filled by generate.py's fill_folder, as generate.py fills its own. It imports that machinery,
so keep generate.py beside it.
"""

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

try:
    from generate import (  # noqa: F401 (re-exported, as sample.X: image_seed, make_images, FolderWriter)
        SCHEDULERS,
        FolderWriter,
        HelpFormatter,
        UserError,
        add_base_weights_flags,
        cast_unet,
        check_model_path,
        check_unet_fits,
        cli,
        end_processes,
        fill_folder,
        folder_settings,
        image_key,
        image_seed,
        load_pipeline,
        load_prompts,
        load_unet,
        make_images,
        merge_metadata,
        model_record,
        on_main_process,
        pipeline_class_name,
        resolve_precision,
        run_config,
        save_atomic,
        start_processes,
        unet_fingerprint,
    )
except ModuleNotFoundError as e:
    if e.name != "generate":
        raise
    print(
        "error: sample.py needs generate.py beside it (it imports generate.py's machinery): copy both files",
        file=sys.stderr,
    )
    sys.exit(2)

GRID_CELL_MAX = 256  # grid cells are the images downscaled to at most this many pixels a side
GRID_LABEL_WIDTH = 200  # left column with the prompts
GRID_HEADER_HEIGHT = 24  # top row with the model names


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
        action="append",
        help="a model to sample (repeat): 'base', a train_spin.py folder, a "
        "bare UNet folder or a hub id, optionally named: iter3=UCLA-AGI/SPIN-Diffusion-iter3 "
        "(default: base)",
    )
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
    p.add_argument(
        "--resolution",
        type=int,
        help="image side in pixels (default: the model's own: 512 for SD-1.5, 768 for SD-2.1, 1024 for SDXL)",
    )
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


class Model(NamedTuple):
    """One --unet to sample: its folder's name under --output_dir, and where its UNet is (see load_unet)."""

    name: str
    where: str


def parse_models(specs):
    """--unet values -> [Model(name, where)]. A name is given as name=where or derived: base, the folder's name
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
        models.append(Model(name, where or "base"))
    names = [m.name for m in models]
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
    font = ImageFont.load_default()
    grid = Image.new(
        "RGB", (GRID_LABEL_WIDTH + cell * len(model_names), GRID_HEADER_HEIGHT + cell * len(prompts)), "white"
    )
    draw = ImageDraw.Draw(grid)
    safe = lambda s: s.encode("latin-1", "replace").decode("latin-1")  # the bitmap default font is latin-1 only
    line_h = max(10, font.getbbox("Ag")[3] + 2)
    for c, name in enumerate(model_names):
        draw.text(
            (GRID_LABEL_WIDTH + c * cell + 2, 4), fit_text(draw, safe(name), font, cell - 4), fill="black", font=font
        )
    for r, prompt in enumerate(prompts):
        y = GRID_HEADER_HEIGHT + r * cell
        lines = wrap_text(draw, safe(prompt), font, GRID_LABEL_WIDTH - 8, max(1, (cell - 4) // line_h))
        for i, line in enumerate(lines):
            draw.text((4, y + 2 + i * line_h), line, fill="black", font=font)
        for c in range(len(model_names)):
            img = cells[r][c]
            img = img.convert("RGB").resize((cell, cell)) if img is not None else Image.new("RGB", (cell, cell), "grey")
            grid.paste(img, (GRID_LABEL_WIDTH + c * cell, y))
    return grid


def grid_from_folders(out, model_names, prompts, n_rows, resolution):
    """grid.png from what is on disk: the first image (image_index 0) of the first n_rows prompts per model."""
    cells = []
    for p in range(min(n_rows, len(prompts))):
        row = []
        for name in model_names:
            f = Path(out, name, "images", image_key(p, 0) + ".png")
            row.append(Image.open(f) if f.is_file() else None)
        cells.append(row)
    return make_grid(cells, model_names, prompts[: len(cells)], min(resolution, GRID_CELL_MAX))


def sample_model(model, pipe, prompts, args, state, class_name, dtype, out):
    """Fill <output_dir>/<model.name>/ with one model's images (generate.py's fill_folder) and say what happened.
    The first model loads the pipeline (text encoder, VAE and tokenizer, shared by every model); each later one
    swaps in its own UNet. Returns the pipeline."""
    # Fingerprint on the float32 weights before any cast: names the weights each folder was sampled from.
    unet = load_unet(model.where, args.pretrained_model_name_or_path, args.revision, args.variant)
    fingerprint = unet_fingerprint(unet)
    if pipe is None:
        pipe = load_pipeline(
            args.pretrained_model_name_or_path,
            unet,
            args.scheduler,
            dtype,
            state.device,
            class_name,
            f"--unet {model.where}",
            args.revision,
            args.variant,
        )
        args.resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        if args.resolution % pipe.vae_scale_factor:
            raise UserError(f"--resolution must be a multiple of {pipe.vae_scale_factor}")
    else:
        check_unet_fits(unet, class_name, f"--unet {model.where}")
        pipe.unet = cast_unet(unet, dtype, state.device)
    folder = out / model.name
    record = {
        "name": model.name,
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "unet": model.where,
        "unet_fingerprint": fingerprint,
        **model_record(pipe),
    }
    config = run_config("sample", args, model=record, settings=folder_settings(args, pipe, prompts, fingerprint))
    run = fill_folder(folder, config, pipe, prompts, args, state, with_latents=False, desc=model.name)
    state.wait_for_everyone()
    if state.is_main_process:
        rows = merge_metadata(folder)
        written = run.stats["written"]
        print(
            f"sample: {model.name}: wrote {written} image(s) in {run.seconds:.1f}s "
            f"({written / max(run.seconds, 1e-9):.2f} images/s), {run.skipped_done} already there; "
            f"{len(rows)}/{len(prompts) * args.num_images_per_prompt} images in {folder}"
        )
    for kind, keys in (("non-finite (not written)", run.stats["nonfinite"]), ("all-black", run.stats["black"])):
        if keys:
            print(f"warning: {model.name}: {len(keys)} {kind} image(s), e.g. {keys[0]}", file=sys.stderr)
    return pipe


def main():
    args = parse_args()
    from accelerate import PartialState  # accelerate takes seconds to import: not for --help

    state = start_processes(PartialState)
    check_model_path(args.pretrained_model_name_or_path)
    models = parse_models(args.unet)
    # an unsupported model fails before any work
    class_name = pipeline_class_name(args.pretrained_model_name_or_path, args.revision)
    prompts = on_main_process(
        state,
        lambda: load_prompts(
            args.prompt,
            args.prompts_file,
            args.dataset,
            args.split,
            args.caption_column,
            args.max_prompts,
            streaming=args.streaming,
        ),
    )
    args.mixed_precision, dtype = resolve_precision(args.mixed_precision, state.device)
    out = Path(args.output_dir)

    pipe = None
    for model in models:
        pipe = sample_model(model, pipe, prompts, args, state, class_name, dtype, out)

    end_processes(state)
    if state.is_main_process and args.grid_prompts > 0:
        grid = grid_from_folders(out, [m.name for m in models], prompts, args.grid_prompts, args.resolution)
        save_atomic(out / "grid.png", lambda p: grid.save(p, format="PNG"))
        print(
            f"sample: grid of {min(args.grid_prompts, len(prompts))} prompts x {len(models)} models "
            f"-> {out / 'grid.png'}"
        )


if __name__ == "__main__":
    cli(main)
