"""The backend conformance kit, a pytest plugin (entry point group ``pytest11``, name ``isthmus``).

A third-party backend package runs::

    pytest --isthmus-backend=NAME [--isthmus-engine=E] [--isthmus-exclusions=PATH] [--isthmus-quick]

and its session gets the kit's tests, collected under the node ``isthmus-kit``: every kernel
conformance case under float32 and bfloat16 (where the backend's capabilities list the dtype)
against the float64 reference, the optimizer's steps among them; every gradient case
(:mod:`isthmus.verify.gradients`: the backend's vector-Jacobian products against float64 finite
differences of the reference); every mapped ONNX operator test case; a training smoke test of
the default model at its smoke size (``ModelSpec.smoke``) through the real trainer (loss finite
and falling); a checkpoint round trip (save, load, resume one step: weights identical to an
uninterrupted step); and a few training steps against the same steps on ``cpu``, within a stated
band. The tests live in :mod:`isthmus.testing.suite`. Without ``--isthmus-backend`` the plugin does
nothing.

An exclusions file (:mod:`isthmus.testing.exclusions`) turns known gaps into xfails with their
reason; the terminal summary lists them, also under pytest-xdist (``-n N``), whose workers hand
what they recorded to the controller. A ``conftest.py`` may add in-process isthmus plugins
(a backend under development, before it has an entry point) with the hook
``pytest_isthmus_plugins(config)``, returning ``[(name, plugin), ...]``.

With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` load it with ``-p isthmus.testing.plugin``. Module level
imports only pytest: the plugin loads in every pytest session of an environment that has isthmus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

KIT_NODE = "isthmus-kit"


class _Hooks:
    """Hook specifications the kit adds to pytest."""

    @pytest.hookspec(firstresult=False)
    def pytest_isthmus_plugins(self, config: pytest.Config) -> list[tuple[str, Any]]:
        """Return ``(name, plugin)`` pairs to register in-process with isthmus for the kit's run."""


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(_Hooks)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isthmus", "isthmus backend conformance kit")
    group.addoption("--isthmus-backend", metavar="NAME", default=None,
                    help="run the isthmus conformance kit against backend NAME")
    group.addoption("--isthmus-engine", metavar="ENGINE", default=None,
                    help="engine of that backend (default: the backend's default engine)")
    group.addoption("--isthmus-exclusions", metavar="PATH", default=None,
                    help="exclusions file (default: isthmus-exclusions.yaml in the rootdir or rootdir/tests)")
    group.addoption("--isthmus-quick", action="store_true", default=False,
                    help="a fast subset: float32 only, one conformance, one gradient and one ONNX case per op")


@dataclass
class Kit:
    """The kit's state for one session: the chosen backend, its exclusions, what they excused."""

    config: pytest.Config
    name: str
    engine: str | None
    quick: bool
    exclusions: Any
    excused: list[tuple[str, Any, str]] = field(default_factory=list)  # (test id, entry, reason)
    unneeded: set[tuple[Any, str]] = field(default_factory=set)  # (entry, test id) passing while excluded
    skipped_dtypes: list[str] = field(default_factory=list)
    _built: Any = None

    def plugins(self) -> list[tuple[str, Any]]:
        """In-process isthmus plugins contributed by ``pytest_isthmus_plugins`` hooks."""
        return [pair for pairs in self.config.hook.pytest_isthmus_plugins(config=self.config) for pair in pairs or []]

    def build(self) -> tuple[Any, Any, Any]:
        """``(manager, registry, backend)``, built once; a backend that is not usable is a usage error."""
        if self._built is None:
            from isthmus.errors import IsthmusError
            from isthmus.registry.manager import load_plugins
            from isthmus.registry.selection import build, select

            manager, registry = load_plugins(extra=self.plugins())
            try:
                selection = select(registry, self.name, self.engine, strict=self.engine is not None)
                backend = build(registry, selection)
            except (IsthmusError, KeyError, ValueError) as error:
                broken = [f"plugin '{r.name}' failed to load: {r.error}" for r in registry.plugins.values() if r.error]
                raise pytest.UsageError("; ".join([f"--isthmus-backend={self.name}: {error}", *broken])) from None
            self._built = (manager, registry, backend)
        return self._built

    def dtypes(self) -> list[str]:
        """The suite's dtypes that the backend's capabilities list (float32 only when quick)."""
        offered = self.build()[2].capabilities.dtypes
        wanted = ("float32",) if self.quick else ("float32", "bfloat16")
        self.skipped_dtypes = [d for d in wanted if d not in offered]
        return [d for d in wanted if d in offered]

    def excused_failure(self, test_id: str, ops: list[str], case_ids: list[str], kind: str | None = None) -> Any:
        """The exclusion covering a failure of ``ops`` (cases of ``kind``), recorded for the summary
        (or ``None``)."""
        entry = self.exclusions.match(ops, case_ids, kind)
        if entry is not None:
            self.excused.append((test_id, entry, entry.reason))
        return entry

    def note_pass(self, test_id: str, ops: list[str], case_ids: list[str], kind: str | None = None) -> None:
        """Remember a passing test that an exclusion covers: that entry may be stale."""
        entry = self.exclusions.match(ops, case_ids, kind)
        if entry is not None:
            self.unneeded.add((entry, test_id))


