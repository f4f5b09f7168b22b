"""One Wyoming client: its events in, its audio onto the engine as a stream, its answers out.

A connection runs on the server's event loop. Events are read with the ``wyoming`` package's
own framing (:func:`wyoming.event.read_event`) from a :class:`ClientStream`: the socket's
protocol is itself the reader ``read_event`` asks for lines and exact byte counts (no asyncio
StreamReader, no proxy and no coroutine per event: tens of events per second per client), and
it refuses a declared data or payload length, or a header line, above
``wyoming.max_event_bytes`` before reading it. A streaming client's audio chunks are taken
where its bytes arrive (:attr:`ClientStream.take_ahead`); anything else wakes its task.

* ``describe`` -> ``info`` (:mod:`edge_agent.wyoming.info`), from the keywords configured now;
* ``detect`` -> the names to report (None: every keyword); a name we do not have gets an
  ``error`` event (``unknown_wake_word``);
* ``audio-start`` opens a *session*: a stream ``wyoming-{peer}-{n}`` of kind ``wyoming`` on the
  engine worker (:class:`~edge_agent.agent.items.StreamStart` with the declared format), within
  ``audio.mqtt.max_streams`` streaming clients (one more gets ``error`` ``too_many_streams`` and
  is closed). An ``audio-chunk`` without ``audio-start`` opens one in the chunk's format;
* ``audio-chunk`` -> the PCM, in any format :class:`~edge_agent.audio.pcm.PcmFormat` accepts,
  held until the server's next tick (every ``wyoming.batch_ms``: every client's audio goes to
  the engine at once, one batched step for all) and submitted as
  :class:`~edge_agent.agent.items.PcmChunk` (the worker converts it, as it does MQTT audio);
* the engine's detections come back through the server (:meth:`Connection.deliver`) and go out
  as ``detection`` at once, named after the keyword and stamped in the client's own chunk
  timestamps (milliseconds) at the keyword's end;
* ``audio-stop`` ends the stream; once the engine has scored its last audio
  (:meth:`Connection.stream_closed`), a session without a detection gets ``not-detected``, and
  the connection closes (as wyoming-openwakeword's does). Home Assistant never sends
  ``audio-stop``: it closes the connection, which ends the stream the same way (nobody is left
  to answer).

Anything malformed (a bad header line, a length over the limit, an unknown format) gets an
``error`` event, is reported (``error`` topic, health), and the connection is closed; an unknown
event type gets an ``error`` event and the connection goes on. One client's trouble never
reaches another's.
"""

from __future__ import annotations

import asyncio
import asyncio.streams
import io
import logging
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, read_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.wake import Detect, Detection, NotDetected

from edge_agent.agent.items import PcmChunk, StreamEnd, StreamStart
from edge_agent.agent.services import AgentServices
from edge_agent.audio.pcm import AudioFormatError, PcmFormat
from edge_agent.mqtt.messages import DetectionEvent

log = logging.getLogger(__name__)

STREAM_KIND = "wyoming"
STREAM_PREFIX = "wyoming-"
# The peer's address as it appears in stream ids (which are MQTT topic levels and Home
# Assistant ids: letters, digits, '-' and '_'; at most 64 characters in all).
_PEER_CHARACTERS = re.compile(r"[^A-Za-z0-9]+")
_MAX_PEER_LENGTH = 40
# A client's audio is flushed without waiting for the tick once it holds this many ticks' worth.
_TICKS_HELD = 4
# Reading a socket pauses beyond this much unread (as asyncio's stream reader does at twice its
# default limit); the reader resumes it whenever it needs more, so an event of up to
# wyoming.max_event_bytes still arrives whole.
_MAX_UNREAD_BYTES = 128 * 1024
# What was read of the buffer is dropped once it is this long (it is dropped anyway whenever
# everything buffered has been read, which is nearly always).
_COMPACT_AFTER_BYTES = 64 * 1024


