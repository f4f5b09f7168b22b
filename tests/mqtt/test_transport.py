"""MqttTransport against a real mosquitto: what the rest of the agent relies on."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from edge_agent.mqtt.transport import MqttTransport
from tests.broker import Broker, Client
from tests.support import agent_config


@pytest.mark.parametrize("bad_topic", ["a/\udcac/response", "a/+/response", ""])
def test_a_topic_mqtt_cannot_carry_drops_that_publish_only(bad_topic: str, tmp_path: Path) -> None:
    """Topics built from inbound names (request ids) may be unencodable; the link must survive it."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "transport-test")
    watcher = Client(broker.port).connect().subscribe("ok")
    try:
        transport.start()
        assert transport.wait_connected(10)
        assert transport.publish(bad_topic, b"x", qos=1) is None
        assert transport.publish("ok", b"still here", qos=1) is not None
        received = watcher.wait_for("ok")
        assert [m.payload for m in received] == [b"still here"]
    finally:
        transport.stop()
        watcher.close()
        broker.stop()


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
    ``family`` (the seam: which options a read sets, and when)."""

    def __init__(self, sock: socket.socket, family: int = socket.AF_INET, refuse: bool = False) -> None:
        self._sock = sock
        self.family = family
        self.refuse = refuse
        self.options: list[tuple[int, int, int]] = []

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))
        if self.refuse:
            raise OSError("not supported here")


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
def test_every_read_from_the_socket_asks_for_an_immediate_tcp_ack() -> None:
    """Once per real read, not per packet paho takes from the buffer: a broker with Nagle's
    algorithm on holds its next PUBACK until this side acknowledges the last one."""
    from edge_agent.mqtt.transport import _ReadBuffer

    quick_ack = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    left, right = socket.socketpair()
    try:
        recording = _RecordingSocket(left)
        reader = _ReadBuffer(recording)
        right.sendall(b"\x40\x02\x00\x01" * 3)  # three PUBACKs in one read
        assert [reader.recv(4) for _ in range(3)] == [b"\x40\x02\x00\x01"] * 3
        assert recording.options == [quick_ack]
        right.sendall(b"\x40\x02\x00\x02")
        assert reader.recv(4) == b"\x40\x02\x00\x02"
        assert recording.options == [quick_ack] * 2
        right.close()
        assert reader.recv(1) == b""  # the peer closed: nothing to acknowledge
        assert recording.options == [quick_ack] * 2
    finally:
        left.close()
        right.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")
def test_quick_ack_is_set_on_a_real_tcp_connection_and_skipped_where_it_does_not_apply() -> None:
    from edge_agent.mqtt.transport import _ReadBuffer

    server = socket.create_server(("127.0.0.1", 0))
    sending = socket.create_connection(server.getsockname())
    receiving, _ = server.accept()
    try:
        reader = _ReadBuffer(receiving)
        sending.sendall(b"\x40\x02\x00\x01")
        assert reader.recv(4) == b"\x40\x02\x00\x01"
        assert reader._quick_ack  # the kernel took the option: it stays on for the next reads
    finally:
        for sock in (sending, receiving, server):
            sock.close()

    left, right = socket.socketpair()
    try:
        unix = _RecordingSocket(left, family=socket.AF_UNIX)  # paho's transport="unix"
        refusing = _RecordingSocket(right, refuse=True)
        readers = _ReadBuffer(unix), _ReadBuffer(refusing)
        right.sendall(b"ab")
        left.sendall(b"cd")
        assert readers[0].recv(2) == b"ab" and unix.options == []
        assert readers[1].recv(2) == b"cd" and len(refusing.options) == 1  # tried once
        left.sendall(b"ef")
        assert readers[1].recv(2) == b"ef" and len(refusing.options) == 1  # then no more
        _ReadBuffer.QUICK_ACK = False
        try:
            switched_off = _RecordingSocket(left)
            right.sendall(b"gh")
            assert _ReadBuffer(switched_off).recv(2) == b"gh" and switched_off.options == []
        finally:
            _ReadBuffer.QUICK_ACK = True
    finally:
        left.close()
        right.close()


def test_the_broker_connection_sends_without_nagle_delay_after_every_connect(tmp_path: Path) -> None:
    """TCP_NODELAY on the agent's socket, set again on the new socket after a reconnect: with
    Nagle's algorithm a burst of detections (and the PUBACKs for inbound QoS 1) would go out in
    steps of the peer's delayed ACK."""
    broker = Broker(tmp_path).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "nodelay-test")

    def nodelay() -> int:
        sock = transport._client._sock
        assert sock is not None
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    try:
        transport.start()
        assert transport.wait_connected(10)
        assert nodelay() != 0
        broker.restart(downtime=0.5)
        deadline = time.monotonic() + 20
        while transport.stats.reconnects == 0 or not transport.connected:
            assert time.monotonic() < deadline, "no reconnect"
            time.sleep(0.05)
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

    def hook() -> None:
        seen_after_reading.append((threading.get_ident(), len(acknowledged)))
        raise RuntimeError("a broken hook")

    transport.on_acknowledged(acknowledged.append)
    transport.after_reading(hook)
    try:
        transport.start()
        assert transport.wait_connected(10)
        mids = [transport.publish("x", b"1", qos=1) for _ in range(3)]
        deadline = time.monotonic() + 10
        while not any(count == 3 for _, count in seen_after_reading):
            assert time.monotonic() < deadline, "no hook call after the PUBACKs"
            time.sleep(0.01)
        assert sorted(acknowledged) == sorted(m for m in mids if m is not None)
        assert {thread for thread, _ in seen_after_reading} == {transport._thread.ident}  # type: ignore[union-attr]
        assert transport.connected and transport.stats.reconnects == 0
    finally:
        transport.stop()
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
    disconnected; paho does not read that value itself."""
    broker = Broker(tmp_path, extra_config=broker_setting).start()
    transport = MqttTransport(agent_config(broker.port, tmp_path).mqtt, "window-test")
    watcher = Client(broker.port).connect().subscribe("burst")
    try:
        transport.start()
        assert transport.wait_connected(10)
        assert transport.send_window == window
        assert transport._client.max_inflight_messages == window  # paho holds back the rest
        # More QoS 1 publishes than the window at once: paho holds back the excess; all arrive.
        # (Not necessarily in order: paho's network thread sends what it held back while this
        # thread sends new ones. The outbox publisher stays inside the window for that reason.)
        for index in range(3 * window):
            assert transport.publish("burst", str(index).encode(), qos=1) is not None
        received = watcher.wait_for("burst", lambda found: len(found) >= 3 * window)
        assert sorted(int(m.payload) for m in received) == list(range(3 * window))
        assert transport.stats.reconnects == 0
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

    transport.on_connected(hook)
    try:
        transport.start()
        assert transport.wait_connected(10)
        deadline = time.monotonic() + 5
        while transport.connect_burst == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert transport.connect_burst == 3
        transport.publish("later", b"x", qos=1)  # outside the hooks: not part of the burst
        assert transport.connect_burst == 3
    finally:
        transport.stop()
        broker.stop()
