"""`--join STRING`: fetch and verify the run's signed manifest, fetch its tokenizer if missing, adopt the run's settings.

Runs before anything else of the peer, over a short-lived p2p daemon of its own (the peer's DHT then starts as
usual, with the run id, run key and initial peers of the join string). A run-wide setting given locally (flag or
ALBERT_* variable) that differs from the manifest is refused with one line naming the field and both values; the
peer tells the monitor first, so that the organiser's log says why too. Per-peer settings stay as given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hivemind.p2p import P2P, P2PDaemonError, PeerID

from data.tokenization import BUNDLED_TOKENIZER
from peer.config import PeerConfig
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.dht import SwarmJoinError
from peer.swarm.flags import field_scope
from peer.swarm.join_string import JoinString
from peer.swarm.manifest import (
    MAX_MANIFEST_BYTES,
    ManifestError,
    canonical,
    tokenizer_listing,
    verify_manifest,
)
from peer.swarm.manifest_protocol import MAX_NOTICE_CHARS, ProtocolError, ask

logger = logging.getLogger(__name__)


class SettingContradicts(ValueError):
    """A run-wide setting given locally differs from the run's manifest."""


@dataclasses.dataclass
class Joined:
    """The configs a peer runs with after adopting its run's manifest, and the manifest itself."""

    swarm: SwarmConfig
    optim: OptimConfig
    config: PeerConfig
    manifest: dict


def join_run(swarm: SwarmConfig, optim: OptimConfig, config: PeerConfig, explicit: set[str]) -> Joined:
    """Adopt the run of ``config.join``. ValueError (exit 2) for a bad string, manifest or contradicting setting;
    SwarmJoinError (exit 3) if the monitor cannot be reached."""
    join = JoinString.decode(config.join)
    for name, value in (("run_id", join.run_id), ("run_key", join.run_key)):
        if name in explicit and getattr(swarm, name) != value:
            raise SettingContradicts(_contradiction(name, getattr(swarm, name), value))
    try:
        # a loop left open, not asyncio.run's: p2pd's exit may be reported to it afterwards, which a closed loop
        # logs as a warning below the one line that says why the peer stops
        return asyncio.new_event_loop().run_until_complete(_join(join, swarm, optim, config, explicit))
    except (P2PDaemonError, ProtocolError, ConnectionError) as error:  # not a local file error: those say themselves
        raise SwarmJoinError(
            f"could not fetch the manifest of run {join.run_id!r} from its monitor ({error}): is the monitor up, and can "
            "this machine reach the addresses in the join string?"
        ) from error


async def _join(join: JoinString, swarm: SwarmConfig, optim: OptimConfig, config: PeerConfig, explicit) -> Joined:
    logger.info(f"Fetching the signed manifest of run {join.run_id!r} from its monitor ({join.initial_peers[0]}, ...)")
    # a throwaway identity (the peer's own may be checked for being in use when its DHT starts right after), and
    # no port mapping or reachability probes: this daemon only dials out, for a few seconds
    p2p = await P2P.create(initial_peers=list(join.initial_peers), auto_nat=False, nat_port_map=False)
    try:
        monitor, document = await _fetch_manifest(p2p, join)
        manifest = verify_manifest(document, join.run_key, join.run_id)
        try:
            adopted = Joined(
                dataclasses.replace(
                    swarm, run_id=join.run_id, run_key=join.run_key, initial_peers=_peers(join, swarm)
                ),
                adopt_optim(optim, manifest, explicit),
                await _adopt_peer_settings(config, manifest, explicit, p2p, monitor),
                manifest,
            )
        except SettingContradicts as refusal:
            await _tell_monitor(p2p, monitor, str(refusal))
            raise
    finally:
        await p2p.shutdown()
    logger.info(f"Adopted the signed manifest of run {join.run_id!r}: {settings_line(adopted)}")
    return adopted


def _peers(join: JoinString, swarm: SwarmConfig) -> list[str]:
    return list(dict.fromkeys([*join.initial_peers, *swarm.initial_peers]))


async def _fetch_manifest(p2p: P2P, join: JoinString) -> tuple[PeerID, bytes]:
    """The signed manifest from the first initial peer that serves it (the monitor's addresses come first)."""
    # the last /p2p/ is the monitor's own (a relayed address names the relay's first); JoinString checked each has one
    peer_ids = list(dict.fromkeys(maddr.rsplit("/p2p/", 1)[1] for maddr in join.initial_peers))
    failures = []
    for attempt in range(3):  # the daemon connects to its bootstrap peers in the background: give it a moment
        for peer_id in map(PeerID.from_base58, peer_ids):
            try:
                return peer_id, await ask(p2p, peer_id, {"get": "manifest"}, MAX_MANIFEST_BYTES)
            except (ProtocolError, P2PDaemonError, OSError) as error:
                failures.append(f"{peer_id}: {error}")
        await asyncio.sleep(1.0 + attempt)
    raise ProtocolError("; ".join(failures[-len(peer_ids) :]))


def _contradiction(name: str, local, run) -> str:
    flag = "--" + name.replace("_", "-")
    return (
        f"{flag} {local} contradicts the run's {name} {run} (its signed manifest): remove {flag} (and ALBERT_"
        f"{name.upper()}) to take the run's value"
    )


