"""The CLI boundary: every command, built-in or contributed by a plugin, ends in one line and an
honest exit code (2 for a user's mistake, 1 for a bug, named as one), unless debugging is asked for."""

from __future__ import annotations

import argparse
import errno

import pytest

from hostile import assert_clean, cli, error_line
from isthmus.errors import IsthmusError
from isthmus.registry import manager, selection
from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import CommandSpec


class Refused(IsthmusError):
    pass


FAULTS = {
    "user": lambda: (_ for _ in ()).throw(Refused("--thing 3: must be even; valid: 2, 4")),
    "bug": lambda: 1 / 0,
    "memory": lambda: (_ for _ in ()).throw(MemoryError()),
    "disk": lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", "/data/out.bin")),
    "odd-os": lambda: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")),
    "exit-7": lambda: (_ for _ in ()).throw(SystemExit(7)),
    "interrupt": lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
    "multiline": lambda: (_ for _ in ()).throw(ValueError("first\nsecond\n\nthird")),
}


class Faulty:
    """A plugin contributing one command per kind of fault."""

    @staticmethod
    @hookimpl
    def register_commands(register):
        for name, fault in FAULTS.items():
            register(CommandSpec(name=f"fault-{name}", help=name,
                                 configure=lambda parser: parser.add_argument("--count", type=int, default=1),
                                 run=lambda args, fault=fault: fault()))


@pytest.fixture
def faulty(monkeypatch):
    selection.clear_caches()
    built, registry = manager.load_plugins(autoload=False, extra=[("faulty", Faulty)])
    monkeypatch.setattr(manager, "_manager", built)
    monkeypatch.setattr(manager, "_registry", registry)
    monkeypatch.delenv("ISTHMUS_DEBUG", raising=False)
    yield registry
    selection.clear_caches()


def test_a_user_error_is_one_line_exit_2(faulty):
    result = cli("fault-user")
    assert result.code == 2
    assert error_line(result) == "isthmus: error: --thing 3: must be even; valid: 2, 4"


def test_a_bug_in_a_contributed_command_is_exit_1_and_said_to_be_a_bug(faulty):
    result = cli("fault-bug")
    assert_clean(result)
    assert result.code == 1
    line = error_line(result)
    assert line.startswith("isthmus: internal error in 'fault-bug': ZeroDivisionError: division by zero (at ")
    assert "test_guard:" in line.split("(at ")[1].split(")")[0]  # where: the plugin's own line
    assert "this is a bug" in line and "ISTHMUS_DEBUG=1" in line
    assert "report it to the authors of plugin 'faulty'" in line  # the raising frame is the plugin's


def test_out_of_memory_is_said_as_such(faulty):
    result = cli("fault-memory")
    assert result.code == 1 and "isthmus: error: fault-memory: out of memory" in error_line(result)


def test_the_system_refusing_a_write_is_the_users_to_fix_and_names_the_file(faulty):
    result = cli("fault-disk")
    assert result.code == 2
    assert error_line(result) == ("isthmus: error: fault-disk: /data/out.bin: No space left on device "
                                  "(ENOSPC: free some disk space)")
    # An OS error that is no fault of the user's environment we can name is a bug, said so.
    result = cli("fault-odd-os")
    assert result.code == 1 and "internal error in 'fault-odd-os': OSError" in error_line(result)


def test_a_multiline_message_becomes_one_line(faulty):
    result = cli("fault-multiline")
    assert result.code == 1 and "ValueError: first second third" in error_line(result)


def test_a_commands_own_exit_code_and_ctrl_c(faulty):
    assert cli("fault-exit-7").code == 7
    result = cli("fault-interrupt")
    assert result.code == 130 and error_line(result) == "isthmus: interrupted"


def test_debugging_shows_the_traceback(faulty, monkeypatch):
    with pytest.raises(ZeroDivisionError):
        cli("fault-bug", "--debug")
    with pytest.raises(ZeroDivisionError):
        cli("--debug", "fault-bug")
    monkeypatch.setenv("ISTHMUS_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli("fault-bug")


def test_usage_errors_are_one_line_for_every_command(faulty):
    from isthmus.cli.args import parsers
    from isthmus.cli.main import parser

    root = parser()
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "eval", "generate", "caption", "export", "portability", "selftest", "fault-bug"} <= set(commands)
    for name in commands:
        result = cli(name, "--no-such-option")
        assert_clean(result)
        assert result.code == 2, (name, result.err)
        assert error_line(result).startswith(f"isthmus {name}") or "unrecognized arguments" in result.err
    assert sum(1 for _ in parsers(root)) > len(commands)  # the nested ones (config show) are walked too


def test_every_number_option_of_every_command_has_a_range(faulty):
    """Including the ones a plugin declares as plain ``type=int`` (the faulty plugin's ``--count``)."""
    from isthmus.cli.args import parsers
    from isthmus.cli.main import parser

    from isthmus.cli.dispatch import parser as version_parser
    from isthmus.cli.main import registry

    # A command several models share (generate) is parsed by the checkpoint's model's version.
    versions = [version_parser(name, spec) for name in registry().names("command")
                for spec in registry().dispatched(name)]
    numeric = []
    for each in [*parsers(parser()), *versions]:
        for action in each._actions:
            assert action.type not in (int, float), f"{each.prog} {action.option_strings}: unchecked {action.type}"
            if getattr(action.type, "limits", None):
                numeric.append((each.prog, action.dest))
    assert ("isthmus fault-bug", "count") in numeric and ("isthmus generate", "seed") in numeric
    result = cli("fault-bug", "--count", "9" * 5000)
    assert result.code == 2 and "expected an integer from" in error_line(result)
