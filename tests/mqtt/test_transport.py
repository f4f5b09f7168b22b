"""MqttTransport against a real mosquitto: what the rest of the agent relies on."""

from __future__ import annotations

import contextlib
import functools
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from edge_agent.mqtt.transport import MqttTransport
from tests.broker import Broker, Client
from tests.support import agent_config


@contextlib.contextmanager
def connected_transport(
    tmp_path: Path, client_id: str, watched: str
) -> Iterator[tuple[MqttTransport, Client]]:
    """A started, connected transport on a fresh broker, and a paho client subscribed to ``watched``."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, client_id)
    watcher = Client(broker.port).connect().subscribe(watched)
    try:
        transport.start()
        assert transport.wait_connected(10)
        yield transport, watcher
    finally:
        transport.stop()
        watcher.close()
        broker.stop()


@pytest.mark.parametrize("bad_topic", ["a/\udcac/response", "a/+/response", ""])
def test_a_topic_mqtt_cannot_carry_drops_that_publish_only(bad_topic: str, tmp_path: Path) -> None:
    """Topics built from inbound names (request ids) may be unencodable; the link must survive it."""
    with connected_transport(tmp_path, "transport-test", "ok") as (transport, watcher):
        assert transport.publish(bad_topic, b"x", qos=1) is None
        assert transport.publish("ok", b"still here", qos=1) is not None
        received = watcher.wait_for("ok")
        assert [m.payload for m in received] == [b"still here"]


def test_read_buffer_serves_small_reads_from_one_large_read() -> None:
    from edge_agent.mqtt.transport import _ReadBuffer

    left, right = socket.socketpair()
    left.setblocking(False)
    try:
        reader = _ReadBuffer(left)
        with pytest.raises(BlockingIOError):  # nothing yet: paho sees "try again", as from a socket
            reader.recv(1)
        right.sendall(b"\x30\x05hello")
        assert reader.recv(1) == b"\x30"
        assert reader.buffered() == 6 and reader.pending() == 6  # paho will not wait in select()
        assert reader.recv(1) == b"\x05"
        assert reader.recv(100) == b"hello"
        assert reader.buffered() == 0
        assert reader.fileno() == left.fileno()  # everything else is the real socket's
        right.close()
        assert reader.recv(1) == b""  # the peer closed
    finally:
        left.close()


class _RecordingSocket:
    """A real socket whose setsockopt calls are recorded (and may be refused), reported as
    ``family`` (the seam: which options are set, and when)."""

    def __init__(self, sock: socket.socket, family: int = socket.AF_INET, refuse: bool = False) -> None:
        self._sock = sock
        self.family = family
        self.refuse = refuse
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))
        if self.refuse:
            raise OSError("not supported here")


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
def test_quick_ack_is_asked_for_after_every_read_where_it_applies() -> None:
    """A broker with Nagle's algorithm on holds its next PUBACK until this side acknowledges the
    last one: TCP_QUICKACK after every read, on TCP only, and no more tries once refused."""
    from edge_agent.mqtt.transport import _QuickAck

    quick_ack = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    left, right = socket.socketpair()
    try:
        tcp = _RecordingSocket(left)
        asking = _QuickAck(tcp)
        asking.after_read()
        asking.after_read()
        assert tcp.options == [quick_ack] * 2

        unix = _RecordingSocket(left, family=socket.AF_UNIX)  # paho's transport="unix"
        _QuickAck(unix).after_read()
        assert unix.options == []

        refusing = _RecordingSocket(right, refuse=True)
        refused = _QuickAck(refusing)
        refused.after_read()
        refused.after_read()
        assert len(refusing.options) == 1 and not refused.enabled  # tried once, then no more
    finally:
        left.close()
        right.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
def test_quick_ack_is_taken_by_a_real_tcp_connection() -> None:
    from edge_agent.mqtt.transport import _QuickAck

    server = socket.create_server(("127.0.0.1", 0))
    sending = socket.create_connection(server.getsockname())
    receiving, _ = server.accept()
    try:
        asking = _QuickAck(receiving)
        sending.sendall(b"\x40\x02\x00\x01")
        assert receiving.recv(4) == b"\x40\x02\x00\x01"
        asking.after_read()
        assert asking.enabled  # the kernel took the option: it stays on for the next reads
    finally:
        for sock in (sending, receiving, server):
            sock.close()


@pytest.mark.parametrize("quick_ack", [True, False])
def test_quick_ack_follows_the_reads_of_a_connection_and_can_be_switched_off(
    quick_ack: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked for after the reads that bring PUBACKs in; never with ``quick_ack=False`` (what
    benchmarks.qos1_burst compares)."""
    from edge_agent.mqtt import transport as module

    asked = threading.Event()
    monkeypatch.setattr(module._QuickAck, "after_read", lambda self: asked.set())
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "quick-ack", quick_ack=quick_ack)
    acknowledged = threading.Event()
    transport.on_acknowledged(lambda mid: acknowledged.set())
    try:
        transport.start()
        assert transport.wait_connected(10)
        transport.publish("x", b"1", qos=1)
        assert acknowledged.wait(10)
        assert asked.is_set() == quick_ack
    finally:
        transport.stop()
        broker.stop()


