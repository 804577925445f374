"""generate.py through its CLI on the tiny pipeline: seeds, folder contract, resume after a kill, errors,
several processes. Every run uses 4 DDIM steps at 32x32, so a run costs about the import time."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import run_in_process  # noqa: E402

import generate  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
COMMON = ["--num_images_per_prompt", "2", "--num_inference_steps", "4", "--seed", "7"]


def run_cli(script, *args, env=None, **kw):
    if env is None and not kw:  # the same cli()/main() path, in this process (conftest.run_in_process)
        return run_in_process(script, *args)
    # One thread per process: the tests run beside other jobs on 2 cores, where OpenMP spinning is very slow.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        **kw,
    )


def assert_user_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    for w in words:
        assert w in errors[0], errors[0]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    # a blank line and a repeated prompt: dropped, so prompt_index is the position among unique prompts
    path.write_text("a red circle\na blue square\n\na red circle\na green triangle\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_pipeline, prompts_file, tmp_path_factory):
    """One uninterrupted run (batch size 3) that the other tests compare against."""
    out = tmp_path_factory.mktemp("gen") / "ref"
    proc = run_cli(
        "generate.py",
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--prompts_file",
        prompts_file,
        *COMMON,
        "--batch_size",
        3,
        "--output_dir",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def latents_of(folder):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return {(r["prompt_index"], r["image_index"]): load_file(folder / r["latent_file"])["latent"] for r in rows}


def assert_same_set(a, b):
    rows_a = (a / "metadata.jsonl").read_text().splitlines()
    rows_b = (b / "metadata.jsonl").read_text().splitlines()
    assert rows_a == rows_b  # same rows, same order, no duplicates
    la, lb = latents_of(a), latents_of(b)
    for key in la:
        torch.testing.assert_close(la[key], lb[key], atol=1e-4, rtol=1e-4)


def test_folder_contract(reference, tiny_pipeline):
    cfg = json.loads((reference / "run_config.json").read_text())
    assert cfg["stage"] == "generate"
    assert {"args", "model", "versions", "created", "command", "settings"} <= set(cfg)
    assert cfg["args"]["batch_size"] == 3 and cfg["args"]["resolution"] == 32 and cfg["args"]["seed"] == 7
    assert cfg["model"]["pretrained_model_name_or_path"] == str(tiny_pipeline)
    assert cfg["model"]["unet"] == "base"
    assert cfg["model"]["unet_fingerprint"].startswith("sha256:")
    assert cfg["settings"]["scheduler"] == "DDIMScheduler" and cfg["settings"]["num_prompts"] == 3

    rows = [json.loads(line) for line in (reference / "metadata.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["image_index"]) for r in rows] == [(p, i) for p in range(3) for i in range(2)]
    for r in rows:
        assert list(r) == ["file_name", "latent_file", "prompt", "prompt_index", "image_index", "seed"]
        key = generate.image_key(r["prompt_index"], r["image_index"])
        assert r["file_name"] == f"images/{key}.png" and r["latent_file"] == f"latents/{key}.safetensors"
        assert r["prompt"] == PROMPTS[r["prompt_index"]]
        assert r["seed"] == generate.image_seed(7, r["prompt_index"], r["image_index"])
        latent = load_file(reference / r["latent_file"])["latent"]
        assert latent.shape == (4, 8, 8) and latent.dtype == torch.float32 and torch.isfinite(latent).all()
        from PIL import Image

        assert Image.open(reference / r["file_name"]).size == (32, 32)
    stats = json.loads((reference / "stats.json").read_text())
    assert stats["images_present"] == stats["images_expected"] == 6
    assert not list(reference.glob("metadata.rank*")) and not list(reference.rglob("*.tmp"))


def test_latent_is_the_pipelines_final_latent(reference, tiny_pipeline):
    """The saved latent is what the pipeline itself returns (output_type="latent") for the image's own seed."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise, _ = generate.initial_noise([generate.image_seed(7, 1, 1)], (4, 8, 8))
    want = pipe(
        "a blue square",
        latents=noise,
        num_inference_steps=4,
        guidance_scale=7.5,
        height=32,
        width=32,
        output_type="latent",
    ).images[0]
    got = load_file(reference / "latents" / f"{generate.image_key(1, 1)}.safetensors")["latent"]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_batch_size_does_not_change_results(reference, tiny_pipeline, prompts_file, tmp_path):
    proc = run_cli(
        "generate.py",
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--prompts_file",
        prompts_file,
        *COMMON,
        "--batch_size",
        1,
        "--output_dir",
        tmp_path / "b1",
    )
    assert proc.returncode == 0, proc.stderr
    assert_same_set(reference, tmp_path / "b1")


