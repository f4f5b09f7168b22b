"""The agent's paho-mqtt client: connection, reconnects, subscriptions, publishing.

One network thread drives paho through its calls for an application's own event loop
(``socket()``, ``want_write()``, ``loop_read()``, ``loop_write()``, ``loop_misc()``) and owns
(re)connection: exponential back-off with jitter between ``reconnect_min_delay`` and
``reconnect_max_delay``, forever. After every CONNACK the remembered subscriptions are restored
and the ``on_connected`` hooks run (they re-publish retained state: availability, info,
discovery), as Home Assistant and Zigbee2MQTT users expect, and only then: a device must never
claim ``online`` before the broker knows it.

Inbound messages are handed to their handlers on the network thread; handlers must only
enqueue (never infer, never wait for a publish: paho #527). A handler that raises is logged and
counted; it never stops the network thread.

Only :class:`_ReadBuffer` (see :func:`_install_read_buffer`) touches paho's internals, and only
on paho versions it was checked against; anywhere else the transport runs on plain paho.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt as paho_package
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.config import ConfigError, MqttConfig, read_password

log = logging.getLogger(__name__)

# paho's default window of unacknowledged QoS 1/2 publishes; also what mosquitto allows.
_PAHO_INFLIGHT_DEFAULT = 20
# Longest wait for the broker's socket: keepalive pings and a stop request are looked at this often.
_IDLE_WAIT_SECONDS = 0.2
# QoS 1/2 publishes held while disconnected, at most.
_HELD_PUBLISHES = 1000
# Packets taken from the read buffer per wake-up, so that keepalives and our own writes keep
# going while a long burst is read.
_READ_BATCH = 256


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    user_properties: dict[str, str] = field(default_factory=dict)
    response_topic: str | None = None
    correlation_data: bytes | None = None
    received_at: float = 0.0  # time.time()


Handler = Callable[[InboundMessage], None]


@dataclass
class TransportStats:
    connected: bool = False
    connects: int = 0
    reconnects: int = 0
    last_error: str | None = None
    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    handler_errors: int = 0


def build_tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context, or a ConfigError naming the key whose file is missing or unreadable."""
    tls = config.tls
    if not tls.enabled:
        return None
    for key, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"mqtt.tls.{key}", f"{path} does not exist")
    try:
        context = (
            ssl.create_default_context(cafile=tls.ca_file) if tls.ca_file else ssl.create_default_context()
        )
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ConfigError(
            "mqtt.tls.ca_file", f"{tls.ca_file} is not a PEM CA certificate ({error})"
        ) from None
    if tls.cert_file and tls.key_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(
                "mqtt.tls.cert_file", f"cannot load {tls.cert_file} with {tls.key_file} ({error})"
            ) from None
    if tls.insecure:
        # Explicitly requested in config (mqtt.tls.insecure), and logged loudly at start-up.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def describe_failure(error: BaseException) -> str:
    """Why a connection attempt failed, in words a user can act on."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate was not accepted ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed ({error.reason or error})"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the broker running on that host and port?)"
    return f"{type(error).__name__}: {error}"


def publish_properties(
    expiry_seconds: int | None = None,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    user_properties: Iterable[tuple[str, str]] = (),
) -> Properties:
    """The MQTT 5 properties of a PUBLISH. Those with at most an expiry (detections, state) are
    made once per expiry and shared: paho only reads them, and making them is a good part of a
    publish's cost in a burst of detections."""
    user = list(user_properties)
    if not (response_topic or correlation_data is not None or user):
        return _expiry_properties(int(expiry_seconds or 0))
    properties = Properties(PacketTypes.PUBLISH)
    if expiry_seconds:
        properties.MessageExpiryInterval = int(expiry_seconds)
    if response_topic:
        properties.ResponseTopic = response_topic
    if correlation_data is not None:
        properties.CorrelationData = correlation_data
    if user:
        properties.UserProperty = user
    return properties


class _SharedProperties(Properties):  # type: ignore[misc]
    """The properties of many publishes (an expiry at most), made once and never changed:
    paho packs a PUBLISH's properties each time it sends one (:meth:`Properties.pack`), and
    packing walks every property name MQTT 5 defines, a good part of a publish's cost in a
    burst of detections. Packed once here."""

    def __init__(self, expiry_seconds: int) -> None:
        super().__init__(PacketTypes.PUBLISH)
        if expiry_seconds:
            self.MessageExpiryInterval = expiry_seconds
        # paho's Properties accepts only MQTT property names as attributes.
        object.__setattr__(self, "packed", super().pack())

    def pack(self) -> bytes:
        return self.packed  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=64)
def _expiry_properties(expiry_seconds: int) -> Properties:
    return _SharedProperties(expiry_seconds)


