"""Checkpoints any engine can read: safetensors under canonical names plus a JSON sidecar, no pickle.

``<run_dir>/checkpoints/step-00000100/`` holds ``model.safetensors`` (dotted parameter names),
``optimizer.safetensors`` (``<param name>.exp_avg``, ...) and ``state.json`` (format version, step,
model name, config, engine and versions, optimizer scalars, RNG states, data position, and for each
tensor file its size, SHA-256 and ``{name: shape, dtype}``). ``checkpoints/latest`` is a one-line
text file naming the newest complete checkpoint. Only numpy arrays come in and out: engines convert.
bfloat16 and float8 are ``ml_dtypes`` arrays stored as safetensors' native BF16 / F8 tags, so
``safetensors.torch`` reads the same file as ``torch.bfloat16``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors
import safetensors.numpy

from isthmus import __version__
from isthmus.train import atomic, sidecar
from isthmus.train.sidecar import CheckpointError

__all__ = ["CheckpointError", "check_fit", "CheckpointState", "Loaded", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "list_checkpoints", "load_sharded_state", "locate", "read_manifest", "read_state",
           "resolve", "FORMAT_VERSION", "MODEL_FILE"]

FORMAT = "isthmus-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
SHARDED = "sharded"  # the sidecar's files entry of a checkpoint written by every rank of distributed=fsdp
_STEP_DIR = re.compile(r"^step-(\d+)$")

# numpy dtype name -> safetensors tag; ml_dtypes is imported only when such a tensor is loaded.
_DTYPE_TAGS = {"bool": "BOOL", "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16",
               "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16",
               "float32": "F32", "float64": "F64", "complex64": "C64", "bfloat16": "BF16",
               "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_TAG_DTYPES = {tag: name for name, tag in _DTYPE_TAGS.items()}
_ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}
_MISSING = object()


@dataclass
class CheckpointState:
    """Everything besides tensors that a resume needs, all JSON-able: ``optimizer`` scalars (step
    count, loss scale), ``rng`` states (bytes as base64 text), ``data_position``. On save ``versions``
    gains the isthmus, numpy and safetensors versions where absent."""

    step: int
    model_name: str
    config: dict = field(default_factory=dict)
    engine: str = ""
    versions: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    data_position: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class Loaded:
    """A verified checkpoint: numpy tensors in the order they were saved, and the sidecar state."""

    params: dict[str, np.ndarray]
    optimizer_tensors: dict[str, np.ndarray]
    state: CheckpointState
    path: Path


def save_checkpoint(run_dir: str | os.PathLike, params: Mapping[str, np.ndarray],
                    optimizer_tensors: Mapping[str, np.ndarray], state: CheckpointState,
                    keep_last: int | None = 3, model_writer: Callable[[Path], dict] | None = None,
                    shard_writer: Callable[[Path], dict] | None = None) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>/`` atomically, point ``latest`` at it and keep the
    ``keep_last`` newest checkpoints by step (None keeps all). Returns the checkpoint directory.

    ``model_writer(path)``, when given, writes ``model.safetensors`` at ``path`` itself (a stream
    too large to hold, from :mod:`isthmus.interop`) instead of ``params``, and returns its manifest
    entry ``{"bytes", "sha256", "tensors": {name: {"shape", "dtype"}}}``.

    ``shard_writer(path)``, when given, has every rank of a sharded run write its shards into the
    temporary checkpoint directory ``path`` (``params`` and ``optimizer_tensors`` are then empty) and
    returns the sidecar's ``files`` (``{"sharded": {"format", "dir", "world_size", "tensors"}}``): a
    sharded checkpoint, which sharded training resumes on any number of ranks and ``isthmus convert``
    consolidates. A rank killed while writing leaves the temporary directory, never a checkpoint.

    The directory is built under a hidden temporary name, every file and directory fsynced, then
    renamed into place; a crash or an ``OSError`` at any point leaves the previous checkpoint as the
    one loaded. Raises :class:`CheckpointError` saying what failed and that the previous one is intact.
    """
    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
    step = int(state.step)
    if step < 0:
        raise CheckpointError(f"cannot save checkpoint: step must be >= 0, got {step}")
    # Everything is encoded before the disk is touched, so bad input cannot leave files behind.
    blobs = {MODEL_FILE: _encode(params, "parameter", step),
             OPTIMIZER_FILE: _encode(optimizer_tensors, "optimizer tensor", step)}
    if model_writer is not None:
        del blobs[MODEL_FILE]
    if shard_writer is not None:
        blobs = {}
    sidecar = _encode_state(state, step, {name: info for name, (_, info) in blobs.items()}) \
        if model_writer is None and shard_writer is None else b""

    ckdir = Path(run_dir) / CHECKPOINTS_DIR
    final = ckdir / f"step-{step:08d}"
    tmp, aside = atomic.temp_name(final), atomic.temp_name(final, ".old")
    previous = latest_checkpoint(ckdir) if ckdir.is_dir() else None
    doing = f"creating {ckdir}"
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        atomic.fsync_dir(ckdir.parent)  # a new checkpoints/ must itself survive a power cut
        for entry in ckdir.iterdir():
            if atomic.is_stale_temp(entry):  # left by a crashed or failed save
                atomic.remove_tree(entry)
        doing = f"creating {tmp.name}"
        tmp.mkdir()
        for name, (data, _) in blobs.items():
            doing = f"writing {name}"
            atomic.write_bytes(tmp / name, data)
        if model_writer is not None:
            doing = f"writing {MODEL_FILE}"
            files = {MODEL_FILE: model_writer(tmp / MODEL_FILE), OPTIMIZER_FILE: blobs[OPTIMIZER_FILE][1]}
            sidecar = _encode_state(state, step, files)
        if shard_writer is not None:
            doing = "writing the shards"
            sidecar = _encode_state(state, step, shard_writer(tmp))
        doing = f"writing {STATE_FILE}"
        atomic.write_bytes(tmp / STATE_FILE, sidecar)
        doing = f"flushing {tmp.name}"
        atomic.fsync_dir(tmp)
        if final.exists():
            # Re-saving a step after resuming from an older one: a directory cannot replace a non-empty
            # one, so the old steps aside; until the rename, loading falls back to an older checkpoint.
            doing = f"moving the old {final.name} aside"
            atomic.rename(final, aside)
        doing = f"renaming {tmp.name} to {final.name}"
        atomic.rename(tmp, final)
        atomic.remove_tree(aside)
    except BaseException as err:
        atomic.remove_tree(tmp)
        if aside.exists() and not final.exists():  # a re-saved step: put its old version back
            os.replace(aside, final)
        if not isinstance(err, OSError):
            raise
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint existed"
        left = f"; could not remove {tmp}, loading ignores it" if tmp.exists() else ""
        raise CheckpointError(f"could not write checkpoint {final}: {atomic.describe_os_error(err)} "
                              f"while {doing}; {kept}{left}") from err

    try:
        atomic.write_text_atomic(ckdir / LATEST_FILE, final.name + "\n")
    except OSError as err:
        raise CheckpointError(f"checkpoint {final} is complete but {ckdir / LATEST_FILE} could not be "
                              f"updated: {atomic.describe_os_error(err)}; it still names the previous "
                              f"checkpoint, pass {final} to load the new one") from err
    if keep_last is not None:
        older = [p for p in list_checkpoints(ckdir) if p != final]
        for doomed in older[:max(0, len(older) + 1 - keep_last)]:
            # Rename first so a crash mid-delete leaves a hidden temp, never a half checkpoint.
            trash = atomic.temp_name(doomed, ".del")
            try:
                os.rename(doomed, trash)
            except OSError:
                continue  # pruning is housekeeping; the new checkpoint is already safe.
            atomic.remove_tree(trash)
    return final


