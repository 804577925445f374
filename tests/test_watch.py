"""Watching a run: train_spin.py's validation images (--validation_prompts), as files, in tensorboard and in wandb."""

import io
import json
from pathlib import Path

import numpy as np
import torch
from conftest import run_in_process
from PIL import Image
from test_train import error_line, make_synthetic_dir, metrics, train, train_args

PROMPTS = ["a red circle", "a blue square"]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def validation_flags(*extra):
    return [
        "--validation_prompts",
        *PROMPTS,
        "--num_validation_images",
        "2",
        "--validation_steps",
        "2",
        "--validation_num_inference_steps",
        "3",
        "--validation_seed",
        "7",
        *extra,
    ]


def generate(pipeline, out, prompts_file, *extra):
    """What generate.py makes from the same UNet with the same seed, one prompt's images per batch."""
    p = run_in_process(
        "generate.py",
        "--pretrained_model_name_or_path",
        str(pipeline),
        "--prompts_file",
        str(prompts_file),
        "--num_images_per_prompt",
        "2",
        "--num_inference_steps",
        "3",
        "--batch_size",
        "2",
        "--seed",
        "7",
        "--output_dir",
        str(out),
        *map(str, extra),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_validation_images_are_generate_s_at_step_0_deterministic_and_in_tensorboard(
    tiny_pipeline, pickapic_parquet, synth, cache, tmp_path
):
    """Step 0 is what generate.py makes from theta_k with the same seed; the same prompts and seeds at every step,
    reproduced exactly by a run resumed from a checkpoint; the training is the run without validation, bit for bit; and
    tensorboard holds each step's grid (read back with tensorboard's own event reader)."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    watched, plain, resumed = tmp_path / "watched", tmp_path / "plain", tmp_path / "resumed"
    common = ["--synthetic_dir", synth, "--checkpointing_steps", "2", "--seed", "3"]
    train(*train_args(tiny_pipeline, pickapic_parquet, watched, cache, *common, *validation_flags(), steps=3),
          "--report_to", "tensorboard")  # fmt: skip
    train(*train_args(tiny_pipeline, pickapic_parquet, plain, cache, *common, steps=3))

    steps = sorted(int(d.name.split("-")[1]) for d in (watched / "validation").iterdir())
    assert steps == [0, 2, 3]  # step 0, every --validation_steps, and the last
    rows = [
        json.loads(line) for line in (watched / "validation" / "step-0" / "metadata.jsonl").read_text().splitlines()
    ]
    assert [(r["prompt"], r["prompt_index"], r["image_index"]) for r in rows] == [
        (q, p, i) for p, q in enumerate(PROMPTS) for i in range(2)
    ]

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    gen = generate(tiny_pipeline, tmp_path / "gen", tmp_path / "prompts.txt")
    for r in rows:  # the same file names, seeds and pixels
        gen_row = next(g for g in map(json.loads, (gen / "metadata.jsonl").read_text().splitlines())
                       if g["file_name"] == r["file_name"])  # fmt: skip
        assert gen_row["seed"] == r["seed"]
        assert np.array_equal(pixels(watched / "validation" / "step-0" / r["file_name"]), pixels(gen / r["file_name"]))
    step0, step3 = (pixels(watched / "validation" / f"step-{s}" / "grid.png") for s in (0, 3))
    assert step0.shape == (2 * 32, 2 * 32, 3) and not np.array_equal(step0, step3)  # the policy moved

    # validation draws from its own generators: the training is the plain run's
    w, v = (load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors")) for d in (watched, plain))
    assert all(torch.equal(w[k], v[k]) for k in w)
    assert metrics(watched) == [
        {**r, "pairs_per_s": m["pairs_per_s"]} for r, m in zip(metrics(plain), metrics(watched))
    ]

    # resumed from checkpoint-2 in another folder: the same pictures at steps 2 and 3
    train(*train_args(tiny_pipeline, pickapic_parquet, resumed, cache, *common, *validation_flags(), steps=3),
          "--resume_from_checkpoint", watched / "checkpoint-2")  # fmt: skip
    assert sorted(d.name for d in (resumed / "validation").iterdir()) == ["step-2", "step-3"]
    for s in ("step-2", "step-3"):
        assert np.array_equal(
            pixels(resumed / "validation" / s / "grid.png"), pixels(watched / "validation" / s / "grid.png")
        )

    # tensorboard: one image per validation step, the grid itself
    events = EventAccumulator(str(watched / "logs" / "spin-diffusion"), size_guidance={"images": 0}).Reload()
    images = events.Images("validation")
    assert [e.step for e in images] == [0, 2, 3]
    for e in images:
        shown = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert np.array_equal(shown, pixels(watched / "validation" / f"step-{e.step}" / "grid.png"))


def test_validation_images_in_wandb(tiny_pipeline, pickapic_parquet, synth, cache, tmp_path, monkeypatch):
    """--report_to wandb (offline: wandb's own files on disk): every validation image, as the folder holds it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--synthetic_dir", synth, *validation_flags(),
                      steps=2), "--report_to", "wandb")  # fmt: skip
    logged = sorted(
        pixels(p).tobytes() for p in tmp_path.glob("wandb/offline-run-*/files/media/images/validation_*.png")
    )
    ours = sorted(pixels(p).tobytes() for p in (out / "validation").glob("step-*/images/*.png"))
    assert len(ours) == 2 * 4 and logged == ours


