"""The engine on every core: worker processes, each running the engine worker on its share.

The decoder and the front-end hold the GIL, so threads cannot spread the engine over cores:
:class:`EnginePool` starts ``engine.workers`` processes and runs, in each, the very
:class:`~edge_agent.agent.worker.EngineWorker` the single-worker agent runs in-process. The
pool offers the worker's interface to the rest of the agent (apply, replace_model, drain,
snapshots, health), so Ingest, LiveConfig and the detection sink do not know which they have.

* **Partitions.** A stream goes to the worker chosen by a stable hash of its id (a hash of the
  id alone, so that one id used by two kinds of source still meets the worker's conflict
  check): its state lives in one process and its audio is scored in order. Whole recordings
  go to the least loaded worker, where they are scored a block at a time between live passes.
* **Order.** Everything for a worker (audio, stream controls, configuration changes, drains)
  goes through one sender thread and one pipe, in the order it was submitted.
* **Backlog.** Each worker has its own :class:`PartitionQueue`, bounded in bytes (its share of
  ``engine.queue_mb``) counting what waits in this process *and* what the worker was sent but
  has not handled (it reports what it handled). The worker reads ahead only about one step's
  worth of audio, so the backlog stays here, where the oldest waiting audio is dropped first.
* **Steps.** The sender gathers what arrives for a worker's live streams within a few
  milliseconds into one batch: the worker then runs one batched step over all of them rather
  than several small ones, which cost several times as much.
* **Results.** Detections, closed streams and refusals come back on the same pipe; one reader
  thread per worker hands them to the detection sink and the :class:`ErrorReporter` of this
  process: there is one outbox and one publisher.
* **Failure.** A worker that dies is reported (``internal_error``), its streams are closed (their
  state, and the audio it had been sent, is lost) and a new process takes its partition.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import edge_agent
from edge_agent.agent.errors import ErrorReporter
from edge_agent.agent.items import (
    Detected,
    EngineSettings,
    PcmChunk,
    RecordingRequest,
    StreamClosed,
    StreamEnd,
    is_network_kind,
)
from edge_agent.agent.streams import StreamSnapshot
from edge_agent.agent.worker import (
    EngineWorker,
    ResultSink,
    WorkerBacklog,
    WorkerStats,
    WorkQueue,
    _is_audio,
    _item_bytes,
    _item_seconds,
)
from edge_agent.audio.wav import WavError
from edge_agent.engine.decoder import CompiledKeyword
from edge_agent.engine.model import KwsModel
from edge_agent.system import tune_allocator

log = logging.getLogger(__name__)

# How often a worker process reports what it handled (bytes released) and its streams' state.
_PROGRESS_SECONDS = 0.02
_STATE_SECONDS = 0.5
# Largest allocation a worker process keeps in its heap rather than mapping it afresh.
_WORKER_HEAP_BYTES = 32 * 1024 * 1024
# How long a newly admitted stream counts as held before a worker's state must show it.
_RECENT_SECONDS = 2.0
# Waits for a worker process that no longer answers (a drain, a change, a stop).
_START_SECONDS = 60.0
# Audio a worker process holds at most besides what it is scoring (seconds, all its streams
# together): it scores all it holds in one step, and a step's working memory grows with its
# audio. About one 100 ms chunk of 300 streams; more waits in the agent.
_READ_AHEAD_SECONDS = 32.0
# Longest wait for a worker's other live streams' chunks before what came is sent to it (see
# Partition._gather): about one burst of devices sending in step, a fraction of a chunk.
_GATHER_SECONDS = 0.03
# How often the queue is looked at meanwhile (chunks arrive one by one: no wake-up per chunk).
_GATHER_POLL_SECONDS = 0.004
# A stream is awaited while it sent audio this recently; and how many quiet ones are remembered
# before they are forgotten.
_LIVE_SECONDS = 0.5
_LIVE_STREAMS_SLACK = 256


@dataclass
class _Message:
    """What goes over a worker's pipe, either way: ``kind`` and its arguments."""

    kind: str
    args: tuple[Any, ...] = ()


