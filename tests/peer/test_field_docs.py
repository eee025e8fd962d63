"""One description per config field: the docstring's Args: entry is the --help text, and drift fails at import."""

from __future__ import annotations

import dataclasses

import pytest

from docs.flags_doc import flags_markdown
from monitor.config import MonitorConfig
from monitor.launcher import LocalSwarmConfig
from peer.config import PeerConfig
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.field_docs import args_section, help_from_docstring
from peer.swarm.flags import parse_configs

CONFIGS = (SwarmConfig, OptimConfig, PeerConfig, MonitorConfig, LocalSwarmConfig)


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda cls: cls.__name__)
def test_help_of_every_field_is_its_docstring_entry(config_class):
    described = args_section(config_class.__doc__)
    helps = {config_field.name: config_field.metadata["help"] for config_field in dataclasses.fields(config_class)}
    assert helps == described
    assert all(text and "  " not in text for text in helps.values())  # continuation lines joined with one space


def test_help_and_flags_table_show_a_continued_entry_whole(capsys):
    # OptimConfig's optimizer entry runs over two docstring lines: both halves reach --help and the README table
    whole = "the optimizer state is shared, so every peer of a run must use the same one."
    assert OptimConfig.__dataclass_fields__["optimizer"].metadata["help"].endswith(whole)
    assert whole in flags_markdown()
    with pytest.raises(SystemExit):
        parse_configs(SwarmConfig, OptimConfig, PeerConfig, args=["--help"], environ={})
    assert "every peer of a run must use the same one" in " ".join(capsys.readouterr().out.split())


def test_a_field_the_docstring_does_not_describe_is_refused():
    @dataclasses.dataclass
    class Config:
        """A config.

        Args:
            port: the port.
        """

        port: int = 0
        host: str = "127.0.0.1"

    with pytest.raises(TypeError, match=r"Config's docstring must describe each field.*missing \['host'\]"):
        help_from_docstring(Config)


def test_a_docstring_entry_without_a_field_is_refused():
    @dataclasses.dataclass
    class Config:
        """A config.

        Args:
            port: the port.
            hots: a typo.
        """

        port: int = 0

    with pytest.raises(TypeError, match=r"not fields \['hots'\]"):
        help_from_docstring(Config)


def test_a_help_written_in_the_field_too_is_refused():
    @dataclasses.dataclass
    class Config:
        """A config.

        Args:
            port: the port.
        """

        port: int = dataclasses.field(default=0, metadata={"help": "The port, said a second time."})

    with pytest.raises(TypeError, match=r"Config.port: describe it in the docstring only"):
        help_from_docstring(Config)


def test_args_section_joins_continuations_and_stops_at_a_blank_line():
    doc = """Title.

    Args:
        first: one line.
        second: starts here
            and goes on here.

    Returns: not an entry.
    """
    assert args_section(doc) == {"first": "one line.", "second": "starts here and goes on here."}
    assert args_section("No section at all.") == {}
    with pytest.raises(ValueError, match="cannot read this line"):
        args_section("Title.\n\n    Args:\n        not an entry\n")
