"""A small synchronous MQTT client for command-line tools and benchmarks.

::

    with MqttClient("broker", 1883).connect(timeout=10) as client:
        client.subscribe("edge_agent/+/availability")
        client.publish("edge_agent/kitchen/cmd/ping", b'{"id": "1"}')      # returns on its PUBACK
        reply = client.request("edge_agent/kitchen/cmd/ping", b"{}", "my/replies", timeout=5)
        while (message := client.receive(timeout=1.0)) is not None:
            print(message.topic, message.payload)

Every call returns once the broker has answered (CONNACK, SUBACK, PUBACK) and raises
:class:`MqttClientError`, whose message says what failed and why, when it refused or did not
answer in time. Messages wait in arrival order until :meth:`MqttClient.receive` takes them (or
go to an ``on_message`` callback instead). After a lost connection the client reconnects in
the background with back-off and subscribes again, as ``edge-agent fleet --watch`` needs.

All network I/O happens on the client's own thread, which drives paho through its calls for an
application's event loop; paho is told to leave writing to it (``on_socket_register_write``),
so a caller publishing fast never writes the socket at the same time as that thread. The agent
itself uses :class:`edge_agent.mqtt.transport.MqttTransport` instead.
"""

from __future__ import annotations

import collections
import contextlib
import select
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.mqtt.transport import (
    InboundMessage,
    Wakeup,
    describe_failure,
    inbound_message,
    publish_properties,
    topic_matches,
)

# Longest wait for the broker's socket: keepalive pings and a close are looked at this often.
_IDLE_WAIT_SECONDS = 0.2


class MqttClientError(Exception):
    """The broker could not be reached, refused something, or did not answer in time."""


