"""train_spin.py, generate.py and evaluate.py are standalone (users copy one file), so a few helpers are repeated in
each. Every copy of a marked block must stay byte-identical: a fix made in one script must be made in all. sample.py
builds on generate.py, its sibling: it imports generate.py's machinery instead of carrying a copy."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["train_spin.py", "generate.py", "sample.py", "evaluate.py"]
STANDALONE = ["train_spin.py", "generate.py", "evaluate.py"]  # each carries the shared blocks
BLOCK = re.compile(r"^# ---- (shared [^:\n]*?)(?::[^\n]*)? ----\n(.*?)^# ---- end \1 ----$", re.M | re.S)


def blocks():
    found = {}
    for name in STANDALONE:
        path = ROOT / name
        if path.is_file():
            for m in BLOCK.finditer(path.read_text()):
                found.setdefault(m.group(1), {})[name] = m.group(2)
    return found


def test_shared_blocks_are_identical():
    found = blocks()
    assert "shared helpers" in found and "train_spin.py" in found["shared helpers"]
    for label, copies in found.items():
        texts = set(copies.values())
        assert len(texts) == 1, f"'{label}' differs between {sorted(copies)}: edit every copy the same way"


def test_every_script_has_the_helpers_blocks():
    found = blocks()
    for name in STANDALONE:
        if (ROOT / name).is_file():
            assert name in found["shared helpers"], f"{name} lacks the shared helpers block"
    for name in ("train_spin.py", "generate.py"):
        assert name in found["shared model and data helpers"], name


def test_sample_imports_generate_instead_of_copying_it():
    """sample.py carries no copy of generate.py: no marked block, no function or class of the same name but its own
    main and parse_args (one place to fix a bug or add a model family), and it runs generate.py's own objects."""
    import ast
    import sys

    def top_level(name):
        tree = ast.parse((ROOT / name).read_text())
        return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    assert not BLOCK.search((ROOT / "sample.py").read_text())
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
    for name in SCRIPTS:
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
