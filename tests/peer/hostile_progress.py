"""A hostile DHT node's progress entries: signed records in hivemind's progress key under keys of its making."""

from __future__ import annotations

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tests.peer.test_access import LOOPBACK


class HostileProgress:
    """A DHT node of its own, storing signed progress entries of its making under ``{prefix}_progress``."""

    def __init__(self, initial_peers: list[str]):
        self.dhts: list[hivemind.DHT] = []
        self.initial_peers = initial_peers
        self._identities: dict[int, tuple[RSAPrivateKey, hivemind.DHT]] = {}

    def store(
        self,
        prefix: str,
        epoch: int,
        samples: int = 0,
        rate: float = 1.0,
        when: float | None = None,
        identity: int | None = None,
    ) -> None:
        """One entry, under a key of its own (a Sybil each time), stamped ``when`` (default: now). Entries of the same
        ``identity`` share a key and a DHT node (a Sybil refreshing its entry, as hivemind's peers do)."""
        if identity is None or identity not in self._identities:
            key = RSAPrivateKey()
            dht = hivemind.DHT(
                initial_peers=self.initial_peers,
                start=True,
                host_maddrs=LOOPBACK,
                record_validators=[RSASignatureValidator(key)],
            )
            self.dhts.append(dht)
            if identity is not None:
                self._identities[identity] = key, dht
        else:
            key, dht = self._identities[identity]
        entry = LocalTrainingProgress(
            peer_id=dht.peer_id.to_bytes(),
            epoch=epoch,
            samples_accumulated=samples,
            samples_per_second=rate,
            time=get_dht_time() if when is None else when,
            client_mode=False,
        )
        subkey = RSASignatureValidator(key).local_public_key
        stored = dht.store(
            f"{prefix}_progress", subkey=subkey, value=entry.dict(), expiration_time=get_dht_time() + 30
        )
        assert stored, "the DHT refused a schema-valid signed entry"

    def shutdown(self) -> None:
        for dht in self.dhts:
            dht.shutdown()
