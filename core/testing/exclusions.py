"""The exclusions file of the backend conformance kit (:mod:`isthmus.testing.plugin`).

A backend that does not support everything yet lists what it leaves out, with a reason, instead
of forking the suite (as Keras 3 backends do)::

    # isthmus-exclusions.yaml
    exclude:
      - op: conv2d                      # a kernel op (isthmus.kernels.interface.OPS), or an integration
        reason: no conv kernel on this device yet   # test: `training`, `checkpoint`, `training_vs_cpu`
      - op: attention
        cases: [attention-gqa, test_attention_4d_gqa]   # optional: only these case ids
        reason: grouped-query attention lands in 0.2
        skip: true                      # optional: do not even run (a kernel that hangs or crashes)
      - op: layer_norm
        kind: gradient                  # optional: only its gradient cases (or `forward`: only the others)
        reason: the fused backward rounds rstd to bfloat16

An excluded test still runs (unless ``skip: true``): a failure is reported as xfail with the
reason, a pass is counted so the summary can say the exclusion is no longer needed. An unknown op
is an error that names it and lists the valid ones. This module imports neither pytest nor an engine.
"""

from __future__ import annotations

import difflib

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

FILE_NAME = "isthmus-exclusions.yaml"
KIT_TESTS = ("training", "checkpoint", "training_vs_cpu")
"""Names for the kit's integration tests, excludable like ops."""
KINDS = ("forward", "gradient")
"""What an entry's ``kind`` may name: a kernel op's forward cases (values, the ONNX oracle, the
optimizer's steps) or its gradient cases; no kind covers both."""


class ExclusionsError(ValueError):
    """The exclusions file is malformed or names an unknown op; the message says where and what."""


@dataclass(frozen=True)
class Exclusion:
    """One entry: ``op`` (all its cases, or only ``cases``; of one ``kind`` or, when empty, of
    both), why, and whether to skip running it."""

    op: str
    reason: str
    cases: tuple[str, ...] = ()
    skip: bool = False
    kind: str = ""

    def covers(self, op: str, case_ids: Iterable[str] = (), kind: str | None = None) -> bool:
        """Whether this entry applies to ``op`` in a case known by any of ``case_ids``, of ``kind``."""
        return (op == self.op and (not self.cases or any(c in self.cases for c in case_ids))
                and (not self.kind or kind is None or kind == self.kind))


@dataclass
class Exclusions:
    """The entries of one file (``source`` is its path, or ``""`` when there is none)."""

    entries: list[Exclusion] = field(default_factory=list)
    source: str = ""

    def match(self, ops: Iterable[str], case_ids: Iterable[str] = (), kind: str | None = None) -> Exclusion | None:
        """The first entry covering any of ``ops`` in the case known by ``case_ids``, of ``kind``."""
        ids = tuple(case_ids)
        return next((e for op in ops for e in self.entries if e.covers(op, ids, kind)), None)


def valid_ops() -> tuple[str, ...]:
    """Kernel ops, then the kit's integration tests: what an entry's ``op`` may name."""
    from isthmus.kernels.interface import OPS

    return (*OPS, *KIT_TESTS)


def parse(data: Any, source: str = "") -> Exclusions:
    """Validate the loaded YAML ``data``; raise :class:`ExclusionsError` listing every problem."""
    where = source or "exclusions"
    if data is None:
        return Exclusions([], source)
    if not isinstance(data, dict) or set(data) - {"exclude"}:
        raise ExclusionsError(f"{where}: expected a mapping with one key 'exclude' (a list of entries)")
    raw = data.get("exclude") or []
    if not isinstance(raw, list):
        raise ExclusionsError(f"{where}: 'exclude' must be a list of entries, got {type(raw).__name__}")
    ops = valid_ops()
    problems, entries = [], []
    for index, item in enumerate(raw):
        at = f"{where}: exclude[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{at}: expected a mapping with 'op' and 'reason'")
            continue
        unknown_keys = set(item) - {"op", "reason", "cases", "skip", "kind"}
        if unknown_keys:
            problems.append(f"{at}: unknown keys {sorted(unknown_keys)}; valid: op, reason, cases, skip, kind")
        op, reason = str(item.get("op", "")), str(item.get("reason") or "").strip()
        if op not in ops:
            close = difflib.get_close_matches(op, ops, n=1)
            did_you_mean = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{at}: unknown op '{op}'{did_you_mean}; valid: {', '.join(ops)}")
        if not reason:
            problems.append(f"{at}: op '{op}' needs a 'reason'")
        cases = item.get("cases") or []
        if not isinstance(cases, list):
            problems.append(f"{at}: 'cases' must be a list of case ids")
            cases = []
        kind = str(item.get("kind") or "")
        if kind and kind not in KINDS:
            problems.append(f"{at}: kind '{kind}' is not one of {', '.join(KINDS)} (leave it out for both)")
        elif kind and op in KIT_TESTS:
            problems.append(f"{at}: kind applies to kernel ops; '{op}' is an integration test")
        entries.append(Exclusion(op, reason, tuple(str(c) for c in cases), bool(item.get("skip", False)), kind))
    if problems:
        raise ExclusionsError("\n".join(problems))
    return Exclusions(entries, source)


def load(path: str | Path | None, search: Iterable[Path] = ()) -> Exclusions:
    """Read ``path``, or the first ``isthmus-exclusions.yaml`` in ``search``; none: no exclusions."""
    import yaml

    if path is None:
        path = next((d / FILE_NAME for d in search if (d / FILE_NAME).is_file()), None)
        if path is None:
            return Exclusions()
    path = Path(path)
    if not path.is_file():
        raise ExclusionsError(f"--isthmus-exclusions: no file at {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ExclusionsError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    return parse(data, str(path))