def test_killed_run_resumes_to_the_same_set(tiny_pipeline, prompts_file, tmp_path):
    cmd = [
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--prompts_file",
        prompts_file,
        "--num_images_per_prompt",
        20,
        "--num_inference_steps",
        4,
        "--seed",
        7,
        "--batch_size",
        2,
    ]
    whole, out = tmp_path / "whole", tmp_path / "killed"  # whole: uninterrupted, and in batches of 5
    assert run_cli("generate.py", *cmd, "--batch_size", 5, "--output_dir", whole).returncode == 0
    # Killed from outside like kill -9, once 3 images are on disk: the others are still being made or written.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "generate.py"), *map(str, cmd), "--output_dir", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while proc.poll() is None and len(list(out.glob("images/*.png"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    pngs = sorted(out.glob("images/*.png"))
    assert 3 <= len(pngs) < 60 and not (out / "metadata.jsonl").exists()
    # ... and what a kill during a write leaves: half a file, an image without its latent, a latent without its image
    (out / "images" / "p0000002_i019.png.tmp").write_bytes(b"\x89PNG half")
    (out / "latents" / f"{pngs[0].stem}.safetensors").unlink(missing_ok=True)
    pngs[1].unlink()

    proc = run_cli("generate.py", *cmd, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "already there" in proc.stdout and "wrote 0 image(s)" not in proc.stdout
    assert_same_set(whole, out)
    assert not list(out.glob("metadata.rank*")) and not list(out.rglob("*.tmp"))

    proc = run_cli("generate.py", *cmd, "--output_dir", out)  # a finished folder: nothing to do, nothing duplicated
    assert proc.returncode == 0 and "wrote 0 image(s)" in proc.stdout, proc.stdout + proc.stderr
    assert_same_set(whole, out)


def test_folder_with_other_settings_is_refused(reference, tiny_pipeline, prompts_file):
    before = (reference / "metadata.jsonl").read_text()
    proc = run_cli(
        "generate.py",
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--prompts_file",
        prompts_file,
        *COMMON,
        "--guidance_scale",
        3,
        "--output_dir",
        reference,
    )
    assert_user_error(proc, "other settings", "guidance_scale")
    assert (reference / "metadata.jsonl").read_text() == before


def test_bad_input_is_one_line_error(tiny_pipeline, tmp_path):
    base = ["--pretrained_model_name_or_path", tiny_pipeline, "--output_dir", tmp_path / "out"]
    assert_user_error(run_cli("generate.py", *base, "--prompts_file", tmp_path / "missing.txt"), "--prompts_file")
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert_user_error(run_cli("generate.py", *base, "--prompts_file", tmp_path / "empty.txt"), "no prompts")
    assert_user_error(run_cli("generate.py", *base, "--dataset", tmp_path / "nope.parquet"), "--dataset")
    (tmp_path / "p.txt").write_text("a cat\n")
    prompts = ["--prompts_file", tmp_path / "p.txt"]
    assert_user_error(run_cli("generate.py", *base, *prompts, "--batch_size", 0), "--batch_size must be at least 1")
    assert_user_error(
        run_cli("generate.py", *base, *prompts, "--resolution", 30), "--resolution must be a multiple of 4"
    )
    assert_user_error(run_cli("generate.py", *base, *prompts, "--dataset", "x"), "exactly one of", "--prompts_file")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert_user_error(run_cli("generate.py", *base, *prompts), "not an empty folder", "no run_config.json")
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["notes.txt"]
    (tmp_path / "out" / "run_config.json").write_text(json.dumps({"stage": "train", "identity": {}}))  # train_spin.py's
    assert_user_error(run_cli("generate.py", *base, *prompts), "other settings", "stage: 'train' there, 'generate' now")
    (tmp_path / "out" / "run_config.json").write_text("{half")
    assert_user_error(run_cli("generate.py", *base, *prompts), "run_config.json is unreadable")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["notes.txt", "run_config.json"]


def test_a_launch_accelerate_does_not_see_is_refused(monkeypatch):
    """Processes started without accelerate seeing them would each write every image: one line instead."""
    import types

    import accelerate

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu: types.SimpleNamespace(num_processes=1))
    with pytest.raises(generate.UserError, match="launched as 2 processes but accelerate sees 1"):
        generate.start_processes(argparse.Namespace(mixed_precision=None))


