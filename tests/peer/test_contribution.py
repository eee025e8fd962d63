"""A peer's lifetime ledger (peer/contribution.py) and its display-name rules (peer/swarm/names.py)."""

from __future__ import annotations

import pytest

from peer.config import PeerConfig
from peer.contribution import Contribution, contribution_path
from peer.swarm.names import MAX_NAME_CHARS, why_refused_as_own_name, why_unprintable


def test_the_ledger_goes_on_from_what_was_saved_and_not_from_what_was_not(tmp_path):
    path = contribution_path(tmp_path / "identity.key")
    ledger = Contribution(path)
    ledger.add(32, 1.5)
    ledger.save()
    ledger.add(8, 0.5)  # then a kill -9: never saved, never logged, never claimed
    restarted = Contribution(path)
    assert (restarted.samples, restarted.compute_seconds) == (32, 1.5)
    assert [p.name for p in tmp_path.iterdir()] == ["identity.key.contribution.json"]  # no temporary file left


def test_without_an_identity_nothing_is_written(tmp_path):
    ledger = Contribution(contribution_path(None))
    ledger.add(8, 1.0)
    ledger.save()
    assert ledger.path is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["not json", "[]", '{"samples": -8, "compute_seconds": 1.0}', '{"samples": 8}'])
def test_a_damaged_ledger_stops_the_peer_with_its_path_rather_than_restarting_at_zero(tmp_path, text):
    path = tmp_path / "identity.key.contribution.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="contribution.json"):
        Contribution(path)


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("Ada Lovelace", None),
        ("Zoë 李 🚀", None),
        ("<img src=x>", "markup"),
        ("Tom & Jerry", "markup"),
        ("Ada\u202egnp.exe", "U+202E"),  # right-to-left override
        ("A\u200bda", "U+200B"),  # zero-width space: looks like "Ada"
        ("line\nbreak", "U+000A"),
        (" Ada", "white space"),
        ("x" * (MAX_NAME_CHARS + 1), "characters long"),
    ],
)
def test_own_name_rules(name, refused):
    reason = why_refused_as_own_name(name)
    assert (reason is None) if refused is None else (refused in reason)


def test_the_schema_rule_lets_markup_through_for_the_pages_to_escape():
    assert why_unprintable("<img src=x onerror=alert(1)>") is None
    assert why_unprintable("Ada\u202egnp.exe") is not None


def test_the_config_refuses_a_bad_name_naming_the_flag():
    assert PeerConfig(name="Ada").name == "Ada"
    with pytest.raises(ValueError, match=r"--name '<b>' contains the markup characters < >"):
        PeerConfig(name="<b>")
