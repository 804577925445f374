"""train_spin.py: the loss against an independent computation, and the real script through its command line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_in_process

import tiny
import train_spin as ts

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def run(*args, check=True):
    """Run a script of the repo through its command line, offline: generate.py in this process (its own cli() and
    main(), conftest.run_in_process), train_spin.py in a process of its own (DataLoader workers, the real launch)."""
    if args[0] == "generate.py":
        p = run_in_process(*args)
    else:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def train(*args, check=True):
    """Run train_spin.py's command line in this process (the same cli()/main() path, without paying the
    ~5 s import of torch/diffusers per run): returns returncode, stdout, stderr like subprocess.run."""
    import contextlib
    import io
    import types

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run is a fresh launch (its own --mixed_precision)
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = [str(a) for a in args[1:]]  # args[0] is the script name, as for run()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ts.cli(lambda: ts.main(argv))
        except SystemExit as e:
            code = e.code
    p = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and code != 0:
        raise AssertionError(f"exit {code}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def error_line(p):
    """The script's last stderr line: must be one 'error: ...' line, not a traceback."""
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), p.stderr[-2000:]
    return last


def make_synthetic_dir(
    path, pipeline, captions=CAPTIONS, unet=None, n_images=2, nan=False, shape=(4, 8, 8), vae_scale=4
):
    """A folder in generate.py's contract (run_config.json + metadata.jsonl + images/ + latents/), with random
    latents and random-pixel PNGs of the matching resolution (the tiny VAE downsamples x4, SD's x8: `vae_scale`)."""
    from PIL import Image
    from safetensors.torch import save_file

    path = Path(path)
    (path / "latents").mkdir(parents=True, exist_ok=True)
    (path / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    fp = ts.unet_fingerprint(ts.load_unet(unet, str(pipeline)))
    g = torch.Generator().manual_seed(1)
    with open(path / "metadata.jsonl", "w") as f:
        for pi, cap in enumerate(captions):
            for ii in range(n_images):
                key = f"p{pi:07d}_i{ii:03d}"  # generate.py's image_key
                lat = torch.randn(shape, generator=g)
                if nan:
                    lat[0, 0, 0] = float("nan")
                save_file({"latent": lat}, str(path / "latents" / f"{key}.safetensors"))
                pixels = rng.integers(0, 256, (shape[1] * vae_scale, shape[2] * vae_scale, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path / "images" / f"{key}.png")
                f.write(
                    json.dumps(
                        {
                            "file_name": f"images/{key}.png",
                            "latent_file": f"latents/{key}.safetensors",
                            "prompt": cap,
                            "prompt_index": pi,
                            "image_index": ii,
                            "seed": ts.image_seed(0, pi, ii),
                        }
                    )
                    + "\n"
                )
    (path / "run_config.json").write_text(
        json.dumps(
            {
                "stage": "generate",
                "model": {
                    "pretrained_model_name_or_path": str(pipeline),
                    "unet": unet or "base",
                    "unet_fingerprint": fp,
                },
            }
        )
    )
    return path


def train_args(pipe, data, out, cache, *extra, steps=2):
    return [
        "train_spin.py",
        "--pretrained_model_name_or_path",
        pipe,
        "--dataset",
        data,
        "--output_dir",
        out,
        "--cache_dir",
        cache,
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(steps),
        "--lr_warmup_steps",
        "0",
        "--learning_rate",
        "1e-4",
        *extra,
    ]


def metrics(out):
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- the math
def test_spin_loss_matches_independent_computation():
    rng = np.random.default_rng(0)
    for beta in (1.0, 500.0, 5000.0):
        m_r, m_s, r_r, r_s = (rng.uniform(0.01, 0.3, size=64).astype(np.float32) for _ in range(4))
        got = ts.spin_loss(*(torch.from_numpy(x) for x in (m_r, m_s, r_r, r_s)), beta).double().numpy()
        m_r, m_s, r_r, r_s = (x.astype(np.float64) for x in (m_r, m_s, r_r, r_s))
        z = -(beta / 2) * ((m_r - r_r) - (m_s - r_s))
        want = np.logaddexp(0.0, -z)  # -log sigmoid(z) = log(1 + exp(-z)), stable for |z| in the hundreds
        # float32 margins: each error carries ~1e-8 rounding, amplified by beta/2
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=beta * 1e-8)
    # equal errors: ln 2 exactly; the policy beating the reference on real data lowers the loss
    same = torch.full((3,), 0.1)
    assert torch.allclose(ts.spin_loss(same, same, same, same, 5000.0), torch.full((3,), math.log(2)), atol=1e-7)
    better = ts.spin_loss(torch.tensor([0.09]), torch.tensor([0.1]), torch.tensor([0.1]), torch.tensor([0.1]), 100.0)
    assert better.item() < math.log(2)
    # fp16 inputs are promoted: the loss is computed in float32
    assert ts.spin_loss(*(same.half(),) * 4, 5000.0).dtype == torch.float32


def test_per_sample_mse_and_targets():
    from diffusers import DDPMScheduler

    pred, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    want = torch.stack([((pred[i] - target[i]) ** 2).mean() for i in range(3)])
    assert torch.allclose(ts.per_sample_mse(pred.half(), target), want, atol=1e-2)
    assert torch.allclose(ts.per_sample_mse(pred, target), want, atol=1e-6)
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x, eps, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(ts.diffusion_target(sched, x, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x, atol=1e-6)
    sched_eps = DDPMScheduler(num_train_timesteps=1000)
    assert ts.diffusion_target(sched_eps, x, eps, t) is eps


def test_batches_cover_epochs_and_split_processes():
    n, per_device, world = 10, 2, 2
    steps_per_epoch = n // (per_device * world)
    for epoch in range(2):
        seen = []
        for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            parts = [ts.batch_indices(n, 0, per_device * world, s, r, per_device) for r in range(world)]
            assert not set(parts[0]) & set(parts[1])  # processes never share a row within a step
            seen += parts[0] + parts[1]
        assert len(set(seen)) == len(seen) == steps_per_epoch * per_device * world
    assert ts.batch_indices(n, 0, 4, 0, 0, 2) != ts.batch_indices(n, 0, 4, steps_per_epoch, 0, 2)  # reshuffled
    # noise: a pure function of (seed, step, place in the global batch), not of the process holding the pair
    a, b, c = (ts.draw_step(0, m, 2, 0, 2, (4, 2, 2), 1000, "shared", 0.0) for m in (5, 5, 6))
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, c.noise)
    assert a.noise.data_ptr() == a.noise2.data_ptr()  # shared by the pair unless asked otherwise: not a copy
    d = ts.draw_step(0, 5, 2, 0, 2, (4, 2, 2), 1000, "independent", 0.0)
    assert not torch.equal(d.noise, d.noise2)
    # a single process draws exactly what earlier versions drew (the step's generator seeded image_seed(seed, 0,
    # step)), so recorded runs reproduce
    old = torch.Generator().manual_seed(ts.image_seed(0, 0, 5))
    assert torch.equal(ts.draw_noise(old, 2, (4, 2, 2), 1000, "shared").noise, a.noise)
    # 2 processes x 2 pairs hold the two halves of 1 process x 4 pairs, dropout mask included
    whole = ts.draw_step(0, 5, 4, 0, 4, (4, 2, 2), 1000, "independent", 0.5)
    halves = [ts.draw_step(0, 5, 4, r * 2, r * 2 + 2, (4, 2, 2), 1000, "independent", 0.5) for r in range(2)]
    for k in range(5):
        assert torch.equal(whole[k], torch.cat([halves[0][k], halves[1][k]]))
    assert not torch.equal(halves[0][1], halves[1][1])  # the processes draw different noise


def test_pair_rows_rotates_synthetic_images():
    syn = [{"prompt": "a", "path": "a0"}, {"prompt": "a", "path": "a1"}, {"prompt": "b", "path": "b0"}]
    pairs, missing = ts.pair_rows(["a", "b", "a", "a", "c"], [True, True, True, False, True], syn)
    assert [(row, syn[k]["path"]) for row, k in pairs] == [(0, "a0"), (1, "b0"), (2, "a1")]
    assert missing == ["c"]


def test_pair_rows_per_row_pairs_each_row_with_its_own_image():
    """generate.py --per_row records (they carry "row"): row i takes row i's image, never another row's of the
    same caption; a row whose image is missing or of another caption (data mismatch) is reported."""
    syn = [
        {"prompt": "a", "row": 0, "path": "r0"},
        {"prompt": "b", "row": 1, "path": "r1"},
        {"prompt": "a", "row": 2, "path": "r2"},
        {"prompt": "a", "row": 3, "path": "r3"},
        {"prompt": "x", "row": 4, "path": "r4"},
    ]
    pairs, missing = ts.pair_rows(["a", "b", "a", "a", "c", "a"], [True, True, True, True, True, True], syn)
    assert [(row, syn[k]["path"]) for row, k in pairs] == [(0, "r0"), (1, "r1"), (2, "r2"), (3, "r3")]
    assert missing == ["c", "a"]


def test_cache_identity_follows_the_weights(tiny_pipeline, tmp_path):
    """Same VAE config, other weights: the latent cache key changes, so stale latents are never reused."""
    import shutil

    from diffusers import AutoencoderKL

    copy = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, copy)
    assert ts.weights_identity(copy, "vae") == ts.weights_identity(copy, "vae")
    before = ts.cache_key(vae=ts.weights_identity(copy, "vae"))
    vae = AutoencoderKL.from_pretrained(copy, subfolder="vae")
    with torch.no_grad():
        next(vae.parameters()).add_(1.0)
    vae.save_pretrained(copy / "vae")
    assert ts.cache_key(vae=ts.weights_identity(copy, "vae")) != before
    assert ts.weights_identity("some/hub-id", "vae") == "some/hub-id/vae"


