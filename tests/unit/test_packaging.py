"""pyproject.toml ships every package and config folder, and installs beside a user's own torch."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_and_config_folder_is_in_the_wheel():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mmpretrain").rglob("__init__.py")}
    conf = {
        ".".join(("mmpretrain", *d.relative_to(ROOT).parts))
        for d in [ROOT / "conf", *(ROOT / "conf").rglob("*")]
        if d.is_dir() and any(f.suffix in (".yaml", ".json") for f in d.iterdir())
    }
    assert code | conf <= listed, f"add to [tool.setuptools] packages: {sorted((code | conf) - listed)}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"mmpretrain.conf": "conf"}


def test_core_dependencies_are_ranges_and_the_exact_torch_is_a_constraint():
    deps = PYPROJECT["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
    assert "pytest" not in names, "pytest is a test extra, not a runtime dependency"
    assert not [d for d in deps if "==" in d], "exact pins belong in scripts/constraints.txt"
    pins = (ROOT / "scripts" / "constraints.txt").read_text()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    assert "-c scripts/constraints.txt" in (ROOT / "Makefile").read_text()
