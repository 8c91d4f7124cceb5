"""How click parses and fails, made to fit an operator's tool.

- Every error is one line, ``accessctl: error: ...``, with its exit code: click's own usage
  errors too (a missing argument, an unknown option, ``--limit 0``), which click would print
  as a usage block in several lines.
- A command given ``--json`` (or ``-o json``/``jsonl``) that fails also prints
  ``{"error": ..., "exit_code": ...}`` on stdout, so a script that always parses stdout
  never reads nothing.
- Global options (``--no-color``, ``--database-url``, ...) work after the command too:
  they are moved before it, unless the command has an option of the same name
  (``limit set --concurrency``).
- Help shows readable placeholders (``N``, ``PATH``, ``USER_ID...``), never Typer's type
  labels (``<str>``, ``<list[str]>``).
- ``batch -1`` is a count out of bounds (exit 2, naming the bounds), not click's unknown
  option ``-1`` (``CountCommand``).
- An exception becomes its line and exit code in one function, ``error_exit``: the
  commands' ``handles_errors`` and the checks that run before a command both use it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

# Typer 0.29 parses with its own copy of click (typer._click), not the click package:
# its exceptions and contexts are the ones to catch and read.
from typer._click import exceptions as click_exceptions
from typer._click.core import Command, Context
from typer._click.globals import get_current_context
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.exceptions import Abort, Exit

from accessctl.exceptions import AccessctlError, ExitCode

PROG = "accessctl"
# The command line being run, for errors raised before a command has its parameters.
_argv: list[str] = []


def json_requested(ctx: Context | None = None) -> bool:
    """Whether the failing command was asked for JSON: from its parsed parameters when it
    has them, else from the command line as given."""
    ctx = ctx or get_current_context(silent=True)
    while ctx is not None:
        if "as_json" in ctx.params or "output" in ctx.params:
            return bool(ctx.params.get("as_json")) or ctx.params.get("output") in (
                "json",
                "jsonl",
            )
        ctx = ctx.parent
    return argv_requests_json(_argv)


def argv_requests_json(args: Sequence[str]) -> bool:
    previous = ""
    for token in args:
        if token == "--":
            break
        if token == "--json" or token in ("--output=json", "--output=jsonl", "-ojson", "-ojsonl"):
            return True
        if previous in ("-o", "--output") and token in ("json", "jsonl"):
            return True
        previous = token
    return False


def report_error(message: str, code: int, *, as_json: bool | None = None) -> None:
    """One line on stderr; with JSON asked for, the same as one object on stdout."""
    line = " ".join(message.split()) if "\n" in message else message
    sys.stderr.write(f"{PROG}: error: {line}\n")
    sys.stderr.flush()
    if json_requested() if as_json is None else as_json:
        print_json_error(line, code)


def print_json_error(message: str, code: int) -> None:
    sys.stdout.write(json.dumps({"error": message, "exit_code": code}, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def error_exit(exc: BaseException, *, url: str | None = None) -> Exit:
    """The one mapping from an exception to the line an operator reads and the documented
    exit code: reported now (``report_error``); the caller raises the returned ``Exit``.
    ``url``: the configured database URL, whose passwords are scrubbed from any text."""
    if isinstance(exc, AccessctlError):
        return _reported(exc.message, int(exc.exit_code))
    if isinstance(exc, KeyboardInterrupt):
        return _reported("interrupted", int(ExitCode.INTERRUPTED))
    from sqlalchemy.exc import DBAPIError

    from accessctl.db import describe_db_error

    if isinstance(exc, DBAPIError):
        return _reported(f"database error: {describe_db_error(exc, url=url)}", int(ExitCode.CONFIG))
    # A bug of ours: one line for the operator, the traceback only with -v.
    import structlog

    structlog.get_logger("accessctl").debug("internal error", exc_info=exc)
    detail = describe_db_error(exc, url=url)[:200] if str(exc).strip() else ""
    return _reported(
        f"internal error: {type(exc).__name__}: {detail} (rerun with -v for the traceback)",
        int(ExitCode.CONFIG),
    )


def _reported(message: str, code: int) -> Exit:
    report_error(message, code)
    return Exit(code)


def describe_click_error(exc: click_exceptions.ClickException) -> str:
    """click's message, naming the command, with where to look for the right usage."""
    message = exc.format_message().strip().rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click_exceptions.UsageError) and ctx is not None:
        path = ctx.command_path
        if ctx.parent is not None:  # a subcommand: name it, the message may not
            message = f"{path.split(' ', 1)[1]}: {message}"
        return f"{message} (see '{path} --help')"
    return message


