"""``edge-agent devices``: the audio input devices PortAudio sees, for ``audio.sources[].device``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence

from edge_agent.audio.microphone import InputDevice, MicrophoneError, list_input_devices
from edge_agent.cli.common import fail

NO_DEVICES = "no input devices"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "devices",
        help="list audio input devices",
        description="List the audio input devices PortAudio sees. A microphone source's `device` "
        "is one of the indexes or a part of a name shown here; `*` marks the system default.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    parser.add_argument(
        "--driver-messages",
        action="store_true",
        help="show what ALSA/JACK print on stderr while PortAudio probes the devices (hidden by default)",
    )
    parser.set_defaults(handler=_list)


def _list(args: argparse.Namespace) -> int:
    try:
        with contextlib.nullcontext() if args.driver_messages else _native_stderr_silenced():
            devices = list_input_devices()
    except ImportError as error:
        fail(str(error))
    except (OSError, MicrophoneError) as error:
        fail(f"cannot list audio devices: {error}")
    if args.json:
        print(json.dumps([device.to_dict() for device in devices], ensure_ascii=False))
        if not devices:
            print(f"edge-agent: {NO_DEVICES} found", file=sys.stderr)
        return 0
    if not devices:
        print(f"{NO_DEVICES} found (PortAudio sees no capture device; check `arecord -l`)")
        return 0
    print(format_table(devices))
    return 0


def format_table(devices: Sequence[InputDevice]) -> str:
    header = ("INDEX", "NAME", "CHANNELS", "DEFAULT RATE", "DEFAULT")
    rows = [
        (
            str(d.index),
            d.name,
            str(d.max_input_channels),
            f"{d.default_sample_rate} Hz",
            "*" if d.is_default else "",
        )
        for d in devices
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right_aligned = {0, 2, 3}  # numbers
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in right_aligned else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: ALSA and JACK write their probing chatter there.

    Only for this one-shot command: the agent itself keeps stderr, where such lines can matter.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
