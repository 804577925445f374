"""The scripts are standalone (users copy one file), so a few helpers are repeated in each. Every copy of a
marked block must stay byte-identical: a fix made in one script must be made in all."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["train_spin.py", "generate.py", "sample.py", "evaluate.py"]
BLOCK = re.compile(r"^# ---- (shared [^:\n]*?)(?::[^\n]*)? ----\n(.*?)^# ---- end \1 ----$", re.M | re.S)


def blocks():
    found = {}
    for name in SCRIPTS:
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
    for name in SCRIPTS:
        if (ROOT / name).is_file():
            assert name in found["shared helpers"], f"{name} lacks the shared helpers block"
    for name in ("train_spin.py", "generate.py", "sample.py"):
        assert name in found["shared model and data helpers"], name