class AccessctlArgument(TyperArgument):
    """An argument shown by its metavar alone: ``N``, ``[USER_ID]...``, ``ACCESS_ID...``."""

    def display_type_rich(self, ctx: Context) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        if self.nargs != 1 and not name.endswith("..."):
            name += "..."
        return name if self.required else f"[{name}]"

    def _rich_display_name(self) -> str:
        name = self.display_name_raw
        return name if self.nargs == 1 or name.endswith("...") else name + "..."


class AccessctlOption(TyperOption):
    """An option shown with a readable placeholder, never a type label: its metavar, or
    its name in capitals."""

    def display_type_rich(self, ctx: Context) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar is not None:
            return self.metavar
        return (self.name or "value").upper()


def readable_params(command: Command) -> None:
    for param in command.params:
        if type(param) is TyperArgument:
            param.__class__ = AccessctlArgument
        elif type(param) is TyperOption:
            param.__class__ = AccessctlOption


class AccessctlCommand(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        readable_params(self)


_NEGATIVE_NUMBER = re.compile(r"-\d[\d.,_]*(?:[eE][+-]?\d+)?")


class CountCommand(TyperCommand):
    """``batch -1`` is a count out of bounds, not an unknown option ``-1``: say so in our
    one line, naming the bounds, before click's parser reports "No such option"."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        takes_value = {
            opt
            for param in self.params
            if param.param_type_name == "option" and not getattr(param, "is_flag", False)
            for opt in (*param.opts, *param.secondary_opts)
        }
        previous: str | None = None
        for token in args:
            if token == "--":
                break
            if previous not in takes_value and _NEGATIVE_NUMBER.fullmatch(token):
                from accessctl.inputs import parse_count

                try:
                    parse_count(token, ctx.obj["settings"]().max_batch)
                except AccessctlError as exc:
                    raise error_exit(exc) from None
            previous = token
        return super().parse_args(ctx, args)


class AccessctlGroup(TyperGroup):
    """The ``accessctl`` group: one-line errors, JSON errors, global options anywhere."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        readable_params(self)
        for command in self.commands.values():
            if isinstance(command, TyperGroup):
                readable_params(command)
            for sub in getattr(command, "commands", {}).values():
                readable_params(sub)
            readable_params(command)

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        given = list(sys.argv[1:] if args is None else args)
        _argv[:] = given
        try:
            code = super().main(
                self.hoist_global_options(given),
                prog_name or PROG,
                complete_var,
                standalone_mode=False,
                **extra,
            )
        except click_exceptions.NoArgsIsHelpError as exc:
            exc.show()  # `accessctl` alone: the help, as before
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            report_error(describe_click_error(exc), exc.exit_code)
            sys.exit(exc.exit_code)
        except Abort:
            report_error("aborted", 1)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def hoist_global_options(self, args: list[str]) -> list[str]:
        """``accessctl batches --no-color`` as ``accessctl --no-color batches``: a global
        option after the command moves before it, with its value, unless the command has
        an option of that name itself."""
        takes_value = _option_names(self, with_value=True)
        flags = _option_names(self, with_value=False)
        ctx = Context(self, info_name=PROG, resilient_parsing=True)
        # Find the command: skip the group's own options (and their values).
        i = 0
        command: Command = self
        while i < len(args):
            token = args[i]
            if token == "--":
                return args
            if token.startswith("-"):
                i += 2 if token in takes_value and isinstance(command, TyperGroup) else 1
                continue
            if not isinstance(command, TyperGroup):
                break
            found = command.get_command(ctx, token)
            if found is None:
                return args  # click will say "No such command"
            command = found
            i += 1
            if not isinstance(command, TyperGroup):
                break
        if command is self or i >= len(args):
            return args
        own_value = _option_names(command, with_value=True)
        own = own_value | _option_names(command, with_value=False)
        head, tail, moved = args[:i], args[i:], []
        kept: list[str] = []
        j = 0
        while j < len(tail):
            token = tail[j]
            if token == "--":
                kept += tail[j:]
                break
            name = token.split("=", 1)[0]
            if name in own:
                kept.append(token)
                if token in own_value and j + 1 < len(tail):
                    kept.append(tail[j + 1])
                    j += 1
            elif name in takes_value:
                moved.append(token)
                if "=" not in token and j + 1 < len(tail):
                    moved.append(tail[j + 1])
                    j += 1
            elif token in flags:
                moved.append(token)
            else:
                kept.append(token)
            j += 1
        # Globals go right after the program's name, where the group parses them.
        return moved + head + kept if moved else args


def _option_names(command: Command, *, with_value: bool) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        if not isinstance(param, TyperOption):
            continue
        if (param.is_flag or param.count) == with_value:
            continue
        if param.name in ("help", "version", "install_completion", "show_completion"):
            continue
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names