@dataclass
class _WorkerState:
    """What a worker process last said about itself."""

    snapshots: list[StreamSnapshot]
    stats: WorkerStats
    alive: bool
    last_error: str | None
    detections_per_hour: float = 0.0
    near_misses: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSource:
    """Where a worker process loads the model from: its files, and how (a loaded model holds
    caches keyed by its own objects, so it is read again rather than sent)."""

    directory: Path
    backend: str = "numpy"
    threads: int = 1
    quantize: bool = False

    def load(self) -> KwsModel:
        """The model as a worker process needs it: keywords come to it compiled, so without the
        lexicon's characters."""
        return KwsModel.load(self.directory, self.backend, self.threads, self.quantize, spelling=False)


def partition_of(stream: str, workers: int) -> int:
    """The worker a stream belongs to: stable across runs and processes."""
    return zlib.crc32(stream.encode()) % workers


# --- the worker process --------------------------------------------------------------------------


class _Outgoing:
    """The worker process's end of the pipe: any of its threads may send."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, kind: str, *args: Any) -> None:
        with self._lock:
            self._conn.send(_Message(kind, args))


class _RemoteResults:
    """The worker's :class:`ResultSink` in a worker process: results go back over the pipe,
    after the streams' state (whoever hears of a detection then finds its stream's counters).
    No wait for the hand-over: the sink runs in another process and takes no core from here."""

    def __init__(self, out: _Outgoing, send_state: Callable[[], None]) -> None:
        self._out = out
        self._send_state = send_state

    def put(self, results: list[Detected | StreamClosed]) -> int:
        self._send_state()
        self._out.send("results", results)
        return 0

    def wait_handed_over(self, ticket: int, timeout: float) -> bool:
        return True


class _RemoteErrors(ErrorReporter):
    """Refusals go to the agent's own reporter (it counts, rate-limits and publishes them)."""

    def __init__(self, out: _Outgoing) -> None:
        super().__init__()
        self._out = out

    def report(self, code: str, message: str, topic: str | None = None, stream: str | None = None) -> None:
        self._out.send("error", code, message, topic, stream)


class _ReadAheadQueue(WorkQueue):
    """The worker process's inbox: unbounded (the bound is kept by the agent), it counts what
    the worker handled, and lets the reader wait while the worker has enough to do."""

    def __init__(self) -> None:
        super().__init__(max_bytes=1 << 62)
        self.handled_bytes = 0
        self.handled_seconds = 0.0
        self._room = threading.Condition()

    def release_amount(self, size: int, seconds: float) -> None:
        super().release_amount(size, seconds)
        with self._room:
            self.handled_bytes += size
            self.handled_seconds += seconds
            self._room.notify_all()

    def wait_below(self, seconds: float) -> None:
        """Wait until less than ``seconds`` of audio is queued."""
        with self._room:
            while self.queued_seconds >= seconds:
                self._room.wait(_STATE_SECONDS)


