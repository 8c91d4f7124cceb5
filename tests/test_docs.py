"""The docs match the code: every command in the registry is in the README, has help and a
runnable example, and its help reads well (placeholders, not type labels; the variable
behind each option that one sets). No database needed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from accessctl.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def leaf_commands() -> Iterator[tuple[str, object]]:
    def walk(command: object, path: list[str]) -> Iterator[tuple[str, object]]:
        children = getattr(command, "commands", None)
        if children:
            for name, child in children.items():
                yield from walk(child, [*path, name])
        else:
            yield " ".join(path), command

    yield from walk(get_command(app), [])


COMMANDS = dict(leaf_commands())


def test_the_registry_is_what_we_think_it_is() -> None:
    # A walk that found nothing would make every test below pass.
    assert {"submit", "batch", "errors", "worker", "users add", "limit set"} <= set(COMMANDS)
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_is_documented_with_help_and_an_example(path: str) -> None:
    command = COMMANDS[path]
    assert f"accessctl {path}" in README, f"README never shows `accessctl {path}`"
    assert (getattr(command, "help", None) or "").strip(), f"{path} has no help"
    epilog = getattr(command, "epilog", None) or ""
    assert re.search(rf"Examples?: accessctl {re.escape(path)}\b", epilog), epilog
    assert "..." not in epilog, f"{path}: an example with an elided ID cannot be run"
    result = CliRunner().invoke(app, [*path.split(), "--help"])
    assert result.exit_code == 0, result.output
    usage = result.stdout
    # Readable placeholders: no Typer type labels like <str>, <list[str]>, {N}.
    assert not re.search(r"<[a-z\[\]|]+>", usage), usage
    assert "{" not in usage.split("\n\n", 1)[0], usage
    assert "Example" in usage


ENV_OPTIONS = {
    "--database-url": "ACCESSCTL_DATABASE_URL",
    "--rate-limit": "ACCESSCTL_RATE_LIMIT",
    "--concurrency": "ACCESSCTL_CONCURRENCY",
    "--log-format": "ACCESSCTL_LOG_FORMAT",
    "--config": "ACCESSCTL_CONFIG",
    "--no-color": "NO_COLOR",
}


def option_help(path: list[str]) -> dict[str, str]:
    command = get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    # Only options have help; arguments do not (click.Parameter has no .help).
    return {
        opt: getattr(p, "help", None) or ""
        for p in command.params
        for opt in getattr(p, "opts", [])
    }


def test_options_an_environment_variable_sets_say_which() -> None:
    helps = option_help([])
    for option, variable in ENV_OPTIONS.items():
        assert f"[env: {variable}]" in helps[option], option
    shown = " ".join(CliRunner().invoke(app, ["--help"]).stdout.split())
    assert "[env: ACCESSCTL_LOG_FORMAT]" in shown  # and the help shows it
    for command in ("submit", "batch", "retry", "worker"):
        assert "[env: ACCESSCTL_METRICS_FILE]" in option_help([command])["--metrics-file"]
        text = CliRunner().invoke(app, [command, "--help"]).stdout
        assert "--metrics-file PATH" in text, command


def test_usage_lines_read_well() -> None:
    expected = {
        "batch": "Usage: accessctl batch [OPTIONS] N",
        "submit": "Usage: accessctl submit [OPTIONS] [USER_ID...]",
        "accesses approve": "Usage: accessctl accesses approve [OPTIONS] ACCESS_ID...",
        "status": "Usage: accessctl status [OPTIONS] [BATCH_ID]",
    }
    for path, usage in expected.items():
        assert CliRunner().invoke(app, [*path.split(), "--help"]).stdout.startswith(usage), path


def test_batches_help_lists_every_state() -> None:
    from accessctl.batch_state import BatchState

    text = CliRunner().invoke(app, ["batches", "--help"]).stdout
    for state in BatchState:
        assert str(state) in text, state


def test_readme_names_the_schema_revision_migrate_reports() -> None:
    from accessctl.schema import head_revision

    head = head_revision()
    assert f"revision {head}" in README
    assert f'"revision": "{head}"' in README


def test_shell_completion_as_the_readme_says() -> None:
    import subprocess

    from conftest import ACCESSCTL_BIN

    assert "accessctl --install-completion" in README
    # Each shell's own script, whatever shell runs the test (``--show-completion`` would
    # detect the calling shell, which a CI runner may not have).
    marks = {"bash": "_accessctl_completion()", "zsh": "#compdef accessctl", "fish": "complete"}
    for shell, mark in marks.items():
        script = subprocess.run(
            [ACCESSCTL_BIN],
            env={**__import__("os").environ, "_ACCESSCTL_COMPLETE": f"source_{shell}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert script.returncode == 0, script.stderr
        assert mark in script.stdout and "_ACCESSCTL_COMPLETE" in script.stdout, shell
        assert f"_ACCESSCTL_COMPLETE=source_{shell}" in README
    completed = subprocess.run(
        [ACCESSCTL_BIN],
        env={
            **__import__("os").environ,
            "_ACCESSCTL_COMPLETE": "complete_bash",
            "COMP_WORDS": "accessctl bat",
            "COMP_CWORD": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.stdout.split() == ["batch", "batches"], completed.stderr
