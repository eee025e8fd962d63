"""Config dataclasses from CLI flags and ALBERT_* environment variables, for every node's command line.

A flag wins over its environment variable (``--run-id`` over ``ALBERT_RUN_ID``), which wins over the default.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import types
from collections.abc import Sequence
from dataclasses import fields

from transformers import HfArgumentParser

ENV_PREFIX = "ALBERT_"


def env_var(field_name: str) -> str:
    """The environment variable that sets a config field, e.g. run_id -> ALBERT_RUN_ID."""
    return ENV_PREFIX + field_name.upper()


def require_positive(config, *names: str) -> None:
    """Raise ValueError naming the first of ``names`` whose value is not above zero."""
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)!r}")


def require_non_negative(config, *names: str) -> None:
    """Raise ValueError naming the first of ``names`` whose value is below zero."""
    for name in names:
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be zero or positive, got {getattr(config, name)!r}")


SCOPES = ("run-wide", "per-peer", "run-default")
SCOPE_MARKS = {"run-wide": " [run-wide: --join takes it from the run]", "run-default": " [run default with --join]"}


def scoped(default: str = "per-peer", **exceptions: str):
    """Class decorator: the scope of each field of a config dataclass (peer/swarm/manifest.py says what each means).

    `default` covers every field not named in `exceptions`, so a field added to the class later takes the class's
    scope without further edits. Set after the dataclass is made: scopes are no fields.
    """
    for scope in (default, *exceptions.values()):
        if scope not in SCOPES:
            raise ValueError(f"a field scope is one of {SCOPES}, got {scope!r}")

    def mark(config_type: type) -> type:
        config_type.field_scopes = (default, exceptions)
        return config_type

    return mark


def field_scope(config_type: type, name: str) -> str:
    """Whether a config field is run-wide, per-peer or a run default; a class without `scoped` is per-peer."""
    default, exceptions = getattr(config_type, "field_scopes", ("per-peer", {}))
    return exceptions.get(name, default)


def int_or_word(text: str) -> int | str:
    """An ``int | str`` flag's value: an integer if it reads as one, else the word (the config checks which)."""
    try:
        return int(text)
    except ValueError:
        return text


class EnvArgumentParser(HfArgumentParser):
    """HfArgumentParser whose defaults come from ALBERT_* environment variables, named in every --help line."""

    def __init__(self, dataclass_types, environ: dict | None = None, **kwargs):
        self.environ = os.environ if environ is None else environ
        super().__init__(dataclass_types, **kwargs)

    def _add_dataclass_arguments(self, dtype):
        self._adding = dtype  # which class the fields below belong to, for their scope
        super()._add_dataclass_arguments(dtype)

    def _parse_dataclass_field(self, parser, dataclass_field):
        # a copy, so that the class's own field metadata is not rewritten each time a parser is built
        annotated = copy.copy(dataclass_field)
        mark = SCOPE_MARKS.get(field_scope(self._adding, dataclass_field.name), "")
        help_text = f"{dataclass_field.metadata.get('help', '')}{mark} [env {env_var(dataclass_field.name)}]"
        annotated.metadata = types.MappingProxyType({**dataclass_field.metadata, "help": help_text})
        if annotated.type == int | str:  # HfArgumentParser would parse it as int only: "--batch-size auto" needs both
            annotated.type = int_or_word
        super()._parse_dataclass_field(parser, annotated)

    def env_arguments(self) -> list[str]:
        """Command-line tokens equivalent to the ALBERT_* variables that are set (placed before the real flags)."""
        tokens = []
        for dataclass_type in self.dataclass_types:
            for dataclass_field in fields(dataclass_type):
                value = self.environ.get(env_var(dataclass_field.name))
                if value is None or value.strip() == "":
                    continue
                if getattr(dataclass_field.type, "__origin__", None) is list:
                    # lists come as space- or comma-separated words, e.g. ALBERT_INITIAL_PEERS="/ip4/... /ip4/..."
                    tokens += [f"--{dataclass_field.name}", *shlex.split(value.replace(",", " "))]
                else:
                    tokens.append(f"--{dataclass_field.name}={value}")
        return tokens

    def error(self, message: str):
        in_env = [name for name in self.environ if name.startswith(ENV_PREFIX)]
        if in_env:
            message += f" (values may come from the environment: {', '.join(sorted(in_env))})"
        super().error(message)


def parse_configs(*dataclass_types: type, args: Sequence[str] | None = None, environ: dict | None = None):
    """Parse the given config dataclasses from ALBERT_* variables then flags; exit with a clear message if invalid.

    Returns one instance per type, in order. Validation errors from ``__post_init__`` exit with status 2 like
    argparse's own errors, naming the offending value.
    """
    parser = EnvArgumentParser(dataclass_types, environ=environ)
    argv = list(sys.argv[1:] if args is None else args)
    try:
        return parser.parse_args_into_dataclasses(args=parser.env_arguments() + argv, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))


def explicit_fields(
    *dataclass_types: type, args: Sequence[str] | None = None, environ: dict | None = None
) -> set[str]:
    """Names of the fields set by a flag or an ALBERT_* variable rather than left at their default.

    The same parser with every default suppressed: what remains in the namespace was given (argparse's own prefix
    matching and --no-x negations included). Call it after ``parse_configs``, which has rejected bad input.
    """
    parser = EnvArgumentParser(dataclass_types, environ=environ)
    names = {item.name for kind in dataclass_types for item in fields(kind)}
    # on the actions themselves: a parser-level default (set_defaults) would be put in the namespace and converted
    for action in parser._actions:  # argparse offers no public list of a parser's actions
        if action.dest in names:
            action.default = argparse.SUPPRESS
    argv = list(sys.argv[1:] if args is None else args)
    namespace, _ = parser.parse_known_args(parser.env_arguments() + argv)
    return set(vars(namespace))