def _reconnected(transport: MqttTransport) -> threading.Event:
    """Set once the transport has connected a second time."""
    event = threading.Event()
    transport.on_connected(lambda: event.set() if transport.stats.reconnects else None)
    return event


def test_the_broker_connection_sends_without_nagle_delay_after_every_connect(tmp_path: Path) -> None:
    """TCP_NODELAY on the agent's socket, set again on the new socket after a reconnect: with
    Nagle's algorithm a burst of detections (and the PUBACKs for inbound QoS 1) would go out in
    steps of the peer's delayed ACK."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "nodelay-test")
    reconnected = _reconnected(transport)

    def nodelay() -> int:
        sock = transport._client.socket()
        assert sock is not None
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    try:
        transport.start()
        assert transport.wait_connected(10)
        assert nodelay() != 0
        broker.restart()
        assert reconnected.wait(20), "no reconnect"
        assert nodelay() != 0
    finally:
        transport.stop()
        broker.stop()


def test_after_reading_hooks_run_on_the_network_thread_once_pubacks_are_in(tmp_path: Path) -> None:
    """Where the outbox refills its window: after paho has read (and counted out of its own
    window) the PUBACKs. A failing hook is logged; the connection carries on."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "reading-test")
    acknowledged: list[int] = []
    seen_after_reading: list[tuple[int, int]] = []  # (thread, acknowledgements so far)
    all_in = threading.Event()

    def hook() -> None:
        seen_after_reading.append((threading.get_ident(), len(acknowledged)))
        if len(acknowledged) == 3:
            all_in.set()
        raise RuntimeError("a broken hook")

    transport.on_acknowledged(acknowledged.append)
    transport.after_reading(hook)
    try:
        transport.start()
        assert transport.wait_connected(10)
        mids = [transport.publish("x", b"1", qos=1) for _ in range(3)]
        assert all_in.wait(10), "no hook call after the PUBACKs"
        assert sorted(acknowledged) == sorted(m for m in mids if m is not None)
        assert {thread for thread, _ in seen_after_reading} == {transport._thread.ident}  # type: ignore[union-attr]
        assert transport.connected and transport.stats.reconnects == 0
    finally:
        transport.stop()
        broker.stop()