def test_dataset_prompts_and_scheduler(tiny_pipeline, pickapic_parquet, tmp_path):
    out = tmp_path / "ds"
    proc = run_cli(
        "generate.py",
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--dataset",
        pickapic_parquet,
        "--num_inference_steps",
        2,
        "--scheduler",
        "dpm++",
        "--max_prompts",
        3,
        "--output_dir",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    want = generate.unique_prompts(generate.open_dataset(str(pickapic_parquet), "train"), max_prompts=3)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == want and len(want) == 3
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["settings"]["scheduler"] == "DPMSolverMultistepScheduler"


def test_two_processes_make_one_consistent_folder(reference, tiny_pipeline, prompts_file, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts a single process (accelerate needs mpirun for several
    # CPU processes); torchrun starts real ones, which accelerate's PartialState joins the same way.
    out = tmp_path / "mp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(ROOT / "generate.py"),
            "--pretrained_model_name_or_path",
            str(tiny_pipeline),
            "--prompts_file",
            str(prompts_file),
            *COMMON,
            "--batch_size",
            "3",
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "stats.json").read_text())["processes"] == 2
    assert not list(out.glob("metadata.rank*"))
    assert_same_set(reference, out)


def test_sharding_and_metadata(tmp_path):
    """Image n of a run is process n % N's, whatever is done; metadata.jsonl lists the images whose files are all
    there, once each, in order."""
    assert generate.plan(3, 2, 1, 4) == [(0, 1), (2, 1)]
    assert sorted(job for r in range(3) for job in generate.plan(7, 2, r, 3)) == [
        (p, i) for p in range(7) for i in (0, 1)
    ]
    assert generate.plan(3, 2, 0, 1, done={(2, 0)}) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)]
    assert generate.plan(3, 2, 1, 4, done={(0, 1)}) == [(2, 1)]

    (tmp_path / "images").mkdir()
    (tmp_path / "latents").mkdir()
    for key in ("p0000000_i000", "p0000000_i001", "p0000001_i001"):
        (tmp_path / "images" / f"{key}.png").write_bytes(b"png")
    (tmp_path / "images" / "p0000001_i000.png.tmp").write_bytes(b"half")
    (tmp_path / "latents" / "p0000000_i001.safetensors").write_bytes(b"latent")
    args = argparse.Namespace(num_images_per_prompt=2, seed=5)
    rows = generate.metadata_rows(tmp_path, ["x", "y"], args, with_latents=False)
    assert [(r["prompt"], r["prompt_index"], r["image_index"]) for r in rows] == [("x", 0, 0), ("x", 0, 1), ("y", 1, 1)]
    assert rows[2] == {
        "file_name": "images/p0000001_i001.png",
        "prompt": "y",
        "prompt_index": 1,
        "image_index": 1,
        "seed": generate.image_seed(5, 1, 1),
    }
    # with latents: an image counts once both its files are there
    assert generate.metadata_rows(tmp_path, ["x", "y"], args, with_latents=True) == [
        {"file_name": "images/p0000000_i001.png", "latent_file": "latents/p0000000_i001.safetensors", **rows[1]}
    ]


