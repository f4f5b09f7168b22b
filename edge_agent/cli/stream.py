"""``edge-agent stream``: act as a thin device: send WAV files to an agent as an MQTT audio stream.

Publishes the audio in chunks to ``{prefix}/{device}/audio/{stream}`` (16 kHz mono s16le, real
time by default), ends the stream with a control message, and prints the agent's detections
for that stream as JSON lines. Used by the quickstart, and handy to test a deployed agent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.audio.wav import WavError, read_wav, to_mono_16k
from edge_agent.cli.common import fail
from edge_agent.mqtt.messages import AudioControl, AudioTopic, Availability, DetectionEvent

if TYPE_CHECKING:
    from edge_agent.mqtt.client import MqttClient

# How long a retained availability may take to follow the SUBACK (it is absent if the agent
# never connected).
_RETAINED_WAIT_SECONDS = 0.3


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
    # Imported here: the other commands should not pay for paho.
    from edge_agent.mqtt.client import MqttClient, MqttClientError

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
    seen: list[dict[str, Any]] = []
    client = MqttClient(host, port)
    try:
        client.connect(timeout=10)
        client.subscribe(DetectionEvent.TOPIC.filter(**topic_parts))
        if args.device:
            availability_topic = Availability.TOPIC.format(**topic_parts)
            client.subscribe(availability_topic)
            status = client.receive(_RETAINED_WAIT_SECONDS, topic_filter=availability_topic)
            if status is not None and status.payload != Availability.ONLINE:
                print(f"warning: agent {args.device} says {status.payload.decode()}", file=sys.stderr)
        if args.pool:
            audio_topic, control_topic = _claim_in_pool(client, args)
        else:
            audio_topic = AudioTopic.TOPIC.format(stream=args.stream, **topic_parts)
            control_topic = AudioControl.TOPIC.format(stream=args.stream, **topic_parts)
            client.publish(control_topic, AudioControl(action="start").to_payload(), qos=1)
        chunk_bytes = 16000 * 2 * args.chunk_ms // 1000
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(audio), chunk_bytes)):
            if not args.fast:  # in real time: detections are printed while waiting for the next chunk
                _print_detections(client, args.stream, seen, until=started + index * args.chunk_ms / 1000)
            client.publish(audio_topic, audio[offset : offset + chunk_bytes], qos=0)
        client.publish(control_topic, AudioControl(action="end").to_payload(), qos=1)
        print(
            f"sent {len(audio) / 32000:.2f} s of audio to {audio_topic}; "
            f"waiting {args.wait:g} s for detections",
            file=sys.stderr,
        )
        _print_detections(client, args.stream, seen, until=time.monotonic() + args.wait)
    except MqttClientError as error:
        fail(str(error))
    finally:
        client.close()
    print(f"{len(seen)} detection(s) on stream {args.stream}", file=sys.stderr)
    return 0


def _print_detections(client: MqttClient, stream: str, seen: list[dict[str, Any]], until: float) -> None:
    """Print the detections on ``stream`` that arrive until ``until`` (time.monotonic())."""
    for message in client.messages(max(0.0, until - time.monotonic())):
        if message.topic.endswith("/availability"):
            continue
        event = json.loads(message.payload)
        if event.get("stream") == stream:
            seen.append(event)
            print(json.dumps(event, ensure_ascii=False), flush=True)


def _claim_in_pool(client: MqttClient, args: argparse.Namespace) -> tuple[str, str]:
    """Ask the pool for a worker; stream only once one has subscribed (it answers then)."""
    from edge_agent.fleet.pool import PoolTopics
    from edge_agent.mqtt.client import MqttClientError

    parts = {"prefix": args.prefix, "pool": args.pool, "stream": args.stream}
    reply_topic = f"{args.prefix}/stream-cli/{uuid.uuid4().hex}/reply"
    start = AudioControl(action="start").to_payload()
    try:
        reply = client.request(PoolTopics.START.format(**parts), start, reply_topic, timeout=10)
    except MqttClientError as error:
        fail(f"pool {args.pool}: no worker of the pool answered ({error})")
    claim = json.loads(reply.payload)
    if not claim.get("ok"):
        fail(f"pool {args.pool}: {claim.get('error')}")
    print(f"pool {args.pool}: stream {args.stream} served by {claim['worker']}", file=sys.stderr)
    return PoolTopics.AUDIO.format(**parts), PoolTopics.CONTROL.format(**parts)