class _RecordingClient(paho.Client):
    """paho's client, keeping what publish() returned: whether paho has finished with a
    message (``is_published``) is public."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.infos: dict[int, paho.MQTTMessageInfo] = {}

    def publish(self, *args: Any, **kwargs: Any) -> paho.MQTTMessageInfo:
        info = super().publish(*args, **kwargs)
        self.infos[info.mid] = info
        return info


@pytest.mark.parametrize("read_buffer", [True, False])
def test_acknowledgements_come_after_paho_is_done_with_the_message(read_buffer: bool, tmp_path: Path) -> None:
    """The listeners run once paho's read call has returned: paho has marked the message
    published (and freed its place in the window), on the network thread, before the
    after-reading hooks of the same round; a listener may publish from there."""
    broker = Broker(tmp_path).start()
    watcher = Client(broker.port).connect().subscribe("ack/#")
    transport = MqttTransport(
        agent_config(broker.port, tmp_path).mqtt,
        "ack-order",
        client_factory=_RecordingClient,
        read_buffer=read_buffer,
    )
    client = transport._client
    assert isinstance(client, _RecordingClient)
    events: list[tuple[str, int, bool]] = []  # (what, thread, paho done with the message)
    followed = threading.Event()

    def listener(mid: int) -> None:
        events.append(("ack", threading.get_ident(), client.infos[mid].is_published()))
        if sum(what == "ack" for what, _, _ in events) == 1:
            transport.publish("ack/followup", b"from the listener", qos=1)
        else:
            followed.set()

    transport.on_acknowledged(listener)
    transport.after_reading(lambda: events.append(("after", threading.get_ident(), True)))
    try:
        transport.start()
        assert transport.wait_connected(10)
        transport.publish("ack/first", b"1", qos=1)
        assert followed.wait(10), "the listener's own publish was not acknowledged"
        watcher.wait_for("ack/followup")
        acks = [event for event in events if event[0] == "ack"]
        assert len(acks) == 2 and all(done for _, _, done in acks)
        assert {thread for _, thread, _ in events} == {transport._thread.ident}  # type: ignore[union-attr]
        first = events.index(acks[0])
        assert ("after", acks[0][1], True) in events[first + 1 :]  # the hooks came after it
    finally:
        transport.stop()
        watcher.close()
        broker.stop()


def test_nodelay_is_left_alone_on_sockets_without_it() -> None:
    """A Unix socket (paho's transport="unix") has no TCP options: none is set on it."""
    from edge_agent.mqtt.transport import _send_without_delay

    class UnixSocket:
        family = socket.AF_UNIX

        def __init__(self) -> None:
            self.options: list[tuple[int, int, int]] = []

        def setsockopt(self, level: int, option: int, value: int) -> None:
            self.options.append((level, option, value))

    unix = UnixSocket()
    _send_without_delay(unix)
    _send_without_delay(None)
    assert unix.options == []


@pytest.mark.parametrize(
    ("broker_setting", "window"),
    [("", 20), ("max_inflight_messages 3\n", 3), ("max_inflight_messages 50\n", 20)],  # 20: paho's cap
)
def test_the_send_window_is_what_the_broker_accepts(broker_setting: str, window: int, tmp_path: Path) -> None:
    """MQTT 5: a client with more unacknowledged publishes than the CONNACK's Receive Maximum is
    disconnected; paho does not read that value itself. The agent keeps within ``send_window``
    at once; paho itself holds back what exceeds it from the next connection on (it takes a new
    window only while disconnected)."""
    broker = Broker(tmp_path, extra_config=broker_setting).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "window-test")
    reconnected = _reconnected(transport)
    watcher = Client(broker.port).connect().subscribe("burst")
    try:
        transport.start()
        assert transport.wait_connected(10)
        assert transport.send_window == window
        assert transport._client.max_inflight_messages == 20  # paho's own, until it reconnects
        watcher.close()
        broker.restart()
        assert reconnected.wait(20), "no reconnect"
        watcher = Client(broker.port).connect().subscribe("burst")
        assert transport.send_window == window
        assert transport._client.max_inflight_messages == window  # paho holds back the rest
        # More QoS 1 publishes than the window at once: paho holds back the excess; all arrive.
        # (Not necessarily in order: paho's network thread sends what it held back while this
        # thread sends new ones. The outbox publisher stays inside the window for that reason.)
        for index in range(3 * window):
            assert transport.publish("burst", str(index).encode(), qos=1) is not None
        received = watcher.wait_for("burst", lambda found: len(found) >= 3 * window)
        assert sorted(int(m.payload) for m in received) == list(range(3 * window))
        assert transport.stats.reconnects == 1
    finally:
        transport.stop()
        watcher.close()
        broker.stop()