def adopt_optim(optim: OptimConfig, manifest: dict, explicit: set[str]) -> OptimConfig:
    """The run's value of every run-wide optimizer setting; a differing local one is refused."""
    known = {item.name for item in dataclasses.fields(OptimConfig)}
    settings = manifest["optim"]
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ManifestError(f"the run sets {', '.join(unknown)}, which this peer does not know: upgrade albert-swarm")
    values = {}
    for name, entry in settings.items():
        if field_scope(OptimConfig, name) != "run-wide":
            continue  # this peer's own choice, whatever the organiser's monitor uses
        value = entry["value"]
        if name in explicit and getattr(optim, name) != value:
            raise SettingContradicts(_contradiction(name, getattr(optim, name), value))
        values[name] = value
    adopted = dataclasses.replace(optim, **values)
    if adopted.training_mode != manifest.get("training_mode"):  # signed, so a bug of the monitor's, not an attack
        raise ManifestError(
            f"the run manifest names mode {manifest.get('training_mode')!r} but its settings make {adopted.training_mode!r}"
        )
    return adopted


async def _adopt_peer_settings(config: PeerConfig, manifest: dict, explicit, p2p: P2P, monitor: PeerID) -> PeerConfig:
    cache = Path(config.cache_dir).expanduser()
    model = adopt_model(config, manifest["model"], explicit, cache)
    tokenizer = await _adopt_tokenizer(config, manifest["tokenizer"]["files"], explicit, p2p, monitor, cache)
    corpus = config.corpus if "corpus" in explicit else manifest.get("corpus", {}).get("spec")
    return dataclasses.replace(config, model=model, tokenizer=tokenizer, corpus=corpus)


def adopt_model(config: PeerConfig, model: dict, explicit: set[str], cache: Path) -> str:
    """The run's model as a --model value: its preset name, or its config.json written to the cache."""
    if model.get("config") is None:
        if "model" in explicit and config.model != model["name"]:
            raise SettingContradicts(_contradiction("model", config.model, model["name"]))
        return model["name"]
    if not isinstance(model["config"], dict):
        raise ManifestError("the run manifest's model config is not a JSON object")
    content = canonical(model["config"])
    if "model" in explicit and _config_json(config.model) != model["config"]:
        raise SettingContradicts(_contradiction("model", config.model, f"{model['name']} (a config.json)"))
    target = cache / "models" / hashlib.sha256(content).hexdigest()[:16] / "config.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    return str(target)


def _config_json(name: str) -> dict | None:
    path = Path(name)
    try:
        return json.loads((path / "config.json" if path.is_dir() else path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


async def _adopt_tokenizer(config: PeerConfig, files: dict, explicit, p2p: P2P, monitor: PeerID, cache: Path) -> str:
    """A directory holding exactly the run's tokenizer files: the local one, the bundled one, cached, or fetched."""
    if "tokenizer" in explicit:
        if _listing_or_none(config.tokenizer) != files:
            raise SettingContradicts(
                f"--tokenizer {config.tokenizer} contradicts the run's tokenizer (files and sha256 of its signed manifest"
                "): remove --tokenizer (and ALBERT_TOKENIZER) to fetch the run's"
            )
        return config.tokenizer
    if _listing_or_none(BUNDLED_TOKENIZER) == files:
        return BUNDLED_TOKENIZER
    target = cache / "tokenizers" / hashlib.sha256(canonical(files)).hexdigest()[:16]
    if _listing_or_none(target) == files:
        logger.info(f"The run's tokenizer is in the cache: {target}")
        return str(target)
    await fetch_tokenizer(p2p, monitor, files, target)
    return str(target)


def _listing_or_none(directory) -> dict | None:
    try:
        return tokenizer_listing(directory) if directory and Path(directory).is_dir() else None
    except (OSError, ValueError):
        return None


async def fetch_tokenizer(p2p: P2P, monitor: PeerID, files: dict, target: Path) -> None:
    """Download every listed file, check its size and sha256, then move the whole directory into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        for name, entry in files.items():
            data = await ask(p2p, monitor, {"get": "tokenizer", "name": name}, entry["size"])
            digest = hashlib.sha256(data).hexdigest()
            if len(data) != entry["size"] or digest != entry["sha256"]:
                raise ManifestError(
                    f"the monitor sent tokenizer file {name} with sha256 {digest}, the signed manifest says "
                    f"{entry['sha256']}: refusing it"
                )
            (partial / name).write_bytes(data)
        shutil.rmtree(target, ignore_errors=True)  # a stale or damaged copy of another attempt
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info(f"Fetched the run's tokenizer ({len(files)} files, sha256 checked) into {target}")


async def _tell_monitor(p2p: P2P, monitor: PeerID, reason: str) -> None:
    try:
        await ask(p2p, monitor, {"refused": reason[:MAX_NOTICE_CHARS]}, 0)
    except (ProtocolError, P2PDaemonError, OSError) as error:
        logger.warning(f"Could not tell the monitor why this peer refuses to join: {error}")


def settings_line(joined: Joined) -> str:
    """The adopted run-wide settings, for the log: what this peer trains with, read back by operators and tests."""
    optim = {
        item.name: getattr(joined.optim, item.name)
        for item in dataclasses.fields(OptimConfig)
        if field_scope(OptimConfig, item.name) == "run-wide"
    }
    config = joined.config
    settings = {"run_id": joined.swarm.run_id, "training_mode": joined.manifest.get("training_mode"), **optim}
    settings.update(model=config.model, tokenizer=config.tokenizer, corpus=config.corpus or "bundled")
    return json.dumps(settings, default=str)