class Wakeup:
    """A socket pair that interrupts the network thread's ``select()`` from any thread.

    Ours rather than paho's: paho makes one in ``loop()`` and ``loop_start()`` and closes it only
    when the client object is finalised, which in a reference cycle may come after the sockets
    themselves were finalised (a ResourceWarning).
    """

    def __init__(self) -> None:
        self._receiving, self._sending = socket.socketpair()
        self._receiving.setblocking(False)
        self._sending.setblocking(False)

    def fileno(self) -> int:
        return self._receiving.fileno()

    def wake(self) -> None:
        # Full (already pending) or closed by close(): either way there is nothing left to do.
        with contextlib.suppress(OSError):
            self._sending.send(b"\0")

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self._receiving.recv(4096)

    def close(self) -> None:
        self._receiving.close()
        self._sending.close()


class MqttTransport:
    """paho-mqtt behind publish / subscribe / start / stop.

    ``read_buffer``: read the broker's socket 64 KiB at a time where paho's version allows it
    (:func:`_install_read_buffer`); False runs on plain paho. ``quick_ack``: after every read, ask
    the kernel to acknowledge at once what arrived (TCP_QUICKACK, Linux; see :class:`_QuickAck`).
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        will_topic: str | None = None,
        will_payload: bytes = b"offline",
        client_factory: Callable[..., paho.Client] = paho.Client,
        read_buffer: bool = True,
        quick_ack: bool = True,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.stats = TransportStats()
        self._mqtt5 = config.protocol == "5"
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._handler_cache: dict[str, list[Handler]] = {}
        self._matchers: list[tuple[TopicFilter, Handler]] = []
        self._connected_hooks: list[Callable[[], None]] = []
        self._ack_listeners: list[Callable[[int], None]] = []
        self._reading_hooks: list[Callable[[], None]] = []
        self._disconnected_listeners: list[Callable[[int | None, str], None]] = []
        self._backoff_floor = 0.0  # seconds; see set_backoff_floor
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakeup: Wakeup | None = None
        self._close_by = 0.0  # monotonic time after which stop() no longer waits for a clean DISCONNECT
        self._attempt = 0
        self._refusal: str | None = None
        self._read_buffer = read_buffer
        self._quick_ack = quick_ack
        # Message ids paho reported in on_publish, for the listeners once paho's call has returned.
        self._acknowledged: collections.deque[int] = collections.deque()
        # QoS 1/2 publishes the broker takes unacknowledged (MQTT 5 Receive Maximum; paho's
        # own window otherwise). paho does not read the broker's value by itself.
        self.send_window = _PAHO_INFLIGHT_DEFAULT
        # paho's window for the next connection: the broker's last Receive Maximum (paho takes a
        # new window only while disconnected).
        self._next_window = _PAHO_INFLIGHT_DEFAULT
        # QoS 1/2 publishes made by the on-connect hooks at the last CONNACK (the largest seen):
        # whoever keeps publishes in flight right after a connection must leave this much room.
        self.connect_burst = 0
        self._hooks_thread: int | None = None  # thread running the on-connect hooks, meanwhile
        self._connect_publishes = 0
        # One writer at a time: paho writes a publish on the thread that makes it, and a packet
        # it could not send whole goes back to its queue, where a second writer could send the
        # next packet into the middle of it.
        self._write_lock = threading.RLock()
        # Set once the broker acknowledged the subscriptions restored at the last CONNACK.
        self._subscribed = threading.Event()
        self._resubscribe_mid: int | None = None
        # When the broker last sent anything (monotonic): a link heard from recently is alive.
        self.last_heard = 0.0
        # QoS 1/2 publishes made while disconnected, sent after the next CONNACK (the oldest are
        # dropped beyond the bound: retained state is re-published anyway).
        self._held: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=_HELD_PUBLISHES)
        # Notified at every CONNACK (stats.connects grows), for reconnect_with's wait.
        self._connection_changed = threading.Condition()

        self._client_factory = client_factory
        self._will = (will_topic, will_payload) if will_topic else None
        # Asked by drop_connection(): the network thread closes the connection and reconnects.
        self._drop_reason: str | None = None
        self._fresh_client_needed = False  # the first connection uses the client made here
        build_tls_context(config)  # a ConfigError naming the key now, not at the first connection
        if (config.password or config.password_file) and not config.tls.enabled:
            log.warning(
                "MQTT: the password for %s goes to %s:%d unencrypted (mqtt.tls.enabled is false): "
                "anyone on the network path can read it",
                config.username,
                config.host,
                config.port,
            )
        self._client = self._new_client(_PAHO_INFLIGHT_DEFAULT)

    def _new_client(self, window: int) -> paho.Client:
        """A paho client for one connection. Every connection starts a new session of its own:
        what a dead connection left unacknowledged is not resent verbatim by paho (a detection
        resent a minute later must say so), but handed over again by its owner (the outbox)."""
        config = self.config
        protocol = paho.MQTTv5 if self._mqtt5 else paho.MQTTv311
        kwargs: dict[str, Any] = {"client_id": self.client_id, "protocol": protocol}
        if not self._mqtt5:
            kwargs["clean_session"] = True
        client = self._client_factory(CallbackAPIVersion.VERSION2, **kwargs)
        client.max_queued_messages_set(10_000)  # bounded: paho's default is unlimited
        client.max_inflight_messages_set(window)
        if config.username:
            client.username_pw_set(config.username, read_password(config))
        context = build_tls_context(config)
        if context is not None:
            client.tls_set_context(context)
            if config.tls.insecure:
                client.tls_insecure_set(True)
                log.warning("mqtt.tls.insecure is set: the broker's certificate is NOT verified")
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_register_write = self._write_requested
        client.connect_async(config.host, config.port, config.keepalive)
        return client

    # --- public API ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def mqtt5(self) -> bool:
        return self._mqtt5

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def reconnect_with(self, config: MqttConfig, timeout: float) -> bool:
        """Connect again with other settings (host, port, TLS, credentials; not the protocol or
        client id); returns whether the broker took them and the subscriptions within
        ``timeout`` (0: do not wait). Raises ConfigError for TLS files that cannot be used."""
        build_tls_context(config)
        connects = self.stats.connects
        self.config = config
        self._attempt = 0
        self.drop_connection("switching to new connection settings")
        if timeout <= 0:
            return False
        deadline = time.monotonic() + timeout
        with self._connection_changed:
            if not self._connection_changed.wait_for(lambda: self.stats.connects > connects, timeout):
                return False
        return self._subscribed.wait(max(0.0, deadline - time.monotonic()))

    def drop_connection(self, reason: str) -> None:
        """Close the connection and connect again (with back-off), as after a network failure:
        for a broker that stopped acknowledging while TCP still looks fine (a frozen process)."""
        self._drop_reason = reason
        if self._wakeup is not None:
            self._wakeup.wake()

    def wait_subscribed(self, timeout: float) -> bool:
        """Connected, and the broker has acknowledged every subscription made so far: messages
        published from now on reach the handlers."""
        return self._subscribed.wait(timeout)

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the network thread after every CONNACK (after re-subscribing)."""
        self._connected_hooks.append(hook)

    def on_disconnected(self, listener: Callable[[int | None, str], None]) -> None:
        """``listener(code, reason)`` on the network thread when a connection ends other than by
        :meth:`stop`: ``code`` is the reason code paho reports (the broker's MQTT 5 DISCONNECT
        reason when it sent one, e.g. 142 "Session taken over"), or None."""
        self._disconnected_listeners.append(listener)

    def set_backoff_floor(self, seconds: float) -> None:
        """Wait at least ``seconds`` (plus up to a fifth more, jitter) before every reconnect
        attempt from now on; 0 returns to the configured back-off alone."""
        self._backoff_floor = max(0.0, seconds)

    def on_acknowledged(self, listener: Callable[[int], None]) -> None:
        """``listener(mid)`` when the broker acknowledges a QoS>0 publish (PUBACK, or PUBCOMP).

        It runs on the network thread once paho's read call that took the acknowledgement has
        returned, and before the :meth:`after_reading` hooks: paho has then released its locks
        and freed the message's place in its window, so the listener may publish. paho also
        reports a QoS 0 publish once it is written; a listener ignores ids it does not know.
        """
        self._ack_listeners.append(listener)

    def after_reading(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` on the network thread after every batch of packets read while connected:
        where a publisher can refill its window as soon as PUBACKs came in, without a thread
        switch. It must be quick and must not block."""
        self._reading_hooks.append(hook)

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 0, retain_as_published: bool = False
    ) -> None:
        """Remember and (when connected) make a subscription; it is restored after reconnects.

        ``retain_as_published`` (MQTT 5): deliver the retain flag as the publisher set it even
        for live messages, so that a handler can refuse retained publications altogether.
        """
        with self._lock:
            self._subscriptions[topic_filter] = (self._options(qos, retain_as_published), handler)
            self._subscriptions_changed()
        if self.connected:
            self._subscribed.clear()
            _, mid = self._client.subscribe(
                topic_filter, **self._subscribe_arguments(self._subscriptions[topic_filter][0])
            )
            self._resubscribe_mid = mid
            self._written()

    def _options(self, qos: int, retain_as_published: bool) -> Any:
        if self._mqtt5:
            return SubscribeOptions(qos=qos, retainAsPublished=retain_as_published)
        return qos

    @staticmethod
    def _subscribe_arguments(options: Any) -> dict[str, Any]:
        return {"options": options} if isinstance(options, SubscribeOptions) else {"qos": options}

    def delivers_to_self(self, topic: str) -> bool:
        """Whether a message published to ``topic`` would come back to this client's own
        subscriptions."""
        with self._lock:
            filters = list(self._subscriptions)
        return any(TopicFilter(f).matches(topic) for f in filters)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
            self._subscriptions_changed()
        if self.connected:
            self._client.unsubscribe(topic_filter)
            self._written()

    def _subscriptions_changed(self) -> None:
        """(Under the lock.) Compile the filters again and forget which topics matched which."""
        self._matchers = [(TopicFilter(f), h) for f, (_, h) in self._subscriptions.items()]
        self._handler_cache.clear()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        expiry_seconds: int | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
        hold: bool = True,
    ) -> int | None:
        """Queue a publish; returns its message id, or None when it was not handed to the
        client now (dropped, or held).

        While disconnected, QoS 0 is dropped (retained state is re-published on connect); QoS
        1/2 is held (boundedly) and published after the next CONNACK, unless ``hold`` is False:
        a publisher that decides what a message says at the moment it goes out (detections)
        publishes again itself.
        """
        if not self.connected:
            if qos and hold:
                with self._lock:
                    self._held.append(
                        (
                            topic,
                            payload,
                            qos,
                            retain,
                            expiry_seconds,
                            response_topic,
                            correlation_data,
                            tuple(user_properties),
                        )
                    )
            return None
        properties = None
        if self._mqtt5:
            properties = publish_properties(expiry_seconds, response_topic, correlation_data, user_properties)
        try:
            if not topic:
                # MQTT 5 lets paho send an empty topic (meant for topic aliases); brokers then drop us.
                raise ValueError("empty topic")
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            if qos and self._hooks_thread == threading.get_ident():
                self._connect_publishes += 1
        except (ValueError, UnicodeError) as error:
            # A topic built from an inbound name (a request id, a stream id) that MQTT cannot carry:
            # dropping this one publish must not fail the caller, who is serving other streams.
            log.warning("publish to %r refused by the MQTT client: %s", topic, error)
            return None
        self._written()
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
            return None
        self.stats.messages_out += 1
        return int(info.mid)

    def start(self) -> None:
        """Connect in the background; returns at once."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._wakeup = Wakeup()
        self._thread = threading.Thread(
            target=self._run, args=(self._wakeup,), name="mqtt-network", daemon=True
        )
        self._thread.start()

    def stop(self, final_messages: Iterable[tuple[str, bytes, bool]] = (), timeout: float = 5.0) -> None:
        """Publish ``final_messages`` (topic, payload, retain) at QoS 1, wait for them, disconnect.

        A clean DISCONNECT means the broker does not send the last will: the final messages
        must say ``offline`` themselves. Every socket is closed when this returns.
        """
        deadline = time.monotonic() + timeout
        if self.connected:
            infos = []
            for topic, payload, retain in final_messages:
                infos.append(self._client.publish(topic, payload, qos=1, retain=retain))
            self._written()
            for info in infos:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    info.wait_for_publish(timeout=remaining)
                except (RuntimeError, ValueError):
                    break
        # The network thread sends the DISCONNECT itself (paho closes the socket once it is
        # written) and ends; it gives up waiting for that at the deadline.
        self._close_by = max(deadline, time.monotonic() + 0.1)
        self._stop.set()
        if self._thread is not None:
            if self._wakeup is not None:
                self._wakeup.wake()
            self._thread.join(max(0.1, deadline - time.monotonic() + 1.0))
            self._thread = None
        sock = self._client.socket()
        if sock is not None:
            # The DISCONNECT could not be written in time (a broker that stopped reading): paho
            # would hold this socket until the client object is finalised.
            log.warning("MQTT: no clean disconnect from %s:%d in time", self.config.host, self.config.port)
            sock.close()
        if self._wakeup is not None:
            self._wakeup.close()
            self._wakeup = None
        self._connected.clear()
        self.stats.connected = False

    # --- network thread ------------------------------------------------------------------
    def _written(self) -> None:
        """After queueing a packet: paho writes it at once from the calling thread unless that is
        not possible (the network thread is inside a callback, or the socket is full); then the
        network thread must be woken to write it."""
        wakeup, thread = self._wakeup, self._thread
        if wakeup is None or thread is None or thread.ident == threading.get_ident():
            return  # not started, or the network thread itself, which looks before it waits
        if self._client.want_write():
            wakeup.wake()

    def _run(self, wakeup: Wakeup) -> None:
        session: _Session | None = None  # None: not connected, (re)connect first
        disconnecting = False
        while True:
            if self._stop.is_set():
                if session is None or self._client.socket() is None or time.monotonic() >= self._close_by:
                    return
                if not disconnecting:
                    disconnecting = True
                    with contextlib.suppress(OSError, ValueError):
                        self._client.disconnect()
                    continue
            elif session is None:
                session = self._connect()
                continue
            try:
                rc = self._serve(session, wakeup)
            except _Dropped as dropped:
                self._drop_reason = None
                _close_socket(self._client)
                session = None
                self._failed(str(dropped))
                continue
            except (OSError, ssl.SSLError) as error:  # paho turns most into a return code; not all
                if not self._stop.is_set():
                    session = None
                    self._failed(describe_failure(error))
                continue
            if rc != paho.MQTT_ERR_SUCCESS and not self._stop.is_set():
                session = None
                self._failed(f"connection lost ({paho.error_string(rc)})")

    def _connect(self) -> _Session | None:
        """One connection attempt (after the back-off if it fails): the new connection's state."""
        if self._fresh_client_needed:
            old = self._client
            with self._write_lock:
                self._client = self._new_client(self._next_window)
            _close_socket(old)
        self._fresh_client_needed = True
        try:
            self._client.reconnect()
        except (OSError, ssl.SSLError) as error:
            self._failed(describe_failure(error))
            return None
        sock = self._client.socket()
        _send_without_delay(sock)
        reader = None
        if self._read_buffer:
            reader = _install_read_buffer(self._client, self._on_plain_publish, self._mqtt5)
        return _Session(reader, _QuickAck(sock) if self._quick_ack else None)

    def _serve(self, session: _Session, wakeup: Wakeup) -> int:
        """Wait for the socket (or a wake-up), read, write and keep alive: one round."""
        sock = self._client.socket()
        if sock is None:
            return paho.MQTT_ERR_NO_CONN
        if self._drop_reason is not None:
            raise _Dropped(self._drop_reason)
        pending = session.pending(sock)
        writing = [sock] if self._client.want_write() else []
        try:
            readable, _, _ = select.select(
                [sock, wakeup], writing, [], 0.0 if pending else _IDLE_WAIT_SECONDS
            )
        except (OSError, ValueError):  # closed meanwhile by paho on a failed write elsewhere
            return paho.MQTT_ERR_CONN_LOST
        if wakeup in readable:
            wakeup.clear()
        rc = paho.MQTT_ERR_SUCCESS
        if pending or sock in readable:
            self.last_heard = time.monotonic()
            rc = self._client.loop_read()
            # Whole packets already in the buffer need no select().
            for _ in range(_READ_BATCH):
                if rc != paho.MQTT_ERR_SUCCESS or not session.buffered():
                    break
                rc = self._client.loop_read()
            session.read_done()
        if rc == paho.MQTT_ERR_SUCCESS and self._client.want_write():
            with self._write_lock:
                rc = self._client.loop_write()
        if rc == paho.MQTT_ERR_SUCCESS:
            rc = self._client.loop_misc()
        self._deliver_acknowledgements()
        if rc == paho.MQTT_ERR_SUCCESS and self.connected:
            self._after_reading()
        return rc

    def _deliver_acknowledgements(self) -> None:
        while self._acknowledged:
            mid = self._acknowledged.popleft()
            for listener in self._ack_listeners:
                try:
                    listener(mid)
                except Exception:
                    log.exception("publish acknowledgement listener failed")

    def _after_reading(self) -> None:
        for hook in self._reading_hooks:
            try:
                hook()
            except Exception:
                log.exception("after-reading hook failed")

    def _failed(self, reason: str) -> None:
        if self._refusal is not None:
            reason, self._refusal = self._refusal, None
        self._connected.clear()
        self._subscribed.clear()
        self.stats.connected = False
        if reason != self.stats.last_error:
            log.warning("MQTT %s:%d: %s", self.config.host, self.config.port, reason)
        self.stats.last_error = reason
        self._stop.wait(self._next_delay())

    def _next_delay(self) -> float:
        """Exponential back-off with equal jitter, so a fleet does not reconnect in lock-step."""
        base = min(self.config.reconnect_max_delay, self.config.reconnect_min_delay * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        delay = base / 2 + random.uniform(0, base / 2)
        if self._backoff_floor > 0:
            delay = max(delay, self._backoff_floor * random.uniform(1.0, 1.2))
        return delay

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            # The broker closes the socket next; keep this reason rather than "connection lost".
            self._refusal = f"broker refused the connection: {reason_code}"
            self.stats.last_error = self._refusal
            log.error(
                "MQTT %s:%d refused the connection: %s", self.config.host, self.config.port, reason_code
            )
            return
        self._attempt = 0
        self._apply_receive_maximum(properties)
        self._subscribed.clear()
        with self._connection_changed:
            self.stats.connects += 1
            self._connection_changed.notify_all()
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        self.stats.last_error = None
        log.info("MQTT connected to %s:%d as %s", self.config.host, self.config.port, self.client_id)
        with self._lock:
            subscriptions = [(f, options) for f, (options, _) in self._subscriptions.items()]
        if subscriptions:
            _, self._resubscribe_mid = client.subscribe(subscriptions)
        else:
            self._subscribed.set()
        self._connected.set()
        self.stats.connected = True
        self._hooks_thread, self._connect_publishes = threading.get_ident(), 0
        try:
            for hook in list(self._connected_hooks):
                try:
                    hook()
                except Exception:
                    log.exception("on-connect hook failed")
        finally:
            self._hooks_thread = None
            # Room for the largest burst seen (integrations may publish more after a change).
            self.connect_burst = max(self.connect_burst, self._connect_publishes)
        with self._lock:
            held, self._held = list(self._held), collections.deque(maxlen=_HELD_PUBLISHES)
        for topic, payload, qos, retain, expiry, response, correlation, user in held:
            self.publish(topic, payload, qos, retain, expiry, response, correlation, user)

    def _apply_receive_maximum(self, properties: Any) -> None:
        """Never more unacknowledged QoS 1/2 publishes than the broker's CONNACK allows: a
        client that exceeds its Receive Maximum is disconnected (MQTT 5, 3.3.4).

        paho keeps the window it connected with until it is disconnected: ``send_window`` tells
        the agent's own flow control (the outbox publisher) the smaller of the two, and the
        broker's value becomes paho's window from the next connection on.
        """
        allowed = getattr(properties, "ReceiveMaximum", None)  # absent: MQTT 3.1.1, or no limit
        broker_window = _PAHO_INFLIGHT_DEFAULT
        if isinstance(allowed, int) and allowed > 0:
            broker_window = min(broker_window, allowed)
        window = min(broker_window, self._client.max_inflight_messages or _PAHO_INFLIGHT_DEFAULT)
        if window != self.send_window:
            log.info("the broker accepts %d unacknowledged publishes at a time", window)
        self.send_window = window
        self._next_window = broker_window

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        if mid == self._resubscribe_mid:
            self._subscribed.set()

    def _write_requested(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """paho has packets to write: write them now on this thread, one writer at a time. On
        the network thread nothing: it writes right after what it is doing."""
        thread = self._thread
        if thread is not None and thread.ident == threading.get_ident():
            return
        with self._write_lock:
            client.loop_write()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self._subscribed.clear()
        self._connected.clear()
        self.stats.connected = False
        if not self._stop.is_set():
            log.warning("MQTT disconnected: %s", reason_code)
            code = getattr(reason_code, "value", reason_code if isinstance(reason_code, int) else None)
            for listener in list(self._disconnected_listeners):
                try:
                    listener(code, str(reason_code))
                except Exception:
                    log.exception("disconnect listener failed")

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        # paho holds its message lock here and has not yet freed the message's place in its
        # window: the listeners run after its call returns (_deliver_acknowledgements).
        self._acknowledged.append(mid)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._dispatch(inbound_message(message))

    def _on_plain_publish(self, topic: str, payload: bytes, retain: bool) -> None:
        """A QoS 0 PUBLISH without properties that the read buffer took apart itself
        (:class:`_ReadBuffer`): handled exactly as one that paho decoded."""
        self._dispatch(InboundMessage(topic, payload, 0, retain, {}, None, None, time.time()))

    def _dispatch(self, inbound: InboundMessage) -> None:
        topic = inbound.topic
        self.stats.messages_in += 1
        self.stats.bytes_in += len(inbound.payload)
        handlers = self._handler_cache.get(topic)
        if handlers is None:
            with self._lock:
                # Audio streams reuse a few topics thousands of times: match each topic once.
                levels = topic.split("/")
                handlers = [h for f, h in self._matchers if f.matches_levels(levels)]
                if len(self._handler_cache) > 10_000:
                    self._handler_cache.clear()
                self._handler_cache[topic] = handlers
        for handler in handlers:
            try:
                handler(inbound)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("handler for %s failed", topic)


class _Dropped(Exception):
    """The connection was given up on purpose (:meth:`MqttTransport.drop_connection`)."""


def _close_socket(client: paho.Client) -> None:
    """Close what a client given up on still holds (paho closes it only on its own reconnect)."""
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def _delivered_filter(topic_filter: str) -> str:
    """The filter messages arrive under: ``$share/{group}/a/b`` delivers topics matching ``a/b``."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class TopicFilter:
    """A subscription's filter, split once: matching a topic is a comparison of its levels.

    (paho's ``topic_matches_sub`` builds a trie on every call: too slow for a network thread
    that must keep up with a flood of messages on distinct topics.)
    """

    __slots__ = ("_system", "levels")

    def __init__(self, topic_filter: str) -> None:
        self.levels = _delivered_filter(topic_filter).split("/")
        # Wildcards at the first level do not match topics starting with "$" (MQTT 4.7.2).
        self._system = self.levels[0].startswith("$")

    def matches(self, topic: str) -> bool:
        return self.matches_levels(topic.split("/"))

    def matches_levels(self, parts: list[str]) -> bool:
        """Whether a topic given as its levels (``topic.split("/")``) matches."""
        if parts[0].startswith("$") and not self._system:
            return False
        levels = self.levels
        for index, level in enumerate(levels):
            if level == "#":
                return True
            if index >= len(parts):
                return False
            if level != "+" and level != parts[index]:
                return False
        if len(parts) == len(levels):
            return True
        # "a/#" also matches "a" itself.
        return len(parts) == len(levels) - 1 and levels[-1] == "#"


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` is delivered to a subscription to ``topic_filter`` (shared ones too)."""
    return TopicFilter(topic_filter).matches(topic)


def _is_tcp(sock: Any) -> bool:
    """A TCP socket (paho's transport="unix" connects through a Unix socket instead)."""
    return getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6)


def _send_without_delay(sock: Any) -> None:
    """Turn off Nagle's algorithm on the broker connection.

    With it, a small packet written while an earlier one is unacknowledged waits for that TCP
    ACK, which the peer may delay by up to 40 ms: a burst of detections and the PUBACKs for
    inbound QoS 1 messages would go out in such steps. paho does not set it. (Brokers do the same
    for what they send back: mosquitto's ``set_tcp_nodelay true``.) Unix sockets have no such
    option; nothing to do there.
    """
    if not _is_tcp(sock):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as error:
        log.debug("could not set TCP_NODELAY: %s", error)


class _QuickAck:
    """After every read, TCP_QUICKACK (Linux) asks the kernel to acknowledge what arrived
    without its usual delay.

    A broker with Nagle's algorithm on (mosquitto's default) holds each PUBACK until the previous
    one is acknowledged at the TCP level, and while a window of detections awaits its PUBACKs the
    agent has nothing to send that could carry that acknowledgement: a burst of detections would
    advance by one delayed ACK per round. The option does not stick (the kernel leaves quick-ack
    mode by itself), hence once per read.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.enabled = hasattr(socket, "TCP_QUICKACK") and _is_tcp(sock)

    def after_read(self) -> None:
        if not self.enabled:
            return
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError as error:
            self.enabled = False  # not on this socket, then: no system call per read for nothing
            log.debug("could not set TCP_QUICKACK: %s", error)


@dataclass
class _Session:
    """What the network thread keeps for one connection."""

    reader: _ReadBuffer | None
    quick_ack: _QuickAck | None

    def pending(self, sock: Any) -> int:
        """Bytes readable without waiting (in our buffer, or decrypted inside an SSL socket)."""
        if self.reader is not None:
            return self.reader.pending()
        return int(sock.pending()) if hasattr(sock, "pending") else 0

    def buffered(self) -> int:
        return self.reader.buffered() if self.reader is not None else 0

    def read_done(self) -> None:
        if self.quick_ack is not None:
            self.quick_ack.after_read()


# --- the one use of paho's internals -------------------------------------------------------------

# paho versions whose source was read for what _ReadBuffer relies on: Client keeps the socket
# returned by socket() in ``_sock`` from reconnect() until it closes it, reads it only through
# ``_sock.recv()`` (BlockingIOError and ssl.SSLWantReadError meaning "nothing yet"), asks
# ``_sock.pending()`` before waiting, and uses no other attribute that the proxy would lack.
_READ_BUFFER_VERIFIED = frozenset({"2.0.0", "2.1.0", "2.2.0"})


def _paho_version() -> str:
    return str(getattr(paho_package, "__version__", ""))


def _install_read_buffer(
    client: Any, on_plain_publish: PlainPublish | None = None, mqtt5: bool = True
) -> _ReadBuffer | None:
    """Put a :class:`_ReadBuffer` in front of the client's fresh socket; None (plain paho) on a
    paho version not in ``_READ_BUFFER_VERIFIED`` or a client without the expected attribute."""
    version = _paho_version()
    if version not in _READ_BUFFER_VERIFIED:
        log.debug("paho-mqtt %s: reading its socket the plain way", version or "(unknown version)")
        return None
    sock = getattr(client, "_sock", None)
    if sock is None or isinstance(sock, _ReadBuffer) or sock is not client.socket():
        return None
    reader = _ReadBuffer(sock, on_plain_publish, mqtt5)
    client._sock = reader
    return reader


# A QoS 0 PUBLISH taken apart by the read buffer: (topic, payload, retain).
PlainPublish = Callable[[str, bytes, bool], None]
# The first byte of a QoS 0 PUBLISH, without and with the retain flag (DUP is 0 at QoS 0).
_PUBLISH_QOS0 = (0x30, 0x31)


class _ReadBuffer:
    """The client's socket, read 64 KiB at a time.

    paho reads a packet with about five ``recv()`` calls (type, length bytes, body), each a
    system call that releases and retakes the GIL, and audio streams bring hundreds of packets a
    second. One large read per burst, with the whole packets in it parsed without another
    ``select()``, spares the network thread most of that work (benchmarks.mqtt_latency reports
    the agent's CPU). Everything else (select, send, TLS state) goes to the real socket.

    With ``on_plain_publish``, the bytes read are split into whole packets here, and a QoS 0
    PUBLISH without properties (what audio devices send, thousands a second) is handed to it
    directly: paho would build a message, a properties object and a callback chain for each.
    Every other packet (CONNACK, SUBACK, PUBACK, PINGRESP, PUBLISH at QoS 1 and 2 or with
    properties) goes to paho whole, and nothing after it is taken before paho has read it, so
    messages keep the order they arrived in. (paho's keepalive still sees the broker: its
    PINGREQ's answer is one of those packets.)
    """

    READ_SIZE = 65536

    def __init__(self, sock: Any, on_plain_publish: PlainPublish | None = None, mqtt5: bool = True) -> None:
        self._sock = sock
        self._data = b""  # what paho reads next
        self._offset = 0
        self._on_plain_publish = on_plain_publish
        self._mqtt5 = mqtt5
        self._raw = b""  # with on_plain_publish: read, not yet split into packets
        self._raw_offset = 0

    def recv(self, size: int) -> bytes:
        if self._offset >= len(self._data):
            if self._on_plain_publish is not None:
                if not self._split():
                    return b""  # the broker closed the connection
            else:
                # May raise BlockingIOError or ssl.SSLWantReadError, exactly as paho expects.
                self._data = self._sock.recv(self.READ_SIZE)
                self._offset = 0
                if not self._data:
                    return b""  # the broker closed the connection
        chunk = self._data[self._offset : self._offset + size]
        self._offset += len(chunk)
        return chunk

    def _split(self) -> bool:
        """Hand on the plain QoS 0 publishes read so far, up to the next packet for paho, which
        then waits in ``_data``; reads the socket once if nothing is left. False: closed. Raises
        BlockingIOError (or the TLS socket's want-read) when there is nothing for paho yet."""
        read = False
        while True:
            if self._take_packets():
                return True
            if read:
                raise BlockingIOError  # what arrived was all handed on: paho has nothing to read
            # May raise BlockingIOError or ssl.SSLWantReadError, exactly as paho expects.
            more = self._sock.recv(self.READ_SIZE)
            if not more:
                return False
            read = True
            self._raw = self._raw[self._raw_offset :] + more if self._raw_offset < len(self._raw) else more
            self._raw_offset = 0

    def _take_packets(self) -> bool:
        """Whole packets from the raw bytes, in order: plain QoS 0 publishes handed on, until one
        for paho, which is put in ``_data`` (True). False when only part of a packet is left."""
        raw, position, mqtt5 = self._raw, self._raw_offset, self._mqtt5
        on_publish = self._on_plain_publish
        assert on_publish is not None
        end_of_raw = len(raw)
        while position < end_of_raw:
            bounds = _packet_bounds(raw, position)
            if bounds is None:
                break  # the rest has not arrived yet
            body, end = bounds
            if body < 0:
                # A length no MQTT packet has: paho gets the rest as it is and fails it.
                self._on_plain_publish = None
                self._data, self._offset = raw[position:], 0
                self._raw, self._raw_offset = b"", 0
                return True
            first = raw[position]
            if first in _PUBLISH_QOS0 and end - body >= 2:
                topic_end = body + 2 + (raw[body] << 8 | raw[body + 1])
                # MQTT 5 puts the properties' length after the topic: 0, no properties.
                payload_start = topic_end + 1 if mqtt5 else topic_end
                if body + 2 < topic_end and payload_start <= end and (not mqtt5 or raw[topic_end] == 0):
                    try:
                        topic = raw[body + 2 : topic_end].decode("utf-8")
                    except UnicodeDecodeError:
                        topic = ""  # paho's to refuse
                    if topic:
                        self._raw_offset = end
                        on_publish(topic, raw[payload_start:end], first == 0x31)
                        position = end
                        continue
            self._data, self._offset = raw[position:end], 0
            self._raw_offset = end
            return True
        self._raw_offset = position
        return False

    def buffered(self) -> int:
        """Bytes paho can read now, or that hold a whole packet still to be taken apart."""
        waiting = len(self._data) - self._offset
        if self._on_plain_publish is not None and _packet_bounds(self._raw, self._raw_offset) is not None:
            waiting += len(self._raw) - self._raw_offset
        return waiting

    def pending(self) -> int:
        """Bytes readable without waiting: paho skips select()'s wait when this is not zero."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return self.buffered() + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _packet_bounds(data: bytes, position: int) -> tuple[int, int] | None:
    """Where the body of the packet starting at ``position`` begins and where the packet ends;
    None when it is not all there yet; (-1, -1) for a length no packet has (over 4 bytes)."""
    index = position + 1
    length = shift = 0
    while True:
        if index >= len(data):
            return None
        byte = data[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            return -1, -1
    end = index + length
    return (index, end) if end <= len(data) else None


def inbound_message(message: paho.MQTTMessage) -> InboundMessage:
    """paho's message as ours (the MQTT 5 properties the agent uses taken out)."""
    properties = getattr(message, "properties", None)
    user: dict[str, str] = {}
    response_topic = correlation = None
    if properties is not None:
        for key, value in getattr(properties, "UserProperty", []) or []:
            user[str(key)] = str(value)
        response_topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
    return InboundMessage(
        topic=message.topic,
        payload=bytes(message.payload),
        qos=message.qos,
        retain=bool(message.retain),
        user_properties=user,
        response_topic=response_topic,
        correlation_data=correlation,
        received_at=time.time(),
    )
