"""FAKE Ascend host: a CANN toolkit tree, the NPU driver tree, ``/dev/davinci*`` nodes and a FAKE
``npu-smi``, all under a temporary directory.

Follows the install layout Huawei documents: the toolkit under ``Ascend/ascend-toolkit/latest``
with ``lib64/libascendcl.so`` (and ``libhccl.so``, ``libge_runner.so``), ``set_env.sh`` one level up
and the version in ``<arch>-linux/ascend_toolkit_install.info`` (CANN Software Installation Guide, "Installing CANN":
``source /usr/local/Ascend/ascend-toolkit/set_env.sh``, then ``cat ascend_toolkit_install.info`` in
``ascend-toolkit/latest/<arch>-linux``,
https://www.hiascend.com/document/detail/zh/canncommercial/80RC3/softwareinst/instg/instg_0053.html);
the driver under ``Ascend/driver`` with ``lib64/driver/libascend_hal.so`` and ``version.info``; one
``/dev/davinciN`` node per chip plus ``/dev/davinci_manager`` (the devices a container is given,
https://www.hiascend.com/doc_center/source/zh/mindie/20RC2/quickstart/mindieturbomindie_quickstart_0006.html).
The libraries are empty files: detection only looks for them. ``npu-smi`` is :mod:`fakes.npu_smi`.
"""

from __future__ import annotations

from pathlib import Path

from fakes import npu_smi

TOOLKIT_VERSION = "8.0.RC3"
DRIVER_VERSION = "24.1.rc2"


def machine(root: Path, sourced: bool, devices: int = 2, recording: str | None = "a2_910b4-1.txt",
            smi_exit: int = 0) -> tuple[dict, dict]:
    """A FAKE Ascend machine under ``root``; ``sourced`` is whether ``set_env.sh`` has been sourced.

    Returns ``(env, keyword arguments of isthmus.backends.ascend.detect.detect)``."""
    toolkit = root / "Ascend/ascend-toolkit/latest"
    (toolkit / "lib64").mkdir(parents=True, exist_ok=True)
    for lib in ("libascendcl.so", "libhccl.so", "libge_runner.so"):
        (toolkit / "lib64" / lib).touch()
    (toolkit / "x86_64-linux").mkdir()
    (toolkit / "x86_64-linux/ascend_toolkit_install.info").write_text(
        f"package_name=Ascend-cann-toolkit\nversion={TOOLKIT_VERSION}\n")
    (root / "Ascend/ascend-toolkit/set_env.sh").write_text("export ASCEND_HOME_PATH=...\n")
    driver = root / "Ascend/driver"
    (driver / "lib64/driver").mkdir(parents=True)
    (driver / "lib64/driver/libascend_hal.so").touch()
    (driver / "version.info").write_text(f"Version={DRIVER_VERSION}\n")
    dev = root / "dev"
    dev.mkdir()
    for i in range(devices):
        (dev / f"davinci{i}").touch()
    if devices:
        (dev / "davinci_manager").touch()
    bin_dir = root / "bin"
    bin_dir.mkdir()
    if recording is not None:
        npu_smi.install(bin_dir, recording, smi_exit)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    if sourced:
        env.update(ASCEND_HOME_PATH=str(toolkit), ASCEND_TOOLKIT_HOME=str(toolkit),
                   LD_LIBRARY_PATH=f"{toolkit}/lib64:{driver}/lib64/driver")
    kwargs = {"roots": (toolkit,), "driver_root": driver, "dev_dir": dev, "ld_conf": root / "no-ld.so.conf"}
    return env, kwargs
