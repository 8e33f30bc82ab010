"""Find out, without importing torch, torch_npu or MindSpore, whether this machine can run Ascend.

Four layers must all be present, and each missing one is reported with its fix:

1. the CANN toolkit (or the NNAE runtime) on disk: ``lib64/libascendcl.so`` under
   ``$ASCEND_HOME_PATH``, ``$ASCEND_TOOLKIT_HOME`` or a default install root;
2. its environment: ``set_env.sh`` sourced, which sets ``ASCEND_HOME_PATH`` and puts
   ``libascendcl.so``, ``libhccl.so`` and ``libge_runner.so`` on the library path (torch_npu links the
   first two, MindSpore's Ascend plugin loads the third);
3. the NPU driver: ``libascend_hal.so`` on the library path (it ships in
   ``/usr/local/Ascend/driver/lib64/driver``);
4. devices: ``/dev/davinciN`` nodes (one per chip) plus ``/dev/davinci_manager``, not all hidden by
   ``ASCEND_RT_VISIBLE_DEVICES``; ``npu-smi info`` then names the SoC and counts the chips.

Every input (environment, install roots, ``/dev``, the loader configuration, ``npu-smi``) can be
passed in, so tests describe a machine with a fake install tree instead of needing one.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from isthmus.backends.ascend.npu_smi import NpuSmi, run_npu_smi

DEFAULT_ROOTS = (
    Path("/usr/local/Ascend/ascend-toolkit/latest"),
    Path("/usr/local/Ascend/nnae/latest"),
    Path.home() / "Ascend/ascend-toolkit/latest",
)
DRIVER_ROOT = Path("/usr/local/Ascend/driver")
TOOLKIT_LIB_DIRS = ("lib64", "runtime/lib64", "acllib/lib64", "fwkacllib/lib64")
RUNTIME_LIBS = ("libascendcl.so", "libhccl.so", "libge_runner.so")
DRIVER_LIB = "libascend_hal.so"
SYSTEM_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
                   "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                   "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu")
TOOLKIT_URL = "https://www.hiascend.com/software/cann"
CONTAINER_DEVICES = ("--device=/dev/davinci0 --device=/dev/davinci_manager --device=/dev/devmm_svm "
                     "--device=/dev/hisi_hdc")


@dataclass(frozen=True)
class Missing:
    """One thing this machine lacks: ``short`` for one-line summaries, ``what`` in full, ``fix``."""

    short: str
    what: str
    fix: str


@dataclass
class Detection:
    """The structured answer: what was found where, and every missing piece with its fix."""

    toolkit: Path | None = None
    toolkit_version: str = ""
    set_env: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)  # library -> where found / "missing"
    driver_version: str = ""
    device_nodes: list[int] = field(default_factory=list)
    visible: list[int] | None = None
    npu_smi_path: str | None = None
    npu_smi: NpuSmi | None = None
    notes: list[str] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)

    @property
    def device_count(self) -> int:
        """Logical devices this process may use (after ``ASCEND_RT_VISIBLE_DEVICES``)."""
        total = len(self.npu_smi.chips) if self.npu_smi and self.npu_smi.chips else len(self.device_nodes)
        if self.visible is None:
            return total
        return len([i for i in self.visible if 0 <= i < total])

    @property
    def usable(self) -> bool:
        """Nothing missing and at least one visible device."""
        return not self.missing and self.device_count > 0

    @property
    def soc(self) -> str | None:
        """The SoC name npu-smi printed (``910B3``), or None without npu-smi."""
        return self.npu_smi.soc if self.npu_smi else None

    def summary(self) -> tuple[str, str]:
        """``(reason, fix)`` on one line each, for ``isthmus backends``."""
        if self.usable:
            return f"{self.device_count} NPU(s), SoC {self.soc or 'unknown'}", ""
        head = "no Ascend device" if self.device_count == 0 else "Ascend device present but not usable"
        reason = f"{head}: " + ", ".join(m.short for m in self.missing) if self.missing else head
        more = len(self.missing) - 1
        fix = self.missing[0].fix if self.missing else "run on an Ascend host"
        if more > 0:
            fix += f" (and {more} more step{'s' if more > 1 else ''}: `isthmus doctor` lists them)"
        return reason, fix

    def lines(self) -> list[str]:
        """The full report, one fact per line, missing pieces last with their fixes."""
        out = [
            f"CANN toolkit: {self.toolkit or 'not found'}"
            + (f" (version {self.toolkit_version})" if self.toolkit_version else ""),
            f"set_env.sh: {self.set_env or 'not found'}",
            "environment: " + ", ".join(f"{k}={v or '(unset)'}" for k, v in self.env.items()),
        ]
        out += [f"library {name}: {where}" for name, where in self.libraries.items()]
        out.append(f"driver version: {self.driver_version or 'unknown'}")
        out.append("device nodes: " + (", ".join(f"/dev/davinci{i}" for i in self.device_nodes) or "none"))
        if self.visible is not None:
            out.append(f"ASCEND_RT_VISIBLE_DEVICES: {','.join(map(str, self.visible))}")
        if self.npu_smi is not None:
            chips = ", ".join(f"npu {c.npu} chip {c.chip}: {c.name} ({c.health})" for c in self.npu_smi.chips)
            out.append(f"npu-smi {self.npu_smi.version or ''}: {chips or 'no chips listed'}".replace("  ", " "))
        else:
            out.append(f"npu-smi: {self.npu_smi_path or 'not on PATH'}")
        out += [f"note: {n}" for n in self.notes]
        out += [f"MISSING: {m.what}\n  fix: {m.fix}" for m in self.missing]
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for ``ProbeResult.details``."""
        return {
            "toolkit": str(self.toolkit) if self.toolkit else None,
            "toolkit_version": self.toolkit_version,
            "set_env": str(self.set_env) if self.set_env else None,
            "env": dict(self.env),
            "libraries": dict(self.libraries),
            "driver_version": self.driver_version,
            "device_nodes": list(self.device_nodes),
            "visible": self.visible,
            "soc": self.soc,
            "devices": self.device_count,
            "notes": list(self.notes),
            "missing": [{"what": m.what, "fix": m.fix} for m in self.missing],
            "report": self.lines(),
        }


