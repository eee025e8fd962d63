"""One description per config field: the class docstring's ``Args:`` entry is the field's ``--help`` text.

Every config dataclass (peer/swarm/config.py, peer/config.py, monitor/config.py, monitor/launcher.py) is decorated with
`help_from_docstring`, so the docstring, ``--help`` and the README's generated flags table (docs/flags_doc.py)
say the same thing and cannot drift. A field without an entry, an entry without a field, or a help text written in
the field itself fails at import time, naming the class and the field.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types

# `name: text` at the entry indent of an Args: section
_ENTRY = re.compile(r"(?P<name>\w+): (?P<text>.+)")


def args_section(docstring: str) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style docstring, each joined into one line: {name: description}."""
    lines = inspect.cleandoc(docstring).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return {}
    entries: dict[str, str] = {}
    entry_indent, name = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            break  # a blank line ends the section
        indent = len(line) - len(line.lstrip())
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ENTRY.fullmatch(line.strip())
        if indent == entry_indent and match:
            name = match["name"]
            entries[name] = match["text"].strip()
        elif indent > entry_indent and name is not None:
            entries[name] += " " + line.strip()  # a continuation line of the entry above
        else:
            raise ValueError(f"cannot read this line of an Args: section: {line.strip()!r}")
    return entries


def help_from_docstring(cls: type) -> type:
    """Set each field's ``metadata["help"]`` of the dataclass `cls` from its docstring's ``Args:`` entry."""
    described = args_section(cls.__doc__ or "")
    names = [config_field.name for config_field in dataclasses.fields(cls)]
    missing = [name for name in names if name not in described]
    unknown = sorted(set(described) - set(names))
    if missing or unknown:
        raise TypeError(
            f"{cls.__name__}'s docstring must describe each field once under Args: "
            f"missing {missing or 'none'}, not fields {unknown or 'none'}"
        )
    for config_field in dataclasses.fields(cls):
        if "help" in config_field.metadata:
            raise TypeError(f"{cls.__name__}.{config_field.name}: describe it in the docstring only, not in help=")
        config_field.metadata = types.MappingProxyType({**config_field.metadata, "help": described[config_field.name]})
    return cls
