"""Thin devices for the MQTT benchmarks: many streams' audio published from one connection, at
little cost to the machine the agent runs on.

A device fleet is other machines; in a benchmark it is a process on the agent's own cores. Sent
through paho, every chunk costs that process a publish call's Python: with many streams the load
generator took as much CPU as a good part of the agent, and the agent's figures were those of an
agent sharing its cores with its own load (``others_cpu_percent`` says how much). Here every chunk is
an MQTT 3.1.1 QoS 0 PUBLISH whose fixed header and topic are framed once per stream (a chunk's
length never changes), and a round of chunks leaves in one ``sendall``: the broker and the
agent see exactly what paho would have sent them.

Only QoS 0 is spoken (no packet ids, nothing to acknowledge), and the connection's end is a
DISCONNECT, after which the broker has handled every publish before it (one connection's
packets are handled in order).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

CONNECT = 0x10
CONNACK = 0x20
PUBLISH_QOS0 = 0x30
DISCONNECT = b"\xe0\x00"
PROTOCOL_LEVEL_3_1_1 = 4
CLEAN_SESSION = 0x02


class DeviceFleetError(RuntimeError):
    """The broker refused the connection or closed it."""


def remaining_length(length: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    if not 0 <= length <= 268_435_455:
        raise ValueError(f"an MQTT packet cannot hold {length} bytes")
    encoded = bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def publish_prefix(topic: str, payload_bytes: int) -> bytes:
    """Everything of a QoS 0 PUBLISH to ``topic`` before its payload of ``payload_bytes``."""
    variable = _utf8(topic)
    return bytes([PUBLISH_QOS0]) + remaining_length(len(variable) + payload_bytes) + variable


class DeviceFleet:
    """One MQTT connection publishing, per round, one payload to each of ``topics``."""

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 10.0) -> None:
        self._socket = socket.create_connection((host, port), timeout=timeout)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = (
            _utf8("MQTT")
            + bytes([PROTOCOL_LEVEL_3_1_1, CLEAN_SESSION])
            + struct.pack("!H", 0)  # no keep-alive: the fleet sends all the time, then leaves
            + _utf8(client_id)
        )
        self._socket.sendall(bytes([CONNECT]) + remaining_length(len(body)) + body)
        answer = self._read(4)
        if answer[0] != CONNACK or answer[3] != 0:
            self._socket.close()
            raise DeviceFleetError(f"the broker refused the connection (CONNACK {answer.hex()})")
        self._prefixes: dict[tuple[str, int], bytes] = {}

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            more = self._socket.recv(count - len(data))
            if not more:
                raise DeviceFleetError("the broker closed the connection")
            data += more
        return data

    def publish_round(self, topics: Sequence[str], payloads: Sequence[bytes]) -> None:
        """``payloads[k]`` to ``topics[k]`` at QoS 0, in order, in one write."""
        parts = []
        for topic, payload in zip(topics, payloads, strict=True):
            key = (topic, len(payload))
            prefix = self._prefixes.get(key)
            if prefix is None:
                prefix = self._prefixes[key] = publish_prefix(topic, len(payload))
            parts += (prefix, payload)
        self._socket.sendall(b"".join(parts))

    def close(self) -> None:
        """Disconnect cleanly: the broker handles every publish sent before."""
        try:
            self._socket.sendall(DISCONNECT)
        finally:
            self._socket.close()