# ------------------------------------------------------------------------------ files
def loader_dirs(env: Mapping[str, str], ld_conf: Path = Path("/etc/ld.so.conf")) -> list[Path]:
    """Where the dynamic loader looks: ``LD_LIBRARY_PATH``, ``ld.so.conf`` (with includes), system."""
    dirs = [Path(p) for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    dirs += _ld_conf_dirs(ld_conf, depth=0)
    dirs += [Path(p) for p in SYSTEM_LIB_DIRS]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _ld_conf_dirs(conf: Path, depth: int) -> list[Path]:
    if depth > 3 or not conf.is_file():
        return []
    found: list[Path] = []
    try:
        lines = conf.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include "):
            pattern = line.split(None, 1)[1]
            if not os.path.isabs(pattern):
                pattern = str(conf.parent / pattern)
            for included in sorted(glob.glob(pattern)):
                found += _ld_conf_dirs(Path(included), depth + 1)
        elif line:
            found.append(Path(line))
    return found


def find_in(dirs: Sequence[Path], name: str) -> Path | None:
    """The first ``dir/name`` that exists, or None."""
    for d in dirs:
        if (d / name).exists():
            return d / name
    return None


def _read_version(path: Path, key: str = "version") -> str:
    try:
        for line in path.read_text(errors="replace").splitlines():
            name, _, value = line.partition("=")
            if name.strip().lower() == key.lower() and value.strip():
                return value.strip()
    except OSError:
        pass
    return ""


def find_toolkit(env: Mapping[str, str], roots: Sequence[Path] = DEFAULT_ROOTS) -> Path | None:
    """The first CANN install (toolkit or NNAE) holding ``libascendcl.so``: the environment's
    choice first, then the default install roots."""
    candidates = [Path(env[k]) for k in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME") if env.get(k)]
    for root in [*candidates, *roots]:
        if any((root / sub / "libascendcl.so").exists() for sub in TOOLKIT_LIB_DIRS):
            return root
    return None


def toolkit_version(toolkit: Path) -> str:
    """The CANN version recorded in the install (``<arch>-linux/ascend_toolkit_install.info``)."""
    for info in sorted(toolkit.glob("*-linux/ascend_*_install.info")):
        found = _read_version(info)
        if found:
            return found
    return _read_version(toolkit / "version.cfg") or _read_version(toolkit / "compiler/version.info", "Version")


def find_set_env(toolkit: Path) -> Path | None:
    """``set_env.sh`` of an install: beside ``latest/`` (CANN's layout) or inside it."""
    for candidate in (toolkit.parent / "set_env.sh", toolkit / "set_env.sh", toolkit / "bin/setenv.bash"):
        if candidate.is_file():
            return candidate
    return None


def parse_visible(value: str | None) -> tuple[list[int] | None, str]:
    """``ASCEND_RT_VISIBLE_DEVICES`` as device ids, or ``(None, problem)`` when malformed."""
    if value is None:
        return None, ""
    try:
        return [int(part) for part in value.split(",") if part.strip()], ""
    except ValueError:
        return None, f"ASCEND_RT_VISIBLE_DEVICES={value!r} is not a comma-separated list of device ids"


def visible_mapping(index: int, visible: Sequence[int] | None) -> int:
    """The physical device id behind logical ``npu:index`` (identity without the variable)."""
    if visible is None:
        return index
    if not 0 <= index < len(visible):
        shown = ", ".join(f"npu:{i} -> device {d}" for i, d in enumerate(visible)) or "no device"
        raise IndexError(
            f"backend.device_index={index}, but ASCEND_RT_VISIBLE_DEVICES={','.join(map(str, visible))} "
            f"exposes {len(visible)} device(s) ({shown})")
    return visible[index]


# ------------------------------------------------------------------------------ the check
def detect(
    env: Mapping[str, str] | None = None,
    roots: Sequence[Path] = DEFAULT_ROOTS,
    driver_root: Path = DRIVER_ROOT,
    dev_dir: Path = Path("/dev"),
    ld_conf: Path = Path("/etc/ld.so.conf"),
    npu_smi_timeout: float = 10.0,
) -> Detection:
    """Check every layer and return what was found plus each missing piece with its fix.

    ``npu-smi info`` runs only when device nodes exist (a machine without them has nothing for it
    to report, and the probe stays instant there).
    """
    env = dict(os.environ if env is None else env)
    found = Detection(env={k: env.get(k, "") for k in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME",
                                                       "ASCEND_RT_VISIBLE_DEVICES")})
    # Most basic first: without device nodes the rest matters only on an Ascend host.
    _check_devices(found, env, dev_dir, npu_smi_timeout)
    _check_driver(found, env, driver_root, ld_conf)
    _check_toolkit(found, env, roots, ld_conf)
    return found


def _check_toolkit(found: Detection, env: Mapping[str, str], roots: Sequence[Path], ld_conf: Path) -> None:
    found.toolkit = toolkit = find_toolkit(env, roots)
    on_path = loader_dirs(env, ld_conf)
    if toolkit is None:
        looked = ", ".join(str(r) for r in roots)
        found.missing.append(Missing(
            "CANN toolkit not found",
            f"CANN toolkit not found (ASCEND_HOME_PATH and ASCEND_TOOLKIT_HOME unset; looked in {looked})",
            f"install the CANN toolkit matching your driver (Ascend-cann-toolkit_<version>_linux-<arch>.run "
            f"--install, from {TOOLKIT_URL}), then `source /usr/local/Ascend/ascend-toolkit/set_env.sh`"))
        for lib in RUNTIME_LIBS:
            found.libraries[lib] = "missing" if find_in(on_path, lib) is None else str(find_in(on_path, lib))
        return
    found.toolkit_version = toolkit_version(toolkit)
    found.set_env = find_set_env(toolkit)
    source = f"source {found.set_env}" if found.set_env else f"source the set_env.sh of {toolkit}"
    if not (env.get("ASCEND_HOME_PATH") or env.get("ASCEND_TOOLKIT_HOME")):
        found.missing.append(Missing(
            "CANN environment not set (set_env.sh not sourced)",
            f"CANN is installed at {toolkit} but its environment is not set: ASCEND_HOME_PATH is unset, "
            f"so set_env.sh was not sourced in this shell",
            f"{source} (add it to ~/.bashrc to keep it)"))
    for lib in RUNTIME_LIBS:
        loaded = find_in(on_path, lib)
        on_disk = find_in([toolkit / sub for sub in TOOLKIT_LIB_DIRS], lib)
        if loaded is not None:
            found.libraries[lib] = str(loaded)
        elif on_disk is not None:
            found.libraries[lib] = f"{on_disk} (not on the library path)"
            if not any(m.short.startswith("CANN environment") for m in found.missing):
                found.missing.append(Missing(
                    f"{lib} not on the library path",
                    f"{lib} is at {on_disk} but not on LD_LIBRARY_PATH, so the engines cannot load it",
                    source))
        else:
            found.libraries[lib] = "missing"
            found.missing.append(Missing(
                f"{lib} missing from the CANN install",
                f"{lib} is in none of {', '.join(str(toolkit / s) for s in TOOLKIT_LIB_DIRS)}: the install "
                f"at {toolkit} is incomplete",
                f"reinstall the CANN toolkit (and kernels package) from {TOOLKIT_URL}"))


def _check_driver(found: Detection, env: Mapping[str, str], driver_root: Path, ld_conf: Path) -> None:
    found.driver_version = _read_version(driver_root / "version.info", "Version")
    loaded = find_in(loader_dirs(env, ld_conf), DRIVER_LIB)
    on_disk = find_in([driver_root / "lib64/driver", driver_root / "lib64", driver_root / "lib64/common"],
                     DRIVER_LIB)
    if loaded is not None:
        found.libraries[DRIVER_LIB] = str(loaded)
    elif on_disk is not None:
        found.libraries[DRIVER_LIB] = f"{on_disk} (not on the library path)"
        found.missing.append(Missing(
            "NPU driver library not on the library path",
            f"{DRIVER_LIB} is at {on_disk} but not on LD_LIBRARY_PATH",
            f"export LD_LIBRARY_PATH={driver_root}/lib64/driver:{driver_root}/lib64/common:$LD_LIBRARY_PATH"))
    else:
        found.libraries[DRIVER_LIB] = "missing"
        found.missing.append(Missing(
            "NPU driver not found",
            f"the Ascend NPU driver is not installed ({DRIVER_LIB} not under {driver_root} nor on the "
            f"library path)",
            "install the Ascend driver and firmware for your card (Ascend-hdk-<chip>-npu-driver_<version>"
            "_linux-<arch>.run --full, then the firmware .run) and reboot"))


def _check_devices(found: Detection, env: Mapping[str, str], dev_dir: Path, timeout: float) -> None:
    nodes = sorted(int(m.group(1)) for p in dev_dir.glob("davinci*")
                   if (m := re.fullmatch(r"davinci(\d+)", p.name)))
    found.device_nodes = nodes
    visible, problem = parse_visible(env.get("ASCEND_RT_VISIBLE_DEVICES"))
    found.visible = visible
    if problem:
        found.missing.append(Missing("bad ASCEND_RT_VISIBLE_DEVICES", problem,
                                     "set ASCEND_RT_VISIBLE_DEVICES to device ids such as 0,1, or unset it"))
    found.npu_smi_path = shutil.which("npu-smi", path=env.get("PATH", os.defpath))
    if not nodes:
        found.missing.append(Missing(
            "no /dev/davinci* device nodes",
            f"no NPU device nodes ({dev_dir}/davinci0, ...): this machine has no Ascend NPU, the driver "
            f"is not loaded, or a container was started without them",
            f"run on an Ascend host; in a container add {CONTAINER_DEVICES}"))
        return
    if not (dev_dir / "davinci_manager").exists():
        found.missing.append(Missing(
            "no /dev/davinci_manager", f"{dev_dir}/davinci_manager is missing: the runtime cannot reach the driver",
            f"start the container with {CONTAINER_DEVICES}"))
    if found.npu_smi_path is None:
        found.notes.append("npu-smi is not on PATH, so the SoC is unknown (bfloat16 and fused routes "
                           "stay off); it ships with the driver, usually as /usr/local/sbin/npu-smi")
    else:
        found.npu_smi, failure = run_npu_smi(found.npu_smi_path, timeout)
        if failure:
            found.missing.append(Missing(
                "npu-smi info failed", failure,
                "check the driver: `lsmod | grep drv_davinci`, `dmesg | grep -i davinci`; reinstall the "
                "driver and firmware and reboot if the module is not loaded"))
    if visible is not None and found.device_count == 0:
        total = len(found.npu_smi.chips) if found.npu_smi and found.npu_smi.chips else len(nodes)
        found.missing.append(Missing(
            "ASCEND_RT_VISIBLE_DEVICES hides every device",
            f"ASCEND_RT_VISIBLE_DEVICES={env['ASCEND_RT_VISIBLE_DEVICES']} names no device of the {total} present",
            f"set ASCEND_RT_VISIBLE_DEVICES to ids below {total}, or unset it"))


__all__ = ["Detection", "Missing", "detect", "find_in", "find_toolkit", "loader_dirs", "parse_visible",
           "visible_mapping"]