KIT_KEY = pytest.StashKey[Kit]()


def get_kit(config: pytest.Config) -> Kit | None:
    """The kit of this session, or ``None`` when ``--isthmus-backend`` was not given."""
    return config.stash.get(KIT_KEY, None)


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("isthmus_backend", None)
    if not name:
        return
    from isthmus.testing.exclusions import ExclusionsError, load

    root = Path(config.rootpath)
    try:
        exclusions = load(config.getoption("isthmus_exclusions"), [root, root / "tests"])
    except ExclusionsError as error:
        raise pytest.UsageError(f"isthmus exclusions: {error}") from None
    config.stash[KIT_KEY] = Kit(config, name, config.getoption("isthmus_engine"),
                                bool(config.getoption("isthmus_quick")), exclusions)


class _KitModule(pytest.Module):
    """The suite module, taken from ``sys.modules`` by its package name, never imported by path."""

    def _getobj(self) -> Any:
        from isthmus.testing import suite as testing_suite

        return testing_suite


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Add the kit's tests first in the hook chain, so ``-k``/``-m`` deselection sees them."""
    if get_kit(config) is None:
        return
    from isthmus.testing import suite as testing_suite

    module = _KitModule.from_parent(session, path=Path(testing_suite.__file__), nodeid=KIT_NODE)
    items.extend(session.genitems(module))


def pytest_report_header(config: pytest.Config) -> str | None:
    kit = get_kit(config)
    if kit is None:
        return None
    source = kit.exclusions.source or "none"
    return (f"isthmus kit: backend {kit.name}, engine {kit.engine or 'default'}, "
            f"exclusions {source}{', quick' if kit.quick else ''}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist a worker hands what its tests recorded to the controller, which prints
    the summary; entries travel as their index in the exclusions file."""
    kit, output = get_kit(session.config), getattr(session.config, "workeroutput", None)
    if kit is None or output is None:
        return
    index = {id(entry): i for i, entry in enumerate(kit.exclusions.entries)}
    output["isthmus_kit"] = {
        "excused": [(test_id, index[id(entry)], reason) for test_id, entry, reason in kit.excused],
        "unneeded": [(index[id(entry)], test_id) for entry, test_id in kit.unneeded],
        "skipped_dtypes": list(kit.skipped_dtypes),
    }


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    kit = get_kit(node.config)
    shared = (getattr(node, "workeroutput", None) or {}).get("isthmus_kit")
    if kit is None or not shared:
        return
    entries = kit.exclusions.entries
    kit.excused.extend((test_id, entries[i], reason) for test_id, i, reason in shared["excused"])
    kit.unneeded.update((entries[i], test_id) for i, test_id in shared["unneeded"])
    kit.skipped_dtypes += [d for d in shared["skipped_dtypes"] if d not in kit.skipped_dtypes]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The exclusions: each entry, the failures it excused, and entries that were not needed."""
    kit = get_kit(config)
    if kit is None:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("-", f"isthmus kit: {kit.name} exclusions")
    if kit.skipped_dtypes:
        write(f"not run: {', '.join(kit.skipped_dtypes)} (not in the backend's capabilities)")
    if not kit.exclusions.entries:
        write(f"no exclusions ({kit.exclusions.source or 'no exclusions file'})")
        return
    write(f"{len(kit.exclusions.entries)} entries from {kit.exclusions.source}")
    for entry in kit.exclusions.entries:
        excused = sum(e is entry for _, e, _ in kit.excused)
        passing = sum(e is entry for e, _ in kit.unneeded)
        scope = (f" ({entry.kind} cases)" if entry.kind else "") + (f" cases {', '.join(entry.cases)}" if entry.cases else "")
        mode = "not run" if entry.skip else f"excused {excused} failing, {passing} passing anyway"
        write(f"  {entry.op}{scope}: {entry.reason} ({mode})")
