"""Rhasspy's Hermes wake-word messages: one typed class per message, owning its topic.

Hermes is Rhasspy's protocol, not ours: payloads use its camelCase keys and carry no ``schema``
field, inbound messages tolerate keys they do not know (newer Rhasspy versions add some), and
everything is published at QoS 0, not retained, as rhasspy-hermes' ``HermesClient`` does.
Field names and defaults follow ``rhasspyhermes/wake.py`` and ``audioserver.py``.

================================================  ====  ============================================
topic                                             dir   payload
================================================  ====  ============================================
``hermes/audioServer/{siteId}/audioFrame``        in    a complete small WAV file (header + PCM)
``hermes/hotword/toggleOff``                      in    :class:`HotwordToggleOff` ``{siteId, reason}``
``hermes/hotword/toggleOn``                       in    :class:`HotwordToggleOn` ``{siteId, reason}``
``rhasspy/hotword/getHotwords``                   in    :class:`GetHotwords` ``{siteId, id}``
``hermes/hotword/{wakewordId}/detected``          out   :class:`HotwordDetected`
``hermes/error/hotword``                          out   :class:`HotwordError`
``rhasspy/hotword/hotwords``                      out   :class:`Hotwords`
================================================  ====  ============================================

Watch a bridge at work::

    mosquitto_sub -v -t 'hermes/hotword/#' -t 'hermes/error/hotword' -t 'rhasspy/hotword/#'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from edge_agent.mqtt.messages import PayloadError, Topic, parse_json_object

DEFAULT_SITE_ID = "default"
T = TypeVar("T", bound="HermesMessage")


def camel_case(name: str) -> str:
    """``site_id`` -> ``siteId`` (rhasspy-hermes serialises with dataclasses_json LetterCase.CAMEL)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _check_type(cls_name: str, key: str, value: Any, types: tuple[type, ...], optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) and bool not in types:
        raise PayloadError(f"{cls_name}: {key} must be {_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise PayloadError(f"{cls_name}: {key} must be {_names(types)}, got {value!r}")


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


@dataclass(frozen=True)
class HermesMessage:
    """Base of Hermes JSON messages: camelCase on the wire, snake_case in Python."""

    TOPIC: ClassVar[Topic]
    # field name -> (accepted types, None allowed): checked on the way in.
    _TYPES: ClassVar[dict[str, tuple[tuple[type, ...], bool]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {camel_case(f.name): _plain(getattr(self, f.name)) for f in fields(self)}

    def to_payload(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Known camelCase keys are read and type-checked; unknown keys are ignored (Rhasspy
        versions differ), missing ones take Rhasspy's defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = camel_case(f.name)
            if key not in data:
                continue
            value = data[key]
            expected = cls._TYPES.get(f.name)
            if expected is not None:
                _check_type(cls.__name__, key, value, *expected)
            values[f.name] = value
        try:
            return cls(**values)
        except TypeError as error:
            raise PayloadError(f"{cls.__name__}: {error}") from None

    @classmethod
    def from_payload(cls: type[T], payload: bytes) -> T:
        return cls.from_dict(parse_json_object(payload, cls.__name__))


def _plain(value: Any) -> Any:
    if isinstance(value, HermesMessage):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --- audio in --------------------------------------------------------------------------------


class AudioFrame:
    """``hermes/audioServer/{siteId}/audioFrame``: binary, QoS 0; every payload is a whole WAV file.

    Rhasspy's microphone services read 2,048 bytes of PCM (1,024 frames at 16 kHz, 16-bit,
    mono: 64 ms) and wrap each chunk with Python's ``wave`` module, so a frame is 2,092 bytes.

    ``mosquitto_sub -t 'hermes/audioServer/+/audioFrame' -C 1 > frame.wav``
    """

    TOPIC = Topic("hermes/audioServer/{site_id}/audioFrame")


# --- toggles ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HotwordToggle(HermesMessage):
    """``reason``: ``""`` (unknown: a toggleOn with it clears every reason), ``dialogueSession``,
    ``playAudio``, ``ttsSay``; other strings are accepted as opaque reasons."""

    _TYPES: ClassVar[dict[str, tuple[tuple[type, ...], bool]]] = {
        "site_id": ((str,), False),
        "reason": ((str,), False),
    }

    site_id: str = DEFAULT_SITE_ID
    reason: str = ""


@dataclass(frozen=True)
class HotwordToggleOff(_HotwordToggle):
    """``hermes/hotword/toggleOff`` ``{"siteId": "kitchen", "reason": "dialogueSession"}``: stop
    listening on that site until every disable reason is withdrawn.

    ``mosquitto_pub -t hermes/hotword/toggleOff -m '{"siteId": "kitchen", "reason": "ttsSay"}'``
    """

    TOPIC: ClassVar[Topic] = Topic("hermes/hotword/toggleOff")


@dataclass(frozen=True)
class HotwordToggleOn(_HotwordToggle):
    """``hermes/hotword/toggleOn`` ``{"siteId": "kitchen", "reason": "dialogueSession"}``:
    withdraw one disable reason (``""`` withdraws all)."""

    TOPIC: ClassVar[Topic] = Topic("hermes/hotword/toggleOn")


# --- detections and errors -------------------------------------------------------------------


@dataclass(frozen=True)
class HotwordDetected(HermesMessage):
    """``hermes/hotword/{wakewordId}/detected``: a wake word on a site; QoS 0, not retained.

    ======================  ======================================================================
    ``modelId``             the keyword (``小云小云``)
    ``modelVersion``        ``""``
    ``modelType``           ``personal`` (as every Rhasspy wake service sends)
    ``currentSensitivity``  the keyword's detection threshold
    ``siteId``              the site whose audio held the keyword
    ``sessionId``           ``null`` (Rhasspy-only: a requested session id)
    ``sendAudioCaptured``   ``null`` (Rhasspy-only)
    ``lang``                ``null`` (Rhasspy-only)
    ``levelDbfs``           ours, extra: RMS level of the keyword's audio, dBFS (``null``: unknown)
    ``snrDb``               ours, extra: that level over the site's recent background, dB
    ======================  ======================================================================

    Hermes clients ignore keys they do not know (rhasspy-hermes reads known keys only), so the
    two extra fields let a dialogue manager pick the closest of several satellites.

    ``mosquitto_sub -v -t 'hermes/hotword/+/detected'``
    """

    TOPIC: ClassVar[Topic] = Topic("hermes/hotword/{wakeword_id}/detected")
    _TYPES: ClassVar[dict[str, tuple[tuple[type, ...], bool]]] = {
        "model_id": ((str,), False),
        "model_version": ((str,), False),
        "model_type": ((str,), False),
        "current_sensitivity": ((int, float), False),
        "site_id": ((str,), False),
        "session_id": ((str,), True),
        "send_audio_captured": ((bool,), True),
        "lang": ((str,), True),
        "level_dbfs": ((int, float), True),
        "snr_db": ((int, float), True),
    }

    model_id: str
    model_version: str = ""
    model_type: str = "personal"
    current_sensitivity: float = 1.0
    site_id: str = DEFAULT_SITE_ID
    session_id: str | None = None
    send_audio_captured: bool | None = None
    lang: str | None = None
    level_dbfs: float | None = None
    snr_db: float | None = None

    # Our extra keys, left out when unknown: the payload is then exactly what Rhasspy sends.
    _EXTRA: ClassVar[frozenset[str]] = frozenset({"levelDbfs", "snrDb"})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None or k not in self._EXTRA}


@dataclass(frozen=True)
class HotwordError(HermesMessage):
    """``hermes/error/hotword``: a frame or request the wake service could not handle.

    ``{"error": "...: not a WAV file", "siteId": "kitchen",
    "context": "hermes/audioServer/kitchen/audioFrame", "sessionId": null}``
    """

    TOPIC: ClassVar[Topic] = Topic("hermes/error/hotword")
    _TYPES: ClassVar[dict[str, tuple[tuple[type, ...], bool]]] = {
        "error": ((str,), False),
        "site_id": ((str,), False),
        "context": ((str,), True),
        "session_id": ((str,), True),
    }

    error: str
    site_id: str = DEFAULT_SITE_ID
    context: str | None = None
    session_id: str | None = None


# --- listing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GetHotwords(HermesMessage):
    """``rhasspy/hotword/getHotwords`` ``{"siteId": "kitchen", "id": "abc"}``: which wake words?"""

    TOPIC: ClassVar[Topic] = Topic("rhasspy/hotword/getHotwords")
    _TYPES: ClassVar[dict[str, tuple[tuple[type, ...], bool]]] = {
        "site_id": ((str,), False),
        "id": ((str,), True),
    }

    site_id: str = DEFAULT_SITE_ID
    id: str | None = None


@dataclass(frozen=True)
class Hotword(HermesMessage):
    """One entry of :class:`Hotwords`."""

    model_id: str
    model_words: str
    model_version: str = ""
    model_type: str = "personal"


@dataclass(frozen=True)
class Hotwords(HermesMessage):
    """``rhasspy/hotword/hotwords``: the answer to :class:`GetHotwords` (``id`` and ``siteId`` echoed).

    ``{"models": [{"modelId": "小云小云", "modelWords": "小云小云", "modelVersion": "",
    "modelType": "personal"}], "siteId": "kitchen", "id": "abc"}``
    """

    TOPIC: ClassVar[Topic] = Topic("rhasspy/hotword/hotwords")

    models: list[Hotword] = field(default_factory=list)
    site_id: str = DEFAULT_SITE_ID
    id: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hotwords:
        models = data.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise PayloadError("Hotwords: models must be a list of objects")
        return cls(
            models=[Hotword.from_dict(m) for m in models],
            site_id=str(data.get("siteId", DEFAULT_SITE_ID)),
            id=data.get("id"),
        )


_SITE_ID = re.compile(r"[^/#+]+")


def valid_site_id(site_id: str) -> bool:
    """A site id that can be one topic level (Rhasspy puts it in audioFrame topics)."""
    return bool(_SITE_ID.fullmatch(site_id))
