"""The top-level package: `import simclrv2` is cheap; `simclrv2.load_pretrained` is re-exported lazily."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simclrv2.checkpoint import write_model_file
from simclrv2.models import create_model


def test_import_simclrv2_does_not_import_torch() -> None:
    code = "import sys, simclrv2; assert 'torch' not in sys.modules and 'simclrv2.convert' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_simclrv2_import_load_pretrained(tmp_path: Path) -> None:
    from simclrv2 import load_pretrained
    from simclrv2.pretrained import load_pretrained as defined

    assert load_pretrained is defined
    model = create_model("r10_0.25x_sk0", in_chans=1, num_classes=3)
    path = tmp_path / "model.safetensors"
    write_model_file(path, model.state_dict(), {"model_name": model.name, "model_config": model.config})
    loaded = load_pretrained(path)
    assert loaded.name == "r10_0.25x_sk0" and not loaded.training
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], model.eval()(x)["logits"])


def test_unknown_attribute_is_an_attribute_error() -> None:
    import simclrv2

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        simclrv2.nope  # noqa: B018


def test_make_test_prints_the_pytest_summary_line(tmp_path: Path) -> None:
    """`make test` runs the Makefile's pytest command under pyproject's addopts; together they must
    leave the final "N passed, M skipped" line (twice -q hides it)."""
    root = Path(__file__).resolve().parents[1]
    recipe = re.search(r"^test:.*\n\t(.*)$", (root / "Makefile").read_text(), re.M)
    assert recipe is not None, "Makefile has no test target"
    command = recipe.group(1).split("#")[0].split()
    assert command[1:3] == ["-m", "pytest"], command
    (tmp_path / "test_tiny.py").write_text(
        "import pytest\n\ndef test_a():\n    pass\n\n@pytest.mark.skip\ndef test_b():\n    pass\n")
    out = subprocess.run([sys.executable, *command[1:], "-c", str(root / "pyproject.toml"), "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_tiny.py")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^1 passed, 1 skipped in ", out.stdout, re.M), out.stdout
