"""Packaging: every package folder is listed for the wheel, configs ship as data, imports stay clean."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "isthmus", "backends": "isthmus.backends", "plugins": "isthmus.plugins", "configs": "isthmus.configs"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    # setuptools does not discover packages under a custom package-dir mapping: a folder that is
    # not listed is silently missing from the wheel.
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found - listed == set(), f"add to pyproject packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but missing: {sorted(listed - found)}"


def test_configs_ship_as_package_data():
    root = resources.files("isthmus.configs")
    assert root.joinpath("defaults.yaml").is_file()
    for group in ("backend", "data", "train"):
        assert any(p.name.endswith(".yaml") for p in root.joinpath(group).iterdir()), group


def test_the_statistics_kernel_source_ships_as_package_data():
    """``isthmus.verify.native`` compiles ``moments.c`` on the user's machine: a wheel without it
    would fall back to numpy everywhere, silently."""
    import fnmatch
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch("moments.c", pattern) for pattern in declared.get("isthmus.verify", []))
    assert resources.files("isthmus.verify").joinpath("moments.c").is_file()


def test_each_built_in_model_ships_its_option_file_in_its_package():
    from isthmus.registry.manager import load_plugins

    registry = load_plugins(autoload=False)[1]
    for name in registry.names("model"):
        package = registry.model(name).factory.__module__.rsplit(".", 1)[0]
        assert resources.files(package).joinpath("configs", "model", f"{name}.yaml").is_file(), name


def test_no_source_imports_a_top_level_folder_by_name():
    pattern = re.compile(r"^\s*(from|import)\s+(core|backends|plugins|configs)(\.|\s|$)", re.MULTILINE)
    offenders = []
    for folder in ("core", "backends", "plugins", "tests", "bench", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_constraints_pin_the_tested_torch():
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0"
    from importlib import metadata

    assert metadata.version("torch").split("+")[0] == pins["torch"]