class MqttClient:
    """One connection to a broker; see the module's documentation.

    ``mqtt5``: MQTT 5 (response topics, correlation data, user properties, reason codes) or
    3.1.1. ``tls``: a context to connect with TLS. ``session_expiry`` (MQTT 5, seconds): resume
    the session on connect and keep it this long after a disconnect, so that the broker queues
    QoS 1 messages meanwhile. ``on_message``: called on the client's thread for every message
    instead of queueing it for :meth:`receive` (it must not block). ``will``: (topic, payload,
    retain) the broker publishes at QoS 1 if the connection dies without a clean close.
    ``on_connected``: called on the client's thread after every accepted CONNACK (the first
    and each reconnect), to publish retained state again; it must not block (publish with
    ``wait=False``).
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        client_id: str = "",
        mqtt5: bool = True,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = 30,
        session_expiry: int = 0,
        reconnect_delay: tuple[float, float] = (1.0, 10.0),
        on_message: Callable[[InboundMessage], None] | None = None,
        will: tuple[str, bytes, bool] | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.mqtt5 = mqtt5
        self._keepalive = keepalive
        self._session_expiry = session_expiry
        self._min_delay, self._max_delay = reconnect_delay
        self._delay = self._min_delay
        self._on_message_callback = on_message
        kwargs: dict[str, Any] = {"client_id": client_id}
        if mqtt5:
            kwargs["protocol"] = paho.MQTTv5
        else:
            kwargs["protocol"] = paho.MQTTv311
            kwargs["clean_session"] = session_expiry == 0
        self._client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        if username:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(tls)
        if will is not None:
            will_topic, will_payload, will_retain = will
            self._client.will_set(will_topic, will_payload, qos=1, retain=will_retain)
        self._on_connected_callback = on_connected
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_socket_register_write = self._on_register_write
        self._state = threading.Condition()
        self._connected = threading.Event()
        self._answered = False  # the first CONNACK came, whatever it said
        self._refusal: str | None = None
        self._filters: dict[str, int] = {}  # restored after a reconnect
        self._resubscribes: set[int] = set()  # their SUBACKs: nobody waits for those
        self._subacks: dict[int, list[Any]] = {}
        self._refused_publishes: dict[int, str] = {}
        self._unacknowledged: list[paho.MQTTMessageInfo] = []
        self._messages: collections.deque[InboundMessage] = collections.deque()
        self._closing = threading.Event()
        self._close_by = 0.0
        self._wakeup: Wakeup | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Whether the client is connected, waiting at most ``timeout`` s for a reconnect."""
        return self._connected.wait(timeout)

    # --- connecting and closing ----------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> MqttClient:
        """Connect and wait for the CONNACK; raises MqttClientError (and closes) otherwise."""
        deadline = time.monotonic() + timeout
        self._wakeup = Wakeup()
        self._client.connect_timeout = max(0.1, timeout)  # TCP connection and TLS handshake
        arguments: dict[str, Any] = {}
        if self.mqtt5 and self._session_expiry:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self._session_expiry
            arguments = {"clean_start": False, "properties": properties}
        try:
            self._client.connect(self.host, self.port, self._keepalive, **arguments)
        except (OSError, ssl.SSLError) as error:
            self.close()
            raise MqttClientError(
                f"cannot connect to the broker {self.address}: {describe_failure(error)}"
            ) from None
        self._thread = threading.Thread(target=self._run, name="mqtt-client", daemon=True)
        self._thread.start()
        with self._state:
            self._state.wait_for(lambda: self._answered, max(0.0, deadline - time.monotonic()))
        if self._refusal is not None:
            self.close()
            raise MqttClientError(f"the broker {self.address} refused the connection: {self._refusal}")
        if not self.connected:
            self.close()
            raise MqttClientError(f"no answer (CONNACK) from the broker {self.address} within {timeout:g} s")
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker then sends no last will) and close every socket."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._close_by = time.monotonic() + timeout
            self._closing.set()
            if self._wakeup is not None:
                self._wakeup.wake()
            thread.join(timeout + 1.0)
        sock = self._client.socket()
        if sock is not None:
            # The DISCONNECT could not be written in time (a broker that stopped reading): paho
            # would hold this socket until the client object is finalised.
            sock.close()
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None
        self._connected.clear()

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # --- subscribing, publishing, receiving ------------------------------------------------------

    def subscribe(self, *topic_filters: str, qos: int = 1, timeout: float = 10.0) -> dict[str, str]:
        """Subscribe and wait for the SUBACK; returns the filters the broker refused, with its
        reason (an empty dict: all granted). The subscriptions are made again after a reconnect."""
        if not topic_filters:
            return {}
        self._filters.update(dict.fromkeys(topic_filters, qos))
        result, mid = self._client.subscribe([(topic_filter, qos) for topic_filter in topic_filters])
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            raise MqttClientError(
                f"cannot subscribe to {', '.join(topic_filters)}: {paho.error_string(result)}"
            )
        with self._state:
            if not self._state.wait_for(lambda: mid in self._subacks, timeout):
                raise MqttClientError(
                    f"the broker {self.address} did not confirm the subscription to "
                    f"{', '.join(topic_filters)} within {timeout:g} s"
                )
            codes = self._subacks.pop(mid)
        return {f: str(code) for f, code in zip(topic_filters, codes, strict=False) if _is_failure(code)}

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        *,
        expiry_seconds: int | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
        wait: bool = True,
        timeout: float = 10.0,
    ) -> int:
        """Publish; returns the message id.

        Waits at most ``timeout`` s for the connection first (after a lost one). QoS 1/2 with
        ``wait``: returns once the broker acknowledged it, raising MqttClientError if it refused
        it or did not answer in time. Without ``wait``, or at QoS 0, returns once it is queued
        (:meth:`flush` waits for the QoS 1/2 ones). The MQTT 5 properties are left out on an
        MQTT 3.1.1 connection.
        """
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout):
            raise MqttClientError(f"cannot publish to {topic}: not connected to the broker {self.address}")
        properties = None
        if self.mqtt5:
            properties = publish_properties(expiry_seconds, response_topic, correlation_data, user_properties)
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as error:
            raise MqttClientError(f"cannot publish to {topic!r}: {error}") from None
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttClientError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        if qos and wait:
            self._wait_acknowledged(info, f"the publish to {topic}", max(0.0, deadline - time.monotonic()))
        elif qos:
            self._unacknowledged.append(info)
        return int(info.mid)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the broker acknowledged every QoS 1/2 publish made without ``wait``."""
        deadline = time.monotonic() + timeout
        pending, self._unacknowledged = self._unacknowledged, []
        for info in pending:
            self._wait_acknowledged(info, f"publish {info.mid}", max(0.0, deadline - time.monotonic()))

    def _wait_acknowledged(self, info: paho.MQTTMessageInfo, what: str, timeout: float) -> None:
        try:
            info.wait_for_publish(timeout)
            acknowledged = info.is_published()
        except (RuntimeError, ValueError) as error:  # the connection was lost first
            raise MqttClientError(f"{what} did not reach the broker {self.address}: {error}") from None
        if not acknowledged:
            raise MqttClientError(
                f"the broker {self.address} did not acknowledge {what} within {timeout:g} s"
            )
        with self._state:
            refusal = self._refused_publishes.pop(info.mid, None)
        if refusal is not None:
            raise MqttClientError(f"the broker {self.address} refused {what}: {refusal}")

    def request(
        self,
        topic: str,
        payload: bytes | str,
        response_topic: str,
        *,
        timeout: float = 10.0,
        correlation_data: bytes | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
    ) -> InboundMessage:
        """MQTT 5 request/response: publish with ``response_topic`` and correlation data (a
        fresh one unless given) and return the reply that carries the same correlation data.
        Subscribes to ``response_topic`` first unless already subscribed. Other messages stay
        queued for :meth:`receive`."""
        if not self.mqtt5:
            raise MqttClientError("request/response needs MQTT 5")
        deadline = time.monotonic() + timeout
        correlation = correlation_data if correlation_data is not None else uuid.uuid4().bytes
        if response_topic not in self._filters:
            refused = self.subscribe(response_topic, timeout=timeout)
            if refused:
                raise MqttClientError(
                    f"the broker refused the subscription to {response_topic}: {refused[response_topic]}"
                )
        self.publish(
            topic,
            payload,
            response_topic=response_topic,
            correlation_data=correlation,
            user_properties=user_properties,
            timeout=max(0.0, deadline - time.monotonic()),
        )
        reply = self._take(
            lambda m: m.correlation_data == correlation and topic_matches(response_topic, m.topic),
            max(0.0, deadline - time.monotonic()),
        )
        if reply is None:
            raise MqttClientError(f"no answer on {response_topic} within {timeout:g} s")
        return reply

    def receive(self, timeout: float, topic_filter: str | None = None) -> InboundMessage | None:
        """The oldest message (on a topic matching ``topic_filter``, if given), waiting at most
        ``timeout`` s for one; None if none came."""
        if topic_filter is None:
            return self._take(lambda message: True, timeout)
        return self._take(lambda message: topic_matches(topic_filter, message.topic), timeout)

    def messages(self, timeout: float) -> Iterator[InboundMessage]:
        """Every message that arrives within ``timeout`` s from now, as it arrives."""
        deadline = time.monotonic() + timeout
        while (message := self.receive(max(0.0, deadline - time.monotonic()))) is not None:
            yield message

    def _take(self, wanted: Callable[[InboundMessage], bool], timeout: float) -> InboundMessage | None:
        deadline = time.monotonic() + timeout
        with self._state:
            while True:
                for index, message in enumerate(self._messages):
                    if wanted(message):
                        del self._messages[index]
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._state.wait(remaining)

    # --- the client's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None  # connect() made it before starting this thread
        disconnecting = False
        while True:
            sock = self._client.socket()
            if self._closing.is_set():
                if sock is None or time.monotonic() >= self._close_by:
                    return
                if not disconnecting:
                    disconnecting = True
                    self._client.disconnect()
            elif sock is None:
                self._reconnect()
                continue
            pending = int(sock.pending()) if hasattr(sock, "pending") else 0
            writing = [sock] if self._client.want_write() else []
            readable, _, _ = select.select(
                [sock, wakeup], writing, [], 0.0 if pending else _IDLE_WAIT_SECONDS
            )
            if wakeup in readable:
                wakeup.clear()
            rc = paho.MQTT_ERR_SUCCESS
            if pending or sock in readable:
                rc = self._client.loop_read()
            if rc == paho.MQTT_ERR_SUCCESS and self._client.want_write():
                rc = self._client.loop_write()
            if rc == paho.MQTT_ERR_SUCCESS:
                self._client.loop_misc()

    def _reconnect(self) -> None:
        if self._closing.wait(self._delay):
            return
        self._delay = min(self._delay * 2, self._max_delay)
        with contextlib.suppress(OSError, ssl.SSLError):  # tried again after the next delay
            self._client.reconnect()

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """paho has a packet to write: the client's thread writes it."""
        if self._wakeup is not None:
            self._wakeup.wake()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        with self._state:
            self._answered = True
            if _is_failure(reason_code):
                self._refusal = str(reason_code)
            else:
                self._delay = self._min_delay
                self._connected.set()
                if self._filters:
                    _, mid = client.subscribe(list(self._filters.items()))
                    if mid is not None:
                        self._resubscribes.add(mid)
            self._state.notify_all()
        if not _is_failure(reason_code) and self._on_connected_callback is not None:
            self._on_connected_callback()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._connected.clear()
        with self._state:
            self._state.notify_all()

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        with self._state:
            if mid in self._resubscribes:
                self._resubscribes.discard(mid)
                return
            self._subacks[mid] = list(reason_codes)
            self._state.notify_all()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        if _is_failure(reason_code):  # a PUBACK that says no; paho marks the publish done all the same
            with self._state:
                self._refused_publishes[mid] = str(reason_code)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        inbound = inbound_message(message)
        if self._on_message_callback is not None:
            self._on_message_callback(inbound)
            return
        with self._state:
            self._messages.append(inbound)
            self._state.notify_all()


def _is_failure(code: Any) -> bool:
    """A reason code (MQTT 5) or a granted QoS 0x80 (MQTT 3.1.1) that says no."""
    if hasattr(code, "is_failure"):
        return bool(code.is_failure)
    return isinstance(code, int) and code >= 0x80