def _encode(tensors: Mapping[str, np.ndarray], what: str, step: int) -> tuple[bytes, dict]:
    """safetensors bytes plus their manifest entry ``{bytes, sha256, tensors: {name: shape, dtype}}``."""
    arrays, manifest = {}, {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CheckpointError(f"cannot save checkpoint: {what} name {name!r} is not allowed")
        if not isinstance(array, np.ndarray):
            raise CheckpointError(f"cannot save checkpoint: {what} {name!r} is a {type(array).__name__}, "
                                  "not a numpy array; convert engine tensors to numpy first")
        dtype = array.dtype.name
        if dtype not in _DTYPE_TAGS:
            raise CheckpointError(f"cannot save checkpoint: {what} {name!r} has dtype {dtype}; "
                                  f"supported: {', '.join(_DTYPE_TAGS)}")
        # safetensors copies raw memory: a transposed view would be stored in the wrong order.
        arrays[name] = array if array.flags.c_contiguous else array.copy(order="C")
        manifest[name] = {"shape": list(array.shape), "dtype": dtype}
    data = safetensors.numpy.save(arrays, metadata={"producer": "isthmus", "step": str(step)})
    return data, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "tensors": manifest}


def _encode_state(state: CheckpointState, step: int, files: dict) -> bytes:
    doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    for f in fields(CheckpointState):
        value = getattr(state, f.name)
        try:
            json.dumps(value, default=_to_json)  # per field, so the error can name it
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"cannot save checkpoint: state.{f.name} is not JSON-able ({err}); "
                                  "store bytes as base64 text and arrays as lists") from err
        doc[f.name] = value
    doc["step"] = step
    doc["versions"] = {"isthmus": __version__, "numpy": np.__version__,
                       "safetensors": safetensors.__version__, **dict(state.versions)}
    doc["files"] = files
    data = json.dumps(doc, indent=1, default=_to_json).encode("utf-8")
    found = sidecar.problems(json.loads(data))  # what loading would refuse is not written at all
    if found:
        raise CheckpointError(f"cannot save checkpoint: its {STATE_FILE} would not load: {'; '.join(found)}")
    return data


