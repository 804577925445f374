"""sample.py: every model draws images for the same prompts with the same seeds, for paired comparison.

    python sample.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --unet base --unet runs/x/iter_1 --unet iter3=UCLA-AGI/SPIN-Diffusion-iter3 \
        --dataset sayakpaul/pickapic_v2_webdataset --split test_unique --output_dir runs/x/samples

Output: <output_dir>/<model>/ per model, in generate.py's folder schema without latents, and <output_dir>/grid.png
(rows prompts, columns models). Base pipeline: SD-1.x, SD-2.x, SDXL or SD3/SD3.5 (a --unet is then a transformer).
It runs generate.py's machinery (prompts, seeds, pipelines, resumable folders) for each model, so keep generate.py
beside it. docs/generate_and_sample.md has the details.
"""

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

try:
    from generate import (  # noqa: F401 (re-exported, as sample.X: image_seed, make_images, FolderWriter)
        FolderWriter,
        HelpFormatter,
        UserError,
        cli,
        end_processes,
        fill_folder,
        folder_config,
        image_key,
        image_seed,
        load_pipeline,
        load_prompts,
        load_unet,
        make_images,
        on_main_process,
        parse_image_args,
        pipeline_class_name,
        report,
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
        "--unet", action="append", help="a model (repeat): [NAME=]base, train_spin.py folder, denoiser folder or hub id"
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeat)")
    p.add_argument("--grid_prompts", type=int, default=8, help="rows of grid.png (0: no grid)")
    args = parse_image_args(p, argv, split="test_unique", images_per_prompt=5)
    args.unet = args.unet or ["base"]
    return args


class Model(NamedTuple):
    """One --unet to sample: its folder's name under --output_dir, and where its UNet or transformer is (load_unet)."""

    name: str
    where: str


def parse_models(specs):
    """--unet values -> [Model(name, where)]. A name is given as name=where or derived: base, the folder's name
    (runs/x/iter_1, runs/x/iter_1/unet and .../transformer -> iter_1), or the hub id's name (SPIN-Diffusion-iter3)."""
    models = []
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep or "/" in name:
            where = spec
            path = Path(spec.rstrip("/"))
            path = path.parent if path.name in ("unet", "transformer") else path  # the folder holding the model
            name = "base" if spec in ("", "base") else path.name
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
    # textwrap counts characters; the default font's letters differ in width, so pixels are measured here
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


def sample_model(model, pipe, prompts, args, state, out):
    """Fill <output_dir>/<model.name>/ with one model's images (generate.py's fill_folder). The first model loads the
    pipeline (text encoders, VAE and tokenizers, shared by every model); each later one swaps in its own denoiser."""
    unet = load_unet(model.where, args.pretrained_model_name_or_path, args.revision, args.variant)
    fingerprint = unet_fingerprint(unet)  # of the float32 weights: names the weights each folder was sampled from
    pipe = load_pipeline(args, unet, f"--unet {model.where}", state.device, pipe)
    config = folder_config("sample", args, pipe, prompts, model.where, fingerprint, name=model.name)
    run = fill_folder(out / model.name, config, pipe, prompts, args, state, with_latents=False, desc=model.name)
    if state.is_main_process:
        report(f"sample: {model.name}", out / model.name, run)
    return pipe


def main():
    args = parse_args()
    state = start_processes(args)
    models = parse_models(args.unet)
    pipeline_class_name(args)  # an unsupported model fails before any work
    prompts = on_main_process(state, lambda: load_prompts(args))
    out, pipe = Path(args.output_dir), None
    for model in models:
        pipe = sample_model(model, pipe, prompts, args, state, out)
    end_processes(state)
    if state.is_main_process and args.grid_prompts > 0:
        grid = grid_from_folders(out, [m.name for m in models], prompts, args.grid_prompts, args.resolution)
        save_atomic(out / "grid.png", lambda p: grid.save(p, format="PNG"))
        rows = min(args.grid_prompts, len(prompts))
        print(f"sample: grid of {rows} prompts x {len(models)} models -> {out / 'grid.png'}")


if __name__ == "__main__":
    cli(main)
