"""The command line as a user runs it: a fresh interpreter per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ENGINES = ("torch", "mindspore", "torch_npu")


def run(*args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def imported_modules(importtime_stderr: str) -> set[str]:
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_importing_the_cli_imports_no_engine():
    result = run("-X", "importtime", "-c", "import isthmus.cli.main")
    assert result.returncode == 0, result.stderr
    modules = imported_modules(result.stderr)
    assert "isthmus.cli.main" in modules  # the parse itself works, so the check below can fail
    assert not {m for m in modules if m.split(".")[0] in ENGINES}


def test_listing_backends_and_plugins_imports_no_engine():
    code = (
        "import sys; from isthmus.cli.main import main;"
        "assert main(['backends']) == 0; assert main(['plugins']) == 0; assert main(['backends', '--json']) == 0;"
        f"print('ENGINES', sorted(m for m in {ENGINES!r} if m in sys.modules))"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert "ENGINES []" in result.stdout


def test_backends_table_reports_installed_usable_and_priority():
    result = run("-m", "isthmus.cli", "backends", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["cpu"]["usable"] is True and rows["cpu"]["installed"][0] == "torch"
    assert rows["cpu"]["priority"] > rows["example"]["priority"]
    assert rows["reference"]["auto"] is False
    text = run("-m", "isthmus.cli", "backends").stdout
    assert text.splitlines()[0].split() == ["backend", "engines", "installed", "usable", "priority", "reason"]


def test_unknown_backend_is_one_line_exit_2():
    result = run("-m", "isthmus.cli", "kernels", "--backend", "cdua")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown backend 'cdua'" in lines[0] and "cpu" in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_command_is_exit_2():
    result = run("-m", "isthmus.cli", "trian")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def config_show(*args: str) -> subprocess.CompletedProcess:
    return run("-m", "isthmus.cli", "config", "show", *args)


def test_config_files_then_overrides(tmp_path):
    import yaml

    (tmp_path / "a.yaml").write_text("train: {steps: 10, lr: 0.5, warmup_steps: 1}\nbackend: {name: cpu}\n")
    (tmp_path / "b.yaml").write_text("train: {steps: 20}\nseed: 4\n")
    result = config_show("--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"))
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["train"]["steps"] == 20 and cfg["train"]["lr"] == 0.5 and cfg["backend"]["name"] == "cpu"
    assert cfg["seed"] == cfg["data"]["seed"] == 4
    # Overrides come last, wherever they stand among the options.
    result = config_show("train.steps=30", "--config", str(tmp_path / "a.yaml"), "seed=2", "train.steps=31")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["train"]["steps"] == 31 and cfg["seed"] == 2 and cfg["train"]["lr"] == 0.5


def test_a_bad_config_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n")
    for path, expected in ((tmp_path / "missing.yaml", "no such config file"),
                           (tmp_path / "list.yaml", "must be a mapping, got a list")):
        result = config_show("--config", str(path))
        assert result.returncode == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"isthmus: error: {path}: ") and expected in lines[0]
    result = run("-m", "isthmus.cli", "train", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "missing.yaml: no such config file" in result.stderr


def test_backend_options_are_checked_here_without_importing_an_engine():
    code = (
        "import sys; from isthmus.cli.main import main;"
        "assert main(['config', 'show', 'backend=ascend', 'backend.options.allow_hf32=true']) == 0;"
        "assert main(['config', 'show', 'backend=ascend', 'backend.options.allow_hf23=true']) == 2;"
        "assert main(['config', 'show', 'backend=cuda', 'backend.options.compile=true']) == 0;"
        "assert main(['config', 'show', 'backend.options.compile=true']) == 0;"
        f"print('ENGINES', sorted(m for m in {ENGINES!r} if m in sys.modules))"
    )
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert "ENGINES []" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("isthmus: error:")]
    assert errors == ["isthmus: error: backend.options.allow_hf23: unknown ascend option (did you mean "
                      "'allow_hf32'?); valid: allow_hf32, precision_mode, mode, jit_level, fallback, fused_kernels"]


def test_kernels_check_runs_gradients_and_names_the_op_of_a_wrong_backward(monkeypatch, capsys):
    """``isthmus kernels --check`` on a backend whose linear VJP is scaled by 0.999 (a test plugin)."""
    from numpy_linear import scaled_vjp, strided_gradients

    from isthmus.cli import main as cli
    from isthmus.registry.manager import load_plugins

    _, registry = load_plugins(autoload=False, extra=[("scaled-vjp", scaled_vjp()),
                                                      ("numpy-linear", strided_gradients())])
    monkeypatch.setattr(cli, "registry", lambda: registry)
    assert cli.main(["kernels", "--check", "--backend", "scaled-vjp", "--ops", "linear"]) == 1
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:3]): line.split()[-1] for line in out.splitlines() if line.startswith("linear ")}
    assert rows[("linear", "forward", "float32")] == "ok" and rows[("linear", "gradient", "float32")] == "FAIL"
    assert "FAIL gradient linear/bias [float32]: dense cotangent, d/dx: " in out
    assert out.rstrip().endswith("(ops with failures: linear)")
    assert cli.main(["kernels", "--check", "--backend", "numpy-linear", "--ops", "linear,adamw_update"]) == 0
    assert cli.main(["kernels", "--check", "--backend", "numpy-linear", "--ops", "lienar"]) == 2
    assert "--ops: unknown op(s) lienar; valid: " in capsys.readouterr().err
