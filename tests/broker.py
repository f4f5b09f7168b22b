"""A real mosquitto for tests: started on a free loopback port, stopped and restarted at will."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """mosquitto on 127.0.0.1:port with a config the test may extend (TLS, ACLs...)."""

    def __init__(
        self, workdir: Path, extra_config: str = "", port: int | None = None, persistence: bool = False
    ) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(self.binary):
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_config = extra_config
        self.persistence = persistence
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"mosquitto-{self.port}.log"

    def start(self) -> Broker:
        config = self.workdir / f"mosquitto-{self.port}.conf"
        listener = (
            self.extra_config
            if "listener" in self.extra_config
            else (f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{self.extra_config}")
        )
        if self.persistence:
            # Sessions, subscriptions and queued messages survive a restart, as on a real broker.
            storage = f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 1\n"
        else:
            storage = "persistence false\n"
        # Started as root, mosquitto drops to the "mosquitto" user, which cannot write its
        # database in the test's folder; as any other user this line is ignored.
        user = "user root\n" if os.geteuid() == 0 else ""
        config.write_text(f"{user}{storage}{listener}\n", encoding="utf-8")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [self.binary, "-c", str(config), "-v"], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any = None
    at: float = field(default_factory=time.time)

    def json(self) -> Any:
        return json.loads(self.payload)


class Client:
    """A paho test client that records everything it receives.

    Independent of edge_agent's own MQTT code. Its thread drives paho through the calls for an
    application's own event loop, with a wake-up socket pair that close() closes: the pair
    paho's loop_start() makes is closed only when the client object is finalised, which in a
    reference cycle may come after the sockets' own finaliser (a ResourceWarning). paho leaves
    every write to that thread (on_socket_register_write), as it does under loop_start().
    """

    def __init__(
        self,
        port: int,
        protocol: int = paho.MQTTv5,
        client_id: str = "",
        clean: bool = True,
        session_expiry: int = 0,
        **tls: Any,
    ) -> None:
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        if protocol != paho.MQTTv5:
            kwargs["clean_session"] = clean
        self.client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        self.protocol = protocol
        self.clean = clean
        self.session_expiry = session_expiry
        self.port = port
        self.messages: list[Received] = []
        self._lock = threading.Condition()
        self._connected = threading.Event()
        self._subacks: dict[int, list[Any]] = {}
        self.client.on_message = self._on_message
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_socket_register_write = lambda *a: self._wake()
        self._waking, self._woken = socket.socketpair()
        self._waking.setblocking(False)
        self._woken.setblocking(False)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        if tls:
            self.client.tls_set(**tls)

    def connect(self) -> Client:
        if self.protocol == paho.MQTTv5:
            properties = None
            if self.session_expiry:
                # A persistent session: the broker queues QoS 1 messages while we are away.
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self.session_expiry
            self.client.connect("127.0.0.1", self.port, 30, clean_start=self.clean, properties=properties)
        else:
            self.client.connect("127.0.0.1", self.port, 30)
        self._thread = threading.Thread(target=self._loop, name="test-mqtt-client", daemon=True)
        self._thread.start()
        assert self._connected.wait(10), "test client could not connect"
        return self

    def close(self) -> None:
        """Disconnect cleanly (the DISCONNECT written, paho closes its socket) and close ours."""
        if self._thread is not None:
            self._closing.set()
            self._wake()
            self._thread.join(10)
            self._thread = None
        sock = self.client.socket()
        if sock is not None:  # the DISCONNECT could not be written (the broker is gone)
            sock.close()
        self._waking.close()
        self._woken.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already pending, or closed
            self._waking.send(b"\0")

    def _loop(self) -> None:
        delay, disconnecting, deadline = 0.2, False, 0.0
        while True:
            sock = self.client.socket()
            if self._closing.is_set():
                if sock is None:
                    return
                if not disconnecting:
                    disconnecting, deadline = True, time.monotonic() + 5
                    self.client.disconnect()
                elif time.monotonic() > deadline:
                    return
            elif sock is None:  # the connection was lost: reconnect, as loop_start() would
                if self._closing.wait(delay):
                    continue
                delay = min(delay * 2, 1.0)
                with contextlib.suppress(OSError):
                    self.client.reconnect()
                continue
            pending = sock.pending() if hasattr(sock, "pending") else 0
            writing = [sock] if self.client.want_write() else []
            readable, _, _ = select.select([sock, self._woken], writing, [], 0 if pending else 0.2)
            if self._woken in readable:
                with contextlib.suppress(BlockingIOError):
                    self._woken.recv(4096)
            if pending or sock in readable:
                self.client.loop_read()
            if self.client.want_write():
                self.client.loop_write()
            self.client.loop_misc()
            if self._connected.is_set():
                delay = 0.2

    def subscribe(self, topic: str, qos: int = 1) -> Client:
        """Subscribe and wait for the broker's SUBACK (retained messages follow it)."""
        result, mid = self.client.subscribe(topic, qos)
        assert result == paho.MQTT_ERR_SUCCESS and mid is not None
        with self._lock:
            assert self._lock.wait_for(lambda: mid in self._subacks, 10), f"no SUBACK for {topic}"
            codes = self._subacks.pop(mid)
        assert not any(code.is_failure for code in codes), f"subscription to {topic} refused: {codes}"
        return self

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False, **props: Any
    ) -> None:
        properties = None
        if props:
            properties = Properties(PacketTypes.PUBLISH)
            for key, value in props.items():
                setattr(properties, key, value)
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos:
            info.wait_for_publish(10)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, properties: Any) -> None:
        with self._lock:
            self._subacks[mid] = list(codes)
            self._lock.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Received(
                    message.topic,
                    bytes(message.payload),
                    bool(message.retain),
                    getattr(message, "properties", None),
                )
            )
            self._lock.notify_all()

    def on(self, topic_filter: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if paho.topic_matches_sub(topic_filter, m.topic)]

    def wait_for(
        self, topic_filter: str, predicate: Callable[[list[Received]], bool] = bool, timeout: float = 15.0
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [m for m in self.messages if paho.topic_matches_sub(topic_filter, m.topic)]
                if predicate(found):
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in found]
                    raise AssertionError(f"timed out waiting on {topic_filter}; got {seen}")
                self._lock.wait(remaining)
