"""Session-wide tiny fixtures: built once per test run, offline, in seconds."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # the scripts, tiny.py and tiny_scorers.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "toy: the toy-world experiment end to end (minutes; pytest -m toy)")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    return tiny.build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipeline")


@pytest.fixture(scope="session")
def other_pipeline(tmp_path_factory):
    """The tiny pipeline's layout with other weights in every part (seed 1)."""
    return tiny.build_tiny_pipeline(tmp_path_factory.mktemp("other") / "pipeline", seed=1)


@pytest.fixture(scope="session")
def variant_pipeline(tiny_pipeline, other_pipeline, tmp_path_factory):
    """tiny_pipeline plus an fp16 weights variant holding other_pipeline's weights (--variant fp16 loads those)."""
    import shutil

    path = tmp_path_factory.mktemp("variant") / "pipeline"
    shutil.copytree(tiny_pipeline, path)
    return tiny.add_tiny_variant(path, other_pipeline, "fp16")


@pytest.fixture(scope="session")
def hub_cache(tiny_pipeline, other_pipeline, tmp_path_factory):
    """A hub cache holding the model repo org/tiny: branch main is tiny_pipeline, branch v2 other_pipeline. Returns
    (cache folder, {branch: commit})."""
    cache = tmp_path_factory.mktemp("hub_cache")
    return cache, tiny.build_tiny_hub_cache(cache, "org/tiny", {"main": tiny_pipeline, "v2": other_pipeline})


@pytest.fixture
def tiny_hub(hub_cache, monkeypatch):
    """The hub id org/tiny, resolved (offline) from hub_cache: huggingface_hub reads its cache folder at each call
    (diffusers and transformers pass it none), so pointing its constant there is enough in this process. Returns the
    {branch: commit} of the repo."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache[0]))
    return hub_cache[1]


@pytest.fixture(scope="session")
def sdxl_pipeline(tmp_path_factory):
    """A tiny StableDiffusionXLPipeline folder (two text encoders, text_time UNet, force_upcast VAE)."""
    return tiny.build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipeline")


@pytest.fixture(scope="session")
def sd3_pipeline(tmp_path_factory):
    """A tiny StableDiffusion3Pipeline folder (two CLIP encoders and a T5, SD3Transformer2DModel, 16-channel VAE)."""
    return tiny.build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline")


@pytest.fixture(scope="session")
def sd2_pipeline(tmp_path_factory):
    """A tiny SD-2.x-style pipeline: the SD layout with a v-prediction scheduler."""
    return tiny.build_tiny_sd2_pipeline(tmp_path_factory.mktemp("sd2") / "pipeline")


@pytest.fixture(scope="module")
def synth(tiny_pipeline, tmp_path_factory):
    """A folder in generate.py's contract for the tiny pipeline's UNet (test_train.make_synthetic_dir), per module."""
    from test_train import make_synthetic_dir

    return make_synthetic_dir(tmp_path_factory.mktemp("synth") / "synth_0", tiny_pipeline)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A --cache_dir shared by one test module's runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def pickapic_parquet(tmp_path_factory):
    return tiny.build_pickapic_parquet(tmp_path_factory.mktemp("pickapic") / "train.parquet")


@pytest.fixture(scope="session")
def pickapic_webdataset(tmp_path_factory):
    """The rows of pickapic_parquet as two webdataset tar shards (sayakpaul/pickapic_v2_webdataset's layout)."""
    return tiny.build_pickapic_webdataset(tmp_path_factory.mktemp("pickapic_wds") / "shards")


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    return tiny.build_imagefolder(tmp_path_factory.mktemp("imgs") / "imagefolder", corrupt=(2,))


def run_in_process(script, *args):
    """Run a script's command line in this process, through its own cli() and main() as `python SCRIPT ARGS` would,
    without the seconds a fresh interpreter spends importing torch and diffusers: returncode, stdout and stderr, as
    subprocess.run gives them. Tests that need a process of their own (a kill, the environment, torchrun) spawn one."""
    import contextlib
    import importlib
    import io
    import types

    from accelerate.state import AcceleratorState

    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    AcceleratorState._reset_state(reset_partial_state=True)  # each run is a fresh launch
    out, err, code, argv = io.StringIO(), io.StringIO(), 0, sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.cli(module.main)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
