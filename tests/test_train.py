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

import train_spin as ts

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def run(*args, check=True):
    """Run a script of the repo through its command line, offline."""
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


def make_synthetic_dir(path, pipeline, captions=CAPTIONS, unet=None, n_images=2, nan=False, shape=(4, 8, 8)):
    """A folder in generate.py's contract (run_config.json + metadata.jsonl + latents/), with random latents."""
    from safetensors.torch import save_file

    path = Path(path)
    (path / "latents").mkdir(parents=True, exist_ok=True)
    fp = ts.unet_fingerprint(ts.load_unet(unet, str(pipeline)))
    g = torch.Generator().manual_seed(1)
    with open(path / "metadata.jsonl", "w") as f:
        for pi, cap in enumerate(captions):
            for ii in range(n_images):
                key = ts.image_key(pi, ii)
                lat = torch.randn(shape, generator=g)
                if nan:
                    lat[0, 0, 0] = float("nan")
                save_file({"latent": lat}, str(path / "latents" / f"{key}.safetensors"))
                f.write(json.dumps({"file_name": f"images/{key}.png", "latent_file": f"latents/{key}.safetensors",
                                    "prompt": cap, "prompt_index": pi, "image_index": ii,
                                    "seed": ts.image_seed(0, pi, ii)}) + "\n")
    (path / "run_config.json").write_text(json.dumps({"stage": "generate", "model": {
        "pretrained_model_name_or_path": str(pipeline), "unet": unet or "base", "unet_fingerprint": fp}}))
    return path


def train_args(pipe, data, out, cache, *extra, steps=2):
    return ["train_spin.py", "--pretrained_model_name_or_path", pipe, "--dataset", data, "--output_dir", out,
            "--cache_dir", cache, "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--lr_warmup_steps", "0", "--learning_rate", "1e-4", *extra]


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
    # noise: a pure function of (seed, process, step); processes differ
    a = ts.draw_noise(ts.step_generator(0, 0, 5), 2, (4, 2, 2), 1000, False)
    b = ts.draw_noise(ts.step_generator(0, 0, 5), 2, (4, 2, 2), 1000, False)
    c = ts.draw_noise(ts.step_generator(0, 1, 5), 2, (4, 2, 2), 1000, False)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert a[1] is a[3]  # shared by the pair unless asked otherwise
    d = ts.draw_noise(ts.step_generator(0, 0, 5), 2, (4, 2, 2), 1000, True)
    assert not torch.equal(d[1], d[3])


