"""The monitor's side of joining by join string: it serves the signed run manifest and the tokenizer files over p2p.

A handler (peer/swarm/manifest_protocol.py) registered on the DHT's p2p daemon, run by an asyncio loop in a thread
of its own, so the monitor's main loop never waits on a stranger's stream. It also logs, once per peer, why a peer
refused to join (its settings contradict the manifest): the organiser sees it without asking the volunteer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import suppress
from pathlib import Path

from hivemind import DHT
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from data.tokenization import BUNDLED_TOKENIZER
from model.configuration import PRESETS
from monitor.config import MonitorConfig
from monitor.state import RunModel
from peer.swarm.config import OptimConfig
from peer.swarm.manifest import build_manifest
from peer.swarm.manifest_protocol import (
    HANDLER,
    MAX_NOTICE_CHARS,
    REQUEST_TIMEOUT,
    ProtocolError,
    answer,
    one_line,
    read_request,
)

logger = logging.getLogger(__name__)
# A stranger's peer ids are free: at most this many refusal lines a minute (each peer once a minute), so a flood
# neither fills the log nor silences the refusals of honest peers that come after it.
MAX_NOTICES_PER_MINUTE = 60
MAX_STREAMS = 16  # manifest and tokenizer requests served at once (a joiner makes a few, one after the other)
# A stream beyond MAX_STREAMS is told "busy", but only after its request line is read (or this many seconds): a
# stream closed with the request unread is reset, and the reset can drop the answer before the asker reads it (CI).
BUSY_READ_TIMEOUT = 2.0
MAX_BUSY = 64  # busy answers pending at once; beyond them a stream is closed unanswered
START_TIMEOUT = 30.0


def tokenizer_dir(config: MonitorConfig) -> Path:
    return Path(config.tokenizer or BUNDLED_TOKENIZER).expanduser()


def model_config_json(name: str) -> dict | None:
    """The config.json content of a model that is not a preset (peers do not have the organiser's file); None else."""
    if name in PRESETS:
        return None
    path = Path(name)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text(encoding="utf-8"))


def run_manifest(run_id: str, optim: OptimConfig, config: MonitorConfig, run_model: RunModel) -> dict:
    """The manifest of the run this monitor serves (unsigned)."""
    return build_manifest(
        run_id,
        optim,
        model_name=config.model,
        model_config=model_config_json(config.model),
        model_hash=run_model.fingerprint,
        tokenizer_dir=tokenizer_dir(config),
        corpus=config.corpus,
    )


class ManifestServer:
    """Serves one run's signed manifest and its tokenizer files to joining peers.

    Args:
        dht: the monitor's DHT, whose p2p daemon the handler is registered with.
        run_id: the run, named in the refusal log lines.
        document: the signed manifest (peer/swarm/manifest.py `sign_manifest`).
        tokenizer_dir: the directory whose files the manifest lists.
        file_names: the listed names: only these are served, read once at start (they were hashed then).
    """

    def __init__(self, dht: DHT, run_id: str, document: bytes, tokenizer_dir: str | Path, file_names: list[str]):
        self.run_id, self.document = run_id, document
        self.files = {name: (Path(tokenizer_dir) / name).read_bytes() for name in file_names}
        self.noticed: set[str] = set()  # peers whose refusal was logged in the current minute
        self._window_start = time.monotonic()
        # streams served at once: a stranger who opens many and never reads the answers holds a bounded few
        self._serving: asyncio.Semaphore | None = None
        self._busy = 0  # streams waiting for their "busy" answer
        self._loop = asyncio.new_event_loop()
        self._p2p: P2P | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="manifest-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._register(dht), self._loop).result(START_TIMEOUT)

    async def _register(self, dht: DHT) -> None:
        self._serving = asyncio.Semaphore(MAX_STREAMS)  # made in the server's loop, which uses it
        self._p2p = await dht.replicate_p2p()
        await self._p2p.add_binary_stream_handler(HANDLER, self._handle)

    async def _handle(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._serving.locked():
            await self._answer_busy(reader, writer)
            return
        async with self._serving:
            try:  # the whole exchange, answer included: a reader that never reads does not hold a slot for ever
                await asyncio.wait_for(self._serve(info, reader, writer), REQUEST_TIMEOUT)
            except TimeoutError:
                writer.close()
                logger.debug(f"A manifest request of {info.peer_id} timed out")

    async def _answer_busy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._busy >= MAX_BUSY:
            writer.close()
            return
        self._busy += 1
        try:
            # a silent or oversize request is told "busy" all the same
            with suppress(TimeoutError, ValueError, ConnectionError, asyncio.LimitOverrunError):
                await asyncio.wait_for(reader.readline(), BUSY_READ_TIMEOUT)
            with suppress(ConnectionError):  # the asker left
                await answer(writer, error="busy: try again in a few seconds")
        finally:
            self._busy -= 1

    async def _serve(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            if request.get("get") == "manifest":
                await answer(writer, self.document)
            elif (
                request.get("get") == "tokenizer"
                and isinstance(request.get("name"), str)
                and request["name"] in self.files
            ):
                await answer(writer, self.files[request["name"]])
            elif isinstance(request.get("refused"), str):
                self._log_refusal(str(info.peer_id), request["refused"])
                await answer(writer, b"")
            else:
                await answer(writer, error="unknown request: ask for the manifest or a file it lists")
        except (ProtocolError, ConnectionError) as error:
            writer.close()
            logger.debug(f"A manifest request of {info.peer_id} failed: {error!r}")
        except Exception as error:  # noqa: BLE001 -- whatever a stranger sends, the server goes on serving others
            writer.close()
            logger.warning(f"A manifest request of {info.peer_id} failed: {error!r}")

    def _log_refusal(self, peer_id: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._window_start >= 60.0:
            self._window_start, self.noticed = now, set()
        if peer_id in self.noticed or len(self.noticed) >= MAX_NOTICES_PER_MINUTE:
            return
        self.noticed.add(peer_id)
        # one printable line, bounded: it goes into the organiser's log verbatim
        logger.warning(f"Peer {peer_id} refused to join run {self.run_id!r}: {one_line(reason, MAX_NOTICE_CHARS)}")

    def shutdown(self) -> None:
        async def stop() -> None:
            if self._p2p is not None:
                await self._p2p.remove_binary_stream_handler(HANDLER)
                await self._p2p.shutdown()  # a replica: closes its client, the DHT's daemon lives on

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(START_TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=START_TIMEOUT)
