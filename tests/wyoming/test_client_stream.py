"""The Wyoming server's socket reader (:class:`ClientStream`): events framed by the ``wyoming``
package itself, however the bytes are split on the way, with the connection's audio fast path
taking chunks where they arrive.

The protocol runs on a real event loop over a real socket pair; the bytes a client would have
sent are handed to it as its transport would (``data_received``), split where each test says.
"""

from __future__ import annotations

import asyncio
import io
import socket
import weakref
from collections.abc import Awaitable, Callable

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event, write_event
from wyoming.info import Describe
from wyoming.wake import Detect

from edge_agent.wyoming.connection import ClientStream, NeedMore

LIMIT = 4096


def framed(*events: Event) -> bytes:
    out = io.BytesIO()
    for event in events:
        write_event(event, out)
    return out.getvalue()


def chunk(index: int, samples: int = 160) -> Event:
    audio = bytes((index + k) % 256 for k in range(2 * samples))
    return AudioChunk(rate=16000, width=2, channels=1, audio=audio, timestamp=10 * index).event()


EVENTS = [
    Describe().event(),
    Detect(names=["小云小云"]).event(),  # data beyond the header, not ASCII
    AudioStart(rate=16000, width=2, channels=1).event(),
    chunk(0),
    chunk(1),
    chunk(2),
    AudioStop().event(),
]


def same(a: list[Event], b: list[Event]) -> bool:
    return [(e.type, e.data or {}, e.payload or b"") for e in a] == [
        (e.type, e.data or {}, e.payload or b"") for e in b
    ]


async def read_events(stream: ClientStream, into: list[Event], waiting: asyncio.Event | None = None) -> None:
    """What a connection's task does: the next event, or wait for more; until the end.
    ``waiting`` is set each time it waits for bytes (the stream's waiter is in place by then:
    ``more`` makes it before its first await)."""
    while True:
        try:
            event = stream.next_event()
        except NeedMore:
            if waiting is not None:
                waiting.set()
            await stream.more()
            continue
        if event is None:
            return
        into.append(event)


async def connected(kind: type[ClientStream] = ClientStream, limit: int = LIMIT) -> ClientStream:
    """A ClientStream on one end of a socket pair (closed with its transport)."""
    ours, theirs = socket.socketpair()
    streams: list[ClientStream] = []
    await asyncio.get_running_loop().connect_accepted_socket(lambda: kind(limit, streams.append), ours)
    # Nothing comes from the other end (the test hands the bytes over), but it stays open while
    # the stream lives: its close would reach the stream as the client's end of file.
    weakref.finalize(streams[0], theirs.close)
    return streams[0]


def on_stream(test: Callable[[ClientStream], Awaitable[None]]) -> None:
    async def main() -> None:
        stream = await connected()
        try:
            await test(stream)
        finally:
            stream.transport.close()  # type: ignore[union-attr]

    asyncio.run(main())


def test_events_split_at_every_byte_come_out_whole_and_in_order() -> None:
    blob = framed(*EVENTS)

    async def main() -> None:
        for split in range(1, len(blob)):
            stream = await connected()
            seen: list[Event] = []
            # The fast path takes audio chunks while the reading task waits, as a streaming
            # connection's does; everything else goes to the task.
            stream.take_ahead = lambda event, seen=seen: (
                AudioChunk.is_type(event.type) and not seen.append(event)
            )
            waiting = asyncio.Event()
            reader = asyncio.get_running_loop().create_task(read_events(stream, seen, waiting))
            await waiting.wait()  # the reader started and waits for bytes
            stream.data_received(blob[:split])
            stream.data_received(blob[split:])
            stream.feed_eof()
            await reader
            stream.transport.close()  # type: ignore[union-attr]
            assert same(seen, EVENTS), f"split at byte {split}"

    asyncio.run(main())


def test_audio_arriving_while_the_task_waits_is_taken_without_waking_it() -> None:
    taken: list[Event] = []

    async def test(stream: ClientStream) -> None:
        seen: list[Event] = []
        stream.take_ahead = lambda event: AudioChunk.is_type(event.type) and not taken.append(event)
        waiting = asyncio.Event()
        reader = asyncio.get_running_loop().create_task(read_events(stream, seen, waiting))
        await waiting.wait()  # the reader started and waits for bytes
        stream.data_received(framed(chunk(0), chunk(1)) + framed(chunk(2))[:50])
        stream.data_received(framed(chunk(2))[50:])
        assert len(taken) == 3 and not reader.done() and seen == []
        stream.data_received(framed(AudioStop().event(), chunk(3)))  # not audio: the task's
        stream.feed_eof()
        await reader
        assert [e.type for e in seen] == ["audio-stop", "audio-chunk"]
        assert same(taken, [chunk(0), chunk(1), chunk(2)])

    on_stream(test)


def test_a_payload_arriving_in_small_pieces_is_parsed_once_it_is_whole() -> None:
    lines: list[int] = []

    class Counting(ClientStream):
        def readline(self) -> bytes:
            lines.append(1)
            return super().readline()

    async def main() -> None:
        stream = await connected(Counting)
        seen: list[Event] = []
        stream.take_ahead = lambda event: AudioChunk.is_type(event.type) and not seen.append(event)
        waiting = asyncio.Event()
        reader = asyncio.get_running_loop().create_task(read_events(stream, seen, waiting))
        await waiting.wait()  # the reader started and waits for bytes
        blob = framed(chunk(0, samples=1500))  # 3000 bytes of payload
        header_end = blob.index(b"\n") + 1
        stream.data_received(blob[:header_end])
        for offset in range(header_end, len(blob), 7):
            stream.data_received(blob[offset : offset + 7])
        stream.feed_eof()
        await reader
        stream.transport.close()  # type: ignore[union-attr]
        assert same(seen, [chunk(0, samples=1500)])
        # Read again once its data is whole and once its payload is (and at each wait for bytes),
        # not at each of the 430 pieces.
        assert len(lines) <= 8

    asyncio.run(main())


def test_a_declared_payload_over_the_limit_is_refused_before_it_arrives() -> None:
    async def test(stream: ClientStream) -> None:
        header = framed(chunk(0, samples=LIMIT))  # 2 * LIMIT bytes of payload declared
        stream.data_received(header[: header.index(b"\n") + 1 + 60])  # header and data only
        assert stream.next_event() is None
        assert stream.refused is not None and "declares 8192 bytes" in stream.refused

    on_stream(test)


def test_a_header_line_over_the_limit_is_refused_before_its_end() -> None:
    async def test(stream: ClientStream) -> None:
        stream.data_received(b'{"type": "' + b"x" * (LIMIT + 10))
        assert stream.next_event() is None
        assert stream.refused is not None and f"longer than {LIMIT} bytes" in stream.refused

    on_stream(test)


def test_a_header_that_is_not_json_is_none_with_its_line() -> None:
    async def test(stream: ClientStream) -> None:
        stream.data_received(b"this is not json\n")
        assert stream.next_event() is None
        assert stream.refused is None and stream.last_line == b"this is not json\n"

    on_stream(test)


def test_the_end_in_the_middle_of_a_payload_is_an_incomplete_read() -> None:
    async def test(stream: ClientStream) -> None:
        stream.data_received(framed(chunk(0))[:-5])
        stream.feed_eof()
        try:
            stream.next_event()
        except asyncio.IncompleteReadError as error:
            assert error.expected == 320
        else:
            raise AssertionError("a truncated event was read as whole")

    on_stream(test)
