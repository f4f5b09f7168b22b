"""Remote commands over MQTT: ``ping``, ``get_config``, ``set_config``, ``mute``, ``unmute``,
``reload_model``, ``restart``, for one device, a group, or the whole fleet.

Every command gets exactly one answer (:class:`CommandResult`): ``ok`` with a result, or
``ok: false`` with the reason. Unknown or disabled commands, bad JSON and invalid arguments are
answered with an error, never a crash. Retained commands are ignored (logged): a command must
not run again each time the device reconnects (Tasmota's "ghost switching").

The network thread only queues a command; one command thread runs them in order, since some
take a while (``reload_model`` reads 3 MB and rebuilds every stream's detector).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent import __version__
from edge_agent.agent.live_config import ConfigRejected
from edge_agent.agent.services import AgentControl, AgentServices, Integration
from edge_agent.config import (
    COMMAND_NAMES,
    AgentConfig,
    ConfigError,
    changed_keys,
    merge_update,
    save_remote_overrides,
    to_dict,
)
from edge_agent.engine.lexicon import LexiconError
from edge_agent.engine.model import ModelError
from edge_agent.mqtt.messages import CommandResult, CommandTopic, PayloadError, iso_utc, parse_json_object
from edge_agent.mqtt.transport import InboundMessage

log = logging.getLogger(__name__)


# Never changed by a remote command: the device would stop listening to the broker.
NEVER_REMOTE_KEYS = ("mqtt.enabled",)
# Changed remotely only where the device's own configuration says commands.allow_sensitive:
# credentials, certificate checks, what the device listens on, who it is on the broker, and which
# commands it accepts (a remote must not widen its own powers).
SENSITIVE_KEYS = (
    "mqtt.username",
    "mqtt.password",
    "mqtt.password_file",
    "mqtt.tls.insecure",
    "mqtt.tls.ca_file",
    "mqtt.tls.cert_file",
    "mqtt.tls.key_file",
    "mqtt.client_id",
    "mqtt.protocol",
    "mqtt.topic_prefix",
    "http.host",
    "commands.",
    "device.id",
)
# Tried before they are kept: the device must come back online with them.
CONNECTION_KEYS = ("mqtt.host", "mqtt.port", "mqtt.tls.", "mqtt.username", "mqtt.password", "mqtt.keepalive")


class CommandError(Exception):
    """A command that cannot be carried out; the message is the answer's ``error``."""


@dataclass(frozen=True)
class _Command:
    name: str
    arguments: dict[str, Any]
    request_id: str | None
    response_topic: str | None
    correlation: bytes | None
    received: float


