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
import sample  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # 1 thread: fast beside other jobs
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


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
    common = ["--pretrained_model_name_or_path", tiny_pipeline, *sum([["--prompt", p] for p in PROMPTS], []),
              "--num_images_per_prompt", 2, "--num_inference_steps", 4, "--batch_size", 4, "--output_dir", out]
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
    for args, words in [(["--unet", "base", "--unet", "base"], "name them"),
                        (["--unet", tmp_path / "no_such_run"], "no UNet there")]:
        proc = run_cli("--pretrained_model_name_or_path", tiny_pipeline, "--prompt", "a cat",
                       "--output_dir", tmp_path / "out", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and words in errors[0], proc.stderr


def test_model_names():
    assert sample.parse_models(["base", "runs/x/iter_1", "runs/x/iter_2/unet/", "UCLA-AGI/SPIN-Diffusion-iter3",
                                "best=runs/x/iter_2"]) == [
        ("base", "base"), ("iter_1", "runs/x/iter_1"), ("iter_2", "runs/x/iter_2/unet/"),
        ("SPIN-Diffusion-iter3", "UCLA-AGI/SPIN-Diffusion-iter3"), ("best", "runs/x/iter_2")]
    with pytest.raises(sample.UserError):
        sample.parse_models(["a/iter_1", "b/iter_1"])


def test_grid_labels_fit():
    from PIL import Image

    cells = [[Image.new("RGB", (64, 64), "red"), None]]
    grid = sample.make_grid(cells, ["a-very-long-model-name", "b"], ["a prompt " * 30 + "ünïcode ✓"], 64)
    assert grid.size == (sample.GRID_LABEL_WIDTH + 128, sample.GRID_HEADER_HEIGHT + 64)
    assert grid.getpixel((sample.GRID_LABEL_WIDTH + 5, sample.GRID_HEADER_HEIGHT + 5)) == (255, 0, 0)
