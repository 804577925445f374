"""sample.py through its CLI on the tiny pipeline: paired seeds across models, per-model folders in
generate.py's schema, resume, the comparison grid, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import run_in_process  # noqa: E402

import sample  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def run_cli(*args):
    return run_in_process("sample.py", *args)  # the same cli()/main() path, in this process


def run_cli_process(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # 1 thread: fast beside other jobs
    return subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def rows_of(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def perturbed_unet(tiny_pipeline, tmp_path_factory):
    """A UNet as train_spin.py saves it (<dir>/unet/), with slightly different weights."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("run") / "iter_1"
    unet.save_pretrained(out / "unet")
    return out


def test_models_share_seeds_and_grid(tiny_pipeline, perturbed_unet, tmp_path):
    from PIL import Image

    out = tmp_path / "samples"
    common = [
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        *sum([["--prompt", p] for p in PROMPTS], []),
        "--num_images_per_prompt",
        2,
        "--num_inference_steps",
        4,
        "--batch_size",
        4,
        "--output_dir",
        out,
    ]
    proc = run_cli(*common, "--unet", "base", "--unet", perturbed_unet)
    assert proc.returncode == 0, proc.stderr

    base, iter1 = rows_of(out / "base"), rows_of(out / "iter_1")
    assert [(r["prompt_index"], r["image_index"]) for r in base] == [(p, i) for p in range(3) for i in range(2)]
    for a, b in zip(base, iter1):
        # generate.py's schema without the latent, and the same seed for the same (prompt, image) in every model
        assert list(a) == ["file_name", "prompt", "prompt_index", "image_index", "seed"]
        assert a == b and a["prompt"] == PROMPTS[a["prompt_index"]]
        assert a["seed"] == sample.image_seed(0, a["prompt_index"], a["image_index"])
        assert (out / "base" / a["file_name"]).is_file() and (out / "iter_1" / b["file_name"]).is_file()
    cfg_base = json.loads((out / "base" / "run_config.json").read_text())
    cfg_iter = json.loads((out / "iter_1" / "run_config.json").read_text())
    assert cfg_base["stage"] == "sample" and cfg_base["model"]["name"] == "base"
    assert cfg_iter["model"]["unet"] == str(perturbed_unet)
    assert cfg_base["model"]["unet_fingerprint"] != cfg_iter["model"]["unet_fingerprint"]
    px = lambda m: torch.from_numpy(np.asarray(Image.open(out / m / base[0]["file_name"])).copy())
    assert not torch.equal(px("base"), px("iter_1"))  # the two UNets really were used

    grid = Image.open(out / "grid.png")
    assert grid.size == (sample.GRID_LABEL_WIDTH + 2 * 32, sample.GRID_HEADER_HEIGHT + 3 * 32)

    # Rerun with one more model: finished models are skipped, the new one gets the same seeds (and, being the
    # same weights as base, the same pixels), and the grid gains a column.
    proc = run_cli(*common, "--unet", "base", "--unet", perturbed_unet, "--unet", "again=base")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote 0 image(s)") == 2 and "again: wrote 6 image(s)" in proc.stdout, proc.stdout
    assert rows_of(out / "again") == base
    assert torch.equal(px("base"), px("again"))
    assert Image.open(out / "grid.png").size == (sample.GRID_LABEL_WIDTH + 3 * 32, sample.GRID_HEADER_HEIGHT + 3 * 32)


def test_bad_input_is_one_line_error(tiny_pipeline, tmp_path):
    for args, words in [
        (["--unet", "base", "--unet", "base"], "name them"),
        (["--unet", tmp_path / "no_such_run"], "no UNet there"),
    ]:
        proc = run_cli(
            "--pretrained_model_name_or_path",
            tiny_pipeline,
            "--prompt",
            "a cat",
            "--output_dir",
            tmp_path / "out",
            *args,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and words in errors[0], proc.stderr


def test_model_names():
    assert sample.parse_models(
        ["base", "runs/x/iter_1", "runs/x/iter_2/unet/", "UCLA-AGI/SPIN-Diffusion-iter3", "best=runs/x/iter_2"]
    ) == [
        ("base", "base"),
        ("iter_1", "runs/x/iter_1"),
        ("iter_2", "runs/x/iter_2/unet/"),
        ("SPIN-Diffusion-iter3", "UCLA-AGI/SPIN-Diffusion-iter3"),
        ("best", "runs/x/iter_2"),
    ]
    with pytest.raises(sample.UserError):
        sample.parse_models(["a/iter_1", "b/iter_1"])


def test_grid_labels_fit():
    from PIL import Image

    cells = [[Image.new("RGB", (64, 64), "red"), None]]
    grid = sample.make_grid(cells, ["a-very-long-model-name", "b"], ["a prompt " * 30 + "ünïcode ✓"], 64)
    assert grid.size == (sample.GRID_LABEL_WIDTH + 128, sample.GRID_HEADER_HEIGHT + 64)
    assert grid.getpixel((sample.GRID_LABEL_WIDTH + 5, sample.GRID_HEADER_HEIGHT + 5)) == (255, 0, 0)


# ---- model families: SDXL and SD-2.x through sample.py (it runs generate.py's machinery) ----


def pipelines_own_image(folder, prompt, seed, steps=2, **kw):
    """The uint8 image the model's own diffusers pipeline makes for `prompt` from the image seed's noise."""
    from diffusers import DiffusionPipeline

    is_sd = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = DiffusionPipeline.from_pretrained(
        folder, **({"safety_checker": None, "requires_safety_checker": False} if is_sd else {"add_watermarker": False})
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed))[None]
    image = pipe(
        prompt,
        latents=noise,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=32,
        width=32,
        output_type="np",
        **kw,
    ).images[0]
    return np.round(image * 255).astype(np.uint8)