class CommandProcessor(Integration):
    """Subscribes to the command topics and answers every command; changes the agent only
    through ``control``."""

    def __init__(self, control: AgentControl) -> None:
        self._control = control
        self._after_answer: Callable[[], None] | None = None
        self._queue: queue.Queue[_Command | None] = queue.Queue(maxsize=256)
        self._thread: threading.Thread | None = None
        self.executed = 0
        self._handlers: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]] = {
            "ping": self._ping,
            "get_config": self._get_config,
            "set_config": self._set_config,
            "mute": self._mute,
            "unmute": self._unmute,
            "reload_model": self._reload_model,
            "restart": self._restart,
        }
        assert set(self._handlers) == set(COMMAND_NAMES)

    # --- wiring ----------------------------------------------------------------------------
    def attach(self, services: AgentServices) -> None:
        super().attach(services)
        prefix, device = services.prefix, services.device_id
        filters = [
            CommandTopic.DEVICE.filter(prefix=prefix, device=device),
            CommandTopic.ALL.filter(prefix=prefix),
        ]
        filters += [
            CommandTopic.GROUP.filter(prefix=prefix, group=group) for group in services.config.device.groups
        ]
        for topic_filter in filters:
            # Retain-as-published: a retained command is recognisable even when it arrives live.
            services.subscribe(topic_filter, self._on_message, qos=1, retain_as_published=True)
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread.join(2.0)
            self._thread = None

    # --- network thread: parse and queue ---------------------------------------------------------
    def _on_message(self, message: InboundMessage) -> None:
        name = None
        for template in (CommandTopic.DEVICE, CommandTopic.ALL, CommandTopic.GROUP):
            parts = template.match(message.topic, self.services.prefix)
            if parts is not None:
                name = parts["command"]
                break
        if name is None:
            return
        if message.retain:
            log.warning(
                "ignored a retained command on %s: clear it with an empty retained message", message.topic
            )
            return
        if message.response_topic:
            refusal = self.services.response_topic_refusal(message.response_topic)
            if refusal is not None:
                self.services.report_error("bad_request", f"{refusal}: command refused", topic=message.topic)
                return
        try:
            arguments = (
                parse_json_object(message.payload, f"command {name}") if message.payload.strip() else {}
            )
        except PayloadError as error:
            self._answer(
                _Command(name, {}, None, message.response_topic, message.correlation_data, 0.0),
                None,
                str(error),
            )
            return
        request_id = arguments.pop("id", None)
        command = _Command(
            name,
            arguments,
            None if request_id is None else str(request_id),
            message.response_topic,
            message.correlation_data,
            message.received_at,
        )
        try:
            self._queue.put_nowait(command)
        except queue.Full:
            self._answer(command, None, "too many commands waiting; try again")

    # --- command thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            command = self._queue.get()
            if command is None:
                return
            try:
                result, restart_required = self._execute(command)
            except CommandError as error:
                self._answer(command, None, str(error))
            except Exception as error:
                log.exception("command %s failed", command.name)
                self._answer(command, None, f"internal error: {type(error).__name__}: {error}")
            else:
                self._answer(command, result, None, restart_required)
            after, self._after_answer = self._after_answer, None
            if after is not None:
                after()

    def _execute(self, command: _Command) -> tuple[dict[str, Any], list[str]]:
        config = self.services.config.commands
        if command.name not in self._handlers:
            raise CommandError(f"unknown command {command.name!r}; commands are {', '.join(COMMAND_NAMES)}")
        if not config.enabled or command.name not in config.allowed:
            raise CommandError(f"command {command.name!r} is disabled on this device (commands.allowed)")
        log.info("command %s %s", command.name, command.arguments or "")
        self.executed += 1
        return self._handlers[command.name](command.arguments)

    def _answer(
        self,
        command: _Command,
        result: dict[str, Any] | None,
        error: str | None,
        restart_required: list[str] | None = None,
    ) -> None:
        services = self.services
        answer = CommandResult(
            device=services.device_id,
            command=command.name,
            ok=error is None,
            id=command.request_id,
            result=result,
            error=error,
            restart_required=restart_required or [],
        )
        if error is not None:
            log.warning("command %s refused: %s", command.name, error)
        topic = command.response_topic or services.topic(CommandResult.TOPIC)
        services.publish(topic, answer.to_payload(), qos=1, correlation_data=command.correlation)

    # --- the commands ----------------------------------------------------------------------------
    def _ping(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        services = self.services
        return {
            "pong": True,
            "version": __version__,
            "boot_id": services.boot_id,
            "uptime_s": round(services.uptime_seconds, 1),
            "time": iso_utc(time.time()),
        }, []

    def _get_config(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return {"config": to_dict(self.services.config), "muted": self.services.muted}, []

    def _set_config(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Checked before anything changes or is kept: the keys a remote may change, the
        schema, then what the change needs on this device (the model loads, paths can be
        written, the keywords are in the lexicon). Connection settings are tried first: kept
        only if the device is back online with them in time, else put back. Only what was
        applied is persisted, so no remote change can leave a device that does not start."""
        if not arguments:
            raise CommandError('set_config needs the keys to change, e.g. {"keywords": ["小云小云"]}')
        current = self.services.config
        try:
            new = merge_update(current, arguments)
        except ConfigError as error:
            raise CommandError(f"invalid configuration: {error}") from None
        changed = changed_keys(to_dict(current, include_secrets=True), to_dict(new, include_secrets=True))
        self._check_remote_keys(changed, current)
        connection = [key for key in changed if key.startswith(CONNECTION_KEYS)]
        try:
            self._control.preflight(new)
            if connection and not self._control.try_connection(new.mqtt, current.commands.connection_trial):
                raise CommandError(
                    f"not applied: the device did not get back online with the new {', '.join(connection)} "
                    f"within {current.commands.connection_trial:g} s; the previous settings are back"
                )
            restart_required = self._control.apply_config(new)
        except ConfigRejected as error:
            raise CommandError(f"not applied: {error}") from None
        except (LexiconError, ValueError, ImportError) as error:
            raise CommandError(f"invalid keywords: {error}") from None
        persisted = self._persist(arguments)
        return {
            "applied": True,
            "persisted": persisted,
            "keywords": [k.text for k in new.keywords],
        }, [key for key in restart_required if key not in connection]

    @staticmethod
    def _check_remote_keys(changed: list[str], current: AgentConfig) -> None:
        refused = [key for key in changed if key.startswith(NEVER_REMOTE_KEYS)]
        if refused:
            raise CommandError(
                f"{', '.join(refused)} cannot be changed remotely: the device would be left unreachable "
                "(change it in the device's own configuration file)"
            )
        sensitive = [key for key in changed if key.startswith(SENSITIVE_KEYS)]
        if sensitive and not current.commands.allow_sensitive:
            raise CommandError(
                f"{', '.join(sensitive)} cannot be changed remotely on this device "
                "(credentials, certificate checks, listening addresses and the command settings; "
                "the device's own configuration can allow it: commands.allow_sensitive)"
            )

    def _set_muted(self, muted: bool) -> tuple[dict[str, Any], list[str]]:
        try:
            self._control.apply_config(merge_update(self.services.config, {"engine": {"muted": muted}}))
        except ConfigRejected as error:
            raise CommandError(f"not applied: {error}") from None
        persisted = self._persist({"engine": {"muted": muted}})
        return {"muted": muted, "persisted": persisted}, []

    def _mute(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        muted = arguments.get("muted", True)  # {"muted": false} also unmutes (Home Assistant's switch)
        if not isinstance(muted, bool):
            raise CommandError(f"muted must be true or false, got {muted!r}")
        return self._set_muted(muted)

    def _unmute(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        return self._set_muted(False)

    def _reload_model(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        try:
            model = self._control.reload_model()
        except (ModelError, LexiconError, ValueError, ImportError, OSError, ConfigRejected) as error:
            raise CommandError(f"model not reloaded, the old one keeps running: {error}") from None
        return {"directory": str(model.directory), "backend": model.backend}, []

    def _restart(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        # Answer first, then stop: the answer is queued before the agent says offline.
        self._after_answer = self._control.request_restart
        return {"restarting": True}, []

    def _persist(self, update: dict[str, Any]) -> bool:
        """Keep a change across restarts, beside the config file, when there is one to write."""
        path = self._control.config_path
        if path is None:
            return False
        try:
            save_remote_overrides(path, update)
        except OSError as error:
            log.warning("change not persisted (%s): it lasts until the next restart", error)
            return False
        return True