def _to_json(obj: Any) -> Any:
    # numpy scalars and small arrays turn up in optimizer scalars and RNG states; keep them as values.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (or of a ``checkpoints`` directory), oldest step first.
    Hidden temporaries from unfinished saves are never listed."""
    ckdir = _checkpoints_dir(Path(run_dir))
    found = [(int(m.group(1)), p) for p in (ckdir.iterdir() if ckdir.is_dir() else ())
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest``, or if that is missing or names no complete checkpoint,
    the complete one with the highest step; None when there is none."""
    ckdir = _checkpoints_dir(Path(run_dir))
    try:
        name = (ckdir / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.match(name) and (ckdir / name / STATE_FILE).is_file():
        return ckdir / name
    return next(reversed(list_checkpoints(ckdir)), None)


def _checkpoints_dir(path: Path) -> Path:
    is_own = path.name == CHECKPOINTS_DIR and not (path / CHECKPOINTS_DIR).is_dir()
    return path if is_own else path / CHECKPOINTS_DIR


def load_checkpoint(path: str | os.PathLike,
                    expect: Mapping[str, tuple[tuple[int, ...], Any]] | None = None,
                    must_match: Mapping[str, Any] | None = None,
                    model_name: str | None = None) -> Loaded:
    """Load and verify a checkpoint; ``path`` is a run directory (its ``latest``), a checkpoint
    directory, or a file inside one.

    ``expect`` maps every parameter the model has to ``(shape, dtype)`` (dtype None: any); missing,
    unexpected, reshaped or retyped parameters are refused, naming them. ``must_match`` maps config
    keys, dotted (``"model.dim": 64``) or nested (``{"model": {...}}``, which also refuses keys the
    checkpoint has under ``model`` that it lacks), to the values they must have. ``model_name``
    must equal the saved one. File sizes and SHA-256 are checked before any tensor is used.
    """
    ckpt = _resolve(Path(path))
    doc = _read_sidecar(ckpt)
    if SHARDED in doc["files"]:
        ranks = doc["files"][SHARDED].get("world_size", "?")
        raise CheckpointError(
            f"checkpoint {ckpt} is sharded (written by {ranks} rank{'' if ranks == 1 else 's'} of "
            f"distributed=fsdp): resume it with distributed=fsdp on any number of ranks, or consolidate it with "
            f"`isthmus convert {ckpt} --to isthmus --output DIR`")
    state = CheckpointState(**{f.name: doc[f.name] for f in fields(CheckpointState) if f.name in doc})
    if model_name is not None and state.model_name != model_name:
        raise CheckpointError(f"checkpoint {ckpt} is for model {state.model_name!r}, not {model_name!r}")
    if must_match:
        _check_config(ckpt, state.config, must_match)
    files = doc["files"]
    if expect is not None:  # from the sidecar alone, before reading large files
        _check_fit(f"checkpoint {ckpt} does not fit the model", files[MODEL_FILE]["tensors"], expect)
    return Loaded(params=_read_tensors(ckpt, MODEL_FILE, files[MODEL_FILE]),
                  optimizer_tensors=_read_tensors(ckpt, OPTIMIZER_FILE, files[OPTIMIZER_FILE]),
                  state=state, path=ckpt)


def load_sharded_state(path: str | os.PathLike, expect: Mapping[str, tuple[tuple[int, ...], Any]] | None = None,
                       must_match: Mapping[str, Any] | None = None,
                       model_name: str | None = None) -> tuple[Path, CheckpointState, dict | None]:
    """The checks of :func:`load_checkpoint` on a checkpoint's sidecar: ``(checkpoint directory,
    state, its sharded entry or None for a whole checkpoint)``; reads no tensors."""
    ckpt = _resolve(Path(path))
    doc = _read_sidecar(ckpt)
    state = CheckpointState(**{f.name: doc[f.name] for f in fields(CheckpointState) if f.name in doc})
    if model_name is not None and state.model_name != model_name:
        raise CheckpointError(f"checkpoint {ckpt} is for model {state.model_name!r}, not {model_name!r}")
    if must_match:
        _check_config(ckpt, state.config, must_match)
    sharded = doc["files"].get(SHARDED)
    if expect is not None:
        tensors = sharded["tensors"] if sharded else doc["files"][MODEL_FILE]["tensors"]
        _check_fit(f"checkpoint {ckpt} does not fit the model", tensors, expect)
    return ckpt, state, sharded


def read_state(path: str | os.PathLike) -> CheckpointState:
    """The sidecar state of the checkpoint at ``path`` (as :func:`load_checkpoint` resolves it),
    without reading its tensors."""
    doc = _read_sidecar(_resolve(Path(path)))
    return CheckpointState(**{f.name: doc[f.name] for f in fields(CheckpointState) if f.name in doc})


def locate(path: str | os.PathLike) -> Path:
    """The checkpoint directory ``path`` names (a run directory's latest, a checkpoint directory,
    or a file in one), without reading it; a one-line :class:`CheckpointError` when there is none."""
    return _resolve(Path(path))


def check_fit(loaded: Loaded, expect: Mapping[str, tuple[tuple[int, ...], Any]], model_name: str | None = None) -> None:
    """The checks ``load_checkpoint`` makes with ``expect`` and ``model_name``, on a checkpoint
    already in memory: for callers that learn the model only from the checkpoint's own config."""
    if model_name is not None and loaded.state.model_name != model_name:
        raise CheckpointError(f"checkpoint {loaded.path} is for model {loaded.state.model_name!r}, not {model_name!r}")
    found = {name: {"shape": list(a.shape), "dtype": a.dtype.name} for name, a in loaded.params.items()}
    _check_fit(f"checkpoint {loaded.path} does not fit the model", found, expect)


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory a path names (a run directory's latest, a checkpoint directory, or a
    file inside one), as :func:`load_checkpoint` finds it."""
    return _resolve(Path(path))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar's ``files`` entry (bytes, SHA-256, tensors) of each tensor file of a checkpoint."""
    return _read_sidecar(_resolve(Path(path)))["files"]


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {atomic.describe_dir(path.parent)}")
    if path.is_file():
        if path.name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
            return path.parent
        raise CheckpointError(f"{path} is not part of a checkpoint: pass a run directory, a checkpoint "
                              f"directory or its {MODEL_FILE}")
    if (path / STATE_FILE).is_file():
        return path
    if _STEP_DIR.match(path.name):
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}; {atomic.describe_dir(path)}")
    found = latest_checkpoint(path)
    if found is None:
        where = _checkpoints_dir(path)
        raise CheckpointError(f"no complete checkpoint in {where}; {atomic.describe_dir(where)}")
    return found