def test_the_on_connect_burst_is_counted_for_the_room_it_needs(tmp_path: Path) -> None:
    """paho resends unacknowledged publishes right after the on-connect hooks' own, without
    counting them against its window: the hooks' QoS 1/2 publishes are counted, QoS 0 not."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "burst-test")

    def hook() -> None:
        for index in range(3):
            transport.publish(f"state/{index}", b"x", qos=1, retain=True)
        transport.publish("state/loose", b"x", qos=0)

    acknowledged: list[int] = []
    all_in = threading.Event()

    def count(mid: int) -> None:
        acknowledged.append(mid)
        if len(acknowledged) == 3:
            all_in.set()

    transport.on_connected(hook)
    transport.on_acknowledged(count)
    try:
        transport.start()
        assert transport.wait_connected(10)
        assert all_in.wait(10)  # after the CONNACK's handling, hooks and count included
        assert transport.connect_burst == 3
        transport.publish("later", b"x", qos=1)  # outside the hooks: not part of the burst
        assert transport.connect_burst == 3
    finally:
        transport.stop()
        broker.stop()


class _ClientWithSocket:
    """What :func:`_install_read_buffer` looks at in a paho client."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: Any = sock

    def socket(self) -> Any:
        return self._sock


def test_the_read_buffer_is_installed_only_where_paho_was_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a paho version outside the checked list, or without the expected attribute, the
    socket is left alone: the transport then runs on plain paho."""
    from edge_agent.mqtt import transport as module

    left, right = socket.socketpair()
    try:
        checked = _ClientWithSocket(left)
        reader = module._install_read_buffer(checked)
        assert isinstance(reader, module._ReadBuffer) and checked.socket() is reader
        assert module._install_read_buffer(checked) is None  # never twice

        class Changed:  # a paho that keeps its socket elsewhere
            def socket(self) -> socket.socket:
                return left

        assert module._install_read_buffer(Changed()) is None

        monkeypatch.setattr(module, "_paho_version", lambda: "3.0.0")
        unknown = _ClientWithSocket(left)
        assert module._install_read_buffer(unknown) is None and unknown.socket() is left
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("mode", ["read buffer", "switched off", "unchecked paho version"])
def test_messages_flow_both_ways_with_and_without_the_read_buffer(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.mqtt import transport as module

    if mode == "unchecked paho version":
        monkeypatch.setattr(module, "_paho_version", lambda: "3.0.0")
    broker = Broker(tmp_path).start()
    transport = MqttTransport(
        agent_config(broker.port, tmp_path).mqtt, "both-paths", read_buffer=mode != "switched off"
    )
    received: list[bytes] = []
    all_in = threading.Event()

    def handler(message: module.InboundMessage) -> None:
        received.append(message.payload)
        if len(received) == 200:
            all_in.set()

    transport.subscribe("in/#", handler, qos=1)
    subscribed = threading.Event()
    transport.on_connected(subscribed.set)
    watcher = Client(broker.port).connect().subscribe("out")
    try:
        transport.start()
        assert transport.wait_connected(10) and subscribed.wait(10)
        assert isinstance(transport._client.socket(), module._ReadBuffer) == (mode == "read buffer")
        # The subscription's SUBACK is in once a QoS 1 publish of ours made after it is back.
        assert transport.publish("out", b"ready", qos=1) is not None
        watcher.wait_for("out")
        for index in range(200):  # a burst: many packets per read
            watcher.client.publish(f"in/{index % 7}", str(index).encode() * 50, qos=index % 2)
        assert all_in.wait(20), f"{len(received)} of 200 arrived"
        # In order per QoS (the broker holds QoS 1 back beyond its window, QoS 0 not).
        for qos in (0, 1):
            sent = [str(index).encode() * 50 for index in range(qos, 200, 2)]
            assert [payload for payload in received if payload in sent] == sent
    finally:
        transport.stop()
        watcher.close()
        broker.stop()
    assert transport._client.socket() is None  # closed by the clean disconnect


def test_stop_disconnects_cleanly_so_the_broker_keeps_the_will_to_itself(tmp_path: Path) -> None:
    """The DISCONNECT is written before the socket closes: the broker drops the last will, and
    publishes the final messages instead."""
    broker = Broker(tmp_path).start()
    watcher = Client(broker.port).connect().subscribe("will/#")
    transport = MqttTransport(
        agent_config(broker.port, tmp_path).mqtt, "will-test", will_topic="will/state", will_payload=b"lost"
    )
    try:
        transport.start()
        assert transport.wait_connected(10)
        transport.stop(final_messages=[("will/state", b"offline", True), ("will/after", b"done", False)])
        assert transport._client.socket() is None and not transport.connected
        watcher.wait_for("will/after")
        assert [m.payload for m in watcher.on("will/state")] == [b"offline"]
    finally:
        transport.stop()
        watcher.close()
        broker.stop()


def test_subscriptions_are_in_place_when_wait_subscribed_returns(tmp_path: Path) -> None:
    """What a client publishes right after ``wait_subscribed`` reaches the handler, at once
    and again after the broker restarts (the subscriptions restored at the CONNACK)."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "subscribed-test")
    received: list[bytes] = []
    arrived = threading.Condition()

    def handler(message: Any) -> None:
        with arrived:
            received.append(message.payload)
            arrived.notify_all()

    transport.subscribe("ready/#", handler, qos=1)
    sender = Client(broker.port).connect()
    try:
        transport.start()
        assert transport.wait_subscribed(10)
        sender.publish("ready/1", b"first", qos=1)
        with arrived:
            assert arrived.wait_for(lambda: received == [b"first"], 10)
        broker.restart()
        assert transport.wait_subscribed(20)
        sender = Client(broker.port).connect()
        sender.publish("ready/2", b"after the restart", qos=1)
        with arrived:
            assert arrived.wait_for(lambda: received == [b"first", b"after the restart"], 10)
    finally:
        transport.stop()
        sender.close()
        broker.stop()