def test_sdxl_models_share_seeds(sdxl_pipeline, tmp_path):
    """An SDXL base and a fine-tuned SDXL UNet (as train_spin.py saves it) sampled into one comparison: the SDXL
    pipeline class and its micro-conditioning are recorded, and base's images are the pipeline's own for each seed."""
    from diffusers import UNet2DConditionModel
    from PIL import Image

    pipeline = sdxl_pipeline
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "run" / "iter_1" / "unet")

    out = tmp_path / "samples"
    proc = run_cli(
        "--pretrained_model_name_or_path",
        pipeline,
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--num_images_per_prompt",
        1,
        "--num_inference_steps",
        2,
        "--batch_size",
        2,
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
    for name in ("base", "iter_1"):
        cfg = json.loads((out / name / "run_config.json").read_text())
        assert cfg["model"]["pipeline_class"] == "StableDiffusionXLPipeline"
        assert cfg["settings"]["micro_conditioning"] == {
            "original_size": [32, 32],
            "crops_coords_top_left": [0, 0],
            "target_size": [32, 32],
        }
    px = lambda m, r: np.asarray(Image.open(out / m / r["file_name"])).astype(int)
    want = pipelines_own_image(
        pipeline,
        base[1]["prompt"],
        base[1]["seed"],
        original_size=(32, 32),
        target_size=(32, 32),
        crops_coords_top_left=(0, 0),
    )
    assert np.abs(px("base", base[1]) - want).max() <= 1
    assert not np.array_equal(px("base", base[1]), px("iter_1", iter1[1]))  # the fine-tuned UNet really was used
    assert (out / "grid.png").is_file()


def test_sd2_v_prediction(sd2_pipeline, tmp_path):
    pipeline = sd2_pipeline
    out = tmp_path / "samples"
    proc = run_cli(
        "--pretrained_model_name_or_path",
        pipeline,
        "--prompt",
        PROMPTS[2],
        "--num_images_per_prompt",
        1,
        "--num_inference_steps",
        2,
        "--grid_prompts",
        0,
        "--output_dir",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "base" / "run_config.json").read_text())
    assert cfg["model"]["pipeline_class"] == "StableDiffusionPipeline" and "micro_conditioning" not in cfg["settings"]
    from PIL import Image

    row = rows_of(out / "base")[0]
    got = np.asarray(Image.open(out / "base" / row["file_name"])).astype(int)
    assert np.abs(got - pipelines_own_image(pipeline, PROMPTS[2], row["seed"])).max() <= 1


def test_unsupported_pipeline_is_one_line_error(tmp_path):
    (tmp_path / "kandinsky").mkdir()
    (tmp_path / "kandinsky" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    proc = run_cli(
        "--pretrained_model_name_or_path", tmp_path / "kandinsky", "--prompt", "a cat", "--output_dir", tmp_path / "out"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "KandinskyV22Pipeline" in errors[0] and "not supported" in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_sample_needs_generate_beside_it(tmp_path):
    """Copied alone, sample.py says in one line that it needs generate.py beside it."""
    import shutil

    shutil.copy(ROOT / "sample.py", tmp_path / "sample.py")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "sample.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "generate.py beside it" in proc.stderr, (
        proc.stderr
    )


def test_variant_and_revision_sample_the_base_weights_they_name(
    variant_pipeline, other_pipeline, tiny_hub, tiny_pipeline, tmp_path
):
    """--variant fp16 and --revision v2 of the hub repo org/tiny sample the 'base' model from those weights (both hold
    other_pipeline's: text encoder, VAE, UNet), so its images are other_pipeline's own; a --unet of another model is
    loaded as it is (here a folder that has fp16 files too: its default UNet is taken)."""
    common = [*sum([["--prompt", p] for p in PROMPTS[:2]], []), "--num_images_per_prompt", 1]
    common += ["--num_inference_steps", 2, "--grid_prompts", 0]
    runs = {
        "fp16": (variant_pipeline, "--variant", "fp16", "--unet", "base", "--unet", f"own={variant_pipeline}"),
        "v2": ("org/tiny", "--revision", "v2"),
        "other": (other_pipeline,),
    }
    for name, (pipe, *extra) in runs.items():
        proc = run_cli("--pretrained_model_name_or_path", pipe, *common, *extra, "--output_dir", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]

    def made(folder):
        cfg = json.loads((folder / "run_config.json").read_text())
        images = {f.name: f.read_bytes() for f in sorted((folder / "images").iterdir())}
        return cfg["model"]["unet_fingerprint"], images

    fp16, v2, other = (made(tmp_path / name / "base") for name in runs)
    own = made(tmp_path / "fp16" / "own")
    assert fp16 == v2 == other and len(other[1]) == 2
    assert own[0] == sample.unet_fingerprint(sample.load_unet("base", str(tiny_pipeline))) != other[0]
