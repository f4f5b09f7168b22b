"""Home Assistant's own Wyoming code against a running ``edge-agent wyoming``.

Run by ``scripts/homeassistant-wyoming.sh`` with the Python of a virtual environment holding
Home Assistant 2024.3.3 (the newest release that installs on Python 3.11); it imports nothing
of edge_agent. It starts a bare Home Assistant core (no frontend, no default_config; its HTTP
server on 127.0.0.1) in a temporary configuration folder and then does what a user does:

1. adds the service: Settings -> Devices & services -> Wyoming Protocol, by host and port (the
   ``user`` step), or as discovered over mDNS (the ``zeroconf`` step, from what the agent
   announces; the query goes by unicast to 127.0.0.1:5353, so nothing leaves the machine);
2. looks at the wake-word entity and its wake words (``get_supported_wake_words``: a fresh
   ``describe`` with Home Assistant's 1 s timeout);
3. chooses it in the preferred Assist pipeline (wake word entity and id) and runs that
   pipeline from the wake-word stage on a recording streamed in real time in 10 ms chunks, as a
   satellite's audio arrives: once with 小云小云, once without.

It prints one JSON object (the entity, the wake words, each run's events, the delay from the
moment the audio of the keyword's end was handed to the pipeline to the pipeline's
``wake_word-end``) and exits 0 when the keyword woke the pipeline and the other recording did
not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

CHUNK_MS = 10
SAMPLE_RATE = 16000
CHUNK_BYTES = SAMPLE_RATE * 2 * CHUNK_MS // 1000
SERVICE_TYPE = "_wyoming._tcp.local."


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as wav:
        if (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) != (SAMPLE_RATE, 2, 1):
            raise SystemExit(f"{path}: expected 16 kHz 16-bit mono")
        return wav.readframes(wav.getnframes())


async def start_home_assistant(config_dir: str, http_port: int):  # type: ignore[no-untyped-def]
    """The core, its base integrations and the HTTP server on loopback: what the Wyoming
    integration and its dependencies (assist_pipeline, conversation, stt, tts, wake_word) need."""
    from homeassistant import bootstrap, config_entries, core, loader
    from homeassistant import config as conf_util
    from homeassistant.setup import async_setup_component

    hass = core.HomeAssistant(config_dir)
    hass.config.skip_pip = True
    loader.async_setup(hass)
    hass.config_entries = config_entries.ConfigEntries(hass, {})
    await bootstrap.async_load_base_functionality(hass)
    for domain in bootstrap.CORE_INTEGRATIONS:
        assert await async_setup_component(hass, domain, {}), domain
    await conf_util.async_process_ha_core_config(hass, {})
    http = {"http": {"server_host": "127.0.0.1", "server_port": http_port}}
    assert await async_setup_component(hass, "http", http)
    assert await async_setup_component(hass, "assist_pipeline", {})
    await hass.async_start()
    return hass


async def discovered(instance: str):  # type: ignore[no-untyped-def]
    """What Home Assistant's zeroconf integration would hand the Wyoming flow."""
    from homeassistant.components.zeroconf import ZeroconfServiceInfo
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    # From a port of its own (a "legacy unicast" query): the answer comes back by unicast, so
    # loopback needs no multicast (some VMs' has none).
    zeroconf = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only, unicast=True)
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}")
        if not await info.async_request(zeroconf.zeroconf, 10_000, addr="127.0.0.1", port=5353):
            raise SystemExit(f"{instance}.{SERVICE_TYPE} not found over mDNS")
    finally:
        await zeroconf.async_close()
    addresses = info.ip_addresses_by_version(IPVersion.V4Only)
    return ZeroconfServiceInfo(
        ip_address=addresses[0],
        ip_addresses=addresses,
        port=info.port,
        hostname=info.server or "",
        type=SERVICE_TYPE,
        name=info.name,
        properties={},
    )