def _read_sidecar(ckpt: Path) -> dict:
    path = ckpt / STATE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupted: not valid JSON ({err})") from err
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {atomic.describe_os_error(err)}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an isthmus checkpoint sidecar (no \"format\": \"{FORMAT}\")")
    if not isinstance(doc.get("format_version"), int) or doc["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {doc.get('format_version')!r}; this isthmus "
                              f"reads up to {FORMAT_VERSION}: upgrade isthmus")
    sidecar.validate(doc, path)  # every field a resume, evaluation or export reads
    shards = doc["files"].get(SHARDED)
    if shards is not None and not (ckpt / shards["dir"]).is_dir():
        raise CheckpointError(f"{ckpt / shards['dir']} is missing; {atomic.describe_dir(ckpt)}")
    return doc


def _read_tensors(ckpt: Path, name: str, entry: dict) -> dict[str, np.ndarray]:
    path = ckpt / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {atomic.describe_dir(ckpt)}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {atomic.describe_os_error(err)}") from err
    if len(data) != entry["bytes"]:
        how = "truncated" if len(data) < entry["bytes"] else "longer than written"
        raise CheckpointError(f"{path} is {how}: {len(data)} bytes, {STATE_FILE} records {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 differs from the one in {STATE_FILE}")
    try:
        views = dict(safetensors.deserialize(data))
    except Exception as err:  # SafetensorError, or anything else the parser throws on bad bytes
        raise CheckpointError(f"{path} has a bad safetensors header: {err}") from err
    found = {key: {"shape": list(v["shape"]), "dtype": _TAG_DTYPES.get(v["dtype"], v["dtype"])}
             for key, v in views.items()}
    _check_fit(f"{path} does not match the manifest in {STATE_FILE}", found,
               {key: (t["shape"], t["dtype"]) for key, t in entry["tensors"].items()})
    return {key: np.frombuffer(views[key]["data"], dtype=_numpy_dtype(path, key, found[key]["dtype"]))
            .reshape(views[key]["shape"]) for key in entry["tensors"]}  # data is a bytearray: writable


