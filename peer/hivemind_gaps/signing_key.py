"""A signing key that outlives the process: hivemind draws a fresh RSA key at every start (gap 13).

Every record a peer signs (its progress record, hivemind's own tracker entries, a closed run's access token) is owned
by ``RSAPrivateKey.process_wide()``, which hivemind generates anew in each process and offers no way to load. The
monitor knows a peer only by that key, so without this a restarted peer is a new contributor and its history ends.
``use_signing_key`` loads the key from a file (creating it on first use, readable by its owner only) and presets it
as the process-wide key; it must run before anything asks for that key (DHT, Optimizer, admission).
"""

from __future__ import annotations

import os
from pathlib import Path

from hivemind.utils.crypto import RSAPrivateKey

from peer.swarm.access_tokens import read_private_key, write_private_key


def signing_key_path(identity_path: str | os.PathLike) -> Path:
    """Where the signing key of the peer whose libp2p identity is ``identity_path`` lives: next to it."""
    return Path(f"{identity_path}.signing-key")


def use_signing_key(path: str | os.PathLike) -> RSAPrivateKey:
    """Load (or create) the RSA key at ``path`` and make it this process's hivemind signing key.

    ValueError if another key already signs for this process: records would then be owned by two keys.
    """
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_key(path, RSAPrivateKey())
    key = read_private_key(path)
    with RSAPrivateKey._process_wide_key_lock:
        current = RSAPrivateKey._process_wide_key
        if current is not None and current.to_bytes() != key.to_bytes():
            raise ValueError(f"this process already signs with another key than {path}")
        RSAPrivateKey._process_wide_key = key
    return key