# ---------------------------------------------------------------------------------------------- the script
def test_spin_first_loss_is_ln2_and_training_lowers_it(tiny_pipeline, pickapic_parquet, synth, cache, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "iter_1"
    train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            out,
            cache,
            "--synthetic_dir",
            synth,
            "--beta",
            "100",
            "--learning_rate",
            "3e-4",
            "--synthetic_latent",
            "image",
            steps=8,
        )
    )
    rows = metrics(out)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6
    assert rows[0]["implicit_acc"] == 0.0 and abs(rows[0]["real_logratio"]) < 1e-7
    for key in (
        "loss",
        "implicit_acc",
        "real_logratio",
        "syn_logratio",
        "model_mse_real",
        "model_mse_syn",
        "ref_mse_real",
        "ref_mse_syn",
        "lr",
        "grad_norm",
    ):
        assert all(math.isfinite(r[key]) for r in rows), key
    cfg = json.loads((out / "run_config.json").read_text())
    assert (
        cfg["finished"]
        and cfg["stage"] == "train"
        and cfg["opponent"]["unet_fingerprint"] == cfg["model"]["unet_fingerprint"]
    )
    assert (
        cfg["data"]["ties_dropped"] == 1 and cfg["data"]["undecodable_rows"] == 1 and cfg["data"]["usable_rows"] == 10
    )

    # the written UNet loads as the model card shows and differs from theta_0
    new = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    old = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))

    # on one fixed batch (fixed pairs, timesteps and noise) the trained policy has a lower loss than theta_0,
    # whose loss against itself is ln 2
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(tiny_pipeline, subfolder="scheduler")
    lat_dir = Path(cfg["cache"]["latents"])
    real = torch.stack([ts.ShardedTensors(lat_dir, "latents")[i] for i in range(4)])
    syn_cache = ts.ShardedTensors(Path(cfg["cache"]["synthetic"]), "latents")  # the PNGs, encoded like real images
    syn = torch.stack([syn_cache[2 * i] for i in range(4)])  # image 0 of each caption (2 images per caption)
    text = torch.cat([ts.ShardedTensors(Path(cfg["cache"]["text"]), "text")[i][None] for i in (1, 2, 3, 4)])
    t, noise = ts.draw_noise(torch.Generator().manual_seed(123), 4, tuple(real.shape[1:]), 1000, "shared")[:2]
    with torch.no_grad():

        def mse(unet, x):
            return ts.per_sample_mse(unet(sched.add_noise(x, noise, t), t, encoder_hidden_states=text).sample, noise)

        r_r, r_s, m_r, m_s = mse(old, real), mse(old, syn), mse(new, real), mse(new, syn)
    assert torch.allclose(ts.spin_loss(r_r, r_s, r_r, r_s, 100.0), torch.tensor(math.log(2)))
    assert ts.spin_loss(m_r, m_s, r_r, r_s, 100.0).mean() < math.log(2) - 0.01

    # a second run with the same settings is a no-op; with other settings it refuses
    p = train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            out,
            cache,
            "--synthetic_dir",
            synth,
            "--beta",
            "100",
            "--learning_rate",
            "3e-4",
            "--synthetic_latent",
            "image",
            steps=8,
        )
    )
    assert "nothing to do" in p.stdout
    p = train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--synthetic_dir", synth, steps=8), check=False)
    assert "other settings" in error_line(p)


def test_a_run_recorded_before_pair_noise_is_the_same_run():
    old = {"independent_pair_noise": False, "beta": 5000.0}
    ts.check_same_run(old, {"pair_noise": "shared", "beta": 5000.0}, "x")
    with pytest.raises(ts.UserError, match="pair_noise"):
        ts.check_same_run(old, {"pair_noise": "independent", "beta": 5000.0}, "x")


def test_every_flag_is_part_of_the_run_identity_unless_it_may_change(monkeypatch):
    """The run identity is every flag but the few listed as free to change (MAY_CHANGE), so a flag added to the parser
    is checked on a resume or re-run without being listed anywhere. A record written before a flag existed lacks it:
    it still matches while the flag is at its default, and is refused in one line otherwise."""
    argv = ["--dataset", "d", "--output_dir", "o", "--loss", "sft"]
    flags = {a.dest for a in ts.build_parser()._actions if a.dest != "help"}
    assert set(ts.MAY_CHANGE) <= flags
    assert set(ts.identity(ts.parse_args(argv))) == flags - set(ts.MAY_CHANGE)
    build = ts.build_parser

    def with_a_new_flag():
        p = build()
        p.add_argument("--new_knob", type=int, default=3)
        return p

    monkeypatch.setattr(ts, "build_parser", with_a_new_flag)
    current = ts.identity(ts.parse_args(argv))
    assert current["new_knob"] == 3
    older = {k: v for k, v in current.items() if k != "new_knob"}  # recorded before --new_knob existed
    ts.check_same_run(older, current, "x")
    with pytest.raises(ts.UserError, match="new_knob") as e:
        ts.check_same_run(older, ts.identity(ts.parse_args(argv + ["--new_knob", "4"])), "x")
    assert "\n" not in str(e.value) and "--new_knob 3 there vs 4 now" in str(e.value)


def test_a_record_without_a_flag_is_the_same_run_at_its_default(tiny_pipeline, pickapic_parquet, cache, tmp_path):
    out = tmp_path / "sft"
    train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--loss", "sft"))
    cfg = json.loads((out / "run_config.json").read_text())
    del cfg["identity"]["caption_dropout"]  # as an output_dir trained before --caption_dropout existed
    (out / "run_config.json").write_text(json.dumps(cfg))
    assert "nothing to do" in train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--loss", "sft")).stdout
    p = train(
        *train_args(tiny_pipeline, pickapic_parquet, out, cache, "--loss", "sft", "--caption_dropout", "0.5"),
        check=False,
    )
    assert "other settings" in error_line(p) and "--caption_dropout 0.0 there vs 0.5 now" in error_line(p)


