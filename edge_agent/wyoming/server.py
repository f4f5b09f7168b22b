"""The Wyoming wake-word server: Home Assistant's Assist wakes on the agent's keywords.

An :class:`~edge_agent.agent.services.Integration`: in :meth:`WyomingServer.attach` it starts
an asyncio event loop on a thread of its own (``wyoming``; the ``wyoming`` package is asyncio;
uvloop's loop when installed, ``wyoming.event_loop``), listens on ``wyoming.host:wyoming.port``
and, unless ``wyoming.zeroconf`` is off, announces itself over mDNS
(:mod:`edge_agent.wyoming.advertise`). Each client is a
:class:`~edge_agent.wyoming.connection.Connection`; each of its audio sessions is a stream of
kind ``wyoming`` on the one engine worker, batched with every other stream (one model in
memory), under the same limits, error reports and health counters as MQTT streams. Its
detections go out on MQTT like any other (stream ``wyoming-{peer}-{n}``), and to the client.

Each client's socket is a :class:`~edge_agent.wyoming.connection.ClientStream` (the bytes it
sent, read by the ``wyoming`` package's own ``async_read_event``).

Threads: connections, routing and writes run on the server's loop only. The detection sink's
hooks (:meth:`on_detection`, :meth:`stream_closed`) hand their event to the loop with
``call_soon_threadsafe`` and return at once; the sink announces a stream's end after its last
detection, and the loop keeps that order. :meth:`attach` and :meth:`stop` wait for the loop.

Limits: ``wyoming.max_connections`` open connections (one more gets an ``error`` event and is
closed), ``audio.mqtt.max_streams`` streaming ones (the engine worker's limit for each network
kind, read live), ``wyoming.max_event_bytes`` per event, ``wyoming.idle_timeout`` without an
event. Keywords are read at every ``describe``: a ``set_config`` of keywords shows at the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wyoming.error import Error
from wyoming.event import async_write_event
from wyoming.info import Info

from edge_agent.agent.services import AgentServices, Integration
from edge_agent.config import WyomingConfig
from edge_agent.mqtt.messages import DetectionEvent
from edge_agent.wyoming.connection import (
    STREAM_KIND,
    STREAM_PREFIX,
    ClientStream,
    Connection,
    Session,
    peer_label,
)
from edge_agent.wyoming.info import wake_info

if TYPE_CHECKING:
    from edge_agent.wyoming.advertise import Advertisement

log = logging.getLogger(__name__)

# How long attach() and stop() wait for the event loop (seconds).
_LOOP_TIMEOUT_SECONDS = 10.0
# Of each tick, the part left for reading the streaming clients' sockets before their audio
# goes to the engine.
_READ_SHARE_OF_TICK = 0.2
# Idle connections are looked for this many times per idle timeout.
_IDLE_CHECKS_PER_TIMEOUT = 4


class WyomingServerError(RuntimeError):
    """The server could not start (the port is taken, the address is not ours, no uvloop)."""


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The server's loop: ``wyoming.event_loop`` (auto: uvloop when it is installed)."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise WyomingServerError(
                    "wyoming.event_loop is uvloop but uvloop is not installed "
                    "(pip install 'edge-agent[wyoming]')"
                ) from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@dataclass
class WyomingStats:
    """Counters of the server's life (read on any thread; written on the loop)."""

    connections: int = 0  # accepted since start
    open_connections: int = 0
    streaming: int = 0  # connections with an open audio session now
    streams: int = 0  # sessions opened since start
    refused_connections: int = 0
    refused_streams: int = 0
    bad_events: int = 0
    idle_closed: int = 0