def test_validation_sdxl_lora_bf16_and_bad_prompts_file(sdxl_pipeline, pickapic_parquet, tmp_path):
    """SDXL (two text encoders, micro-conditioning, its own decoding) through a LoRA policy under bf16 autocast:
    step 0 is generate.py's bf16 images up to autocast's rounding (normalisation layers stay fp32 under autocast, not
    under generate.py's cast). An empty or unreadable prompts file is one line."""
    synth = make_synthetic_dir(tmp_path / "synth", sdxl_pipeline, shape=(4, 8, 8))
    out = tmp_path / "run"
    args = train_args(sdxl_pipeline, pickapic_parquet, out, tmp_path / "cache", "--synthetic_dir", synth,
                      "--lora_rank", "4", "--mixed_precision", "bf16", *validation_flags(), steps=1)  # fmt: skip
    train(*args)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    gen = generate(sdxl_pipeline, tmp_path / "gen", tmp_path / "prompts.txt", "--mixed_precision", "bf16")
    for f in sorted((gen / "images").iterdir()):
        ours, theirs = pixels(out / "validation" / "step-0" / "images" / f.name).astype(int), pixels(f).astype(int)
        assert np.abs(ours - theirs).mean() < 2, (f.name, np.abs(ours - theirs).mean())  # measured: 0.80-0.86
    assert sorted(d.name for d in (out / "validation").iterdir()) == ["step-0", "step-1"]

    (tmp_path / "empty.txt").write_text("\n\n")
    for bad, says in ((tmp_path / "empty.txt", "no prompts in it"), (tmp_path / "missing.txt", "cannot read it")):
        p = train(*train_args(sdxl_pipeline, pickapic_parquet, tmp_path / "bad", tmp_path / "cache",
                              "--synthetic_dir", synth, "--validation_prompts_file", bad), check=False)  # fmt: skip
        assert says in error_line(p) and "--validation_prompts_file" in error_line(p)
    assert not Path(tmp_path / "bad").exists()  # refused before any work


def test_validation_samples_the_base_weights_of_variant_and_revision(
    variant_pipeline, other_pipeline, tiny_hub, pickapic_parquet, tmp_path
):
    """The validation pipeline's VAE and text encoder are the ones the run trains with: --variant fp16 and --revision
    v2 (both other_pipeline's weights) sample at step 0 exactly what other_pipeline samples."""
    images = {}
    for name, pipe, extra in (
        ("other", other_pipeline, []),
        ("fp16", variant_pipeline, ["--variant", "fp16"]),
        ("v2", "org/tiny", ["--revision", "v2"]),
        ("plain", variant_pipeline, []),
    ):
        out = tmp_path / name
        train(*train_args(pipe, pickapic_parquet, out, tmp_path / "cache", "--loss", "sft", *validation_flags(),
                          *extra, steps=1))  # fmt: skip
        images[name] = pixels(out / "validation" / "step-0" / "grid.png")
    assert np.array_equal(images["fp16"], images["other"]) and np.array_equal(images["v2"], images["other"])
    assert not np.array_equal(images["plain"], images["other"])