def test_exact_resume(tiny_pipeline, pickapic_parquet, synth, cache, tmp_path):
    from safetensors.torch import load_file

    common = [
        "--synthetic_dir",
        synth,
        "--checkpointing_steps",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--lr_warmup_steps",
        "1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*train_args(tiny_pipeline, pickapic_parquet, straight, cache, *common, steps=4))
    train(*train_args(tiny_pipeline, pickapic_parquet, resumed, cache, *common, steps=4))
    assert (resumed / "checkpoint-2" / "train_state.json").is_file()
    # interrupted after the checkpoint at step 2: the finished UNet never got written
    import shutil

    shutil.rmtree(resumed / "unet")
    # resumed with DataLoader workers making the batches and draws (StepBatches): the same pairs, timesteps and noise
    p = train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            resumed,
            cache,
            *common,
            "--resume_from_checkpoint",
            "latest",
            "--dataloader_num_workers",
            "2",
            steps=4,
        )
    )
    assert "resumed from" in p.stdout and "checkpoint-2" in p.stdout
    a = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]
    # resuming with other settings is refused, not silently continued
    p = train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            resumed,
            cache,
            *common,
            "--beta",
            "10",
            "--resume_from_checkpoint",
            str(resumed / "checkpoint-2"),
            steps=4,
        ),
        check=False,
    )
    assert "other settings" in error_line(p)


def test_checkpoint_loads_as_the_unet_at_its_step(tiny_pipeline, pickapic_parquet, cache, tmp_path):
    """load_unet(checkpoint-N) (train_spin.py, generate.py and sample.py share it) = the UNet a run stopped at step
    N writes, same seed (constant lr: the schedule does not depend on the total), for full fine-tuning and LoRA;
    a checkpoint without its weights or a stray folder: one line."""
    common = ["--loss", "sft", "--lr_scheduler", "constant", "--seed", "3"]
    train(
        *train_args(
            tiny_pipeline, pickapic_parquet, tmp_path / "long", cache, *common, "--checkpointing_steps", "2", steps=4
        )
    )
    train(*train_args(tiny_pipeline, pickapic_parquet, tmp_path / "short", cache, *common, steps=2))
    ckpt = ts.load_unet(str(tmp_path / "long" / "checkpoint-2"), str(tiny_pipeline)).state_dict()
    final = ts.load_unet(str(tmp_path / "short"), str(tiny_pipeline)).state_dict()
    end = ts.load_unet(str(tmp_path / "long"), str(tiny_pipeline)).state_dict()
    assert ckpt.keys() == final.keys() and all(torch.equal(ckpt[k], final[k]) for k in ckpt)
    assert any(not torch.equal(ckpt[k], end[k]) for k in ckpt)  # step 2, not the run's end
    assert all(v.dtype == torch.float32 for v in ckpt.values())

    import shutil

    # a LoRA run's checkpoint (the adapter alone) loads as the UNet it would have written at step N: fused, float32
    lora = ["--lora_rank", "4", "--learning_rate", "1e-2"]
    train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            tmp_path / "lora_long",
            cache,
            *common,
            *lora,
            "--checkpointing_steps",
            "2",
            steps=4,
        )
    )
    train(*train_args(tiny_pipeline, pickapic_parquet, tmp_path / "lora_short", cache, *common, *lora, steps=2))
    assert not (tmp_path / "lora_long" / "checkpoint-2" / "model.safetensors").exists()
    ckpt = ts.load_unet(str(tmp_path / "lora_long" / "checkpoint-2"), str(tiny_pipeline)).state_dict()
    final = ts.load_unet(str(tmp_path / "lora_short"), str(tiny_pipeline)).state_dict()
    base = ts.load_unet("base", str(tiny_pipeline)).state_dict()
    assert ckpt.keys() == final.keys() == base.keys() and all(torch.equal(ckpt[k], final[k]) for k in ckpt)
    assert any(not torch.equal(ckpt[k], base[k]) for k in ckpt)  # the adapter moved the weights
    assert all(v.dtype == torch.float32 for v in ckpt.values())

    broken = tmp_path / "broken" / "checkpoint-2"
    shutil.copytree(tmp_path / "long" / "checkpoint-2", broken)
    (broken / "model.safetensors").unlink()
    shutil.copy(tmp_path / "long" / "run_config.json", broken.parent / "run_config.json")
    with pytest.raises(ts.UserError, match="a checkpoint without its weights"):
        ts.load_unet(str(broken), str(tiny_pipeline))
    (broken.parent / "run_config.json").unlink()
    with pytest.raises(ts.UserError, match="does not name the run's starting UNet"):
        ts.load_unet(str(broken), str(tiny_pipeline))
    with pytest.raises(ts.UserError, match="no UNet there"):
        ts.load_unet(str(tmp_path / "long" / "logs"), str(tiny_pipeline))


def test_generate_per_row_trains_each_row_against_its_own_image(tiny_pipeline, pickapic_parquet, cache, tmp_path):
    """generate.py --per_row (the paper's Algorithm 1): one image per usable row (ties dropped, repeated captions
    kept), prompt_index = the row train_spin.py caches; training pairs row i with image i."""
    synth = tmp_path / "synth_rows"
    run(
        "generate.py",
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--dataset",
        pickapic_parquet,
        "--per_row",
        "--output_dir",
        synth,
        "--resolution",
        "32",
        "--num_inference_steps",
        "2",
        "--batch_size",
        "4",
        "--max_train_samples",
        "6",
    )
    rows = ts.read_jsonl(synth / "metadata.jsonl")
    assert [r["prompt_index"] for r in rows] == list(range(6)) and len({r["prompt"] for r in rows}) == 3  # row 3: a tie
    out = tmp_path / "iter_1"
    train(
        *train_args(
            tiny_pipeline, pickapic_parquet, out, cache, "--synthetic_dir", synth, "--max_train_samples", "6", steps=1
        )
    )
    assert abs(metrics(out)[0]["loss"] - math.log(2)) < 1e-6
    captions = json.loads(
        (Path(json.loads((out / "run_config.json").read_text())["cache"]["latents"]) / "captions.json").read_text()
    )
    _, synthetic = ts.read_synthetic_dir(synth, "sampler")
    pairs, missing = ts.pair_rows(captions, [True] * len(captions), synthetic)
    assert not missing and [(r, synthetic[k]["prompt_index"]) for r, k in pairs] == [(r, r) for r in range(6)]
    assert [captions[r] for r, _ in pairs] == [synthetic[k]["prompt"] for _, k in pairs]
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    p = run(
        "generate.py",
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--prompts_file",
        tmp_path / "prompts.txt",
        "--per_row",
        "--output_dir",
        tmp_path / "x",
        check=False,
    )
    assert "--per_row needs --dataset" in error_line(p)


