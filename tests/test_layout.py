"""The layout's rules: core/ is one folder per concept; a model is named only inside its own
package; core/ reaches backends only through registered factories; the public API is a fixed,
documented list."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import isthmus
from isthmus.nn.model import Model
from isthmus.registry.manager import builtin_plugins, load_plugins

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "core"
MODELS = CORE / "models"


def sources(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def test_core_has_no_top_level_module_but_the_package_init_and_errors():
    assert sorted(p.name for p in CORE.glob("*.py")) == ["__init__.py", "errors.py"]
    assert all((folder / "__init__.py").is_file() for folder in CORE.iterdir() if folder.is_dir()
               and not folder.name.startswith("__"))


def model_words() -> dict[str, set[str]]:
    """Per built-in model package: its package name, the names it registers and the model classes
    its modules define."""
    registry = load_plugins(autoload=False)[1]
    words: dict[str, set[str]] = {}
    for module, plugin in builtin_plugins():
        if not module.startswith("isthmus.models."):
            continue
        found = {plugin, *(name for name, spec in registry.specs["model"].items() if spec.plugin == plugin)}
        for path in (MODELS / plugin).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "Model" for b in node.bases):
                    found.add(node.name)
        words[plugin] = found
    return words


def test_every_built_in_model_package_is_found_and_registers_a_model():
    words = model_words()
    assert {"captioner", "t2i"} <= set(words)
    assert all(len(found) >= 3 for found in words.values()), words  # package, model name, model class


def naming(words: set[str]) -> re.Pattern[str]:
    """Any of ``words`` as a whole word (a hyphenated name counts as one word)."""
    return re.compile(r"(?<![A-Za-z0-9_-])(" + "|".join(map(re.escape, sorted(words))) + r")(?![A-Za-z0-9_-])",
                      re.IGNORECASE)


def builds_on(path: Path, package: str) -> bool:
    """Whether a model package's module imports the model package ``package`` (a model built on
    another, as GLM-Image's generator is on the decoder family's blocks): a declared dependency."""
    if not path.is_relative_to(MODELS):
        return False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"isthmus.models.{package}"):
            return True
    return False


def test_no_module_outside_a_models_own_package_names_it():
    words = model_words()
    offenders = []
    for package, found in words.items():
        pattern = naming(found)
        for path in sources(CORE, ROOT / "backends", ROOT / "plugins"):
            if path.is_relative_to(MODELS / package) or builds_on(path, package):
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number} names {package}: {line.strip()}")
    assert offenders == []


def test_the_name_check_would_catch_a_model_named_outside_its_package(tmp_path):
    # The scan above, on a line that names the captioner from a general module.
    pattern = naming({"tiny-captioner", "TinyCaptioner"})
    assert pattern.search('if model.name == "tiny-captioner":')
    assert not pattern.search("a tiny-captioner-like model")  # a longer word is another word


def backend_imports(path: Path) -> list[str]:
    """Modules under ``isthmus.backends`` that ``path`` imports, by statement or by string."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("isthmus.backends")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("isthmus.backends"):
            found.append(node.module or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                r"isthmus\.backends(\.[a-z_]+)+", node.value):
            found.append(node.value)
    return found


def test_core_imports_no_backend_module():
    offenders = {str(p.relative_to(ROOT)): backend_imports(p) for p in sources(CORE) if backend_imports(p)}
    assert offenders == {}


def test_the_backend_import_check_sees_all_three_forms(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import isthmus.backends.torch.engine\nfrom isthmus.backends.cpu import torch\n"
                     "importlib.import_module('isthmus.backends.mindspore.distributed')\n")
    assert len(backend_imports(probe)) == 3


PUBLIC = [
    "BackendParts", "BackendRequest", "BackendSpec", "Capabilities", "CommandSpec", "ConfigError", "DataBase",
    "DataError", "DataSplits", "Dataset", "DatasetSpec", "Engine", "ExporterSpec", "IsthmusError", "KernelRoute",
    "KernelSet", "Kernels", "Model", "ModelBase", "ModelSpec", "ParamSpec", "ProbeResult", "Scope", "Trainer",
    "add_specs", "bounds", "compose", "get_registry", "hookimpl", "layers", "prepare", "restore",
]


def test_the_public_api_is_this_list():
    assert isthmus.__all__ == sorted(PUBLIC)


def test_each_public_name_resolves_and_has_its_own_docstring():
    for name in isthmus.__all__:
        value = getattr(isthmus, name)
        doc = inspect.getdoc(value)
        assert doc and len(doc.split()) >= 3, name
        defined = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        if defined.startswith("isthmus"):  # ours: documented where it is written, not inherited
            assert value.__doc__, name


def test_model_is_the_protocol_the_models_derive_from():
    assert isthmus.Model is Model
    assert all(hasattr(Model, part) for part in ("evaluate", "bind_data", "data_state", "generate", "export_checks"))


def test_importing_isthmus_and_its_public_names_imports_no_engine():
    code = ("import sys, isthmus; [getattr(isthmus, n) for n in isthmus.__all__]; "
            "print(sorted(m for m in ('torch', 'mindspore', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def called_on(path: Path, owner: str, parent: str | None = None) -> set[str]:
    """Attributes the code at ``path`` reads on anything named ``owner`` (``engine``,
    ``backend.engine``, ``self.run.model``...), or only on ``<parent>.<owner>`` when given."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            value = node.value
            base = value.id if isinstance(value, ast.Name) else value.attr if isinstance(value, ast.Attribute) else ""
            above = value.value if isinstance(value, ast.Attribute) else None
            above_name = above.id if isinstance(above, ast.Name) else above.attr if isinstance(above, ast.Attribute) else ""
            if base == owner and (parent is None or above_name == parent):
                names.add(node.attr)
    return names


def test_every_engine_and_model_member_the_trainer_uses_is_declared_in_its_protocol():
    from isthmus.data.splits import Dataset
    from isthmus.registry.backend import Engine

    trainer = CORE / "train" / "trainer.py"
    for owner, parent, protocol in (("engine", None, Engine), ("model", None, Model), ("train", "data", Dataset)):
        used = called_on(trainer, owner, parent)
        assert used, owner  # the scan found the trainer's calls
        annotated = {name for klass in protocol.__mro__ for name in getattr(klass, "__annotations__", {})}
        undeclared = sorted(name for name in used if not hasattr(protocol, name) and name not in annotated)
        assert undeclared == [], f"{owner}: {undeclared} are used by the trainer but not declared by {protocol.__name__}"
