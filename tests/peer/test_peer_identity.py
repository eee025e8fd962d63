"""A peer's identity file and the proofs a join request carries (peer/swarm/peer_identity.py), against hivemind's own
reading of the file and against malformed or borrowed proofs."""

from __future__ import annotations

import base64

from hivemind.p2p import P2P, PeerID

from peer.swarm.peer_identity import PeerIdentity, peer_proof_problem

MESSAGE = b"join request body"


def test_the_peer_id_of_an_identity_file_is_hiveminds(tmp_path):
    path = tmp_path / "identity.key"
    P2P.generate_identity(str(path))
    assert PeerIdentity.load(path).peer_id == PeerID.from_identity(path.read_bytes())


def test_a_proof_by_the_named_identity_passes():
    identity = PeerIdentity.generate()
    key = base64.b64encode(identity.public_key).decode()
    assert peer_proof_problem(identity.peer_id.to_base58(), key, MESSAGE, identity.sign(MESSAGE)) is None


def test_malformed_or_borrowed_proofs_are_refused_by_name():
    identity, other = PeerIdentity.generate(), PeerIdentity.generate()
    peer_id, key = identity.peer_id.to_base58(), base64.b64encode(identity.public_key).decode()
    signature = identity.sign(MESSAGE)
    malformed = "'peer_key' or 'peer_signature' is malformed"
    assert peer_proof_problem(peer_id, "not base64!", MESSAGE, signature) == malformed
    assert peer_proof_problem(peer_id, key, MESSAGE, "not base64!") == malformed
    assert peer_proof_problem(peer_id, base64.b64encode(b"x" * 4096).decode(), MESSAGE, signature) == (
        "'peer_key' is too long"
    )
    # another peer's key under this peer id, and this peer's key signed by another
    other_key = base64.b64encode(other.public_key).decode()
    assert (
        peer_proof_problem(peer_id, other_key, MESSAGE, signature) == f"'peer_key' is not the key of peer id {peer_id}"
    )
    assert "is not a signature of this request" in peer_proof_problem(peer_id, key, MESSAGE, other.sign(MESSAGE))
    # a valid proof of another message
    assert "is not a signature of this request" in peer_proof_problem(peer_id, key, b"another body", signature)