class WorkerProcess:
    """A worker process: the engine worker on its own thread; :meth:`run`, on the process's
    main thread, reads the pipe and queues what came for the worker."""

    def __init__(
        self, conn: Connection, source: ModelSource, settings: EngineSettings, read_ahead: float
    ) -> None:
        self._conn = conn
        self._out = _Outgoing(conn)
        self._inbox = _ReadAheadQueue()
        self._worker = EngineWorker(
            source.load(),
            settings,
            self._inbox,
            _RemoteResults(self._out, self._send_state),
            _RemoteErrors(self._out),
        )
        self._read_ahead = read_ahead
        self._stopped = threading.Event()

    def _report_progress(self) -> None:
        next_state = 0.0
        reported = -1
        while not self._stopped.wait(_PROGRESS_SECONDS):
            if self._inbox.handled_bytes != reported:  # an idle worker stays quiet
                reported = self._inbox.handled_bytes
                self._send_handled()
            if time.monotonic() >= next_state:
                self._send_state()
                next_state = time.monotonic() + _STATE_SECONDS

    def _send_handled(self) -> None:
        self._out.send("handled", self._inbox.handled_bytes, self._inbox.handled_seconds)

    def _send_state(self) -> None:
        worker = self._worker
        self._out.send(
            "state",
            _WorkerState(
                worker.snapshots(),
                worker.stats,
                worker.alive,
                worker.last_error,
                worker.false_alarms.detections_per_hour(),
                worker.false_alarms.near_misses(),
            ),
        )

    def run(self) -> None:
        self._worker.start()
        threading.Thread(target=self._report_progress, name="engine-progress", daemon=True).start()
        self._out.send("ready")
        try:
            while True:
                batch: _Message = self._conn.recv()
                if not self._handle_batch(batch.args):
                    return
        except (EOFError, OSError):
            return  # the agent went away
        finally:
            self._stopped.set()

    def _handle_batch(self, entries: tuple[Any, ...]) -> bool:
        """A batch from the agent's sender, in order: runs of items (raw PCM chunks come as
        plain tuples, see :func:`_to_wire`) are queued a read-ahead's worth at a time; False
        after ``stop``."""
        items: list[Any] = []
        for entry in entries:
            if type(entry) is tuple:
                items.append(PcmChunk(*entry))
            elif entry.kind == "item":
                items.append(entry.args[0])
            else:
                self._queue_items(items)
                items = []
                if not self._handle(entry):
                    return False
        self._queue_items(items)
        return True

    def _queue_items(self, items: list[Any]) -> None:
        """Queue ``items`` for the worker, never more than the read-ahead (seconds of audio) at a
        time: the worker scores all it has in one step, whose working memory grows with its
        audio; what it has not taken yet stays in the agent, where the oldest audio can be
        dropped."""
        inbox, limit = self._inbox, self._read_ahead
        start = 0
        while start < len(items):
            inbox.wait_below(limit)
            room = limit - inbox.queued_seconds
            end = start + 1
            room -= _item_seconds(items[start])
            while end < len(items) and room > 0:
                room -= _item_seconds(items[end])
                end += 1
            inbox.extend(items[start:end])
            start = end

    def _handle(self, message: _Message) -> bool:
        """One item or command from the agent, in order; False after ``stop``."""
        worker, inbox, out = self._worker, self._inbox, self._out
        kind, args = message.kind, message.args
        if kind == "recording":
            token, wav, source, keywords, decoder = args
            inbox.put(RecordingRequest(wav, source, _reply_over(out, token), keywords, decoder))
        elif kind == "apply":
            worker.apply(args[1], timeout=_START_SECONDS)
            out.send("done", args[0])
        elif kind == "model":
            worker.replace_model(args[1].load(), args[2], timeout=_START_SECONDS)
            out.send("done", args[0])
        elif kind == "drain":
            worker.drain(_START_SECONDS)
            self._send_handled()
            self._send_state()
            out.send("done", args[0])
        elif kind == "stop":
            worker.stop(timeout=_START_SECONDS)
            self._send_state()
            out.send("done", args[0])
            return False
        return True


def serve(handle: int) -> None:
    """A worker process's entry point: its end of the pipe is the open descriptor ``handle``;
    the first message on it says what to load and how (:meth:`Partition.launch`)."""
    # As `edge-agent run` does for its own process: the engine's per-chunk buffers stay in the
    # heap (see tune_allocator), with a lower bound here, as there is one heap per worker; and
    # one arena, which the engine thread and the pipe's reader share.
    tune_allocator(_WORKER_HEAP_BYTES, arenas=1)
    conn = Connection(handle)
    try:
        source, settings, read_ahead = conn.recv()
    except (EOFError, OSError):
        return  # the agent went away before it started this one
    WorkerProcess(conn, source, settings, read_ahead).run()