def image_args(pipeline, mixed_precision="no", **kw):
    """The flags load_pipeline, folder_config and make_images read, as parse_args gives them."""
    flags = dict(revision=None, variant=None, scheduler=None, resolution=None, num_images_per_prompt=1, seed=0)
    flags.update(num_inference_steps=2, guidance_scale=7.5, batch_size=2, max_sequence_length=256, no_t5=False, **kw)
    return argparse.Namespace(pretrained_model_name_or_path=str(pipeline), mixed_precision=mixed_precision, **flags)


def load_pipeline(pipeline, unet_from=None, mixed_precision="no", **kw):
    """generate.load_pipeline: the base `pipeline` around the UNet of `unet_from` (default: the base's own)."""
    args = image_args(pipeline, mixed_precision, **kw)
    unet = generate.load_unet("base", str(unet_from or pipeline))
    return generate.load_pipeline(args, unet, "--unet x", "cpu"), args


def test_non_finite_results_are_counted_not_written(tiny_pipeline, tmp_path):
    args = image_args(tiny_pipeline)
    unet = generate.load_unet("base", str(tiny_pipeline))
    with torch.no_grad():
        unet.conv_out.bias[0] = float("nan")  # every latent becomes NaN, as an fp16 overflow would make it
    pipe = generate.load_pipeline(args, unet, "--unet x", "cpu")
    (tmp_path / "images").mkdir()
    (tmp_path / "latents").mkdir()
    writer = generate.FolderWriter(tmp_path, with_latents=True)
    stats = generate.make_images(pipe, ["a cat"], [(0, 0), (0, 1)], args, writer)
    writer.close()
    assert stats == {"written": 0, "nonfinite": ["p0000000_i000", "p0000000_i001"], "black": []}
    assert generate.metadata_rows(tmp_path, ["a cat"], argparse.Namespace(num_images_per_prompt=2, seed=0), True) == []
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.safetensors"))


def test_black_images_are_written_and_listed(tiny_pipeline, tmp_path):
    pipe, args = load_pipeline(tiny_pipeline, num_images_per_prompt=2)
    with torch.no_grad():  # the decoder's last layer now outputs -10 everywhere: black after clamping to [-1, 1]
        pipe.vae.decoder.conv_out.weight.zero_()
        pipe.vae.decoder.conv_out.bias.fill_(-10)
    for sub in ("images", "latents"):
        (tmp_path / sub).mkdir()
    writer = generate.FolderWriter(tmp_path, with_latents=True)
    stats = generate.make_images(pipe, ["a cat"], [(0, 0), (0, 1)], args, writer)
    writer.close()
    assert stats == {"written": 2, "nonfinite": [], "black": ["p0000000_i000", "p0000000_i001"]}
    assert len(generate.metadata_rows(tmp_path, ["a cat"], args, with_latents=True)) == 2
    run = {"written": 2, "seconds": 1.0, "skipped_done": 0, "images_present": 2, "images_expected": 2}
    run.update(nonfinite_keys=[], black_keys=stats["black"])
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        generate.report("generate", tmp_path, run)
    assert err.getvalue() == "warning: generate: 2 all-black image(s), e.g. p0000000_i000\n"
    (tmp_path / "stats.json").write_text(json.dumps({"black_keys": ["p0000001_i000"]}))  # an earlier run's
    generate.write_stats(tmp_path / "stats.json", run, processes=1)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["black_keys"] == ["p0000000_i000", "p0000000_i001", "p0000001_i000"] and stats["written"] == 2


