"""Display names of peers (``--name``): short, printable text that every node treats as display only.

Two rules, because two kinds of sender exist. The record schema (any stranger's signed record) refuses what no
display can show safely whatever the escaping: control and format characters (bidi overrides, zero-width joiners
and other invisible text that would let one name pass for another) and anything over MAX_NAME_CHARS. Markup
characters pass the schema, so the dashboard must (and does) escape every name. An honest peer's own ``--name`` is
held to the stricter rule below (no markup characters at all), so the CLI tells its user at start, not the
dashboard later. Two peers may share a name: a name identifies nobody; the signing key's short id does.
"""

from __future__ import annotations

import unicodedata

MAX_NAME_CHARS = 32
# Unicode categories a name may not contain: control (Cc), format (Cf: bidi overrides, zero-width characters),
# surrogates (Cs), private use (Co), unassigned (Cn), and line/paragraph separators (Zl, Zp).
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
MARKUP_CHARS = frozenset("<>&\"'`")


def why_unprintable(name: str) -> str | None:
    """Why a name cannot be shown as it is (the record schema's rule), or None if it can."""
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long (at most {MAX_NAME_CHARS})"
    for char in name:
        if unicodedata.category(char) in REFUSED_CATEGORIES:
            return f"contains the unprintable character U+{ord(char):04X}"
    if name != name.strip():
        return "starts or ends with white space"
    return None


def why_refused_as_own_name(name: str) -> str | None:
    """Why a peer may not take this as its own --name (the schema's rule plus: no markup characters), or None."""
    reason = why_unprintable(name)
    if reason is not None:
        return reason
    markup = sorted(MARKUP_CHARS.intersection(name))
    if markup:
        return f"contains the markup character{'s' if len(markup) > 1 else ''} {' '.join(markup)}"
    return None