def peer_label(peername: Any) -> str:
    """``127.0.0.1`` -> ``127_0_0_1``: the client's address as a stream id may hold it."""
    host = peername[0] if isinstance(peername, tuple) and peername else str(peername or "unknown")
    label = _PEER_CHARACTERS.sub("_", str(host)).strip("_")
    return label[-_MAX_PEER_LENGTH:] or "unknown"


class Server(Protocol):
    """What a connection needs of its server (all on the server's event loop)."""

    services: AgentServices
    batch_ms: int
    max_event_bytes: int

    def info(self) -> Info: ...

    def open_stream(self, connection: Connection, session: Session) -> str | None:
        """A stream id for a new session, registered for detections; None when the streaming
        clients are at their limit."""

    def release_stream(self, session: Session, keep_routing: bool) -> None:
        """The session's audio ended: its slot is free; ``keep_routing`` until the engine closes
        its stream (its last detections and the end are still to come)."""

    def count_bad_event(self) -> None: ...


@dataclass
class Session:
    """One audio stream of a connection, from ``audio-start`` to ``audio-stop`` or the end."""

    fmt: PcmFormat
    names: frozenset[str] | None
    stream: str = ""
    pending: bytearray = field(default_factory=bytearray)
    max_pending_bytes: int = 0  # a client faster than real time is not held to the tick
    ms_per_byte: float = 0.0
    audio_ms: float = 0.0  # audio received so far
    timestamp_base_ms: float | None = None  # the client's timestamp at the stream's start
    detected: bool = False
    ended: bool = False  # audio-stop or disconnect: the end was submitted
    answer: bool = True  # someone is left to tell (not after a disconnect)
    quiet_closed: bool = False  # the engine closed the stream (it went quiet); nothing sent since

    def set_format(self, fmt: PcmFormat, batch_ms: int) -> None:
        """The session's audio format from now on. Audio is held at most between two ticks: a
        real-time client sends a tick's worth, a faster one is flushed when it has sent several
        (bounded memory, no lost alignment)."""
        self.fmt = fmt
        self.max_pending_bytes = max(1, fmt.bytes_per_second * batch_ms * _TICKS_HELD // 1000)
        self.ms_per_byte = 1000.0 / fmt.bytes_per_second


class NeedMore(Exception):
    """The bytes buffered so far end inside an event (deliberately not a ValueError, which
    ``read_event`` takes for a malformed event)."""


class ClientStream(asyncio.streams.FlowControlMixin):
    """A client's socket on the server's loop: the protocol its transport feeds, and the reader
    the ``wyoming`` package's own :func:`wyoming.event.read_event` reads (``readline``,
    ``read``) from what arrived, with no coroutine per event.

    :meth:`next_event` is the next whole event buffered, or raises :class:`NeedMore` (what was
    read of it is put back; :meth:`more` waits). While the connection's task waits for more, the
    events that arrive are first offered to :attr:`take_ahead` (the connection's audio fast
    path) right where they arrive: only an event it does not take (kept for :meth:`next_event`)
    wakes the task, so a streaming client costs one socket read and no task switch per tick.

    A header line or a declared data or payload length above ``limit`` is refused before it is
    read (the library would read whatever a header declares): ``refused`` says why and the read
    raises ValueError, which ``read_event`` answers with None, as it does bad JSON. Reading
    the socket pauses while more than ``_MAX_UNREAD_BYTES`` are unread and the reader needs none
    of it (a client that does not read its answers while it keeps sending), and while the
    connection waits for the server's tick (:meth:`hold`, :meth:`release`). Writes go through
    :attr:`writer` (flow control: the mixin).
    """

    def __init__(self, limit: int, connected: Callable[[ClientStream], None]) -> None:
        super().__init__()
        self.limit = limit
        self.refused: str | None = None
        self.last_line = b""
        self.received_at = time.time()  # wall time of the last bytes' arrival
        self.transport: asyncio.Transport | None = None
        self.writer: asyncio.StreamWriter
        # The connection's fast path: takes an event (True) or leaves it to the task (False).
        self.take_ahead: Callable[[Event], bool] | None = None
        self._connected = connected
        self._unread = io.BytesIO()  # what arrived; read up to its position
        self._size = 0  # bytes in _unread
        self._kept: Event | None = None  # read ahead, not taken: the next event
        self._missing = 0  # bytes of the event being read that have not arrived yet
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._held = False  # by the connection, until the server's tick
        self._full = False  # too much unread

    # --- the protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        self.writer = asyncio.StreamWriter(self.transport, self, None, self._loop)  # type: ignore[arg-type]
        self._connected(self)

    def data_received(self, data: bytes) -> None:
        self.received_at = time.time()
        self._append_unread(data)
        if self._missing > 0:
            self._missing -= len(data)
            if self._missing > 0:
                return  # the rest of a declared data or payload is still to come
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # The task waits for more: what arrived is read here first.
            if self.take_ahead is not None and self._read_ahead(self.take_ahead):
                return  # all taken (the rest of an event may follow): the task sleeps on
            waiter.set_result(None)
        if self._size - self._unread.tell() > _MAX_UNREAD_BYTES:
            self._full = True
            self._pause()

    def _append_unread(self, data: bytes) -> None:
        unread = self._unread
        position = unread.tell()
        if position >= self._size:
            # Everything before was read (the usual case: clients write whole events).
            self._unread = io.BytesIO(data)
            self._size = len(data)
        elif position > _COMPACT_AFTER_BYTES:
            self._unread = io.BytesIO(unread.read() + data)
            self._size = self._size - position + len(data)
        else:
            unread.seek(0, io.SEEK_END)
            unread.write(data)
            unread.seek(position)
            self._size += len(data)

    def eof_received(self) -> bool:
        self.feed_eof()
        return True  # half-closed: the answers to what it sent still go out; then the connection closes

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.feed_eof()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    # --- events ----------------------------------------------------------------------------------
    def next_event(self) -> Event | None:
        """The next event (None: the client left, or a bad event: see ``refused``, ``last_line``).
        Raises NeedMore when no whole event is buffered; IncompleteReadError when the client
        left in the middle of one."""
        kept = self._kept
        if kept is not None:
            self._kept = None
            return kept
        unread = self._unread
        start = unread.tell()
        try:
            return read_event(self)  # type: ignore[arg-type]
        except NeedMore:
            unread.seek(start)
            raise

    def _read_ahead(self, take: Callable[[Event], bool]) -> bool:
        """Hand whole buffered events to ``take`` while it takes them; True when it took them all
        and what is left is part of an event. An event it does not take is kept for
        :meth:`next_event`; a bad one is left unread for the task to find again and answer."""
        unread = self._unread
        while True:
            start = unread.tell()
            try:
                event = read_event(self)  # type: ignore[arg-type]
            except NeedMore:
                unread.seek(start)
                return True
            except Exception:  # noqa: BLE001 - the task reads it again and answers
                event = None
            if event is None:
                unread.seek(start)
                self.refused = None
                return False
            if not take(event):
                self._kept = event
                return False

    # --- what read_event reads -------------------------------------------------------------------
    def readline(self) -> bytes:
        line = self._unread.readline()
        self.last_line = line
        if line[-1:] == b"\n" or self._eof:
            return line  # at the end: a last line without its end, or nothing (b"": the client left)
        if len(line) > self.limit:
            self.refused = f"a header line longer than {self.limit} bytes (wyoming.max_event_bytes)"
            raise ValueError(self.refused)
        raise NeedMore

    def read(self, n: int) -> bytes:
        if n > self.limit:
            self.refused = (
                f"event declares {n} bytes of data or payload; wyoming.max_event_bytes is {self.limit}"
            )
            raise ValueError(self.refused)
        data = self._unread.read(n)
        if len(data) == n:
            return data
        if self._eof:
            raise asyncio.IncompleteReadError(data, n)
        # Not parsed again before these bytes are here (a large payload arrives in many pieces).
        self._missing = n - len(data)
        raise NeedMore

    async def more(self) -> None:
        """Wait for more bytes (the buffer holds no whole event)."""
        if self._eof:
            return
        if self._full:
            self._full = False
            if not self._held:
                self._resume()
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    # --- reading paused ---------------------------------------------------------------------------
    def hold(self) -> None:
        """Read nothing more from the socket until :meth:`release` (what arrived is still read)."""
        if not self._held:
            self._held = True
            self._pause()

    def release(self) -> None:
        if self._held:
            self._held = False
            if not self._full:
                self._resume()

    # --- inside ----------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _pause(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def _resume(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()


class Connection(AsyncEventHandler):
    """A client connection on the server's event loop."""

    def __init__(
        self, server: Server, number: int, stream: ClientStream, writer: asyncio.StreamWriter
    ) -> None:
        super().__init__(stream, writer)  # type: ignore[arg-type] # what async_read_event reads
        self.stream = stream
        self.server = server
        self.services = server.services
        self.number = number
        self.peer = peer_label(writer.get_extra_info("peername"))
        self.origin = f"wyoming client {self.peer} #{number}"
        self.last_event = time.monotonic()
        self.names: frozenset[str] | None = None
        self.session: Session | None = None
        self.closed = False
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._format_key: tuple[Any, Any, Any] | None = None
        self._hold_for_tick = server.batch_ms > 0
        stream.take_ahead = self._take_audio

    # --- the read loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Events until the client leaves or misbehaves (the library's loop, hardened: a bad
        event ends this connection with an ``error`` event, and nothing else)."""
        reader = self.stream
        try:
            while not self.closed:
                try:
                    event = reader.next_event()
                except NeedMore:
                    try:
                        await reader.more()
                    except asyncio.CancelledError:
                        break
                    continue
                except asyncio.IncompleteReadError:
                    self._bad_event("the connection closed in the middle of an event", "truncated_event")
                    break
                except Exception as error:  # noqa: BLE001 - whatever a header holds: one client's fault
                    await self._refuse(f"malformed event: {type(error).__name__}: {error}", "bad_event")
                    break
                if event is None:
                    if reader.refused is not None:
                        await self._refuse(reader.refused, "event_too_large")
                    elif reader.last_line:
                        # A header line that is not JSON.
                        await self._refuse("malformed event: its header line is not JSON", "bad_event")
                    break
                if not self._take_audio(event):
                    self.last_event = time.monotonic()
                    if not await self.handle_event(event):
                        break
                    if self._hold_for_tick and self.session is not None:
                        reader.hold()
        finally:
            self.closed = True
            reader.take_ahead = None
            self.end_session(answer=False)
            self.writer.close()

    def _take_audio(self, event: Event) -> bool:
        """An ``audio-chunk`` in the open session's format (nearly every event), held for the
        tick, with no coroutine: from :meth:`run` or straight from the socket's buffer as it
        arrives (:attr:`ClientStream.take_ahead`). False for anything else (:meth:`handle_event`).
        Streaming, what the socket holds is then read once per tick, in one go (one wake-up of
        the loop for several chunks)."""
        if not AudioChunk.is_type(event.type) or not self._append(event):
            return False
        self.last_event = time.monotonic()
        if self._hold_for_tick:
            self.stream.hold()
        return True

    async def handle_event(self, event: Event) -> bool:
        if AudioChunk.is_type(event.type):
            return await self._on_chunk(event)
        if Describe.is_type(event.type):
            await self.write_event(self.server.info().event())
            return True
        if Detect.is_type(event.type):
            await self._on_detect(Detect.from_event(event).names)
            return True
        if AudioStart.is_type(event.type):
            return await self._on_start(event)
        if AudioStop.is_type(event.type):
            self.end_session(answer=True)
            return True
        if Ping.is_type(event.type):
            await self.write_event(Pong(text=(event.data or {}).get("text")).event())
            return True
        self._bad_event(f"unknown event type {event.type!r}", "unknown_event")
        await self.write_event(Error(text=f"unknown event type {event.type!r}", code="unknown_event").event())
        return True

    async def write_event(self, event: Event) -> None:
        """One event to the client, in order; a client that is gone is not an error here."""
        if self.closed and self.writer.is_closing():
            return
        async with self._write_lock:
            try:
                await super().write_event(event)
            except (ConnectionError, RuntimeError):
                self.closed = True

    def close(self) -> None:
        """End the connection from the server's side (idle, shutting down)."""
        self.closed = True
        self.stream.take_ahead = None
        self.writer.close()
        self.stream.feed_eof()

    # --- events ------------------------------------------------------------------------------
    async def _on_detect(self, names: Sequence[str] | None) -> None:
        self.names = frozenset(names) if names else None
        if self.session is not None:
            self.session.names = self.names
        if not names:
            return
        known = [keyword.text for keyword in self.services.keywords]
        unknown = [name for name in names if name not in known]
        if unknown:
            text = (
                f"unknown wake word {', '.join(map(repr, unknown))}; this service has "
                f"{', '.join(known) or 'none'}"
            )
            self.services.report_error("unknown_wake_word", text, topic=self.origin)
            await self.write_event(Error(text=text, code="unknown_wake_word").event())

    async def _on_start(self, event: Event) -> bool:
        fmt = await self._format(event.data or {}, "audio-start")
        if fmt is None:
            return False
        self.end_session(answer=False)  # a new start without a stop: the old stream just ends
        return await self._start_session(fmt)

    async def _on_chunk(self, event: Event) -> bool:
        """A chunk that opens a session or changes its format; then held as any other."""
        data = event.data or {}
        session = self.session
        key = (data.get("rate"), data.get("width"), data.get("channels"))
        if session is None or key != self._format_key:
            fmt = await self._format(data, "audio-chunk")
            if fmt is None:
                return False
            if session is None:
                if not await self._start_session(fmt):
                    return False
                session = self.session
                assert session is not None
            elif fmt != session.fmt:
                self._flush(session)
                session.set_format(fmt, self.server.batch_ms)
            self._format_key = key
        return self._append(event)

    def _append(self, event: Event) -> bool:
        """An ``audio-chunk`` in the open session's format: its audio held for the tick. False
        when there is no session or the format is another (:meth:`_on_chunk` then)."""
        session = self.session
        data = event.data
        if session is None or not data:
            return False
        if (data.get("rate"), data.get("width"), data.get("channels")) != self._format_key:
            return False
        audio = event.payload or b""
        if session.timestamp_base_ms is None:
            timestamp = data.get("timestamp")
            if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
                session.timestamp_base_ms = timestamp - session.audio_ms
        session.audio_ms += len(audio) * session.ms_per_byte
        session.pending += audio
        if len(session.pending) >= session.max_pending_bytes:
            self._flush(session)
        return True

    async def _format(self, data: dict[str, Any], what: str) -> PcmFormat | None:
        try:
            rate, width, channels = data["rate"], data["width"], data["channels"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rate, width, channels)):
                raise AudioFormatError(
                    f"rate, width and channels must be integers, got {rate!r}, {width!r}, {channels!r}"
                )
            return PcmFormat(rate=rate, channels=channels, width=width)
        except KeyError as error:
            text = f"{what} without {error.args[0]!r}"
        except AudioFormatError as error:
            text = f"{what}: {error}"
        await self._refuse(text, "bad_format")
        return None

    # --- the session's stream ----------------------------------------------------------------
    async def _start_session(self, fmt: PcmFormat) -> bool:
        session = Session(fmt=fmt, names=self.names)
        session.set_format(fmt, self.server.batch_ms)
        stream = self.server.open_stream(self, session)
        if stream is None:
            limit = self.services.config.audio.mqtt.max_streams
            text = f"already {limit} streaming Wyoming clients (audio.mqtt.max_streams); try again later"
            self.services.report_error("too_many_streams", text, topic=self.origin)
            await self.write_event(Error(text=text, code="too_many_streams").event())
            return False
        session.stream = stream
        self.session = session
        self._format_key = None
        self.services.ingest(StreamStart(stream, STREAM_KIND, fmt, self.origin))
        log.debug("%s: stream %s started (%s)", self.origin, stream, fmt.describe())
        return True

    def flush(self) -> None:
        """Hand the audio held so far to the engine (the server's tick)."""
        if self.session is not None:
            self._flush(self.session)

    def resume_reading(self) -> None:
        """Read what the client sent since the last tick (the server's tick)."""
        if not self.closed:
            self.stream.release()

    def _flush(self, session: Session) -> None:
        if not session.pending:
            return
        data = bytes(session.pending)
        session.pending.clear()
        session.quiet_closed = False
        # Refusals (rate limit, a full queue) are reported by the ingest itself.
        self.services.ingest(
            PcmChunk(session.stream, STREAM_KIND, data, session.fmt, self.stream.received_at, self.origin)
        )

    def end_session(self, answer: bool) -> None:
        """The session's audio ends (``audio-stop``, a new ``audio-start``, a disconnect): its last
        audio and the end go to the engine. With ``answer``, ``not-detected`` follows once the
        engine has scored it all, if nothing was detected."""
        session = self.session
        if session is None:
            return
        self.session = None
        self._flush(session)
        session.ended = True
        session.answer = answer and not self.closed
        self.services.ingest(StreamEnd(session.stream, STREAM_KIND, self.origin))
        # The engine already closed a stream that went quiet; with nothing sent since, it has
        # nothing more to say about it.
        self.server.release_stream(session, keep_routing=session.answer and not session.quiet_closed)
        if session.answer and session.quiet_closed:
            self._finish(session)

    # --- from the engine (the server's event loop) ---------------------------------------------
    def deliver(self, session: Session, event: DetectionEvent) -> None:
        """A detection on this connection's stream: out at once, if the client asked for it."""
        if session.names is not None and event.keyword not in session.names:
            return
        session.detected = True
        if self.closed:
            return
        base = session.timestamp_base_ms or 0.0
        detection = Detection(name=event.keyword, timestamp=int(round(base + event.end * 1000.0)))
        self._spawn(self.write_event(detection.event()))

    def stream_closed(self, session: Session) -> bool:
        """The engine freed the session's stream; returns whether the session is done with."""
        if not session.ended:
            session.quiet_closed = True  # audio sent from now on opens it again
            return False
        self._finish(session)
        return True

    def _finish(self, session: Session) -> None:
        if session.answer and not self.closed:
            self._spawn(self._answer_and_close(session))

    async def _answer_and_close(self, session: Session) -> None:
        """After ``audio-stop``: ``not-detected`` unless something was, then the connection
        closes, as wyoming-openwakeword's does (clients wait for that)."""
        if not session.detected:
            await self.write_event(NotDetected().event())
        self.close()

    # --- errors ------------------------------------------------------------------------------
    async def _refuse(self, text: str, code: str) -> None:
        """A bad event: told to the client (if it still listens), reported; the caller closes."""
        self._bad_event(text, code)
        await self.write_event(Error(text=text, code=code).event())

    def _bad_event(self, text: str, code: str) -> None:
        self.server.count_bad_event()
        stream = self.session.stream if self.session is not None else None
        self.services.report_error(code, text, topic=self.origin, stream=stream)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
