"""Contract tests against the real torch_npu package: every torch_npu call in our code binds.

The torch_npu wheel that pairs with our torch (2.13.0) is downloaded once (``pip download
--no-deps``, cached under ``.cache/torch_npu/``, never installed: without CANN its import breaks)
or taken from ``ISTHMUS_TORCH_NPU_WHEEL``. From it the tests read

* the operator schemas, ``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``, turned into
  the schemas torch_npu registers with the published rule of its code generator
  (``torchnpugen/custom_functions.py``, ``RegisterCustomSchema``: several out arguments become one
  keyword ``Tensor[] out``; ``self`` is renamed ``input``), cross-checked against the schema
  strings compiled into ``torch_npu/lib/libtorch_npu.so``;
* the Python sources, for the non-operator attributes we use (``torch_npu.npu.device_count``).

Our source (``backends/``, ``plugins/``, ``core/``) is scanned with ``ast`` for every
``torch_npu.<name>`` and ``torch.ops.npu.<name>`` reference, so a new call cannot escape: each call
must bind to an overload (positional count, keyword names, keyword-only arguments, required ones,
obvious literal types) and, where the caller unpacks or indexes the result, match its arity.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("backends", "plugins", "core")
TORCH_NPU_VERSION = "2.13.0"  # the torch_npu release paired with torch 2.13
CACHE = REPO / ".cache" / "torch_npu"
WHEEL_ENV = "ISTHMUS_TORCH_NPU_WHEEL"
SCHEMA_FILE = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
LIBRARY = "torch_npu/lib/libtorch_npu.so"

# Attributes that are not operators and cannot be resolved by reading module top levels, with the
# file and text in the wheel that shows them, and why they are dynamic.
PYTHON_LEVEL = {
    "torch_npu.npu.matmul.allow_hf32": (
        "torch_npu/npu/npu_config.py", 'option = {"ALLOW_MATMUL_HF32"',
        "torch_npu.npu.matmul is an _allowHF32Matmul instance; allow_hf32 is handled by its __setattr__"),
    "torch_npu.npu.conv.allow_hf32": (
        "torch_npu/npu/npu_config.py", 'option = {"ALLOW_CONV_HF32"',
        "torch_npu.npu.conv is an _allowHF32Conv instance; allow_hf32 is handled by its __setattr__"),
}


# ------------------------------------------------------------------------------ the wheel
@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    given = os.environ.get(WHEEL_ENV)
    if given:
        if not Path(given).is_file():
            pytest.fail(f"{WHEEL_ENV}={given}: no such file")
        return zipfile.ZipFile(given)
    found = sorted(glob.glob(str(CACHE / f"torch_npu-{TORCH_NPU_VERSION}-*.whl")))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               f"torch-npu=={TORCH_NPU_VERSION}", "-d", str(CACHE)],
                              capture_output=True, text=True, timeout=600)
        found = sorted(glob.glob(str(CACHE / f"torch_npu-{TORCH_NPU_VERSION}-*.whl")))
        if done.returncode != 0 or not found:
            said = " ".join((done.stderr or done.stdout).split())[-400:]
            pytest.fail(f"could not download torch-npu=={TORCH_NPU_VERSION} (pip exit {done.returncode}: {said}); "
                        f"the contract cannot be checked offline: download the wheel elsewhere and set "
                        f"{WHEEL_ENV}=/path/to/torch_npu-{TORCH_NPU_VERSION}-<tag>.whl")
    return zipfile.ZipFile(found[-1])


# ------------------------------------------------------------------------------ schemas
@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None
    kwonly: bool


@dataclass(frozen=True)
class Schema:
    name: str
    overload: str
    params: tuple[Param, ...]
    returns: int

    def __str__(self) -> str:
        return f"{self.name}{'.' + self.overload if self.overload else ''}({', '.join(p.name for p in self.params)})"


def split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_schema(text: str) -> Schema:
    match = re.fullmatch(r"\s*([\w.]+)\((.*)\) -> (.*)", text.strip(), re.S)
    assert match, f"not a schema: {text!r}"
    full, args, ret = match.groups()
    name, _, overload = full.partition(".")
    params, kwonly = [], False
    for piece in split_top(args):
        if piece == "*":
            kwonly = True
            continue
        decl, eq, default = piece.partition("=")
        kind, pname = decl.strip().rsplit(" ", 1)
        params.append(Param(pname, kind, default.strip() if eq else None, kwonly))
    ret = ret.strip()
    returns = 0 if ret == "()" else len(split_top(ret[1:-1])) if ret.startswith("(") else 1
    return Schema(name, overload, tuple(params), returns)


def registered(schema: Schema) -> Schema:
    """The schema torch_npu registers for a yaml entry (torchnpugen's RegisterCustomSchema)."""
    outs = [p for p in schema.params if p.kwonly and "!" in p.type]
    params, returns = list(schema.params), schema.returns
    if len(outs) > 1:
        params = [p for p in params if p not in outs] + [Param("out", "Tensor[]", None, True)]
        returns = len(outs)
    params = [replace(p, name="input") if p.name == "self" else p for p in params]
    return Schema(schema.name, schema.overload, tuple(params), returns)


@pytest.fixture(scope="module")
def schemas(wheel) -> dict[str, list[Schema]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load(wheel.read(SCHEMA_FILE), Loader=loader)
    found: dict[str, list[Schema]] = {}
    for section in doc.values():
        for entry in section if isinstance(section, list) else []:
            func = entry.get("func") if isinstance(entry, dict) else None
            if func and "(" in func:
                schema = registered(parse_schema(func))
                found.setdefault(schema.name, []).append(schema)
    assert len(found) > 300, f"only {len(found)} operators parsed from {SCHEMA_FILE}"
    return found


# ------------------------------------------------------------------------------ our source
@dataclass
class Reference:
    where: str
    chain: tuple[str, ...]
    call: ast.Call | None = None
    unpack: int | None = None  # number of targets the result is unpacked into
    starred: bool = False
    index: int | None = None  # constant subscript applied to the result

    @property
    def op(self) -> str | None:
        if self.chain[:3] == ("torch", "ops", "npu") and len(self.chain) > 3:
            return self.chain[3]
        if self.chain[0] == "torch_npu" and len(self.chain) == 2:
            return self.chain[1]
        return None


def _chain(node: ast.AST) -> tuple[str, ...] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return (node.id, *reversed(names)) if isinstance(node, ast.Name) else None


def scan(source: str, where: str) -> tuple[list[Reference], list[str]]:
    """Every torch_npu reference in ``source``, and the ways of hiding one (which are refused)."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    refs, problems = [], []
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            problems += [f"{line}: `import {a.name} as {a.asname}` hides calls from this test; use `import torch_npu`"
                         for a in node.names if a.name.split(".")[0] == "torch_npu" and a.asname]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch_npu":
            problems.append(f"{line}: `from {node.module} import ...` hides calls from this test; "
                            f"use `torch_npu.<name>`")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and node.args and _chain(node.args[0]) in (("torch_npu",), ("torch", "ops", "npu")):
            problems.append(f"{line}: getattr on torch_npu hides the symbol from this test")
        if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
            continue
        chain = _chain(node)
        if chain is None:
            continue
        if chain[:2] == ("torch", "npu"):
            chain = ("torch_npu", *chain[1:])
        if chain[0] != "torch_npu" and chain[:3] != ("torch", "ops", "npu"):
            continue
        ref = Reference(line, chain)
        parent = parents.get(node)
        if isinstance(parent, ast.Call) and parent.func is node:
            ref.call = parent
            holder = parents.get(parent)
            if isinstance(holder, ast.Assign) and holder.value is parent \
                    and isinstance(holder.targets[0], (ast.Tuple, ast.List)):
                elts = holder.targets[0].elts
                ref.unpack, ref.starred = len(elts), any(isinstance(e, ast.Starred) for e in elts)
            elif isinstance(holder, ast.Subscript) and holder.value is parent \
                    and isinstance(holder.slice, ast.Constant):
                ref.index = holder.slice.value
        refs.append(ref)
    return refs, problems


def our_references() -> tuple[list[Reference], list[str]]:
    refs, problems = [], []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            found, bad = scan(path.read_text(), str(path.relative_to(REPO)))
            refs += found
            problems += bad
    return refs, problems


# ------------------------------------------------------------------------------ binding
_LITERAL_TYPES = {str: ("str",), bool: ("bool",), int: ("int", "SymInt", "float", "Scalar"),
                  float: ("float", "Scalar")}


def bind(call: ast.Call, schema: Schema) -> str:
    """'' when ``call`` binds to ``schema`` the way torch's overload resolution does, else why not."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return "uses *args or **kwargs, which this test cannot check: spell the arguments out"
    positional = [p for p in schema.params if not p.kwonly]
    if len(call.args) > len(positional):
        extra = [p.name for p in schema.params[len(positional):len(call.args)] if p.kwonly]
        why = f" ({', '.join(extra)} keyword-only)" if extra else ""
        return f"{len(call.args)} positional arguments, at most {len(positional)}{why}"
    given: dict[str, ast.expr] = {p.name: a for p, a in zip(positional, call.args)}
    names = {p.name: p for p in schema.params}
    for keyword in call.keywords:
        if keyword.arg not in names:
            return f"unknown keyword '{keyword.arg}'"
        if keyword.arg in given:
            return f"'{keyword.arg}' given twice"
        given[keyword.arg] = keyword.value
    missing = [p.name for p in schema.params if p.default is None and p.name not in given]
    if missing:
        return f"missing required {', '.join(missing)}"
    for pname, value in given.items():
        kind = names[pname].type
        if isinstance(value, ast.Constant):
            if value.value is None and not kind.endswith("?"):
                return f"None for non-optional '{pname}' ({kind})"
            allowed = _LITERAL_TYPES.get(type(value.value))
            if allowed and kind.rstrip("?") not in allowed:
                return f"{type(value.value).__name__} literal for '{pname}' ({kind})"
    return ""


def problems_of(ref: Reference, schemas: dict[str, list[Schema]]) -> list[str]:
    overloads = schemas.get(ref.op or "", [])
    if ref.chain[:3] == ("torch", "ops", "npu") and len(ref.chain) > 4 and ref.chain[4] != "default":
        overloads = [s for s in overloads if s.overload == ref.chain[4]]
    if not overloads:
        return [f"{ref.where}: {'.'.join(ref.chain)} is not a torch_npu {TORCH_NPU_VERSION} operator"]
    binding = [s for s in overloads if not bind(ref.call, s)]
    if not binding:
        reasons = "; ".join(f"{s}: {bind(ref.call, s)}" for s in overloads)
        return [f"{ref.where}: {'.'.join(ref.chain)}(...) binds to no overload: {reasons}"]
    out = []
    for s in binding:
        if ref.unpack is not None and (s.returns < ref.unpack - 1 if ref.starred else s.returns != ref.unpack):
            out.append(f"{ref.where}: unpacks {ref.unpack} values, {s} returns {s.returns}")
        if isinstance(ref.index, int) and not -s.returns <= ref.index < s.returns:
            out.append(f"{ref.where}: takes [{ref.index}] of {s}, which returns {s.returns}")
    return out


def python_symbol_problem(chain: tuple[str, ...], wheel: zipfile.ZipFile) -> str:
    """'' when ``torch_npu.a.b`` is a module of the wheel or a name bound at a module's top level."""
    dotted = ".".join(chain)
    files = set(wheel.namelist())
    for cut in range(len(chain), 0, -1):
        base = "/".join(chain[:cut])
        module = next((f for f in (f"{base}/__init__.py", f"{base}.py") if f in files), None)
        if module:
            break
    rest = chain[cut:]
    if not rest:
        return ""
    tree = ast.parse(wheel.read(module))
    bound = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                bound.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    if rest[0] not in bound:
        return f"{dotted}: '{rest[0]}' is not defined at the top level of {module}"
    if len(rest) == 1:
        return ""
    if dotted not in PYTHON_LEVEL:
        return f"{dotted}: a dynamic attribute of {'.'.join(chain[:cut + 1])}; document it in PYTHON_LEVEL"
    path, evidence, _ = PYTHON_LEVEL[dotted]
    return "" if evidence in wheel.read(path).decode() else f"{dotted}: {evidence!r} no longer in {path}"


# ------------------------------------------------------------------------------ the tests
def test_every_torch_npu_call_binds_to_the_published_schema(schemas):
    refs, hidden = our_references()
    calls = [r for r in refs if r.call is not None and r.op is not None]
    assert {r.op for r in calls} >= {"npu_fusion_attention", "npu_rms_norm", "npu_rotary_mul", "npu_apply_adam_w"}
    problems = [p for r in calls for p in problems_of(r, schemas)]
    assert not hidden + problems, "\n".join(hidden + problems)


def test_every_other_torch_npu_symbol_exists_in_the_wheel(wheel, schemas):
    refs, _ = our_references()
    others = {r.chain: r.where for r in refs if r.call is None or r.op is None}
    problems = []
    for chain, where in sorted(others.items()):
        if chain[0] == "torch_npu" and len(chain) == 2 and chain[1] in schemas:
            problems.append(f"{where}: {'.'.join(chain)} is an operator used without a call: call it directly")
        elif chain[0] == "torch_npu":
            problem = python_symbol_problem(chain, wheel)
            if problem:
                problems.append(f"{where}: {problem}")
    assert not problems, "\n".join(problems)
    assert ("torch_npu", "npu", "device_count") in others  # the scan sees attribute uses, not only calls


def test_the_registration_rule_matches_the_compiled_schemas(wheel, schemas):
    # The yaml is the generator's input; the library holds what is registered. For every operator
    # we call, both must agree once the published rule is applied.
    library = wheel.read(LIBRARY)
    refs, _ = our_references()
    for op in sorted({r.op for r in refs if r.call is not None and r.op}):
        compiled = []
        for head in (f"\x00{op}(".encode(), f"\x00{op}.".encode()):
            start = library.find(head)
            while start != -1:
                end = library.index(b"\x00", start + 1)
                text = library[start + 1:end].decode(errors="replace")
                if ") -> " in text and re.fullmatch(rf"{op}(\.\w+)?\(.*", text, re.S):
                    compiled.append(parse_schema(text))
                start = library.find(head, end)
        assert compiled, f"no compiled schema for {op} in {LIBRARY}"
        assert sorted(map(repr, compiled)) == sorted(map(repr, schemas[op])), op


@pytest.mark.parametrize("source, expected", [
    ("torch_npu.npu_rms_norm(x, g, 1e-6, 3)", "at most 3"),
    ("torch_npu.npu_rms_norm(x, g, eps=1e-6)", "unknown keyword 'eps'"),
    ("torch_npu.npu_rms_norm(x)", "missing required gamma"),
    ("torch_npu.npu_rms_norm(x, g, epsilon='big')", "str literal"),
    ("torch_npu.npu_apply_adam_w(1, 1, 1, 0, .9, .9, 1e-8, g, None, False, False, (p, m, v))",
     "positional arguments, at most 11 (out keyword-only)"),
    ("torch_npu.npu_apply_adam_w(1, 1, 1, 0, .9, .9, 1e-8, g, False, False, out=(p, m, v))",
     "missing required maximize"),
    ("torch_npu.npu_apply_adam_w(1, 1, 1, 0, .9, .9, 1e-8, g, None, False, False, var=p, m=m, v=v)",
     "unknown keyword 'var'"),
    ("y, rstd, extra = torch_npu.npu_rms_norm(x, g)", "unpacks 3 values"),
    ("y = torch_npu.npu_rotary_mul(x, c, s)[1]", "takes [1]"),
    ("torch_npu.npu_fusion_attention(q, k, v, 2, 'BNSD', scale=None)", "None for non-optional 'scale'"),
    ("torch_npu.npu_no_such_op(x)", "not a torch_npu"),
    ("from torch_npu import npu_rms_norm", "hides calls"),
    ("import torch_npu as tnpu", "hides calls"),
])
def test_the_checker_refuses_calls_that_do_not_bind(schemas, source, expected):
    refs, hidden = scan(source, "<case>")
    problems = hidden + [p for r in refs if r.call is not None for p in problems_of(r, schemas)]
    assert any(expected in p for p in problems), problems


def test_the_checker_accepts_the_documented_calls(schemas):
    source = """
y, rstd = torch_npu.npu_rms_norm(x, gamma, epsilon=1e-5)
out = torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode='interleave')
a, b, c = torch_npu.npu_apply_adam_w(1.0, 1.0, 1e-3, 0.01, 0.9, 0.999, 1e-8, g, None, False, False, out=(p, m, v))
o = torch_npu.npu_fusion_attention(q, k, v, 4, 'BNSD', atten_mask=mask, scale=0.125, sparse_mode=2)[0]
"""
    refs, hidden = scan(source, "<documented>")
    assert not hidden and len(refs) == 4
    assert [p for r in refs for p in problems_of(r, schemas)] == []
