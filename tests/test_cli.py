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
