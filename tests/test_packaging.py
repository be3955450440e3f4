"""Packaging: the core imports without the optional extras; the tested Lightning range is the pinned one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPTIONAL = ("wandb", "optuna", "sqlalchemy", "timm", "torch_ema")


def _requirement(name: str) -> Requirement:
    (req,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == name]
    return req


def test_core_imports_without_any_optional_extra():
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in OPTIONAL)  # `import m` now fails
    code = (
        f"import sys; {blocked}; "
        "import lightning_tricks.callbacks, lightning_tricks.recipes, lightning_tricks.datamodules, "
        "lightning_tricks.cli, lightning_tricks.ensemble; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_optional_packages_are_extras_and_dev_installs_them():
    core = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not core & {"wandb", "optuna", "timm", "torch-ema", "sqlalchemy"}
    assert {Requirement(r).name for r in extras["wandb"]} == {"wandb"}
    dev = [Requirement(r) for r in extras["dev"]]
    (itself,) = [r for r in dev if r.name == "lightning-tricks"]
    assert set(extras) - {"dev"} <= itself.extras  # dev pulls every other extra


def test_lightning_range_is_the_tested_one():
    spec = _requirement("lightning").specifier
    lowest = re.search(r"^LOWEST_LIGHTNING=(\S+)$", (ROOT / ".ci" / "run").read_text(), re.M).group(1)
    assert {s.operator for s in spec} == {">=", "<"}
    assert Version(next(s.version for s in spec if s.operator == ">=")) == Version(lowest)
    assert Version(lowest) in spec and Version(lightning.__version__) in spec
    assert Version("2.7.0") not in spec  # the next minor is untested until the CI matrix covers it
