"""The service announced over mDNS as ``_wyoming._tcp``, as Home Assistant's discovery expects.

Home Assistant's Wyoming integration watches ``_wyoming._tcp.local.``; a new instance shows up
under Settings -> Devices & services as discovered, and Home Assistant then asks the announced
address and port for ``describe``. The instance name (the device id unless
``wyoming.zeroconf_name`` says otherwise) and the program's name make its unique id there.

The address announced is ``wyoming.advertise_host`` (and mDNS then uses that interface only), or
the address the server listens on, or every non-loopback IPv4 address of the host.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import ifaddr
from zeroconf import InterfaceChoice, IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def host_addresses() -> list[str]:
    """The host's IPv4 addresses but loopback and link-local ones."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6: (address, flowinfo, scope)
            address = ipaddress.IPv4Address(ip.ip)
            if not (address.is_loopback or address.is_link_local) and ip.ip not in found:
                found.append(ip.ip)
    return found


def announced_addresses(listen_host: str, advertise_host: str | None) -> list[str]:
    if advertise_host:
        return [advertise_host]
    if listen_host not in _WILDCARD_HOSTS:
        return [listen_host]
    return host_addresses()


def service_info(instance: str, port: int, addresses: list[str]) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(address) for address in addresses],
        port=port,
        server=f"{instance}.local.",
    )


class Advertisement:
    """Registers the service on the running event loop; :meth:`stop` says goodbye."""

    def __init__(self, instance: str, port: int, addresses: list[str], only_interface: bool) -> None:
        self.info = service_info(instance, port, addresses)
        self.addresses = addresses
        # With an address of its own, mDNS stays on that interface (a loopback address keeps
        # it on this machine); otherwise every interface hears it.
        self._interfaces = addresses if only_interface else InterfaceChoice.All
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        self._zeroconf = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        announced = await self._zeroconf.async_register_service(self.info, allow_name_change=True)
        await announced
        log.info(
            "Wyoming service announced over mDNS as %s on %s",
            self.info.name,
            ", ".join(self.addresses),
        )

    async def stop(self) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is None:
            return
        try:
            await zeroconf.async_unregister_all_services()
        finally:
            await zeroconf.async_close()