# One BLAS thread per worker process unless the agent's environment says otherwise (as
# ``edge-agent`` sets for itself): there is a process per core already, and each OpenBLAS thread
# would wait for work on a core of its own and keep a buffer of its own.
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _worker_environment() -> dict[str, str]:
    """The agent's environment, with this copy of edge_agent first on the worker's path (the
    agent may run from a checkout that is not installed), and one BLAS thread unless set."""
    root = str(Path(edge_agent.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    environment = {variable: "1" for variable in _BLAS_THREAD_VARIABLES}
    environment.update(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([root, path]) if path else root
    return environment


def _wait(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit code of ``process`` once it exited, None if it still runs after ``timeout``."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _reply_over(out: _Outgoing, token: int) -> Callable[[Any], None]:
    return lambda result: out.send("reply", token, result)


# --- the agent's side ----------------------------------------------------------------------------


class PartitionQueue:
    """One worker's share of the engine's queue, in the agent's process. A
    :class:`WorkQueue` (dropping the oldest waiting audio when full) whose bytes stay counted
    until the worker process says it handled them."""

    def __init__(self, max_bytes: int) -> None:
        self.waiting = WorkQueue(max_bytes)
        self._lock = threading.Lock()
        self._sent_bytes = 0
        self._sent_seconds = 0.0
        self._handled_bytes = 0
        self._handled_seconds = 0.0

    def sent(self, items: list[Any]) -> None:
        """``items`` left for the worker process: they stay counted until the worker handled them."""
        size = sum(_item_bytes(item) for item in items)
        seconds = sum(_item_seconds(item) for item in items)
        with self._lock:
            self._sent_bytes += size
            self._sent_seconds += seconds

    def handled(self, total_bytes: int, total_seconds: float) -> None:
        """The worker process handled this much in all (since it started)."""
        with self._lock:
            bytes_now = total_bytes - self._handled_bytes
            seconds_now = total_seconds - self._handled_seconds
            self._handled_bytes, self._handled_seconds = total_bytes, total_seconds
        self.waiting.release_amount(bytes_now, seconds_now)

    def restarted(self) -> None:
        """A new worker process: what was in flight to the old one is gone."""
        with self._lock:
            in_flight = self._sent_bytes - self._handled_bytes
            in_flight_seconds = self._sent_seconds - self._handled_seconds
            self._sent_bytes = self._handled_bytes = 0
            self._sent_seconds = self._handled_seconds = 0.0
        self.waiting.release_amount(in_flight, in_flight_seconds)


class Partition:
    """One worker process, its queue, and the threads that talk to it."""

    def __init__(self, pool: EnginePool, index: int, max_bytes: int) -> None:
        self.pool = pool
        self.index = index
        self.queue = PartitionQueue(max_bytes)
        self.read_ahead = _READ_AHEAD_SECONDS
        self.process: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.state = _WorkerState([], WorkerStats(), False, None)
        self.restarts = 0
        # The network streams it holds, as this process knows them (the limit of streams per kind
        # is the agent's, not a worker's): stream id -> (kind, when it was routed here).
        # Whether audio was sent for it too: a stream that never sent any may lose its slot.
        self.known: dict[str, tuple[str, float, bool]] = {}
        self.ready = threading.Event()  # the current worker process has loaded the model
        self._replaced = threading.Condition()  # a new worker process (its pipe) replaced the last
        self._sender: threading.Thread | None = None

    def launch(self) -> None:
        """Start a worker process: a fresh interpreter (as multiprocessing's spawn would make,
        without the extra resource-tracker process spawn starts), its pipe a socket pair."""
        ours, theirs = socket.socketpair()
        mine = Connection(ours.detach())
        handle = theirs.fileno()
        self.ready.clear()
        process = subprocess.Popen(
            [sys.executable, "-c", f"from edge_agent.agent.engine_pool import serve; serve({handle})"],
            pass_fds=(handle,),
            env=_worker_environment(),
        )
        theirs.close()
        # Should it die at once, its reader thread finds the pipe closed and starts another.
        with contextlib.suppress(OSError):
            mine.send((self.pool.source, self.pool.settings, self.read_ahead))
        with self._replaced:
            self.conn, self.process = mine, process
            self._replaced.notify_all()
        threading.Thread(
            target=self._read, args=(mine, process), name=f"engine-results-{self.index}", daemon=True
        ).start()
        if self._sender is None:
            self._sender = threading.Thread(
                target=self._send, name=f"engine-sender-{self.index}", daemon=True
            )
            self._sender.start()

    # --- sender thread -----------------------------------------------------------------------
    def _send(self) -> None:
        live: dict[str, float] = {}  # stream id -> when its audio was last sent
        while True:
            batch = self.queue.waiting.take(_STATE_SECONDS)
            if batch and None not in batch:
                batch = self._gather(batch, live)
            items = [item for item in batch if item is not None]
            if items:
                # Everything waiting in one message: one pickling and one write for many chunks.
                self._deliver(_Message("batch", tuple([_to_wire(item) for item in items])))
                self.queue.sent(items)
            if len(items) < len(batch):
                return  # closed

    def _gather(self, batch: list[Any], live: dict[str, float]) -> list[Any]:
        """``batch`` and what joins it while the worker's other live streams' next chunks arrive
        (at most :data:`_GATHER_SECONDS`): the worker steps once per batch it is sent, and one
        step over every stream costs far less than several steps over a few each."""
        now = time.monotonic()
        deadline = now + _GATHER_SECONDS
        awaited = {stream for stream, sent in live.items() if now - sent < _LIVE_SECONDS}
        if len(live) > len(awaited) + _LIVE_STREAMS_SLACK:
            for stream in [stream for stream in live if stream not in awaited]:
                del live[stream]
        awaited.difference_update(_audio_streams(batch))
        while awaited and time.monotonic() < deadline:
            time.sleep(_GATHER_POLL_SECONDS)
            more = self.queue.waiting.take(0.0)
            batch += more
            if None in more:
                break  # closed
            awaited.difference_update(_audio_streams(more))
        now = time.monotonic()
        for stream in _audio_streams(batch):
            live[stream] = now
        return batch

    def _deliver(self, message: _Message) -> None:
        """Send to the current worker process; if it died meanwhile, to the one replacing it
        (what the dead one had been sent is lost with it)."""
        while True:
            self.ready.wait()
            conn = self.conn
            try:
                assert conn is not None
                conn.send(message)
                return
            except (OSError, ValueError):
                if not self._wait_replaced(conn):
                    return

    def _wait_replaced(self, dead: Connection | None) -> bool:
        """Wait until a new worker process replaced the one on ``dead``; False when stopping."""
        with self._replaced:
            self._replaced.wait_for(lambda: self.conn is not dead or self.pool.stopping, _START_SECONDS)
        return not self.pool.stopping and self.conn is not dead

    # --- reader thread -----------------------------------------------------------------------
    def _read(self, conn: Connection, process: subprocess.Popen[bytes]) -> None:
        pool = self.pool
        while True:
            try:
                message: _Message = conn.recv()
            except (EOFError, OSError):
                break
            kind, args = message.kind, message.args
            if kind == "results":
                self._forget_closed(args[0])
                pool.results.put(args[0])
            elif kind == "error":
                pool.errors.report(*args)
            elif kind == "handled":
                self.queue.handled(*args)
            elif kind == "state":
                self._update(args[0])
            elif kind == "done":
                pool.done(args[0])
            elif kind == "reply":
                pool.reply(args[0], args[1])
            elif kind == "ready":
                self.ready.set()
        exitcode = _wait(process, 5.0)
        if pool.stopping:
            return
        self._died(exitcode)

    def _died(self, exitcode: int | None) -> None:
        self.ready.clear()  # nothing more is sent until the new worker is ready
        pool = self.pool
        message = f"engine worker {self.index} died (exit code {exitcode}); its streams start afresh"
        log.error(message)
        pool.last_error = message
        pool.errors.report("internal_error", message)
        lost = self.state.snapshots
        self.state = _WorkerState([], self.state.stats, False, message)
        self.restarts += 1
        with pool.lock:
            self.known.clear()
        self.queue.restarted()
        pool.failed(self.index)
        # Their state is gone: the sink closes them (integrations, rate limits forget them).
        if lost:
            pool.results.put([StreamClosed(snapshot.id, snapshot.kind) for snapshot in lost])
        self.launch()

    def _update(self, state: _WorkerState) -> None:
        self.state = state
        now = time.monotonic()
        with self.pool.lock:
            # Streams routed in the last moments may not have reached the worker yet.
            known = {s.id: (s.kind, 0.0, s.chunks > 0) for s in state.snapshots if is_network_kind(s.kind)}
            for stream, (kind, routed, fed) in self.known.items():
                if now - routed < _RECENT_SECONDS:
                    known[stream] = (kind, routed, fed or known.get(stream, (kind, 0.0, False))[2])
            self.known = known

    def _forget_closed(self, results: list[Detected | StreamClosed]) -> None:
        with self.pool.lock:
            for result in results:
                if isinstance(result, StreamClosed):
                    self.known.pop(result.stream, None)

    def backlog(self) -> WorkerBacklog:
        waiting = self.queue.waiting
        process = self.process
        return WorkerBacklog(
            self.index,
            process.pid if process is not None else 0,
            self.state.alive,
            round(waiting.queued_seconds, 2),
            waiting.queued_bytes,
            len(self.state.snapshots),
            self.restarts,
        )


def _audio_streams(items: list[Any]) -> set[str]:
    """The streams of the audio chunks among ``items``."""
    return {item.stream for item in items if type(item) is PcmChunk or _is_audio(item)}


def _to_wire(item: Any) -> _Message | tuple[Any, ...]:
    """An item as it crosses the pipe: a raw PCM chunk (thousands a second) as a plain tuple of
    its fields, which pickles without a class lookup per object; anything else as a message."""
    if type(item) is PcmChunk:
        return (item.stream, item.kind, item.data, item.fmt, item.received_at, item.origin)
    if isinstance(item, _Control):
        return _Message(item.kind, item.args)
    if isinstance(item, _Recording):
        request = item.request
        return _Message(
            "recording", (item.token, request.wav, request.source, request.keywords, request.decoder)
        )
    return _Message("item", (item,))


@dataclass(frozen=True)
class _Control:
    """A change, drain or stop for one worker, queued in order with its audio."""

    kind: str
    args: tuple[Any, ...]
    worker: int = -1


@dataclass(frozen=True)
class _Recording:
    request: RecordingRequest
    token: int
    worker: int

    @property
    def nbytes(self) -> int:
        return self.request.nbytes


class PoolInbox:
    """The engine's queue as :class:`~edge_agent.agent.ingest.Ingest` and the recording
    requests see it (a :class:`WorkQueue`'s interface): routes each item to its worker's
    :class:`PartitionQueue`."""

    def __init__(self, pool: EnginePool) -> None:
        self._pool = pool

    def on_evicted(self, listener: Callable[[Any], None]) -> None:
        for partition in self._pool.partitions:
            partition.queue.waiting.on_evicted(listener)

    def put(self, item: Any) -> bool:
        pool = self._pool
        if isinstance(item, RecordingRequest):
            return pool.submit_recording(item)
        stream: str = getattr(item, "stream", "")
        partition = pool.partitions[partition_of(stream, len(pool.partitions))]
        kind: str = getattr(item, "kind", "")
        if isinstance(item, (_Control, StreamEnd)) or not is_network_kind(kind):
            return partition.queue.waiting.put(item)
        admitted, reclaimed = pool.admit(partition, stream, kind, _is_audio(item))
        if reclaimed is not None:
            holder, silent = reclaimed
            pool.errors.report(
                "stream_reclaimed",
                f"stream {silent!r} never sent usable audio; its slot went to a new stream",
                stream=silent,
            )
            holder.queue.waiting.put(StreamEnd(silent, kind, "engine"))
        if not admitted:
            pool.errors.report(
                "too_many_streams",
                f"already {pool.settings.max_streams} {kind} audio streams (audio.mqtt.max_streams); "
                "stream refused",
                topic=getattr(item, "origin", None),
                stream=stream,
            )
            return True  # refused as a stream, not as audio: reported once, like the worker does
        return partition.queue.waiting.put(item)

    def close(self) -> None:
        for partition in self._pool.partitions:
            partition.queue.waiting.close()

    @property
    def queued_bytes(self) -> int:
        return sum(p.queue.waiting.queued_bytes for p in self._pool.partitions)

    @property
    def queued_seconds(self) -> float:
        return sum(p.queue.waiting.queued_seconds for p in self._pool.partitions)

    @property
    def high_water(self) -> int:
        return sum(p.queue.waiting.high_water for p in self._pool.partitions)

    @property
    def refused(self) -> int:
        return sum(p.queue.waiting.refused for p in self._pool.partitions)

    def __len__(self) -> int:
        return sum(len(p.queue.waiting) for p in self._pool.partitions)


class EnginePool:
    """``workers`` engine worker processes behind the engine worker's interface."""

    def __init__(
        self,
        source: ModelSource,
        settings: EngineSettings,
        workers: int,
        max_bytes: int,
        results: ResultSink,
        errors: ErrorReporter,
    ) -> None:
        self.source = source
        self.settings = settings
        self.results = results
        self.errors = errors
        self.partitions = [Partition(self, index, max(max_bytes // workers, 1)) for index in range(workers)]
        self.inbox = PoolInbox(self)
        self.stopping = False
        self.last_error: str | None = None
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self.lock = threading.Lock()  # the partitions' known streams
        self._waits: dict[int, tuple[int, threading.Event]] = {}  # token -> (worker, done)
        self._replies: dict[int, tuple[int, Callable[[Any], None]]] = {}  # token -> (worker, reply)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker process and wait until each has loaded the model: the agent
        takes audio (and says it is online) once its engine can score it."""
        for partition in self.partitions:
            partition.launch()
        deadline = time.monotonic() + _START_SECONDS
        for partition in self.partitions:
            if not partition.ready.wait(max(0.0, deadline - time.monotonic())):
                log.error("engine worker %d did not start within %.0f s", partition.index, _START_SECONDS)

    def stop(self, timeout: float = 5.0) -> None:
        """Every worker finishes its streams (their last detections come back), then exits."""
        if not any(partition.process is not None for partition in self.partitions):
            return
        deadline = time.monotonic() + timeout
        self.stopping = True  # a worker exiting now is not restarted
        self._everywhere("stop", (), max(0.5, deadline - time.monotonic()))
        for partition in self.partitions:
            partition.queue.waiting.close()
            process = partition.process
            if process is not None and _wait(process, max(0.1, deadline - time.monotonic())) is None:
                process.terminate()

    def drain(self, timeout: float = 10.0) -> bool:
        return self._everywhere("drain", (), timeout)

    def apply(self, settings: EngineSettings, timeout: float = 10.0) -> bool:
        self.settings = settings
        return self._everywhere("apply", (settings,), timeout)

    def replace_model(
        self, model: KwsModel, keywords: Sequence[CompiledKeyword], timeout: float = 10.0
    ) -> bool:
        self.source = replace(self.source, directory=model.directory)
        self.settings = replace(self.settings, keywords=tuple(keywords))
        return self._everywhere("model", (self.source, tuple(keywords)), timeout)

    def _everywhere(self, kind: str, args: tuple[Any, ...], timeout: float) -> bool:
        """Queue ``kind`` for every worker after what is queued; wait until all did it."""
        waits = []
        for partition in self.partitions:
            token = next(self._tokens)
            done = threading.Event()
            with self._lock:
                self._waits[token] = (partition.index, done)
            partition.queue.waiting.put(_Control(kind, (token, *args), partition.index))
            waits.append(done)
        deadline = time.monotonic() + timeout
        return all(done.wait(max(0.0, deadline - time.monotonic())) for done in waits)

    # --- from the reader threads -------------------------------------------------------------
    def done(self, token: int) -> None:
        with self._lock:
            entry = self._waits.pop(token, None)
        if entry is not None:
            entry[1].set()

    def reply(self, token: int, result: Any) -> None:
        with self._lock:
            entry = self._replies.pop(token, None)
        if entry is not None:
            entry[1](result)

    def failed(self, worker: int) -> None:
        """Worker ``worker`` died: whoever waits on it is answered now."""
        with self._lock:
            waits = [token for token, (index, _) in self._waits.items() if index == worker]
            replies = [token for token, (index, _) in self._replies.items() if index == worker]
            done = [self._waits.pop(token)[1] for token in waits]
            answers = [self._replies.pop(token)[1] for token in replies]
        for event in done:
            event.set()
        for answer in answers:
            answer(WavError("the engine worker scoring this recording died; try again"))

    def admit(
        self, partition: Partition, stream: str, kind: str, audio: bool
    ) -> tuple[bool, tuple[Partition, str] | None]:
        """Whether a network stream may go to ``partition``: one it holds already, or a new one
        within the agent's limit of streams per kind (counted over every worker). At the limit,
        the slot of a stream that never sent audio (the longest waiting) is taken back, as the
        worker does for its own: returned with its partition, for the caller to end it."""
        with self.lock:
            known = partition.known.get(stream)
            if known is not None:
                if audio and not known[2]:
                    partition.known[stream] = (known[0], known[1], True)
                return True, None
            held = [(p, sid, v) for p in self.partitions for sid, v in p.known.items() if v[0] == kind]
            reclaimed = None
            if len(held) >= self.settings.max_streams:
                silent = [(v[1], p.index, sid) for p, sid, v in held if not v[2]]
                if not silent:
                    return False, None
                _, index, sid = min(silent)
                del self.partitions[index].known[sid]
                reclaimed = (self.partitions[index], sid)
            partition.known[stream] = (kind, time.monotonic(), audio)
            return True, reclaimed

    def submit_recording(self, request: RecordingRequest) -> bool:
        """A whole recording, to the worker with the least audio waiting."""
        partition = min(self.partitions, key=lambda p: p.queue.waiting.queued_bytes)
        token = next(self._tokens)
        with self._lock:
            self._replies[token] = (partition.index, request.reply)
        if partition.queue.waiting.put(_Recording(request, token, partition.index)):
            return True
        with self._lock:
            self._replies.pop(token, None)
        return False

    # --- reading (any thread) ----------------------------------------------------------------
    @property
    def keywords(self) -> list[CompiledKeyword]:
        return list(self.settings.keywords)

    @property
    def muted(self) -> bool:
        return self.settings.muted

    @property
    def alive(self) -> bool:
        return all(p.process is not None and p.process.poll() is None for p in self.partitions)

    @property
    def stats(self) -> WorkerStats:
        total = WorkerStats()
        for partition in self.partitions:
            stats = partition.state.stats
            total.items += stats.items
            total.item_errors += stats.item_errors
            total.streams_opened += stats.streams_opened
            total.streams_closed += stats.streams_closed
            total.muted_seconds += stats.muted_seconds
        return total

    def snapshots(self) -> list[StreamSnapshot]:
        return [snapshot for p in self.partitions for snapshot in p.state.snapshots]

    def stream_ids(self) -> list[str]:
        """Every stream open on a worker; network streams as this process admitted them."""
        with self.lock:
            network = [stream for p in self.partitions for stream in p.known]
        local = [s.id for s in self.snapshots() if not is_network_kind(s.kind)]
        return network + local

    @property
    def false_alarms(self) -> PooledFalseAlarms:
        """Detections per hour and near misses over every worker (as each last reported)."""
        return PooledFalseAlarms([p.state for p in self.partitions])

    def backlog(self) -> list[WorkerBacklog]:
        return [partition.backlog() for partition in self.partitions]

    def worker_errors(self) -> list[str]:
        return [p.state.last_error for p in self.partitions if p.state.last_error]


class PooledFalseAlarms:
    """The workers' false-alarm windows as one (what health reads of a single worker)."""

    def __init__(self, states: list[_WorkerState]) -> None:
        self._states = states

    def detections_per_hour(self) -> float:
        return sum(state.detections_per_hour for state in self._states)

    def near_misses(self) -> dict[str, float]:
        best: dict[str, float] = {}
        for state in self._states:
            for keyword, score in state.near_misses.items():
                best[keyword] = max(best.get(keyword, 0.0), score)
        return best
