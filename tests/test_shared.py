"""The scripts are standalone (users copy one file), so each carries the helpers it calls. Every helper is the same
text in every file that defines it: a fix made in one is made in all. sample.py builds on generate.py (it imports
generate.py's machinery) and spin_extras.py on train_spin.py (it imports train_spin.py's helpers)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["train_spin.py", "generate.py", "sample.py", "evaluate.py"]
PRODUCT = SCRIPTS + ["spin_extras.py"]  # what a user runs or copies: the budgets count these files
CARRIERS = ["train_spin.py", "generate.py", "evaluate.py", "spin_extras.py"]  # each carries its own helpers
OWN = {"main", "parse_args"}  # every script has its own
# Line budgets: one file per stage, read in one sitting (README, "Copying one script into your project").
BUDGETS = {"train_spin.py": 1860, "generate.py": 820, "evaluate.py": 1150, "sample.py": 300}
TOTAL_BUDGET = 4600


def definitions(name):
    """{top-level function, class or constant name: its source text} of one file."""
    src = (ROOT / name).read_text()
    lines, out = src.splitlines(keepends=True), {}
    for node in ast.parse(src).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for n in names:
            out[n] = "".join(lines[start - 1 : node.end_lineno])
    return out


def test_each_helper_is_the_same_text_wherever_it_appears():
    copies = {}
    for name in CARRIERS:
        for helper, text in definitions(name).items():
            if helper not in OWN:
                copies.setdefault(helper, {})[name] = text
    shared = {h: c for h, c in copies.items() if len(c) > 1}
    assert {"UserError", "cli", "load_unet", "iter_examples", "image_seed"} <= set(shared)
    for helper, texts in shared.items():
        assert len(set(texts.values())) == 1, f"{helper} differs between {sorted(texts)}: edit every copy the same way"


def test_no_top_level_definition_goes_unused():
    """A script carries only what it calls: every top-level function, class and constant is used in its own file (or by
    the file built on it: sample.py on generate.py, spin_extras.py and train_spin.py on each other)."""
    for name in PRODUCT:
        src = (ROOT / name).read_text()
        user = {"generate.py": "sample.py", "train_spin.py": "spin_extras.py", "spin_extras.py": "train_spin.py"}.get(
            name
        )
        users = src + ((ROOT / user).read_text() if user else "")
        for helper in set(definitions(name)) - {"main"}:
            uses = len(re.findall(rf"\b{re.escape(helper)}\b", users))
            assert uses > 1, f"{name}: {helper} is defined but never used there"


def test_the_scripts_stay_within_their_line_budgets():
    counts = {name: len((ROOT / name).read_text().splitlines()) for name in PRODUCT}
    for name, budget in BUDGETS.items():
        assert counts[name] <= budget, f"{name}: {counts[name]} lines, over its budget of {budget}"
    assert sum(counts.values()) <= TOTAL_BUDGET, counts


def test_sample_imports_generate_instead_of_copying_it():
    """sample.py carries no copy of generate.py: no function or class of the same name but its own main and
    parse_args (one place to fix a bug or add a model family), and it runs generate.py's own objects."""
    import sys

    def top_level(name):
        tree = ast.parse((ROOT / name).read_text())
        return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    assert top_level("sample.py") & top_level("generate.py") == {"main", "parse_args"}
    sys.path.insert(0, str(ROOT))
    import generate
    import sample

    for name in ("UserError", "load_pipeline", "make_images", "FolderWriter", "image_seed"):
        assert getattr(sample, name) is getattr(generate, name), name


def test_help_states_each_default_once():
    """--help shows a default only where the help text does not already state it, and never 'None'/'False'."""
    import subprocess
    import sys

    for name in SCRIPTS:
        p = subprocess.run([sys.executable, str(ROOT / name), "--help"], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        text = " ".join(p.stdout.split())  # argparse wraps lines
        assert "(default: None)" not in text and "(default: False)" not in text, name
        assert not re.search(r"default[^()]*\) \(default:", text), name  # stated twice


def test_known_import_noise_is_silenced_at_its_source():
    """Importing a script and the libraries it uses prints nothing (bitsandbytes' missing optional CPU kernel,
    transformers' torchvision fallback), while other warnings of those loggers still show."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, '.'); import {m}; import bitsandbytes; "
        "from diffusers import AutoencoderKL, StableDiffusionPipeline; from transformers import CLIPImageProcessor; "
        "import logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a real warning')"
    )
    for name in PRODUCT:
        p = subprocess.run(
            [sys.executable, "-c", code.format(m=name[:-3])],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        )
        assert p.returncode == 0, p.stderr[-2000:]
        assert "gemm_4bit" not in p.stderr and "torchvision" not in p.stderr, p.stderr
        assert "a real warning" in p.stderr


def test_each_stage_copied_alone_into_an_empty_folder_does_its_stage(tiny_pipeline, tmp_path):
    """generate.py alone makes its images; sample.py with generate.py beside it samples; evaluate.py alone scores them
    (tiny scorers); sample.py without generate.py is one line naming the file. train_spin.py alone: test_extras.py."""
    import os
    import shutil
    import subprocess
    import sys

    import tiny_scorers

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

    def alone(*scripts):
        folder = tmp_path / "_".join(s[:-3] for s in scripts)
        folder.mkdir()
        for script in scripts:
            shutil.copy(ROOT / script, folder)
        return folder

    def run(folder, *args):
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=folder, env=env)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    common = ["--pretrained_model_name_or_path", tiny_pipeline, "--prompts_file", prompts, "--num_inference_steps", 2]
    p = run(alone("generate.py"), "generate.py", *common, "--output_dir", tmp_path / "synth")
    assert p.returncode == 0 and len(list((tmp_path / "synth" / "images").glob("*.png"))) == 2, p.stderr[-2000:]
    samples = tmp_path / "samples"
    p = run(
        alone("sample.py", "generate.py"), "sample.py", *common, "--num_images_per_prompt", 2, "--output_dir", samples
    )
    assert p.returncode == 0 and len(list((samples / "base" / "images").glob("*.png"))) == 4, p.stderr[-2000:]
    p = run(alone("sample.py"), "sample.py", *common, "--output_dir", tmp_path / "x")
    assert p.returncode == 2 and "needs generate.py beside it" in p.stderr and "Traceback" not in p.stderr
    scorers = tiny_scorers.build_all(tmp_path / "scorers")
    p = run(alone("evaluate.py"), "evaluate.py", samples, "--output_dir", tmp_path / "eval", *scorers["flags"])
    assert p.returncode == 0 and (tmp_path / "eval" / "summary.md").is_file(), p.stderr[-2000:]