def test_only_the_main_process_reads_the_prompts(monkeypatch):
    """Under N processes the prompt source (a streamed dataset) is read once, by the main process, and its result or
    its one-line error reaches every process."""
    import types

    import accelerate.utils

    sent = {}

    def broadcast(box):  # what accelerate's broadcast_object_list does: every process ends with the main's box
        if "box" in sent:
            box[0] = sent["box"][0]
        else:
            sent["box"] = list(box)

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    main = types.SimpleNamespace(is_main_process=True, num_processes=2)
    other = types.SimpleNamespace(is_main_process=False, num_processes=2)
    assert generate.on_main_process(main, lambda: ["a cat"]) == ["a cat"]
    assert generate.on_main_process(other, lambda: pytest.fail("a non-main process read the prompts")) == ["a cat"]

    sent.clear()

    def bad():
        raise generate.UserError("no prompts in --dataset x")

    with pytest.raises(generate.UserError, match="no prompts"):
        generate.on_main_process(main, bad)
    with pytest.raises(generate.UserError, match="no prompts"):
        generate.on_main_process(other, lambda: pytest.fail("read twice"))


def test_two_processes_read_prompts_from_a_dataset(tiny_pipeline, pickapic_parquet, tmp_path):
    """torchrun with --dataset: the prompts reach the second process from the main one; the folder is complete."""
    out = tmp_path / "mpd"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "generate.py"),
            "--pretrained_model_name_or_path",
            str(tiny_pipeline),
            "--dataset",
            str(pickapic_parquet),
            "--resolution",
            "32",
            "--num_inference_steps",
            "2",
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(
        generate.unique_prompts(generate.open_dataset(str(pickapic_parquet), "train"))
    )


# ---- model families: SDXL (StableDiffusionXLPipeline) and SD-2.x (v-prediction), and the ones we refuse ----

SDXL_CONDITIONING = {"original_size": [32, 32], "crops_coords_top_left": [0, 0], "target_size": [32, 32]}


def pipelines_own(folder, prompt, seed, steps, **kw):
    """(final latent, uint8 image) that the model's own diffusers pipeline makes for `prompt` from the image seed's
    noise, loaded and called directly (not through generate.py)."""
    import numpy as np
    from diffusers import DiffusionPipeline

    pipe = (
        DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        if json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
        else DiffusionPipeline.from_pretrained(folder, add_watermarker=False)
    )
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=steps, guidance_scale=7.5, height=32, width=32, **kw)
    noise, _ = generate.initial_noise([seed], (4, 8, 8))
    latent = pipe(prompt, latents=noise, output_type="latent", **call).images[0]
    image = pipe(prompt, latents=noise, output_type="np", **call).images[0]
    return latent, np.round(image * 255).astype(np.uint8)


def assert_pipelines_own(folder, model_folder, key, steps, **kw):
    import numpy as np
    from PIL import Image

    row = next(
        r
        for r in (json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines())
        if (r["prompt_index"], r["image_index"]) == key
    )
    latent, image = pipelines_own(model_folder, row["prompt"], row["seed"], steps, **kw)
    if "latent_file" in row:
        torch.testing.assert_close(load_file(folder / row["latent_file"])["latent"], latent, atol=1e-4, rtol=1e-4)
    got = np.asarray(Image.open(folder / row["file_name"])).astype(int)
    assert got.shape == image.shape and np.abs(got - image).max() <= 1