def _numpy_dtype(path: Path, key: str, name: str) -> np.dtype:
    if name not in _DTYPE_TAGS:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {name}, which isthmus does not load")
    if name in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise CheckpointError(f"{path}: tensor {key!r} is {name}, which numpy reads only with "
                                  "ml_dtypes installed: pip install ml_dtypes") from None
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _check_fit(prefix: str, found: Mapping[str, dict], expect: Mapping[str, tuple]) -> None:
    """Raise if the tensors ``found`` ({name: {shape, dtype}}) differ from ``expect``."""
    missing = [k for k in expect if k not in found]
    unexpected = [k for k in found if k not in expect]
    shapes, dtypes = [], []
    for key, (shape, dtype) in expect.items():
        if (have := found.get(key)) is None:
            continue
        if tuple(have["shape"]) != tuple(shape):
            shapes.append(f"{key} {tuple(have['shape'])} vs {tuple(shape)}")
        want = dtype if dtype is None or isinstance(dtype, str) else np.dtype(dtype).name
        if want is not None and have["dtype"] != want:
            dtypes.append(f"{key} {have['dtype']} vs {want}")
    problems = [f"{len(items)} {label} ({_few(items)})" for label, items in
                (("missing", missing), ("unexpected", unexpected),
                 ("with another shape, checkpoint vs expected:", shapes),
                 ("with another dtype, checkpoint vs expected:", dtypes)) if items]
    if problems:
        raise CheckpointError(f"{prefix}: {'; '.join(problems)}")


def _few(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f", and {len(items) - limit} more" if len(items) > limit else "")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _check_config(ckpt: Path, saved: Mapping[str, Any], must_match: Mapping[str, Any]) -> None:
    # Round-trip through JSON so a tuple matches the list it became when saved.
    wanted = json.loads(json.dumps(_flatten(must_match), default=_to_json))
    have = _flatten(saved)
    roots = [key for key, value in must_match.items() if isinstance(value, Mapping)]
    keys = list(wanted) + [k for k in have if k not in wanted
                           and any(k.startswith(root + ".") for root in roots)]
    differ = []
    for key in keys:
        old, new = have.get(key, _MISSING), wanted.get(key, _MISSING)
        # True == 1 in Python, but a flag turned into a number is a different config.
        if old != new or isinstance(old, bool) != isinstance(new, bool):
            differ.append(f"{key} is {_show(old)} in the checkpoint but {_show(new)} now")
    if differ:
        raise CheckpointError(f"checkpoint {ckpt} was made with another config: {_few(differ)} "
                              f"({len(differ)} key{'s' if len(differ) > 1 else ''} differ)")


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else json.dumps(value)