class WyomingServer(Integration):
    """Serves Home Assistant's Wyoming wake-word protocol on the agent's engine."""

    name = "wyoming"

    def __init__(self, config: WyomingConfig | None = None) -> None:
        """``config``: the ``wyoming`` section (default: the agent's own, at attach)."""
        self._config = config
        self.stats = WyomingStats()
        self.port = 0  # the port listened on, once started (wyoming.port 0: a free one)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[Connection, asyncio.Task[None] | None] = {}  # and its task
        self._routes: dict[str, tuple[Connection, Session]] = {}
        self._stream_numbers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._client_tasks: set[asyncio.Task[None]] = set()  # one per connection: kept until done
        self._advertisement: Advertisement | None = None
        self.advertised = threading.Event()  # set once announced over mDNS

    # --- wiring (the agent's thread) ---------------------------------------------------------
    def attach(self, services: AgentServices) -> None:
        super().attach(services)
        config = self._config or services.config.wyoming
        self._config = config
        self.batch_ms = config.batch_ms
        self.max_event_bytes = config.max_event_bytes
        loop = new_event_loop(config.event_loop)
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="wyoming", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(config), loop).result(_LOOP_TIMEOUT_SECONDS)
        except OSError as error:
            self._stop_loop()
            raise WyomingServerError(
                f"wyoming: cannot listen on {config.host}:{config.port}: {error.strerror or error}"
            ) from error

    def stop(self) -> None:
        """Close every connection (their streams end: the engine scores their last audio),
        stop listening, say goodbye over mDNS, stop the loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(_LOOP_TIMEOUT_SECONDS)
        except Exception:  # stopping goes on whatever happened
            log.exception("Wyoming server did not stop cleanly")
        self._stop_loop()

    # --- hooks (the detection sink's thread): hand over, never block ------------------------------
    def on_detection(self, event: DetectionEvent, stream_kind: str) -> None:
        if stream_kind == STREAM_KIND and self._loop is not None:
            self._loop.call_soon_threadsafe(self._route_detection, event)

    def stream_closed(self, stream: str, stream_kind: str) -> None:
        if stream_kind == STREAM_KIND and self._loop is not None:
            self._loop.call_soon_threadsafe(self._route_closed, stream)

    def config_changed(self, keys: list[str]) -> None:
        if any(key.startswith("keywords") for key in keys):
            log.info(
                "Wyoming: describe now answers with %s",
                ", ".join(keyword.text for keyword in self.services.keywords),
            )

    # --- what connections use (the loop) ------------------------------------------------------
    def info(self) -> Info:
        assert self._config is not None
        return wake_info(self._config.name, self.services.config.model.id, self.services.keywords)

    def open_stream(self, connection: Connection, session: Session) -> str | None:
        if self.stats.streaming >= self.services.config.audio.mqtt.max_streams:
            self.stats.refused_streams += 1
            return None
        self._stream_numbers += 1
        stream = f"{STREAM_PREFIX}{connection.peer}-{self._stream_numbers}"
        self._routes[stream] = (connection, session)
        self.stats.streaming += 1
        self.stats.streams += 1
        return stream

    def release_stream(self, session: Session, keep_routing: bool) -> None:
        self.stats.streaming -= 1
        if not keep_routing:
            self._routes.pop(session.stream, None)

    def count_bad_event(self) -> None:
        self.stats.bad_events += 1

    # --- the loop ---------------------------------------------------------------------------------
    async def _start(self, config: WyomingConfig) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientStream(config.max_event_bytes, self._connected), host=config.host, port=config.port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Wyoming wake-word service on %s:%d", config.host, self.port)
        self._keep(self._close_idle(config.idle_timeout))
        if config.batch_ms > 0:
            self._keep(self._tick(config.batch_ms / 1000.0))
        if config.zeroconf:
            self._keep(self._advertise(config))

    async def _advertise(self, config: WyomingConfig) -> None:
        try:
            from edge_agent.wyoming.advertise import Advertisement, announced_addresses

            addresses = announced_addresses(config.host, config.advertise_host)
            if not addresses:
                raise OSError("no network address to announce (set wyoming.advertise_host)")
            instance = config.zeroconf_name or self.services.device_id
            advertisement = Advertisement(
                instance, self.port, addresses, only_interface=config.advertise_host is not None
            )
            self._advertisement = advertisement
            await advertisement.start()
            self.advertised.set()
        except Exception as error:  # noqa: BLE001 - the service works without discovery
            self.services.report_error(
                "zeroconf_failed", f"the Wyoming service is not announced over mDNS: {error}"
            )

    def _connected(self, stream: ClientStream) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._accept(stream, stream.writer))
        self._client_tasks.add(task)
        task.add_done_callback(self._client_tasks.discard)

    async def _accept(self, stream: ClientStream, writer: asyncio.StreamWriter) -> None:
        assert self._config is not None
        self.stats.connections += 1
        if len(self._connections) >= self._config.max_connections:
            self.stats.refused_connections += 1
            text = f"already {self._config.max_connections} connections (wyoming.max_connections)"
            peer = peer_label(writer.get_extra_info("peername"))
            self.services.report_error("too_many_connections", text, topic=f"wyoming client {peer}")
            with contextlib.suppress(ConnectionError):
                await async_write_event(Error(text=text, code="too_many_connections").event(), writer)
            writer.close()
            return
        connection = Connection(self, self.stats.connections, stream, writer)
        self._connections[connection] = asyncio.current_task()
        self.stats.open_connections = len(self._connections)
        try:
            await connection.run()
        except Exception:  # the connection's own errors are handled there; this is a bug
            log.exception("%s failed", connection.origin)
        finally:
            self._connections.pop(connection, None)
            self.stats.open_connections = len(self._connections)

    async def _tick(self, period: float) -> None:
        """Every client's audio to the engine at once, on a fixed schedule. Streaming clients'
        sockets are read once per tick (several chunks for one wake-up of the loop); a moment
        later, once that is parsed, every client's audio is submitted together: the engine
        worker then finds every stream's audio in its queue at once and runs one batched step
        for all of them, instead of one small step per client as its chunks trickle in."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += period
            await asyncio.sleep(max(0.0, due - loop.time()))
            for connection in list(self._connections):
                connection.resume_reading()
            loop.call_later(period * _READ_SHARE_OF_TICK, self._flush_all)
            if loop.time() - due > period:
                due = loop.time()  # fell behind (a busy machine): no burst of catch-up ticks

    def _flush_all(self) -> None:
        for connection in list(self._connections):
            connection.flush()

    async def _close_idle(self, timeout: float) -> None:
        while True:
            await asyncio.sleep(timeout / _IDLE_CHECKS_PER_TIMEOUT)
            now = time.monotonic()
            for connection in list(self._connections):
                if now - connection.last_event > timeout:
                    self.stats.idle_closed += 1
                    log.info("%s sent nothing for %.0f s: closed", connection.origin, timeout)
                    connection.close()

    def _route_detection(self, event: DetectionEvent) -> None:
        route = self._routes.get(event.stream)
        if route is not None:
            connection, session = route
            connection.deliver(session, event)

    def _route_closed(self, stream: str) -> None:
        route = self._routes.get(stream)
        if route is not None:
            connection, session = route
            if connection.stream_closed(session):
                del self._routes[stream]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        running = [task for task in self._connections.values() if task is not None]
        for connection in list(self._connections):
            connection.close()
        if running:
            # Each connection ends its stream as it goes (the engine scores its last audio).
            await asyncio.wait(running, timeout=_LOOP_TIMEOUT_SECONDS / 2)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._advertisement is not None:
            try:
                await self._advertisement.stop()
            except Exception:  # goodbye packets are a courtesy
                log.exception("mDNS goodbye failed")
        if self._server is not None:
            await self._server.wait_closed()

    def _keep(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = None
        self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(_LOOP_TIMEOUT_SECONDS)
        if not loop.is_running():
            loop.close()