def test_8bit_adam_sft_on_imagefolder_and_dpo(tiny_pipeline, imagefolder, pickapic_parquet, cache, tmp_path):
    out = tmp_path / "sft8"
    p = train(
        *train_args(
            tiny_pipeline,
            imagefolder,
            out,
            cache,
            "--loss",
            "sft",
            "--caption_column",
            "text",
            "--use_8bit_adam",
            "--caption_dropout",
            "0.5",
            steps=3,
        )
    )
    assert "1 undecodable images skipped" in p.stdout
    rows = metrics(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((out / "run_config.json").read_text())["args"]["use_8bit_adam"] is True

    out = tmp_path / "dpo"
    train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--loss", "dpo", steps=2))
    assert abs(metrics(out)[0]["loss"] - math.log(2)) < 1e-6


def test_bad_input_one_line_errors(tiny_pipeline, pickapic_parquet, synth, cache, tmp_path):
    out = tmp_path / "out"

    def fails(*extra, data=pickapic_parquet, syn=synth):
        p = train(
            *train_args(tiny_pipeline, data, out, cache, *(["--synthetic_dir", syn] if syn else []), *extra),
            check=False,
        )
        assert not (out / "unet").exists()  # nothing left looking finished
        return error_line(p)

    assert "no such file or folder" in fails(data=tmp_path / "missing.parquet")
    assert "no column" in fails("--caption_column", "prompt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "generate.py" in fails(syn=empty)
    assert "not found" in fails(syn=tmp_path / "nope")
    partial = make_synthetic_dir(tmp_path / "partial", tiny_pipeline, captions=CAPTIONS[:2])
    assert "have no synthetic image" in fails(syn=partial)
    # an opponent that is not the UNet being trained: refused, unless explicitly allowed
    other_unet = tmp_path / "other"
    unet = ts.load_unet(None, str(tiny_pipeline))
    with torch.no_grad():
        next(unet.parameters()).add_(0.01)
    unet.save_pretrained(other_unet / "unet")
    assert "opponent" in fails("--unet", other_unet)
    nan = make_synthetic_dir(tmp_path / "nan", tiny_pipeline, nan=True)
    assert "non-finite loss" in fails("--synthetic_latent", "sampler", syn=nan)
    assert "no UNet there" in fails("--unet", tmp_path / "nowhere")
    wrong = make_synthetic_dir(tmp_path / "wrong_res", tiny_pipeline, shape=(4, 4, 4))
    assert "same resolution" in fails(syn=wrong)
    assert "same resolution" in fails("--synthetic_latent", "image", syn=wrong)


def test_generate_folder_is_accepted(tiny_pipeline, pickapic_parquet, cache, tmp_path):
    """End to end: generate.py's folder feeds train_spin.py (the opponent check passes, pairs match)."""
    if not (ROOT / "generate.py").is_file():
        pytest.skip("generate.py not present")
    synth = tmp_path / "synth_0"
    run(
        "generate.py",
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--dataset",
        pickapic_parquet,
        "--output_dir",
        synth,
        "--resolution",
        "32",
        "--num_inference_steps",
        "2",
        "--num_images_per_prompt",
        "2",
        "--batch_size",
        "4",
        "--max_train_samples",
        "3",
    )  # 3 usable rows: 3 of the 4 captions
    assert len(ts.read_jsonl(synth / "metadata.jsonl")) == 6
    out = tmp_path / "iter_1"
    run(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            out,
            cache,
            "--synthetic_dir",
            synth,
            "--max_train_samples",
            "3",
            "--dataloader_num_workers",
            "2",
            steps=2,
        )
    )  # worker processes reopen the cache shards
    assert abs(metrics(out)[0]["loss"] - math.log(2)) < 1e-6
    # the opponent check through the real command line: theta_1 did not make synth_0
    p = run(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            tmp_path / "iter_2",
            cache,
            "--synthetic_dir",
            synth,
            "--unet",
            out,
            steps=2,
        ),
        check=False,
    )
    assert "opponent must be theta_k" in error_line(p) and p.returncode == 2


# ------------------------------------------------------------------------ real data: ties, corrupt images
@pytest.mark.parametrize("loss", ["spin", "sft", "dpo"])
def test_every_loss_trains_past_an_epoch_on_ties_and_corrupt_images(
    loss, tiny_pipeline, pickapic_parquet, synth, cache, tmp_path
):
    """Pick-a-Pic has ties and the odd undecodable image: 12 rows, 1 tie, 1 corrupt winner -> 10 usable rows, so
    batch 2 x 12 steps runs through the data more than twice. The counters must not shadow each other (the bug:
    'rows' read overwrote the cache's row count, adding a phantom row per tie that crashed sft and dpo)."""
    out = tmp_path / loss
    extra = ["--synthetic_dir", synth] if loss == "spin" else []
    p = train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--loss", loss, *extra, steps=12))
    assert "10 usable rows of 12 read (1 ties dropped, 1 undecodable images skipped)" in p.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in rows)
    data = json.loads((out / "run_config.json").read_text())["data"]
    assert (data["rows_read"], data["ties_dropped"], data["undecodable_rows"], data["usable_rows"]) == (12, 1, 1, 10)
    assert data["pairs"] == 10


def test_merge_pieces_cut_counts_ties_up_to_the_cut():
    def piece(rows):  # rows: 'u' usable, 'x' undecodable, 't' tie; as encode_piece records them
        kept = [(i, r) for i, r in enumerate(rows) if r != "t"]
        return {
            "captions": [f"c{i}" for i, _ in kept],
            "source_rows": [i for i, _ in kept],
            "rows_read": len(rows),
            "ties_dropped": rows.count("t"),
            "valid": [r == "u" for _, r in kept],
        }

    pieces = [piece("utxu"), piece("ttuu"), piece("utu")]
    whole = ts.merge_pieces(pieces, None)
    assert whole["counts"] == {
        "cache_rows": 7,
        "usable_rows": 6,
        "rows_read": 11,
        "ties_dropped": 4,
        "undecodable_rows": 1,
    }
    assert whole["sizes"] == [3, 2, 2] and whole["valid"] == [True, False, True, True, True, True, True]
    # the first 4 cache rows, as one stream would read them: u t x u | t t u -> 7 rows read, 3 ties
    cut = ts.merge_pieces(pieces, 4)
    assert cut["counts"] == {
        "cache_rows": 4,
        "usable_rows": 3,
        "rows_read": 7,
        "ties_dropped": 3,
        "undecodable_rows": 1,
    }
    assert cut["captions"] == ["c0", "c2", "c3", "c2"] and cut["sizes"] == [3, 2]
    # a cut at a piece's end does not count the ties after its last usable row
    assert ts.merge_pieces([piece("uutt"), piece("u")], 2)["counts"]["rows_read"] == 2


def test_max_train_samples_reads_the_first_usable_rows(tiny_pipeline, pickapic_parquet, cache, tmp_path):
    out = tmp_path / "sft5"
    p = train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--loss", "sft", "--max_train_samples", "5"))
    # rows 0 1 2 (3: tie) 4 5(corrupt): 5 rows past ties, 4 of them decodable, 6 read
    assert "4 usable rows of 6 read (1 ties dropped, 1 undecodable images skipped)" in p.stdout


def test_bf16_autocast_first_loss_is_ln2(tiny_pipeline, pickapic_parquet, synth, cache, tmp_path):
    """The precision path a GPU takes (bf16 autocast) runs on CPU too: policy and reference must take the same path,
    so that the margin is exactly 0 at step 0."""
    out = tmp_path / "bf16"
    train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            out,
            cache,
            "--synthetic_dir",
            synth,
            "--mixed_precision",
            "bf16",
            "--beta",
            "100",
            "--learning_rate",
            "3e-4",
            steps=4,
        )
    )
    rows = metrics(out)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6 and rows[0]["implicit_acc"] == 0.0
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["loss"] != rows[0]["loss"]
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["args"]["mixed_precision"] == "bf16" and cfg["precision"]["frozen_weights"] == "torch.bfloat16"
    # ... and autocast really ran: the same first batch in fp32 gives other errors
    train(
        *train_args(
            tiny_pipeline,
            pickapic_parquet,
            tmp_path / "fp32",
            cache,
            "--synthetic_dir",
            synth,
            "--mixed_precision",
            "no",
            steps=1,
        )
    )
    fp32 = metrics(tmp_path / "fp32")[0]
    # the latents and prompt embeddings of fp32 encoders are not those of bf16 ones: their own cache entries
    fp32_cache = json.loads((tmp_path / "fp32" / "run_config.json").read_text())["cache"]
    assert fp32_cache["latents"] != cfg["cache"]["latents"] and fp32_cache["text"] != cfg["cache"]["text"]
    assert (
        fp32["model_mse_real"] != rows[0]["model_mse_real"]
        and abs(fp32["model_mse_real"] - rows[0]["model_mse_real"]) < 1e-2
    )


