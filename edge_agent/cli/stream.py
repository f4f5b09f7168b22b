"""``edge-agent stream``: act as a thin device: send WAV files to an agent as an MQTT audio stream.

Publishes the audio in chunks to ``{prefix}/{device}/audio/{stream}`` (16 kHz mono s16le, real
time by default), ends the stream with a control message, and prints the agent's detections
for that stream as JSON lines. Used by the quickstart, and handy to test a deployed agent.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np

from edge_agent.audio.wav import WavError, read_wav, to_mono_16k
from edge_agent.cli.common import fail
from edge_agent.mqtt.messages import AudioControl, AudioTopic, Availability, DetectionEvent
from edge_agent.mqtt.transport import close_sockets


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "stream",
        help="send WAV files to an agent as an MQTT audio stream and print its detections",
        description="Act as a thin device: publish WAV files as raw 16 kHz mono PCM chunks to "
        "{prefix}/{device}/audio/{stream}, end the stream, and print the agent's detections.",
    )
    parser.add_argument("files", nargs="+", metavar="WAV")
    parser.add_argument("--broker", default="localhost:1883", metavar="HOST[:PORT]")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID", help="device id of the agent")
    target.add_argument("--pool", metavar="NAME", help="a pool of agents in server mode (docs/scale-out.md)")
    parser.add_argument("--stream", default="cli", metavar="ID", help="stream id (default: cli)")
    parser.add_argument("--prefix", default="edge_agent", help="topic prefix (default: edge_agent)")
    parser.add_argument("--chunk-ms", type=int, default=100, metavar="MS")
    parser.add_argument("--fast", action="store_true", help="send as fast as possible, not in real time")
    parser.add_argument(
        "--wait", type=float, default=5.0, metavar="S", help="seconds to wait for detections after the end"
    )
    parser.set_defaults(handler=run_stream)


def run_stream(args: argparse.Namespace) -> int:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, _, port_text = args.broker.partition(":")
    port = int(port_text) if port_text else 1883
    pcm = []
    for name in args.files:
        try:
            samples = to_mono_16k(read_wav(name))
        except WavError as error:
            fail(str(error))
        pcm.append(np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes())
    audio = b"".join(pcm)

    # With a pool, any of its agents may serve the stream: listen to every device's detections.
    topic_parts = {"prefix": args.prefix, "device": args.device or "+"}
    connected = threading.Event()
    seen: list[dict[str, Any]] = []
    availability: list[bytes] = []
    claim: list[dict[str, Any]] = []
    reply_topic = f"{args.prefix}/stream-cli/{uuid.uuid4().hex}/reply"

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(DetectionEvent.TOPIC.filter(**topic_parts), qos=1)
        if args.device:
            client.subscribe(Availability.TOPIC.format(**topic_parts), qos=1)
        else:
            client.subscribe(reply_topic, qos=1)
        connected.set()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic.endswith("/availability"):
            availability.append(bytes(message.payload))
            return
        if message.topic == reply_topic:
            claim.append(json.loads(message.payload))
            return
        event = json.loads(message.payload)
        if event.get("stream") == args.stream:
            seen.append(event)
            print(json.dumps(event, ensure_ascii=False), flush=True)

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(host, port, 30)
    except OSError as error:
        fail(f"cannot connect to the broker {host}:{port}: {error}")
    client.loop_start()
    try:
        if not connected.wait(10):
            fail(f"no CONNACK from {host}:{port}")
        time.sleep(0.3)  # retained availability arrives
        if availability and availability[-1] != Availability.ONLINE:
            print(f"warning: agent {args.device} says {availability[-1].decode()}", file=sys.stderr)
        if args.pool:
            audio_topic, control_topic = _claim_in_pool(client, args, reply_topic, claim)
        else:
            audio_topic = AudioTopic.TOPIC.format(stream=args.stream, **topic_parts)
            control_topic = AudioControl.TOPIC.format(stream=args.stream, **topic_parts)
            client.publish(control_topic, AudioControl(action="start").to_payload(), qos=1)
        chunk_bytes = 16000 * 2 * args.chunk_ms // 1000
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(audio), chunk_bytes)):
            if not args.fast:
                delay = started + index * args.chunk_ms / 1000 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            client.publish(audio_topic, audio[offset : offset + chunk_bytes], qos=0)
        client.publish(control_topic, AudioControl(action="end").to_payload(), qos=1).wait_for_publish(10)
        print(
            f"sent {len(audio) / 32000:.2f} s of audio to {audio_topic}; "
            f"waiting {args.wait:g} s for detections",
            file=sys.stderr,
        )
        time.sleep(args.wait)
    finally:
        client.disconnect()
        client.loop_stop()
        close_sockets(client)
    print(f"{len(seen)} detection(s) on stream {args.stream}", file=sys.stderr)
    return 0


def _claim_in_pool(
    client: Any, args: argparse.Namespace, reply_topic: str, claim: list[dict[str, Any]]
) -> tuple[str, str]:
    """Ask the pool for a worker; stream only once one has subscribed (it answers then)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_agent.fleet.pool import PoolTopics

    parts = {"prefix": args.prefix, "pool": args.pool, "stream": args.stream}
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = reply_topic
    properties.CorrelationData = args.stream.encode()
    start = AudioControl(action="start").to_payload()
    client.publish(PoolTopics.START.format(**parts), start, qos=1, properties=properties)
    deadline = time.monotonic() + 10
    while not claim and time.monotonic() < deadline:
        time.sleep(0.02)
    if not claim or not claim[-1].get("ok"):
        reason = claim[-1].get("error") if claim else "no worker of the pool answered within 10 s"
        fail(f"pool {args.pool}: {reason}")
    print(f"pool {args.pool}: stream {args.stream} served by {claim[-1]['worker']}", file=sys.stderr)
    return PoolTopics.AUDIO.format(**parts), PoolTopics.CONTROL.format(**parts)
