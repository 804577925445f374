"""toy_world.py: the Frechet distance against independent computations, and the CI-sized experiment end to end
(the SPIN claims, through generate.py and train_spin.py's command lines)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import toy_world as tw  # noqa: E402


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_fd_commuting_covariances_closed_form():
    """C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T commute: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(0)
    d = 64
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = tw.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fd_non_commuting_2x2_closed_form():
    """For 2x2 M = C1 C2 (positive eigenvalues): tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) (Cayley-Hamilton)."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        c1, c2 = random_spd(rng, 2), random_spd(rng, 2)
        mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
        m = c1 @ c2
        tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
        assert tw.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fd_properties():
    """Zero for identical Gaussians, symmetric, the 1-d formula, and singular (rank-deficient) covariances."""
    rng = np.random.default_rng(2)
    c1, c2 = random_spd(rng, 16), random_spd(rng, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    assert abs(tw.frechet_distance(mu1, c1, mu1, c1)) < 1e-8
    assert tw.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(tw.frechet_distance(mu2, c2, mu1, c1), rel=1e-9)
    assert tw.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(4 + 1)
    x = rng.normal(size=(10, 16))  # 10 samples in 16 dimensions: a singular sample covariance
    fd = tw.frechet_distance(*tw.gaussian(x), *tw.gaussian(x + 1))
    assert fd == pytest.approx(16.0, rel=1e-6)  # a pure shift by 1 in every dimension


def test_fd_per_caption_on_samples():
    """The pipeline from latents: pooled features of Gaussian latents approach the closed form with many samples,
    and a pure offset of the latents shows up as |delta mu|^2 in the pooled 64-dim space."""
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(20000, 4, 8, 8, generator=g)}
    b = {"x": torch.randn(20000, 4, 8, 8, generator=g) + 0.5}
    # 2x2 average pooling of iid N(0,1): 64 features with variance 1/4 each, so the covariances agree; mean shift 0.5
    assert tw.fd_per_caption(a, b)["x"] == pytest.approx(64 * 0.25, rel=0.05)
    assert tw.fd_per_caption(a, a)["x"] == pytest.approx(0.0, abs=1e-8)


def test_sizes_and_flags():
    """--quick and per-size flags build the Sizes the run uses."""
    import argparse

    ap = argparse.ArgumentParser()
    tw.add_common(ap)
    s = tw.sizes_from(ap.parse_args(["--quick", "--beta", "500", "--iterations", "2"]))
    assert s.beta == 500.0 and s.iterations == 2 and s.theta0_steps == tw.QUICK.theta0_steps
    assert tw.sizes_from(ap.parse_args([])) == tw.FULL
    assert len(tw.CAPTIONS) == 12 and tw.CAPTIONS[0] == "a red circle"


def toy_selected(config):
    """The end-to-end run takes minutes: it runs when selected (`pytest -m toy`) or with SPIN_TOY=1."""
    return "toy" in (config.getoption("markexpr") or "") or os.environ.get("SPIN_TOY") == "1"


@pytest.mark.toy
def test_toy_world_quick_end_to_end(tmp_path, request):
    """The CI-sized experiment through the command line: world, theta_0, SPIN and SFT arms, evaluation.
    --check asserts: every SPIN iteration starts at loss ln 2, FD(SPIN 1) <= 0.7 FD(theta_0),
    FD(SPIN final) <= 1.1 FD(SPIN 1), FD(SPIN final) <= 0.7 FD(SFT final), everything finite."""
    if not toy_selected(request.config):
        pytest.skip("minutes of CPU: run with `pytest -m toy` or SPIN_TOY=1")
    out = tmp_path / "toy"
    tag = tw.arm_names(tw.QUICK)[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, str(ROOT / "toy_world.py"), "--quick", "--seed", "1", "--check", "--output_dir", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-3000:]}"
    assert "FAIL" not in p.stdout and p.stdout.count("PASS") == tw.QUICK.iterations + 4, p.stdout[-3000:]
    r = json.loads((out / f"results_{tag}.json").read_text())
    # the same checks, read back from the results file (what the README's table is made from)
    assert all(ok for _, ok in tw.checks(r))
    for name in ("world.json", "pipeline/model_index.json", "data/train.parquet", "data/test.parquet", "theta0/unet/config.json",
                 f"fd_{tag}.png", f"samples_{tag}.png"):
        assert (out / name).is_file(), name
    # rerun: every stage is found complete, nothing is trained or generated again
    p2 = subprocess.run([sys.executable, str(ROOT / "toy_world.py"), "--quick", "--seed", "1", "--output_dir", str(out)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "$ " not in p2.stdout, p2.stdout[-3000:]  # no script was run
    assert json.loads((out / f"results_{tag}.json").read_text())["fd"] == r["fd"]
    # the fd subcommand on the same world reuses the cached evaluation samples
    p3 = subprocess.run([sys.executable, str(ROOT / "toy_world.py"), "fd", "--world", str(out), "--unet", str(out / "theta0"),
                         "--names", "theta0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert json.loads((out / "fd.json").read_text())["fd"]["theta0"] == pytest.approx(r["fd"]["theta_0"])


def test_arm_folders_are_named_after_their_settings():
    """A run with other settings must not pick up an arm trained with different ones (a stale, silent result)."""
    import dataclasses

    base = tw.arm_names(tw.FULL)
    for change in ({"lr": 1e-4}, {"beta": 500.0}, {"guidance": 3.0}, {"opponent_images": 16}, {"sample_steps": 50},
                   {"steps": 50}, {"batch": 16}):
        spin, sft = tw.arm_names(dataclasses.replace(tw.FULL, **change))
        assert spin != base[0], change
        assert (sft != base[1]) == bool({"lr", "steps", "batch"} & set(change)), change
    assert tw.arm_names(dataclasses.replace(tw.FULL, iterations=2)) == base  # iter_k folders are shared