# ------------------------------------------------------------------------------ several processes (torchrun)
def test_torchrun_two_processes_train_what_one_process_trains(tiny_pipeline, tmp_path):
    """torchrun on CPU (gloo), as users launch: the processes join one run (one cache, one metrics line per step,
    one checkpoint), each reads only its share of a streamed 3-file dataset yet the cache is the one a single
    process builds, and 2 processes x batch 1 train what 1 process x batch 2 trains (noise follows the pair's place
    in the global batch, not the process). A resume from the 2-process checkpoint ends bit-identical. The processes
    share out the validation prompts: step 0's pictures are the single process's."""
    from PIL import Image
    from safetensors.torch import load_file

    data = tmp_path / "data"
    for i in range(3):  # ties in every file, an undecodable winner in one
        tiny.build_pickapic_parquet(
            data / f"train-{i:05d}-of-00003.parquet",
            n_rows=6,
            seed=i,
            tie_rows=(i,),
            corrupt_rows=(4,) if i == 1 else (),
        )
    synth = make_synthetic_dir(tmp_path / "synth", tiny_pipeline)
    common = [
        "--pretrained_model_name_or_path",
        tiny_pipeline,
        "--dataset",
        data,
        "--streaming",
        "--synthetic_dir",
        synth,
        "--resolution",
        "32",
        "--max_train_steps",
        "4",
        "--lr_warmup_steps",
        "0",
        "--learning_rate",
        "1e-4",
        "--checkpointing_steps",
        "2",
        "--seed",
        "3",
        "--synthetic_latent",
        "image",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }  # torchrun's threads

    def launch(nproc, out, cache, batch, *extra):
        cmd = [sys.executable] + (
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        )
        p = subprocess.run(
            [
                *cmd,
                str(ROOT / "train_spin.py"),
                *map(str, common),
                "--output_dir",
                str(out),
                "--cache_dir",
                str(cache),
                "--train_batch_size",
                str(batch),
                *map(str, extra),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    # validation images: 3 prompts shared out among the processes, written by the main process
    watch = ["--validation_prompts", "a red circle", "a blue square", "a green triangle"]
    watch += ["--validation_steps", "4", "--validation_num_inference_steps", "2", "--num_validation_images", "1"]
    launch(1, one, tmp_path / "c1", 2, *watch)
    p = launch(2, two, tmp_path / "c2", 1, *watch)
    assert p.stdout.count("training spin: 14 pairs, 4 steps of 1 x 2 x 1 = 2 pairs") == 1  # one run, not two alone
    assert [r["step"] for r in metrics(two)] == [1, 2, 3, 4]
    assert json.loads((two / "run_config.json").read_text())["num_processes"] == 2

    # the caches are the same files with the same tensors
    for kind in ("latents", "text", "synthetic"):
        (a,), (b,) = (list(Path(c).glob(f"{kind}-*")) for c in (tmp_path / "c1", tmp_path / "c2"))
        assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
        for f in a.iterdir():
            if f.suffix == ".safetensors":
                x, y = load_file(str(f)), load_file(str(b / f.name))
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name
            else:
                assert f.read_text() == (b / f.name).read_text(), f.name
    info = json.loads(next(Path(tmp_path / "c2").glob("latents-*/info.json")).read_text())
    assert info["sizes"] == [5, 5, 5] and (info["usable_rows"], info["ties_dropped"], info["undecodable_rows"]) == (
        14,
        3,
        1,
    )

    # the same weights up to float summation order: far closer than the training moved them
    def weights(d):
        return load_file(str(Path(d) / "unet" / "diffusion_pytorch_model.safetensors"))

    w0, w1, w2 = weights(tiny_pipeline), weights(one), weights(two)
    moved = sum(((w1[k] - w0[k]) ** 2).sum() for k in w0).sqrt()
    apart = sum(((w1[k] - w2[k]) ** 2).sum() for k in w0).sqrt()
    assert moved > 0 and apart < 0.01 * moved, (apart / moved).item()
    assert metrics(one)[0]["loss"] == metrics(two)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for run_dir in (one, two):
        assert sorted(d.name for d in (run_dir / "validation").iterdir()) == ["step-0", "step-4"]
    grids = [np.asarray(Image.open(d / "validation" / "step-0" / "grid.png")) for d in (one, two)]
    assert grids[0].shape == (3 * 32, 32, 3) and np.array_equal(*grids)  # theta_0's pictures, whoever sampled them

    # interrupted after step 2 and resumed (in another folder) under torchrun: bit-identical to the straight run
    p = launch(2, resumed, tmp_path / "c2", 1, "--resume_from_checkpoint", two / "checkpoint-2")
    assert "resumed from" in p.stdout
    w3 = weights(resumed)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(two)][2:]
    # the 2-process checkpoint (the DDP wrapper's state) loads as a UNet, the weights of that step
    at_step_2 = ts.load_unet(str(two / "checkpoint-2"), str(tiny_pipeline)).state_dict()
    assert at_step_2.keys() == w0.keys() and any(not torch.equal(at_step_2[k], w0[k]) for k in w0)
    # ... but not on another number of processes: the global batch, each process's rows and its draws would differ
    assert json.loads((two / "checkpoint-2" / "train_state.json").read_text())["num_processes"] == 2
    p = train(
        "train_spin.py",
        *map(str, common),
        "--output_dir",
        tmp_path / "one_more",
        "--cache_dir",
        tmp_path / "c2",
        "--train_batch_size",
        "1",
        "--resume_from_checkpoint",
        two / "checkpoint-2",
        check=False,
    )
    assert "written by a run of 2 process(es), this one has 1" in error_line(p)

    # LoRA with bf16 autocast and gradient checkpointing under the same launch: one run, first loss ln 2
    p = launch(
        2,
        tmp_path / "lora",
        tmp_path / "c2",
        1,
        "--lora_rank",
        "4",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--checkpointing_steps",
        "100",
    )
    assert (
        p.stdout.count("training spin") == 1
        and (tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    )
    assert metrics(tmp_path / "lora")[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)


# ------------------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_an_adapter_writes_it_merged_and_resumes_exactly(
    tiny_pipeline, pickapic_parquet, synth, cache, tmp_path
):
    """--lora_rank: the reference is the UNet with its adapter off (no copy), so the first loss is exactly ln 2; unet/
    is the merged UNet (what the next iteration's generate.py loads) and equals the base pipeline plus lora/ loaded
    with load_lora_weights; 8-bit AdamW, gradient checkpointing and an exact resume work with it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    common = [
        "--synthetic_dir",
        synth,
        "--lora_rank",
        "4",
        "--learning_rate",
        "1e-3",
        "--gradient_checkpointing",
        "--use_8bit_adam",
        "--checkpointing_steps",
        "2",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*train_args(tiny_pipeline, pickapic_parquet, straight, cache, *common, steps=4))
    rows = metrics(straight)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and rows[-1]["loss"] != rows[0]["loss"]
    cfg = json.loads((straight / "run_config.json").read_text())
    assert cfg["reference"]["unet_fingerprint"] == cfg["model"]["unet_fingerprint"]

    base = load_file(str(Path(tiny_pipeline) / "unet" / "diffusion_pytorch_model.safetensors"))
    merged = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    assert merged.keys() == base.keys()  # a plain UNet, no adapter keys
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(any(f".{m}." in k for m in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)

    # the adapter alone, loaded the diffusers way onto the base pipeline, gives the merged UNet's predictions
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    pipe.load_lora_weights(str(straight / "lora"))
    unet_m = UNet2DConditionModel.from_pretrained(straight, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, unet_m.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        a = pipe.unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample
        b = unet_m(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    assert torch.allclose(a, b, atol=1e-5)

    # the checkpoint holds the adapter and its optimizer state, not the frozen UNet under it
    ckpt = straight / "checkpoint-2"
    assert (ckpt / ts.ADAPTER_FILE).is_file() and not list(ckpt.glob("model*.safetensors"))
    adapter = load_file(str(ckpt / ts.ADAPTER_FILE))
    assert adapter and all("lora_" in k for k in adapter)
    unet_bytes = (Path(tiny_pipeline) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < unet_bytes / 2

    # interrupted after the checkpoint at step 2, resumed: bit-identical
    train(*train_args(tiny_pipeline, pickapic_parquet, resumed, cache, *common, steps=4))
    import shutil

    shutil.rmtree(resumed / "unet")
    train(
        *train_args(
            tiny_pipeline, pickapic_parquet, resumed, cache, *common, "--resume_from_checkpoint", "latest", steps=4
        )
    )
    again = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(merged[k], again[k]) for k in merged)


def test_lora_reference_is_the_same_unet_without_adapter(tiny_pipeline):
    unet = ts.add_lora(ts.load_unet(None, str(tiny_pipeline)), 4, None, "to_q,to_v")
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # a trained adapter
    ref = ts.WithoutAdapter(unet)
    plain = ts.load_unet(None, str(tiny_pipeline))
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([100]), torch.randn(1, 77, plain.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(ref(x, t, encoder_hidden_states=text).sample, plain(x, t, encoder_hidden_states=text).sample)
        assert not torch.equal(
            unet(x, t, encoder_hidden_states=text).sample, plain(x, t, encoder_hidden_states=text).sample
        )
    p = train(
        *train_args(
            tiny_pipeline,
            tiny.build_pickapic_parquet(Path(str(tiny_pipeline)).parent / "lp.parquet"),
            Path(str(tiny_pipeline)).parent / "lbad",
            Path(str(tiny_pipeline)).parent / "lc",
            "--loss",
            "sft",
            "--lora_rank",
            "4",
            "--lora_target_modules",
            "no_such_module",
        ),
        check=False,
    )
    assert "--lora_target_modules" in error_line(p)


def test_v_prediction_end_to_end(sd2_pipeline, pickapic_parquet, tmp_path):
    """SD-2.x-style v-prediction pipeline through generate.py and train_spin.py: the opponent samples with its
    scheduler's v-prediction, the loss's target is the velocity, the first loss is ln 2 and training moves it."""
    if not (ROOT / "generate.py").is_file():
        pytest.skip("generate.py not present")
    pipe = sd2_pipeline
    assert json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    synth = tmp_path / "synth_0"
    run(
        "generate.py",
        "--pretrained_model_name_or_path",
        pipe,
        "--dataset",
        pickapic_parquet,
        "--output_dir",
        synth,
        "--resolution",
        "32",
        "--num_inference_steps",
        "2",
        "--num_images_per_prompt",
        "2",
        "--batch_size",
        "4",
    )
    out = tmp_path / "iter_1"
    train(
        *train_args(
            pipe,
            pickapic_parquet,
            out,
            tmp_path / "cache",
            "--synthetic_dir",
            synth,
            "--beta",
            "100",
            "--learning_rate",
            "3e-4",
            steps=6,
        )
    )
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and rows[-1]["loss"] < rows[0]["loss"]
    # the errors logged are against the velocity: recompute the first reference error on one pair by hand
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(pipe, subfolder="scheduler")
    x, eps, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500])
    a = sched.alphas_cumprod[500]
    assert torch.allclose(ts.diffusion_target(sched, x, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- SDXL
def wide_pickapic(path, n=6):
    """Pick-a-Pic rows whose images are 48x32 (wider than tall): a real crop, so SDXL's micro-conditioning is not "
    "trivial."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        imgs = [tiny.jpeg_bytes(Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))) for _ in range(2)]
        for k, v in (
            ("caption", CAPTIONS[i % 4]),
            ("jpg_0", imgs[0]),
            ("jpg_1", imgs[1]),
            ("label_0", 1.0),
            ("label_1", 0.0),
        ):
            rows[k].append(v)
    pq.write_table(pa.table(rows), str(path))
    return path


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_sdxl_conditioning_is_the_pipelines(dropout, sdxl_pipeline, tmp_path):
    """SDXL: one SFT step at lr 0 logs the denoising error of its first batch; recompute it with the conditioning the
    official StableDiffusionXLPipeline builds: encode_prompt's prompt and pooled embeddings (its negative branch, zeros
    for force_zeros_for_empty_prompt, when the caption is dropped) and add_time_ids = original size, crop top-left,
    target size of each real image (48x32 centre-cropped to 32: crop left 8)."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe_dir = sdxl_pipeline
    data = wide_pickapic(tmp_path / "wide.parquet")
    out = tmp_path / "sft"
    train(
        *train_args(
            pipe_dir,
            data,
            out,
            tmp_path / "cache",
            "--loss",
            "sft",
            "--learning_rate",
            "0",
            "--caption_dropout",
            str(dropout),
            steps=1,
        )
    )
    logged = metrics(out)[0]["model_mse_real"]
    assert json.loads((out / "run_config.json").read_text())["model"]["conditioning"] == "sdxl"

    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir)
    cfg = json.loads((out / "run_config.json").read_text())
    rows = ts.batch_indices(6, 0, 2, 0, 0, 2)  # first batch (6 usable rows, batch 2, seed 0)
    lat = ts.ShardedTensors(Path(cfg["cache"]["latents"]), "latents")
    z = torch.stack([lat[r] for r in rows])
    t, noise, _, _, _ = ts.draw_step(0, 0, 2, 0, 2, tuple(z.shape[1:]), 1000, "shared", dropout)
    prompts = [CAPTIONS[r % 4] for r in rows]
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        if dropout:
            emb, pooled = neg, neg_pooled
        assert not dropout or (emb.abs().sum() == 0 and pooled.abs().sum() == 0)  # force_zeros_for_empty_prompt
        time_ids = torch.tensor([[32.0, 48.0, 0.0, 8.0, 32.0, 32.0]] * 2)
        sched = DDPMScheduler.from_pretrained(pipe_dir, subfolder="scheduler")
        pred = pipe.unet(
            sched.add_noise(z, noise, t),
            t,
            encoder_hidden_states=emb,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
    # the cache keeps embeddings in fp16: agreement to fp16 rounding, far below what a wrong input would change
    assert ((pred - noise) ** 2).mean().item() == pytest.approx(logged, rel=1e-3)
    with torch.no_grad():
        wrong = pipe.unet(
            sched.add_noise(z, noise, t),
            t,
            encoder_hidden_states=emb,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32.0, 0, 0, 32, 32]] * 2)},
        ).sample
    assert ((wrong - noise) ** 2).mean().item() != pytest.approx(logged, rel=1e-3)


def test_sdxl_spin_and_dpo_first_loss_ln2_and_lora(sdxl_pipeline, tmp_path):
    pipe_dir = sdxl_pipeline
    data = wide_pickapic(tmp_path / "wide.parquet")
    synth = make_synthetic_dir(tmp_path / "synth", pipe_dir)
    for name, extra in (
        ("spin", ["--synthetic_dir", synth, "--caption_dropout", "0.5"]),
        ("dpo", ["--loss", "dpo"]),
        ("lora", ["--synthetic_dir", synth, "--lora_rank", "4", "--learning_rate", "1e-3"]),
    ):
        train(*train_args(pipe_dir, data, tmp_path / name, tmp_path / "cache", "--beta", "100", *extra, steps=4))
        rows = metrics(tmp_path / name)
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and all(
            math.isfinite(r["loss"]) for r in rows
        ), name
    assert (tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_sdxl_generate_then_train(sdxl_pipeline, pickapic_parquet, tmp_path):
    """The SDXL folder generate.py writes feeds train_spin.py: opponent check, image size, first loss ln 2."""
    pipe_dir = sdxl_pipeline
    synth = tmp_path / "synth_0"
    run(
        "generate.py",
        "--pretrained_model_name_or_path",
        pipe_dir,
        "--dataset",
        pickapic_parquet,
        "--output_dir",
        synth,
        "--num_inference_steps",
        "2",
        "--num_images_per_prompt",
        "2",
        "--batch_size",
        "4",
    )
    assert json.loads((synth / "run_config.json").read_text())["model"]["pipeline_class"] == "StableDiffusionXLPipeline"
    out = tmp_path / "iter_1"
    train(*train_args(pipe_dir, pickapic_parquet, out, tmp_path / "cache", "--synthetic_dir", synth, steps=2))
    assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_pair_noise_modes_and_step_batches():
    g = lambda: torch.Generator().manual_seed(ts.image_seed(0, 0, 3))  # noqa: E731
    shared, paper, indep = (ts.draw_noise(g(), 3, (4, 2, 2), 1000, m) for m in ts.PAIR_NOISE)
    for mode in (paper, indep):  # the first member's draws do not depend on the mode
        assert torch.equal(mode[0], shared[0]) and torch.equal(mode[1], shared[1])
    assert paper[0] is paper[2] and not torch.equal(paper[1], paper[3])  # the paper's C.6: one t, two noises
    assert not torch.equal(indep[0], indep[2]) and not torch.equal(indep[1], indep[3])
    # StepBatches item m = the rows batch_indices gives and the draws draw_step gives, for this process's slice
    from types import SimpleNamespace

    rows_of_pairs = [{"real": torch.full((4, 2, 2), float(i))} for i in range(10)]
    pairs = ts.Pairs(rows_of_pairs, (4, 2, 2), 4, None, None)  # global batch 4: 2 processes x 2
    for mode in ts.PAIR_NOISE:
        args = SimpleNamespace(seed=7, train_batch_size=2, pair_noise=mode, caption_dropout=0.5)
        for process in (0, 1):
            steps = ts.StepBatches(pairs, args, process, 1000)
            for m in (0, 1, 2, 5):  # 2 steps per epoch: 5 is in the third epoch (the kept permutation is replaced)
                item = steps[m]
                rows = ts.batch_indices(10, 7, 4, m, process, 2)
                assert item["real"][:, 0, 0, 0].tolist() == [float(r) for r in rows]
                t, noise, t2, noise2, drop = ts.draw_step(
                    7, m, 4, 2 * process, 2 * process + 2, (4, 2, 2), 1000, mode, 0.5
                )
                assert (
                    torch.equal(item["t"], t) and torch.equal(item["noise"], noise) and torch.equal(item["drop"], drop)
                )
                if mode == "shared":
                    assert "t2" not in item and "noise2" not in item  # the loop reuses t and noise
                else:
                    assert torch.equal(item["t2"], t2) and torch.equal(item["noise2"], noise2)


def test_frozen_weights_in_the_compute_dtype_compute_the_same(tiny_pipeline, sdxl_pipeline):
    """cast_frozen: under autocast a bf16-held frozen UNet (norms fp32) predicts bit-identically what the fp32 one
    predicts, for the SD and SDXL layouts and under a LoRA adapter; trainable weights stay fp32."""
    import copy

    for pipe in (tiny_pipeline, sdxl_pipeline):
        unet = ts.load_unet(None, str(pipe))
        cfg = unet.config
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
        text = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
        added = None
        if cfg.addition_embed_type == "text_time":
            pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {
                "text_embeds": torch.randn(2, pooled_dim, generator=g),
                "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
            }
        lora = ts.add_lora(copy.deepcopy(unet), 4, None, "to_q,to_v")
        with torch.no_grad():
            for n, p in lora.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05)
        for model in (unet.requires_grad_(False), lora):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                before = model(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
                ts.cast_frozen(model, torch.bfloat16)
                after = model(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
            assert torch.equal(before, after)
            dtypes = {n: p.dtype for n, p in model.named_parameters()}
            assert dtypes["conv_in.weight"] == torch.bfloat16 and dtypes["conv_norm_out.weight"] == torch.float32
            assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)


def test_fp16_steps_skipped_by_the_grad_scaler_do_not_advance_the_schedule(
    tiny_pipeline, pickapic_parquet, cache, tmp_path, monkeypatch
):
    """fp16's grad scaler skips a step whose gradients overflowed: that step changed no weight, so the learning-rate
    schedule does not advance and metrics.jsonl marks it. (CPU has no fp16 grad scaler: the skip is simulated.)"""
    from accelerate import Accelerator

    calls = []

    def skipped(self):
        calls.append(1)
        return len(calls) == 2  # the second optimizer step overflowed

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))
    out = tmp_path / "skip"
    train(
        *train_args(tiny_pipeline, pickapic_parquet, out, cache, "--loss", "sft", "--lr_scheduler", "linear", steps=4)
    )
    rows = metrics(out)
    assert [r.get("skipped", False) for r in rows] == [False, True, False, False]
    lrs = [r["lr"] for r in rows]
    assert lrs[1] == lrs[2] and lrs[0] > lrs[1] > lrs[3]  # step 3 uses the rate step 2 would have, had it applied


def test_deepspeed_and_fsdp_launches_are_refused(tiny_pipeline, pickapic_parquet, cache, tmp_path, monkeypatch):
    """They would take over accumulation, clipping, autocast and saving: refused in one line naming what works.
    FSDP through the launcher users type; DeepSpeed (whose launcher needs deepspeed installed) by its variable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--use_fsdp",
            "--num_processes",
            "1",
            str(ROOT / "train_spin.py"),
            *map(str, train_args(tiny_pipeline, pickapic_parquet, tmp_path / "f", cache, "--loss", "sft")[1:]),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert p.returncode != 0 and "error: FSDP launches are not supported: train_spin.py runs DDP" in p.stderr, p.stderr[
        -2000:
    ]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    p = train(*train_args(tiny_pipeline, pickapic_parquet, tmp_path / "d", cache, "--loss", "sft"), check=False)
    assert "DeepSpeed launches are not supported" in error_line(p) and "--lora_rank" in error_line(p)
    assert not (tmp_path / "d").exists()


