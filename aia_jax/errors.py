"""Errors of bad input or usage, and how the command-line programs report them.

Every such error's message is one line naming the file, line, flag or config key and what was
expected. The programs (`train.py`, `python -m aia_jax.evaluate`, `.predict`, `.export`,
`.convert`) print it as `<program>: error: <message>` and exit with status 2 instead of a
traceback; argparse's own errors too, without the usage above them. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import numbers
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn


class UserError(ValueError):
    """Bad input or usage (a file, a flag, a config value); the message says which and why."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist or is not what was expected."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its usage errors on one line, `prog: error: message`, status 2.

    argparse prints the usage above the error; a wrapped usage can be many lines and push the
    error out of a job log's last line. `--help` still prints it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def checked_positive_int(name: str, value: Any) -> int:
    """`value` as an int, or a one-line `UserError` naming `name` unless it is a positive integer.

    For library arguments (`positive_int` is the command-line flags' twin); a bool is no count.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{name} {value!r}: expected a positive integer")
    return int(value)


def positive_int(text: str) -> int:
    """An argparse `type` for counts and sizes: a positive integer, or a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def unknown_field(node: Any, known: Any, prefix: str = "", skip: Sequence[str] = ()) -> str | None:
    """The first field of config `node` that `known` (its defaults) lacks, as a message, or None.

    Nested configs are walked, except the fields named in `skip` (full paths without `prefix`'s
    'config.'), which another part checks. The message names the field and suggests the closest
    known one: `config.num_epoch: no such field (did you mean config.num_epochs?)`.
    """
    for key in node.keys():
        if key not in known:
            close = difflib.get_close_matches(key, list(known.keys()), n=1)
            hint = f" (did you mean config.{prefix}{close[0]}?)" if close else ""
            return f"config.{prefix}{key}: no such field{hint}"
        child, schema = node[key], known[key]
        if f"{prefix}{key}" not in skip and hasattr(child, "keys") and hasattr(schema, "keys"):
            message = unknown_field(child, schema, f"{prefix}{key}.", skip)
            if message:
                return message
    return None


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (whitespace runs, newlines included, become a space)."""
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def reported_as_usage_errors(program: str) -> Iterator[None]:
    """Turns a `UserError` raised inside into `program: error: …` on stderr and exit status 2."""
    try:
        yield
    except UserError as e:
        print(f"{program}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def add_config_package_to_path(argv: Sequence[str], flag: str = "config") -> None:
    """Puts the folder holding a `configs/` package on `sys.path` when `--config` is a file in it.

    The project's config files import `configs.common`; `train.py` finds it beside itself, a
    module run from elsewhere (`python -m aia_jax.evaluate`) would not.
    """
    path = _flag_value(argv, flag)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        root = os.path.dirname(folder)
        if root not in sys.path:
            sys.path.append(root)


def load_config_flag(holder: Any, argv: Sequence[str], flag: str = "config") -> Any:
    """The ConfigDict of an ml_collections `DEFINE_config_file` flag, loading errors as UserError.

    ml_collections defers a config file's loading errors (missing file, syntax error, no
    `get_config`) to the first use of the config; this uses it once and names the file.

    Args:
      holder: the flag holder `DEFINE_config_file` returned (after the flags were parsed).
      argv: the command line, to name the config file.
      flag: the flag's name.
    """
    try:
        config = holder.value
        config.to_dict()  # a file that failed to load raises only here
    except (OSError, SyntaxError, AttributeError, ImportError, TypeError, ValueError) as e:
        path = _flag_value(argv, flag)
        raise UserError(f"--{flag} {path}: cannot load the config file: {_last_line(e)}") from None
    return config


def _flag_value(argv: Sequence[str], flag: str) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def unknown_override(error: BaseException, argv: Sequence[str], flag: str = "config") -> str:
    """The message for an override ml_collections rejected while parsing (`--config.x.y=v`).

    ml_collections raises it as an AttributeError around a `KeyError` of the last name only;
    `argv` gives the whole override back.
    """
    inner = error.args[0] if error.args else error
    if isinstance(inner, KeyError) and inner.args:
        inner = inner.args[0]
    # For a near miss ml_collections adds a line: 'nmae'\nDid you mean "name" instead of "nmae"?
    name, _, hint = str(inner).partition("\n")
    name, hint = name.strip("\"'"), hint.strip()
    hint = f" ({hint})" if hint else ""
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key.startswith(f"--{flag}.") and key.rsplit(".", 1)[-1] == name:
            return f"{key}: the config has no field {key[len(flag) + 3 :]!r}{hint}"
    return f"a --{flag}.* override names a field the config does not have ({name!r}){hint}"


def _last_line(error: BaseException) -> str:
    """The last line of an error (or its cause): where ml_collections puts the reason."""
    cause = error.__cause__ or error
    if isinstance(cause, SyntaxError):
        return f"line {cause.lineno}: {cause.msg}"
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__