def test_pair_rows_rotates_synthetic_images():
    syn = [{"prompt": "a", "latent_path": "a0"}, {"prompt": "a", "latent_path": "a1"}, {"prompt": "b", "latent_path": "b0"}]
    pairs, missing = ts.pair_rows(["a", "b", "a", "a", "c"], [True, True, True, False, True], syn)
    assert pairs == [(0, "a0"), (1, "b0"), (2, "a1")]
    assert missing == ["c"]


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
@pytest.fixture(scope="module")
def synth(tiny_pipeline, tmp_path_factory):
    return make_synthetic_dir(tmp_path_factory.mktemp("synth") / "synth_0", tiny_pipeline)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_spin_first_loss_is_ln2_and_training_lowers_it(tiny_pipeline, pickapic_parquet, synth, cache, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "iter_1"
    train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--synthetic_dir", synth, "--beta", "100",
                    "--learning_rate", "3e-4", steps=8))
    rows = metrics(out)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6
    assert rows[0]["implicit_acc"] == 0.0 and abs(rows[0]["real_logratio"]) < 1e-7
    for key in ("loss", "implicit_acc", "real_logratio", "syn_logratio", "model_mse_real", "model_mse_syn",
                "ref_mse_real", "ref_mse_syn", "lr", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["finished"] and cfg["stage"] == "train" and cfg["opponent"]["unet_fingerprint"] == cfg["model"]["unet_fingerprint"]
    assert cfg["data"]["ties_dropped"] == 1 and cfg["data"]["invalid_rows"] == 1

    # the written UNet loads as the model card shows and differs from theta_0
    new = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    old = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))

    # on one fixed batch (fixed pairs, timesteps and noise) the trained policy has a lower loss than theta_0,
    # whose loss against itself is ln 2
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    sched = DDPMScheduler.from_pretrained(tiny_pipeline, subfolder="scheduler")
    lat_dir = Path(cfg["cache"]["latents"])
    real = torch.stack([ts.ShardedTensors(lat_dir, "latents")[i] for i in range(4)])
    syn = torch.stack([load_file(str(p))["latent"] for p in sorted((synth / "latents").glob("*_i000.safetensors"))])
    text = torch.cat([ts.ShardedTensors(Path(cfg["cache"]["text"]), "text")[i][None] for i in (1, 2, 3, 4)])
    t, noise, _, _ = ts.draw_noise(torch.Generator().manual_seed(123), 4, tuple(real.shape[1:]), 1000, False)
    with torch.no_grad():
        def mse(unet, x):
            return ts.per_sample_mse(unet(sched.add_noise(x, noise, t), t, encoder_hidden_states=text).sample, noise)
        r_r, r_s, m_r, m_s = mse(old, real), mse(old, syn), mse(new, real), mse(new, syn)
    assert torch.allclose(ts.spin_loss(r_r, r_s, r_r, r_s, 100.0), torch.tensor(math.log(2)))
    assert ts.spin_loss(m_r, m_s, r_r, r_s, 100.0).mean() < math.log(2) - 0.01

    # a second run with the same settings is a no-op; with other settings it refuses
    p = train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--synthetic_dir", synth, "--beta", "100",
                        "--learning_rate", "3e-4", steps=8))
    assert "nothing to do" in p.stdout
    p = train(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--synthetic_dir", synth, steps=8), check=False)
    assert "other settings" in error_line(p)


def test_exact_resume(tiny_pipeline, pickapic_parquet, synth, cache, tmp_path):
    from safetensors.torch import load_file

    common = ["--synthetic_dir", synth, "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--lr_warmup_steps", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*train_args(tiny_pipeline, pickapic_parquet, straight, cache, *common, steps=4))
    train(*train_args(tiny_pipeline, pickapic_parquet, resumed, cache, *common, steps=4))
    assert (resumed / "checkpoint-2" / "train_state.json").is_file()
    # interrupted after the checkpoint at step 2: the finished UNet never got written
    import shutil

    shutil.rmtree(resumed / "unet")
    p = train(*train_args(tiny_pipeline, pickapic_parquet, resumed, cache, *common, "--resume_from_checkpoint", "latest", steps=4))
    assert "resumed from" in p.stdout and "checkpoint-2" in p.stdout
    a = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]
    # resuming with other settings is refused, not silently continued
    p = train(*train_args(tiny_pipeline, pickapic_parquet, resumed, cache, *common, "--beta", "10",
                        "--resume_from_checkpoint", str(resumed / "checkpoint-2"), steps=4), check=False)
    assert "other settings" in error_line(p)


def test_8bit_adam_sft_on_imagefolder_and_dpo(tiny_pipeline, imagefolder, pickapic_parquet, cache, tmp_path):
    out = tmp_path / "sft8"
    p = train(*train_args(tiny_pipeline, imagefolder, out, cache, "--loss", "sft", "--caption_column", "text",
                        "--use_8bit_adam", "--caption_dropout", "0.5", steps=3))
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
        p = train(*train_args(tiny_pipeline, data, out, cache, *(["--synthetic_dir", syn] if syn else []), *extra), check=False)
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
    assert "non-finite loss" in fails(syn=nan)
    assert "no UNet there" in fails("--unet", tmp_path / "nowhere")
    wrong = make_synthetic_dir(tmp_path / "wrong_res", tiny_pipeline, shape=(4, 4, 4))
    assert "same resolution" in fails(syn=wrong)


def test_generate_folder_is_accepted(tiny_pipeline, pickapic_parquet, cache, tmp_path):
    """End to end: generate.py's folder feeds train_spin.py (the opponent check passes, pairs match)."""
    if not (ROOT / "generate.py").is_file():
        pytest.skip("generate.py not present")
    synth = tmp_path / "synth_0"
    run("generate.py", "--pretrained_model_name_or_path", tiny_pipeline, "--dataset", pickapic_parquet,
        "--output_dir", synth, "--resolution", "32", "--num_inference_steps", "2", "--num_images_per_prompt", "2",
        "--batch_size", "4", "--max_train_samples", "3")  # 3 usable rows: 3 of the 4 captions
    assert len(ts.read_jsonl(synth / "metadata.jsonl")) == 6
    out = tmp_path / "iter_1"
    run(*train_args(tiny_pipeline, pickapic_parquet, out, cache, "--synthetic_dir", synth, "--max_train_samples", "3",
                    "--dataloader_num_workers", "2", steps=2))  # worker processes reopen the cache shards
    assert abs(metrics(out)[0]["loss"] - math.log(2)) < 1e-6
    # the opponent check through the real command line: theta_1 did not make synth_0
    p = run(*train_args(tiny_pipeline, pickapic_parquet, tmp_path / "iter_2", cache, "--synthetic_dir", synth,
                        "--unet", out, steps=2), check=False)
    assert "opponent must be theta_k" in error_line(p) and p.returncode == 2
