"""The configuration reference's flag table is generated from the config dataclasses; these keep the two in sync."""

from pathlib import Path

from docs.flags_doc import BEGIN, DOC, END, flags_markdown, replace_block
from monitor.launcher import LocalSwarmConfig
from peer.config import PeerConfig

REFERENCE = Path(__file__).resolve().parents[2] / DOC


def test_reference_flag_table_matches_the_code():
    text = REFERENCE.read_text()
    assert BEGIN in text and END in text, f"{DOC} lost its generated flags block"
    current = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert current == flags_markdown(), f"{DOC}'s flag table is stale: run `python -m docs.flags_doc --write {DOC}`"


def test_table_names_every_field_with_its_environment_variable():
    table = flags_markdown()
    for config_class in (PeerConfig, LocalSwarmConfig):
        for name in config_class.__dataclass_fields__:
            assert f"`--{name.replace('_', '-')}` | `ALBERT_{name.upper()}`" in table


def test_replace_block_keeps_the_rest_and_refuses_a_readme_without_markers():
    text = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert replace_block(text, "NEW") == "intro\nNEW\noutro\n"
    try:
        replace_block("no markers", "NEW", "README.md")
    except ValueError as error:
        assert "README.md has no flags block" in str(error) and DOC in str(error)
    else:
        raise AssertionError("a README without markers must be refused")
