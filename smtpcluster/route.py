"""Where a domain's mail goes: MX records in preference order (RFC 5321 §5.1).

Equal preferences are shuffled to spread load; no MX means the domain's own A/AAAA
(the implicit MX); a null MX (RFC 7505) or a domain that does not exist bounces at
once; a resolver failure defers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from raft.transport import Address


class Undeliverable(Exception):
    """A permanent routing failure: bounce (5xx)."""


class RouteTemporaryFailure(Exception):
    """DNS could not answer now: defer (4xx)."""


@dataclass(frozen=True)
class Router:
    nameservers: tuple[str, ...] = ()  # "ip:port"; empty = the system resolver
    port: int = 25  # SMTP port of the exchanges (tests run them on loopback ports)
    timeout_s: float = 10.0

    def _resolver(self) -> dns.asyncresolver.Resolver:
        if not self.nameservers:
            return dns.asyncresolver.Resolver()
        r = dns.asyncresolver.Resolver(configure=False)
        addrs = [Address.parse(ns) for ns in self.nameservers]
        r.nameservers = [a.host for a in addrs]
        r.nameserver_ports = {a.host: a.port for a in addrs}
        return r

    async def exchanges(self, domain: str) -> list[Address]:
        """The hosts to try, in order."""
        r = self._resolver()
        try:
            answer = await r.resolve(domain, "MX", lifetime=self.timeout_s)
        except dns.resolver.NXDOMAIN:
            raise Undeliverable(f"5.1.2 domain {domain} does not exist") from None
        except dns.resolver.NoAnswer:
            return await self._hosts(r, domain)  # the implicit MX
        except dns.exception.DNSException as exc:
            raise RouteTemporaryFailure(f"4.4.3 MX lookup for {domain} failed: {exc}") from None
        records = sorted((rr.preference, str(rr.exchange).rstrip(".")) for rr in answer)
        if len(records) == 1 and records[0][1] in ("", "."):
            raise Undeliverable(f"5.1.10 {domain} accepts no mail (null MX, RFC 7505)")
        out: list[Address] = []
        for pref in sorted({p for p, _ in records}):
            same = [h for p, h in records if p == pref and h not in ("", ".")]
            random.shuffle(same)  # equal preference: spread the load
            for host in same:
                out += await self._hosts(r, host, soft=True)
        if not out:
            raise RouteTemporaryFailure(f"4.4.3 no address for any MX of {domain}")
        return out

    async def _hosts(
        self, r: dns.asyncresolver.Resolver, host: str, soft: bool = False
    ) -> list[Address]:
        addrs: list[Address] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await r.resolve(host, rdtype, lifetime=self.timeout_s)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                if soft:
                    continue
                raise RouteTemporaryFailure(f"4.4.3 lookup of {host} failed: {exc}") from None
            addrs += [Address(rr.address, self.port) for rr in answer]
        if not addrs and not soft:
            raise Undeliverable(f"5.1.2 {host} has no MX and no address")
        return addrs
