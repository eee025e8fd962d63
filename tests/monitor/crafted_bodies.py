"""Crafted /api/join bodies, as an attacker would send them (raw HTTP): deep nesting, huge or non-finite numbers,
bad encodings, wrong JSON types. test_monitor_fuzz.py sends them to a closed server, test_monitor_access.py to a
running monitor.
"""

from __future__ import annotations

NOW = 1_700_000_000
JOIN = '{"peer_id": "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "public_key": "ssh-rsa AAAA", "hmac": "00", '
CRAFTED_BODIES = {
    "nested arrays": b"[" * 30_000 + b"]" * 30_000,
    "nested objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "nested in a field": (JOIN + '"timestamp": 1, "peer": ' + "[" * 20_000 + "]" * 20_000 + "}").encode(),
    "1e400 timestamp": (JOIN + '"timestamp": 1e400}').encode(),
    "10**400 timestamp": (JOIN + f'"timestamp": {10**400}}}').encode(),
    "-10**400 timestamp": (JOIN + f'"timestamp": -{10**400}}}').encode(),
    "2**53+1 timestamp": (JOIN + f'"timestamp": {2**53 + 1}}}').encode(),
    "5000-digit integer": (JOIN + '"timestamp": ' + "9" * 5000 + "}").encode(),
    "NaN timestamp": (JOIN + '"timestamp": NaN}').encode(),
    "Infinity timestamp": (JOIN + '"timestamp": -Infinity}').encode(),
    "float timestamp": (JOIN + f'"timestamp": {NOW}.5}}').encode(),
    "bool timestamp": (JOIN + '"timestamp": true}').encode(),
    "non-UTF-8": b'{"peer_id": "\xff\xfe\xc3\x28", "timestamp": 1}',
    "UTF-16": '{"timestamp": 1}'.encode("utf-16"),
    "lone surrogate escape": (JOIN + '"timestamp": 1, "signature": "\\ud800"}').encode(),
    "NUL bytes": b"\x00" * 1000,
    "empty": b"",
    "array": b"[]",
    "string": b'"join me"',
    "number": b"12",
    "null": b"null",
    "truncated": b'{"peer_id": "Qm',
    "duplicate keys": (JOIN + '"timestamp": 1, "timestamp": "x"}').encode(),
    "object fields": b'{"peer_id": {}, "public_key": [], "timestamp": 1}',
}