def test_sdxl_end_to_end(sdxl_pipeline, prompts_file, tmp_path):
    """An SDXL folder runs its own pipeline class (two text encoders, pooled embedding, micro-conditioning passed
    explicitly and recorded); images and latents are the pipeline's own for each seed, whatever the batch size."""
    args = [
        "--pretrained_model_name_or_path",
        sdxl_pipeline,
        "--prompts_file",
        prompts_file,
        "--num_inference_steps",
        2,
        "--seed",
        7,
    ]
    proc = run_cli("generate.py", *args, "--batch_size", 3, "--output_dir", tmp_path / "b3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "b3"
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["model"]["pipeline_class"] == "StableDiffusionXLPipeline" and cfg["model"]["vae_dtype"] == "float32"
    assert cfg["settings"]["micro_conditioning"] == SDXL_CONDITIONING
    assert cfg["settings"]["scheduler"] == "EulerDiscreteScheduler"
    assert cfg["args"]["resolution"] == 32  # the model's own: unet sample_size 8 x VAE factor 4
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["image_index"]) for r in rows] == [(0, 0), (1, 0), (2, 0)]
    for r in rows:
        latent = load_file(out / r["latent_file"])["latent"]
        assert latent.shape == (4, 8, 8) and latent.dtype == torch.float32 and torch.isfinite(latent).all()
    assert_pipelines_own(
        out, sdxl_pipeline, (1, 0), 2, original_size=(32, 32), target_size=(32, 32), crops_coords_top_left=(0, 0)
    )

    proc = run_cli("generate.py", *args, "--batch_size", 1, "--output_dir", tmp_path / "b1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_set(out, tmp_path / "b1")


def test_sd2_v_prediction_end_to_end(sd2_pipeline, prompts_file, tmp_path):
    """SD-2.x is a StableDiffusionPipeline with a v-prediction scheduler: its folder records the class, and its
    settings have exactly SD-1.5's keys (no micro-conditioning), so SD folders made before keep resuming."""
    out = tmp_path / "sd2"
    proc = run_cli(
        "generate.py",
        "--pretrained_model_name_or_path",
        sd2_pipeline,
        "--prompts_file",
        prompts_file,
        "--num_inference_steps",
        2,
        "--max_prompts",
        2,
        "--output_dir",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["model"]["pipeline_class"] == "StableDiffusionPipeline"
    assert set(cfg["settings"]) == {
        "pretrained_model_name_or_path",
        "unet_fingerprint",
        "prompts_sha256",
        "num_prompts",
        *generate.IMAGE_SETTINGS,
    }
    from diffusers import DDIMScheduler

    assert DDIMScheduler.from_pretrained(sd2_pipeline, subfolder="scheduler").config.prediction_type == "v_prediction"
    assert_pipelines_own(out, sd2_pipeline, (1, 0), 2)


def test_unsupported_pipeline_is_one_line_error(tiny_pipeline, prompts_file, tmp_path):
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0"}))
    base = ["--prompts_file", prompts_file, "--output_dir", tmp_path / "out"]
    assert_user_error(
        run_cli("generate.py", "--pretrained_model_name_or_path", other, *base),
        "FluxPipeline",
        "not supported",
        "StableDiffusionXLPipeline",
    )
    # a UNet folder instead of a pipeline folder: no model_index.json
    assert_user_error(
        run_cli("generate.py", "--pretrained_model_name_or_path", Path(tiny_pipeline) / "unet", *base),
        "model_index.json",
    )
    assert not (tmp_path / "out").exists()


def test_sdxl_fp16_decodes_with_an_fp32_vae(sdxl_pipeline, tiny_pipeline):
    """Half precision: SDXL's VAE (config force_upcast) stays float32 and decodes fp16 latents in float32, as
    diffusers' SDXL pipeline decodes; an SD-1.x pipeline keeps its VAE in fp16, as diffusers' does."""
    pipe, args = load_pipeline(sdxl_pipeline, mixed_precision="fp16")
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float32
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float16
    model = generate.folder_config("generate", args, pipe, ["a"], "base", "sha256:x")["model"]
    assert (model["pipeline_class"], model["vae_dtype"]) == ("StableDiffusionXLPipeline", "float32")
    x = generate.decode_latents(pipe.vae, torch.randn(1, 4, 8, 8, dtype=torch.float16), True)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()
    sd, args = load_pipeline(tiny_pipeline, mixed_precision="fp16")
    model = generate.folder_config("generate", args, sd, ["a"], "base", "sha256:x")["model"]
    assert sd.vae.dtype == torch.float16 and model["vae_dtype"] == "float16"


def test_micro_conditioning_follows_the_resolution():
    sdxl, sd = type("StableDiffusionXLPipeline", (), {})(), type("StableDiffusionPipeline", (), {})()
    assert generate.micro_conditioning(sdxl, 1024) == {
        "original_size": (1024, 1024),
        "crops_coords_top_left": (0, 0),
        "target_size": (1024, 1024),
    }
    assert generate.micro_conditioning(sd, 512) == {}


def test_unet_of_another_family_is_refused(sdxl_pipeline, tiny_pipeline):
    """An SD-1.x UNet with an SDXL base (or the reverse) is a one-line error, not a crash inside the pipeline."""
    with pytest.raises(generate.UserError, match="does not fit the base's StableDiffusionXLPipeline"):
        load_pipeline(sdxl_pipeline, unet_from=tiny_pipeline)
    with pytest.raises(generate.UserError, match="does not fit the base's StableDiffusionPipeline"):
        load_pipeline(tiny_pipeline, unet_from=sdxl_pipeline)


def test_variant_and_revision_make_the_images_of_the_base_weights_they_name(
    variant_pipeline, other_pipeline, tiny_hub, prompts_file, tmp_path
):
    """--variant fp16 makes the images of the base's fp16 files, --revision (a branch or its commit) of the hub repo
    org/tiny those of its snapshot: both hold other_pipeline's weights (text encoder, VAE, UNet), so the images are
    other_pipeline's own. A folder made with another variant is refused either way round; one made without the flags
    records no key for them (folders made before they existed resume)."""
    common = ["--prompts_file", prompts_file, "--max_prompts", 2, "--num_inference_steps", 2, "--seed", 7]

    def gen(pipe, out, *extra):
        return run_cli("generate.py", "--pretrained_model_name_or_path", pipe, *common, *extra, "--output_dir", out)

    runs = {
        "plain": (variant_pipeline,),
        "fp16": (variant_pipeline, "--variant", "fp16"),
        "other": (other_pipeline,),
        "v2": ("org/tiny", "--revision", "v2"),
        "commit": ("org/tiny", "--revision", tiny_hub["v2"]),
    }
    images = {}
    for name, (pipe, *extra) in runs.items():
        proc = gen(pipe, tmp_path / name, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        images[name] = {f.name: f.read_bytes() for f in sorted((tmp_path / name / "images").iterdir())}
    assert len(images["plain"]) == 2
    assert images["fp16"] == images["other"] == images["v2"] == images["commit"] != images["plain"]
    settings = {name: json.loads((tmp_path / name / "run_config.json").read_text())["settings"] for name in runs}
    assert {"revision", "variant"}.isdisjoint(settings["plain"]) and settings["fp16"]["variant"] == "fp16"
    assert settings["v2"]["revision"] == "v2"
    assert_user_error(gen(variant_pipeline, tmp_path / "plain", "--variant", "fp16"), "variant: None there, 'fp16' now")
    assert_user_error(gen(variant_pipeline, tmp_path / "fp16"), "variant: 'fp16' there, None now")
    assert_user_error(gen("org/tiny", tmp_path / "v2"), "revision: 'v2' there, None now")


def test_a_missing_variant_is_one_line_error(tiny_pipeline, other_pipeline, prompts_file, tmp_path):
    """--variant bf16 where the base has no such files: one line naming the variant and the fix, from the base UNet, or,
    with a --unet of another model (loaded as it is), from the pipeline's other parts."""
    base = ["--pretrained_model_name_or_path", tiny_pipeline, "--prompts_file", prompts_file, "--variant", "bf16"]
    hint = "no --variant bf16 weight files there? drop --variant, or pass one the model has"
    assert_user_error(run_cli("generate.py", *base, "--output_dir", tmp_path / "a"), "could not load the UNet", hint)
    proc = run_cli("generate.py", *base, "--unet", other_pipeline, "--output_dir", tmp_path / "b")
    assert_user_error(proc, "could not load the pipeline", hint)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
