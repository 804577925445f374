"""generate.py and sample.py on a tiny StableDiffusion3Pipeline (SD3, SD3.5: a transformer in transformer/, flow
matching, two CLIP text encoders and a T5), through their command lines: the images are diffusers' own pipeline's for
each image's seed, whatever the batch size; the settings that change them are recorded; bad input is one line."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import run_in_process  # noqa: E402
from test_generate import assert_user_error  # noqa: E402

import generate  # noqa: E402
import sample  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
STEPS = ["--num_inference_steps", 2, "--seed", 7]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def rows_of(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def pipelines_own(folder, prompt, seed, **kw):
    """(final latent, uint8 image) of diffusers' StableDiffusion3Pipeline itself (not generate.py's code) for `prompt`
    from the image seed's noise, at generate.py's defaults (guidance 7.5, max_sequence_length 256)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(seed))[None]
    call = dict(latents=noise, num_inference_steps=2, guidance_scale=7.5, height=32, width=32, **kw)
    latent = pipe(prompt, output_type="latent", **call).images[0]
    image = pipe(prompt, output_type="np", **call).images[0]
    return latent, np.round(image * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sd3_folders(sd3_pipeline, prompts_file, tmp_path_factory):
    """generate.py's folders of the three prompts at batch sizes 3 and 1."""
    out = tmp_path_factory.mktemp("sd3_gen")
    common = ["--pretrained_model_name_or_path", sd3_pipeline, "--prompts_file", prompts_file, *STEPS]
    for b in (3, 1):
        proc = run_in_process("generate.py", *common, "--batch_size", b, "--output_dir", out / f"b{b}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "b3", out / "b1"


def test_sd3_folder_records_its_pipeline_and_settings(sd3_folders):
    out, _ = sd3_folders
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["model"]["pipeline_class"] == "StableDiffusion3Pipeline" and cfg["model"]["unet"] == "base"
    assert cfg["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert cfg["settings"]["max_sequence_length"] == 256 and "micro_conditioning" not in cfg["settings"]
    assert cfg["args"]["resolution"] == 32  # the model's own: transformer sample_size 8 x VAE factor 4
    rows = rows_of(out)
    assert [(r["prompt_index"], r["image_index"]) for r in rows] == [(0, 0), (1, 0), (2, 0)]
    for r in rows:
        latent = load_file(out / r["latent_file"])["latent"]
        assert latent.shape == (16, 8, 8) and latent.dtype == torch.float32 and torch.isfinite(latent).all()
        assert Image.open(out / r["file_name"]).size == (32, 32)


def test_sd3_images_are_the_pipelines_own_whatever_the_batch_size(sd3_folders, sd3_pipeline):
    """Each image and kept latent is what diffusers' StableDiffusion3Pipeline makes from its seed's noise, at batch
    sizes 3 and 1; the kept latent is the model's latent space (shifted and scaled): decoding it as the pipeline
    decodes, vae.decode(latent / scaling_factor + shift_factor), gives the PNG."""
    from diffusers import AutoencoderKL

    b3, b1 = sd3_folders
    assert rows_of(b3) == rows_of(b1)
    vae = AutoencoderKL.from_pretrained(sd3_pipeline, subfolder="vae")
    for r in rows_of(b3):
        kept = load_file(b3 / r["latent_file"])["latent"]
        torch.testing.assert_close(load_file(b1 / r["latent_file"])["latent"], kept, atol=1e-4, rtol=1e-4)
        assert np.abs(pixels(b3 / r["file_name"]) - pixels(b1 / r["file_name"])).max() <= 1
        latent, image = pipelines_own(sd3_pipeline, r["prompt"], r["seed"])
        torch.testing.assert_close(kept, latent, atol=1e-4, rtol=1e-4)
        assert np.abs(pixels(b3 / r["file_name"]) - image).max() <= 1
        with torch.no_grad():
            x = vae.decode(kept[None] / vae.config.scaling_factor + vae.config.shift_factor).sample
        assert np.abs(pixels(b3 / r["file_name"]) - generate.to_pixels(x)[0].numpy()).max() <= 1


def test_sd3_max_sequence_length_changes_the_images_and_is_checked(sd3_folders, sd3_pipeline, prompts_file):
    """--max_sequence_length (T5 tokens) changes the images: a folder made with another value is refused; a new one
    holds the pipeline's own images for that value."""
    out, _ = sd3_folders
    common = ["--pretrained_model_name_or_path", sd3_pipeline, "--prompts_file", prompts_file, *STEPS]
    before = (out / "metadata.jsonl").read_text()
    proc = run_in_process("generate.py", *common, "--max_sequence_length", 77, "--output_dir", out)
    assert_user_error(proc, "other settings", "max_sequence_length: 256 there, 77 now")
    assert (out / "metadata.jsonl").read_text() == before
    short = out.parent / "short"
    proc = run_in_process(
        "generate.py", *common, "--max_prompts", 1, "--max_sequence_length", 77, "--output_dir", short
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = rows_of(short)[0]
    _, image = pipelines_own(sd3_pipeline, row["prompt"], row["seed"], max_sequence_length=77)
    assert np.abs(pixels(short / row["file_name"]) - image).max() <= 1
    assert not np.array_equal(pixels(short / row["file_name"]), pixels(out / row["file_name"]))


def test_sd3_bad_input_is_one_line_error(sd3_pipeline, tiny_pipeline, prompts_file, tmp_path):
    """An SD sampler for SD3, a resolution off the transformer's 2x2 patches, too many T5 tokens, a UNet for an SD3
    base and a transformer for an SD base: each one line, before any folder is made."""
    common = ["--prompts_file", prompts_file, "--output_dir", tmp_path / "out", *STEPS]
    sd3 = ["--pretrained_model_name_or_path", sd3_pipeline, *common]
    for script in ("generate.py", "sample.py"):
        proc = run_in_process(script, *sd3, "--scheduler", "ddim")
        assert_user_error(proc, "--scheduler ddim", "flow matching", "drop --scheduler")
    assert_user_error(run_in_process("generate.py", *sd3, "--resolution", 36), "--resolution must be a multiple of 8")
    assert_user_error(run_in_process("generate.py", *sd3, "--max_sequence_length", 600), "--max_sequence_length", "512")
    proc = run_in_process("generate.py", *sd3, "--unet", tiny_pipeline)
    assert_user_error(proc, "UNet2DConditionModel does not fit the base's StableDiffusion3Pipeline", "SD3Transformer2D")
    proc = run_in_process(
        "generate.py", "--pretrained_model_name_or_path", tiny_pipeline, *common, "--unet", sd3_pipeline
    )
    assert_user_error(proc, "SD3Transformer2DModel does not fit the base's StableDiffusionPipeline", "UNet2DCondition")
    assert not (tmp_path / "out").exists()


def test_flux_is_refused_in_one_line_naming_what_is_supported(prompts_file, tmp_path):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0"}))
    for script in ("generate.py", "sample.py"):
        proc = run_in_process(
            script,
            "--pretrained_model_name_or_path",
            flux,
            "--prompts_file",
            prompts_file,
            "--output_dir",
            tmp_path / "o",
        )
        assert_user_error(proc, "FluxPipeline", "not supported", "SD-1.x, SD-2.x, SDXL or SD3/SD3.5")
        assert_user_error(proc, "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")
    assert not (tmp_path / "o").exists()


def test_sd3_models_share_seeds(sd3_pipeline, tmp_path):
    """sample.py with the SD3 base and a fine-tuned transformer (as train_spin.py saves it: <dir>/transformer/): the
    same seeds, each folder naming its model, base's images the pipeline's own, the second model really swapped in."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(sd3_pipeline, subfolder="transformer")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    transformer.save_pretrained(tmp_path / "run" / "iter_1" / "transformer")
    assert sample.parse_models([str(tmp_path / "run" / "iter_1" / "transformer")])[0].name == "iter_1"

    out = tmp_path / "samples"
    prompts = sum([["--prompt", p] for p in PROMPTS[:2]], [])
    proc = run_in_process(
        "sample.py",
        "--pretrained_model_name_or_path",
        sd3_pipeline,
        *prompts,
        "--num_images_per_prompt",
        1,
        *STEPS,
        "--output_dir",
        out,
        "--unet",
        "base",
        "--unet",
        tmp_path / "run" / "iter_1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, iter1 = rows_of(out / "base"), rows_of(out / "iter_1")
    assert base == iter1 and [(r["prompt_index"], r["image_index"]) for r in base] == [(0, 0), (1, 0)]
    cfgs = {name: json.loads((out / name / "run_config.json").read_text()) for name in ("base", "iter_1")}
    assert cfgs["base"]["model"]["unet"] == "base" and cfgs["iter_1"]["model"]["unet"] == str(
        tmp_path / "run" / "iter_1"
    )
    assert cfgs["iter_1"]["model"]["unet_fingerprint"] == sample.unet_fingerprint(transformer)
    assert cfgs["base"]["model"]["unet_fingerprint"] != cfgs["iter_1"]["model"]["unet_fingerprint"]
    for cfg in cfgs.values():
        assert cfg["model"]["pipeline_class"] == "StableDiffusion3Pipeline"
        assert cfg["settings"]["max_sequence_length"] == 256
    _, want = pipelines_own(sd3_pipeline, base[1]["prompt"], base[1]["seed"])
    assert np.abs(pixels(out / "base" / base[1]["file_name"]) - want).max() <= 1
    assert not np.array_equal(
        pixels(out / "base" / base[1]["file_name"]), pixels(out / "iter_1" / iter1[1]["file_name"])
    )
    assert (out / "grid.png").is_file()
