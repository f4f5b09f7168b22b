"""The mDNS announcement, found as Home Assistant finds it: ``_wyoming._tcp.local.``.

mDNS stays on the loopback interface here (``wyoming.advertise_host: 127.0.0.1``, which is also
the only interface it then uses): the query is sent by unicast to 127.0.0.1:5353 from a port of
its own (a "legacy unicast" query, which is answered by unicast), so it needs no multicast on
``lo`` (some VMs' loopback has none), and nothing leaves the machine.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from edge_agent.wyoming.advertise import SERVICE_TYPE, announced_addresses
from tests.wyoming.clients import describe, run
from tests.wyoming.helpers import KEYWORD, wyoming_agent


async def look_up(instance: str) -> AsyncServiceInfo:
    zeroconf = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only, unicast=True)
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}")
        assert await info.async_request(zeroconf.zeroconf, 10_000, addr="127.0.0.1", port=5353)
        return info
    finally:
        await zeroconf.async_close()


def test_the_service_is_announced_and_what_it_announces_answers_describe(  # type: ignore[no-untyped-def]
    make_agent, tmp_path: Path
) -> None:
    instance = f"edge-agent-test-{uuid.uuid4().hex[:8]}"
    _, server, _ = wyoming_agent(
        make_agent, tmp_path, zeroconf=True, advertise_host="127.0.0.1", zeroconf_name=instance
    )
    assert server.advertised.wait(30)
    found = run(look_up(instance))
    assert found.port == server.port
    assert found.parsed_addresses() == ["127.0.0.1"]
    # What Home Assistant's zeroconf step does next: describe at the announced address and port.
    assert run(describe(found.port)).wake[0].models[0].name == KEYWORD


def test_announced_addresses() -> None:
    assert announced_addresses("0.0.0.0", "10.1.2.3") == ["10.1.2.3"]
    assert announced_addresses("192.168.1.5", None) == ["192.168.1.5"]
    everything = announced_addresses("0.0.0.0", None)
    assert "127.0.0.1" not in everything and all(address.count(".") == 3 for address in everything)