CHECKPOINT_RACE = """
import sys, time, types
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
import train_spin as ts
from accelerate import Accelerator

acc = Accelerator(cpu=True)
model, opt = acc.prepare(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
save = acc.save_state


def slow_save(*a, **k):  # the other process is still writing its part when the main one has finished
    if acc.process_index == 1:
        time.sleep(3)
    return save(*a, **k)


acc.save_state = slow_save
args = types.SimpleNamespace(seed=0, checkpoints_total_limit=None)
ts.save_checkpoint(acc, Path(sys.argv[2]), 1, sched, args, "sha256:x")
"""


def test_checkpoint_is_renamed_after_every_process_wrote_into_it(tmp_path):
    script = tmp_path / "race.py"
    script.write_text(CHECKPOINT_RACE)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(ROOT),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = tmp_path / "out" / "checkpoint-1"
    assert {"random_states_0.pkl", "random_states_1.pkl", "train_state.json"} <= {f.name for f in ckpt.iterdir()}
    assert not (tmp_path / "out" / "checkpoint-1.partial").exists()
    assert json.loads((ckpt / "train_state.json").read_text())["num_processes"] == 2


def test_two_nodes_with_node_local_cache_folders_stop_in_one_line(tiny_pipeline, pickapic_parquet, tmp_path):
    """Two simulated nodes (torchrun --nnodes 2, one process each) whose --cache_dir are different folders, as
    node-local scratch would be: every process stops with one line naming the folder that must be shared."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node_rank",
            str(node),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            "29547",
            str(ROOT / "train_spin.py"),
            *map(
                str,
                train_args(
                    tiny_pipeline, pickapic_parquet, tmp_path / "out", tmp_path / f"cache_node{node}", "--loss", "sft"
                )[1:],
            ),
        ]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        )
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode != 0
        assert "error: --cache_dir must be one folder shared by all 2 processes (process(es) [1] do not see" in err, (
            err[-2000:]
        )
    assert not list((tmp_path / "cache_node0").glob("latents-*"))  # stopped before any work


def test_diffusers_flag_names_are_aliases(tiny_pipeline, pickapic_parquet, tmp_path):
    """The names users of diffusers' training examples type mean the same here: each is an alias of ours (one dest,
    so the run identity and --help list it once), and --enable_xformers_memory_efficient_attention without xformers
    installed trains as without it and says in one line that PyTorch's attention is used."""
    base = ["--output_dir", "o", "--loss", "sft"]
    for alias, ours, value, want in (
        ("--dataset_name", "dataset", "d", "d"),
        ("--train_data_dir", "dataset", "d", "d"),
        ("--proportion_empty_prompts", "caption_dropout", "0.1", 0.1),
        ("--rank", "lora_rank", "4", 4),
        ("--beta_dpo", "beta", "100", 100.0),
    ):
        extra = [] if ours == "dataset" else ["--dataset", "x"]
        assert getattr(ts.parse_args([alias, value, *extra, *base]), ours) == want, alias
    args = train_args(tiny_pipeline, pickapic_parquet, tmp_path / "plain", tmp_path / "cache", "--loss", "sft")
    assert train(*args).returncode == 0
    p = train(
        *[a if a != str(tmp_path / "plain") else str(tmp_path / "x") for a in map(str, args)],
        "--enable_xformers_memory_efficient_attention",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        assert "note: xformers is not installed" in p.stdout
    assert metrics(tmp_path / "x")[-1]["loss"] == metrics(tmp_path / "plain")[-1]["loss"]


def test_variant_and_revision_train_from_the_base_weights_they_name(
    variant_pipeline, other_pipeline, tiny_hub, pickapic_parquet, tmp_path
):
    """--variant fp16 trains from the base's fp16 files, --revision v2 of the hub repo org/tiny from that branch's
    snapshot (both hold other_pipeline's weights): UNet, VAE latents and prompt embeddings are exactly those of a run
    on other_pipeline itself. All runs share one --cache_dir: a variant or revision that reused the default files' or
    main's cache would train on stale latents and show another loss. They are part of the run's identity, and the
    model card loads the base pipeline with them."""
    cache = tmp_path / "cache"

    def sft(pipe, out, *extra):
        train(*train_args(pipe, pickapic_parquet, tmp_path / out, cache, "--loss", "sft", "--model_card", *extra))
        cfg = json.loads((tmp_path / out / "run_config.json").read_text())
        return cfg, [r["loss"] for r in metrics(tmp_path / out)]

    plain, plain_loss = sft(variant_pipeline, "plain")
    fp16, fp16_loss = sft(variant_pipeline, "fp16", "--variant", "fp16")
    other, other_loss = sft(other_pipeline, "other")
    main, main_loss = sft("org/tiny", "main")
    v2, v2_loss = sft("org/tiny", "v2", "--revision", "v2")
    assert fp16_loss == other_loss == v2_loss != plain_loss == main_loss
    fingerprint = other["model"]["unet_fingerprint"]
    assert fp16["model"]["unet_fingerprint"] == v2["model"]["unet_fingerprint"] == fingerprint
    assert plain["model"]["unet_fingerprint"] != fingerprint
    for kind in ("latents", "text"):
        assert fp16["cache"][kind] != plain["cache"][kind] and v2["cache"][kind] != main["cache"][kind]
    # the run's identity: a record from before the flags is the same run, another variant is refused
    assert {"revision", "variant"}.isdisjoint(ts.MAY_CHANGE) and fp16["identity"]["variant"] == "fp16"
    assert v2["identity"]["revision"] == "v2" and plain["identity"]["variant"] is None
    before = {k: v for k, v in plain["identity"].items() if k not in ("revision", "variant")}
    ts.check_same_run(before, plain["identity"], "x")
    p = train(*train_args(variant_pipeline, pickapic_parquet, tmp_path / "fp16", cache, "--loss", "sft"), check=False)
    assert "--variant 'fp16' there vs None now" in error_line(p)
    card = {name: (tmp_path / name / "README.md").read_text() for name in ("plain", "fp16", "v2")}
    assert f'DiffusionPipeline.from_pretrained("{variant_pipeline}", torch_dtype' in card["plain"]
    assert f'DiffusionPipeline.from_pretrained("{variant_pipeline}", variant="fp16", torch_dtype' in card["fp16"]
    assert 'DiffusionPipeline.from_pretrained("org/tiny", revision="v2", torch_dtype' in card["v2"]
    # LoRA: unet/ and a checkpoint fuse the adapter into the variant's UNet (conv_in is outside the adapter)
    sft(variant_pipeline, "lora", "--variant", "fp16", "--lora_rank", "4", "--checkpointing_steps", "1")
    want = ts.load_unet(None, str(other_pipeline)).conv_in.weight
    for unet in (tmp_path / "lora", tmp_path / "lora" / "checkpoint-1"):
        assert torch.equal(ts.load_unet(str(unet), str(variant_pipeline)).conv_in.weight, want)


def test_a_missing_variant_is_one_line(tiny_pipeline, pickapic_parquet, tmp_path):
    """--variant bf16 where the base has no such files: one line naming the variant and the fix, from the base UNet's
    load, or, with a --unet of another model (loaded as it is), from the base's VAE."""
    import shutil

    args = train_args(tiny_pipeline, pickapic_parquet, tmp_path / "o", tmp_path / "cache", "--loss", "sft")
    line = error_line(train(*args, "--variant", "bf16", check=False))
    assert "could not load the UNet" in line and "no --variant bf16 weight files there? drop --variant" in line
    shutil.copytree(tiny_pipeline / "unet", tmp_path / "own" / "unet")
    line = error_line(train(*args, "--variant", "bf16", "--unet", tmp_path / "own", check=False))
    assert "could not load the VAE" in line and "no --variant bf16 weight files there? drop --variant" in line


def test_a_pipeline_without_its_tokenizer_is_one_line(tiny_pipeline, pickapic_parquet, tmp_path):
    """transformers builds an empty tokenizer for a pipeline folder that lacks tokenizer/: train_spin.py and
    generate.py refuse it in one line instead of failing inside the tokenizer's call."""
    import shutil

    broken = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline, broken)
    shutil.rmtree(broken / "tokenizer")
    p = train(*train_args(broken, pickapic_parquet, tmp_path / "out", tmp_path / "cache", "--loss", "sft"), check=False)
    assert "no tokenizer in its tokenizer/" in error_line(p)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    p = run("generate.py", "--pretrained_model_name_or_path", broken, "--prompts_file", tmp_path / "prompts.txt",
            "--output_dir", tmp_path / "gen", check=False)  # fmt: skip
    assert "no tokenizer in its tokenizer/" in error_line(p)