async def add_service(hass, host: str, port: int, zeroconf_instance: str | None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    flows = hass.config_entries.flow
    if zeroconf_instance:
        info = await discovered(zeroconf_instance)
        result = await flows.async_init("wyoming", context={"source": "zeroconf"}, data=info)
        step = result.get("step_id")
        if result["type"] != "form":
            raise SystemExit(f"zeroconf discovery aborted: {result}")
        result = await flows.async_configure(result["flow_id"], {})  # the user confirms
        how = {"discovered": f"{info.name} at {info.host}:{info.port}", "confirm_step": step}
    else:
        result = await flows.async_init(
            "wyoming", context={"source": "user"}, data={"host": host, "port": port}
        )
        how = {"added": f"{host}:{port}"}
    if result["type"] != "create_entry":
        raise SystemExit(f"the Wyoming flow did not create an entry: {result}")
    await hass.async_block_till_done()
    return {**how, "title": result["title"]}


async def run_pipeline(hass, pcm: bytes, realtime: bool) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The preferred pipeline from its wake-word stage on ``pcm``, as a satellite streams it."""
    from homeassistant.components import stt
    from homeassistant.components.assist_pipeline import (
        PipelineStage,
        async_pipeline_from_audio_stream,
    )
    from homeassistant.core import Context

    events: list[dict[str, Any]] = []
    sent_at: list[float] = []  # monotonic time each 10 ms chunk was handed over
    woke = asyncio.Event()

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        events.append({"type": str(event.type), "data": event.data, "at": time.monotonic()})
        if str(event.type) in ("wake_word-end", "error", "run-end"):
            woke.set()

    async def audio():  # type: ignore[no-untyped-def]
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), CHUNK_BYTES)):
            if woke.is_set():
                return
            if realtime:
                delay = started + index * CHUNK_MS / 1000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent_at.append(time.monotonic())
            yield pcm[offset : offset + CHUNK_BYTES]

    metadata = stt.SpeechMetadata(
        language="zh",
        format=stt.AudioFormats.WAV,
        codec=stt.AudioCodecs.PCM,
        bit_rate=stt.AudioBitRates.BITRATE_16,
        sample_rate=stt.AudioSampleRates.SAMPLERATE_16000,
        channel=stt.AudioChannels.CHANNEL_MONO,
    )
    result: dict[str, Any] = {}
    try:
        await async_pipeline_from_audio_stream(
            hass,
            context=Context(),
            event_callback=on_event,
            stt_metadata=metadata,
            stt_stream=audio(),
            start_stage=PipelineStage.WAKE_WORD,
            end_stage=PipelineStage.WAKE_WORD,
        )
    except AttributeError as error:
        # Home Assistant 2024.3 goes on to speech-to-text after a wake-up whatever the end
        # stage, and this bare core has no speech-to-text engine: the wake-word stage is done.
        if not any(e["type"] == "wake_word-end" for e in events):
            raise
        result["after_wake_word"] = f"speech-to-text not set up ({error})"
    result.update(events=[e["type"] for e in events], audio_ms=len(sent_at) * CHUNK_MS)
    end = next((e for e in events if e["type"] == "wake_word-end"), None)
    error = next((e for e in events if e["type"] == "error"), None)
    if error is not None:
        result["error"] = error["data"]
    if end is not None:
        output = end["data"].get("wake_word_output") or {}
        if output:
            result["wake_word_output"] = output
        timestamp = output.get("timestamp")
        if timestamp is not None and sent_at:
            # The chunk holding the keyword's last sample, as the pipeline numbers its audio.
            index = min(len(sent_at) - 1, int(timestamp) // CHUNK_MS)
            result["delay_ms"] = round((end["at"] - sent_at[index]) * 1000, 1)
    return result


async def main(args: argparse.Namespace) -> int:
    from homeassistant.components import wake_word
    from homeassistant.components.assist_pipeline.pipeline import async_get_pipeline, async_update_pipeline

    config_dir = tempfile.mkdtemp(prefix="ha-wyoming-")
    hass = await start_home_assistant(config_dir, args.http_port)
    report: dict[str, Any] = {"home_assistant": __import__("homeassistant.const").const.__version__}
    report["wyoming_package"] = __import__("wyoming").__version__
    try:
        report["service"] = await add_service(hass, args.host, args.port, args.zeroconf_instance)
        (entity_id,) = hass.states.async_entity_ids("wake_word")
        entity = wake_word.async_get_wake_word_detection_entity(hass, entity_id)
        words = await entity.get_supported_wake_words()
        report["entity"] = {"entity_id": entity_id, "name": entity.name}
        report["wake_words"] = [{"id": w.id, "name": w.name, "phrase": w.phrase} for w in words]
        if args.keyword not in [w.id for w in words]:
            raise SystemExit(f"{args.keyword} is not among the wake words: {report['wake_words']}")
        pipeline = async_get_pipeline(hass)
        # A pipeline that starts at the wake word must name a speech-to-text engine; these runs
        # end with the wake word, so the one named never runs (none is installed here).
        await async_update_pipeline(
            hass,
            pipeline,
            wake_word_entity=entity_id,
            wake_word_id=args.keyword,
            stt_engine=pipeline.stt_engine or "stt.not_used",
            stt_language=pipeline.stt_language or "zh",
        )
        silence = bytes(SAMPLE_RATE * 2)
        report["positive"] = await run_pipeline(hass, read_pcm(args.positive) + silence, not args.fast)
        report["negative"] = await run_pipeline(hass, read_pcm(args.negative), not args.fast)
    finally:
        await hass.async_stop()
    woke = report["positive"].get("wake_word_output", {})
    report["ok"] = (
        woke.get("wake_word_id") == args.keyword
        and woke.get("wake_word_phrase") == args.keyword
        and "wake_word_output" not in report["negative"]
    )
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0 if report["ok"] else 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the agent's Wyoming port")
    parser.add_argument("--zeroconf-instance", help="add the service as discovered under this mDNS name")
    parser.add_argument("--keyword", default="小云小云")
    parser.add_argument("--positive", type=Path, required=True, help="16 kHz mono WAV with the keyword")
    parser.add_argument("--negative", type=Path, required=True, help="16 kHz mono WAV without it")
    parser.add_argument("--fast", action="store_true", help="stream faster than real time")
    parser.add_argument("--http-port", type=int, default=0, help="Home Assistant's HTTP port (default: free)")
    arguments = parser.parse_args()
    arguments.http_port = arguments.http_port or free_port()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(main(arguments)))