def test_publishes_from_many_threads_reach_the_broker_whole_through_a_tight_socket(tmp_path: Path) -> None:
    """paho writes a publish on the thread that makes it; with a send buffer too small for a
    packet and a broker that stalls, writes go in pieces, and two writers at once could splice
    packets into each other. The transport lets one writer at a time: every message arrives
    whole and the connection stays up."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "writers-test")
    watcher = Client(broker.port).connect().subscribe("bulk/#")
    payloads = {f"bulk/{t}/{n}": bytes([t * 16 + n % 16]) * 30_000 for t in range(4) for n in range(25)}
    try:
        transport.start()
        assert transport.wait_subscribed(10)
        sock = transport._client.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        start = threading.Barrier(5)

        def publish(thread: int) -> None:
            start.wait()
            for topic, payload in payloads.items():
                if topic.startswith(f"bulk/{thread}/"):
                    assert transport.publish(topic, payload, qos=thread % 2) is not None

        threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)  # the broker stops reading: writes go in pieces
        for thread in threads:
            thread.start()
        start.wait()
        broker.process.send_signal(signal.SIGCONT)
        for thread in threads:
            thread.join(60)
        received = watcher.wait_for("bulk/#", lambda m: len(m) >= len(payloads), timeout=60)
        assert {m.topic: m.payload for m in received} == payloads
        assert transport.stats.reconnects == 0
    finally:
        transport.stop()
        watcher.close()
        broker.stop()


def _publish_packet(
    topic: str | bytes, payload: bytes, first: int = 0x30, properties: bytes = b"\x00"
) -> bytes:
    """A PUBLISH as the broker writes it (MQTT 5: ``properties`` with their length; QoS 1 and 2
    carry a packet id after the topic)."""
    name = topic.encode() if isinstance(topic, str) else topic
    packet_id = b"\x00\x07" if first & 0x06 else b""
    body = len(name).to_bytes(2, "big") + name + packet_id + properties + payload
    length, encoded = len(body), b""
    while True:
        digit, length = length % 128, length // 128
        encoded += bytes([digit | (0x80 if length else 0)])
        if not length:
            return bytes([first]) + encoded + body


def _read_packets_as_paho_does(reader: Any, record: Callable[[bytes], None]) -> None:
    """Whole packets read the way paho reads them (type, length a byte at a time, then the
    body in pieces), each given to ``record`` as it is read, until the reader has nothing more."""
    while True:
        try:
            first = reader.recv(1)
        except BlockingIOError:
            return
        if not first:
            return
        length_bytes, length, shift = b"", 0, 0
        while True:
            byte = reader.recv(1)
            length_bytes += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        body = b""
        while len(body) < length:
            body += reader.recv(min(5, length - len(body)))
        record(first + length_bytes + body)


def _tagged(seen: list[tuple[str, Any]], kind: str, what: Any) -> None:
    seen.append((kind, what))


def _plain_tagged(seen: list[tuple[str, Any]], topic: str, payload: bytes, retain: bool) -> None:
    seen.append(("plain", (topic, payload, retain)))


def test_the_read_buffer_hands_plain_qos0_publishes_on_itself_and_keeps_the_order() -> None:
    """QoS 0 publishes without properties go straight to the handler; everything else (QoS 1,
    properties, other packets, a topic that is not UTF-8) to paho, whole, and nothing behind it
    before paho read it: however the socket cuts the bytes."""
    from edge_agent.mqtt.transport import _ReadBuffer

    big = bytes(range(256)) * 40  # a length of two bytes
    stream = [
        ("plain", _publish_packet("a/audio/s1", b"one")),
        ("paho", _publish_packet("a/audio/s1/control", b'{"action":"start"}', first=0x32)),  # QoS 1
        ("plain", _publish_packet("a/audio/s1", big)),
        ("paho", _publish_packet("a/audio/s2", b"declared", properties=b"\x0a\x26\x00\x04rate\x00\x0248")),
        ("plain", _publish_packet("a/audio/s2", b"retained", first=0x31)),
        ("paho", b"\xd0\x00"),  # PINGRESP
        ("paho", _publish_packet(b"a/\xff\xfe", b"bad topic")),
        ("plain", _publish_packet("a/audio/s3", b"last")),
    ]
    wire = b"".join(packet for _, packet in stream)
    for cut in (1, 7, 64, len(wire)):
        left, right = socket.socketpair()
        left.setblocking(False)
        seen: list[tuple[str, Any]] = []
        to_paho = functools.partial(_tagged, seen, "paho")
        try:
            plain = functools.partial(_plain_tagged, seen)
            reader = _ReadBuffer(left, plain, mqtt5=True)
            for start in range(0, len(wire), cut):
                right.sendall(wire[start : start + cut])
                _read_packets_as_paho_does(reader, to_paho)
            _read_packets_as_paho_does(reader, to_paho)
            assert reader.buffered() == 0
        finally:
            left.close()
            right.close()
        assert [kind for kind, _ in seen] == [kind for kind, _ in stream], cut
        for (kind, got), (_, packet) in zip(seen, stream, strict=True):
            if kind == "paho":
                assert got == packet
        assert [got for kind, got in seen if kind == "plain"] == [
            ("a/audio/s1", b"one", False),
            ("a/audio/s1", big, False),
            ("a/audio/s2", b"retained", True),
            ("a/audio/s3", b"last", False),
        ]


def test_the_read_buffer_takes_plain_publishes_of_mqtt_311_too() -> None:
    from edge_agent.mqtt.transport import _ReadBuffer

    left, right = socket.socketpair()
    left.setblocking(False)
    seen: list[tuple[str, bytes, bool]] = []
    try:
        reader = _ReadBuffer(left, lambda t, p, r: seen.append((t, p, r)), mqtt5=False)
        right.sendall(_publish_packet("x/y", b"pcm", properties=b"") + b"\xd0\x00")
        to_paho: list[bytes] = []
        _read_packets_as_paho_does(reader, to_paho.append)
        assert to_paho == [b"\xd0\x00"]
        assert seen == [("x/y", b"pcm", False)]
        right.close()
        assert reader.recv(1) == b""  # the peer closed
    finally:
        left.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_plain_and_decoded_messages_reach_the_handlers_alike_and_in_order(
    protocol: str, tmp_path: Path
) -> None:
    """Through a real broker: QoS 0 audio-like messages with and without user properties, and
    a retained one, arrive in the order sent, with their properties and flags."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_agent.mqtt import transport as module

    broker = Broker(tmp_path).start()
    config = agent_config(broker.port, tmp_path, mqtt={"protocol": protocol}).mqtt
    transport = MqttTransport(config, "plain-and-decoded")
    received: list[module.InboundMessage] = []
    all_in = threading.Event()
    count = 300

    def handler(message: module.InboundMessage) -> None:
        received.append(message)
        if len(received) == count + 1:
            all_in.set()

    sender = Client(broker.port, protocol=paho.MQTTv5 if protocol == "5" else paho.MQTTv311).connect()
    sender.client.publish("in/kept", b"retained", qos=0, retain=True).wait_for_publish(5)
    transport.subscribe("in/#", handler)
    subscribed = threading.Event()
    transport.on_connected(subscribed.set)
    try:
        transport.start()
        assert transport.wait_connected(10) and subscribed.wait(10)
        assert transport.wait_subscribed(10)
        for index in range(count):
            properties = None
            if protocol == "5" and index % 3 == 0:
                properties = Properties(PacketTypes.PUBLISH)
                properties.UserProperty = [("rate", str(index))]
            sender.client.publish(f"in/{index % 5}", str(index).encode() * 40, qos=0, properties=properties)
        assert all_in.wait(20), f"{len(received)} of {count + 1} arrived"
    finally:
        transport.stop()
        sender.close()
        broker.stop()
    assert isinstance(transport._client.socket(), type(None))
    kept, live = received[0], received[1:]
    assert (kept.topic, kept.payload, kept.retain) == ("in/kept", b"retained", True)
    assert [m.payload for m in live] == [str(index).encode() * 40 for index in range(count)]
    assert [m.topic for m in live] == [f"in/{index % 5}" for index in range(count)]
    for index, message in enumerate(live):
        declared = protocol == "5" and index % 3 == 0
        assert message.user_properties == ({"rate": str(index)} if declared else {})
        assert not message.retain and message.qos == 0 and message.received_at > 0
    assert transport.stats.messages_in == count + 1


def test_publish_properties_with_only_an_expiry_are_made_once_and_others_each_time() -> None:
    from edge_agent.mqtt.transport import publish_properties

    live = publish_properties(expiry_seconds=30)
    assert publish_properties(expiry_seconds=30) is live  # a burst of detections shares one
    assert live.MessageExpiryInterval == 30
    assert publish_properties(expiry_seconds=5) is not live
    assert publish_properties() is publish_properties(None)
    assert not hasattr(publish_properties(), "MessageExpiryInterval")
    asked = publish_properties(expiry_seconds=30, correlation_data=b"c1", user_properties=[("k", "v")])
    assert asked is not live and publish_properties(expiry_seconds=30, correlation_data=b"c1") is not asked
    assert asked.CorrelationData == b"c1" and asked.UserProperty == [("k", "v")]
    assert not hasattr(live, "CorrelationData")  # nothing of another publish leaks into the shared one
    # The shared ones are packed once, to the bytes paho would pack for them each time.
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    expiry = Properties(PacketTypes.PUBLISH)
    expiry.MessageExpiryInterval = 30
    assert live.pack() == expiry.pack() == b"\x05\x02\x00\x00\x00\x1e"
    assert publish_properties().pack() == Properties(PacketTypes.PUBLISH).pack() == b"\x00"


def test_publishes_sharing_properties_reach_subscribers_with_their_own_expiry(tmp_path: Path) -> None:
    with connected_transport(tmp_path, "expiry-test", "e/#") as (transport, watcher):
        for n in range(3):
            transport.publish(f"e/{n}", b"x", qos=1, expiry_seconds=60 if n < 2 else None)
        transport.publish("e/end", b"x", qos=1, correlation_data=b"42")
        arrived = watcher.wait_for("e/#", lambda found: any(m.topic == "e/end" for m in found))
        received = {m.topic: m for m in arrived}
        for topic in ("e/0", "e/1"):
            assert 0 < received[topic].properties.MessageExpiryInterval <= 60
        assert not hasattr(received["e/2"].properties, "MessageExpiryInterval")
        assert received["e/end"].properties.CorrelationData == b"42"
        assert not hasattr(received["e/end"].properties, "MessageExpiryInterval")
