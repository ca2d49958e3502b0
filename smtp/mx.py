"""Where to deliver mail for a domain: MX look-up with dnspython (RFC 5321 section 5.1).

    mail_hosts("example.org", resolver) -> ["192.0.2.10", "2001:db8::25", ...]

The domain's MX records, lowest preference first, each resolved to its A and
AAAA addresses; a domain with no MX records is its own mail host (the
"implicit MX": its A/AAAA records); a null MX (RFC 7505, exchange ".") or a
domain that does not exist is a permanent failure; a DNS timeout or
SERVFAIL is temporary (the relay tries again later). An address literal
(`user@[192.0.2.1]`) needs no look-up.

The resolver is the one the config names (`mail.resolver = "host:port"`, so
tests run a DNS server on loopback), or the system's.
"""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.name
import dns.resolver

LOOKUP_LIFETIME_S = 10.0


class DNSError(Exception):
    """No mail host for a domain; `permanent` tells a bounce from a retry."""

    def __init__(self, text: str, permanent: bool, status: str):
        super().__init__(text)
        self.permanent = permanent
        self.status = status  # enhanced status code for a bounce


def make_resolver(addr: str = "") -> dns.resolver.Resolver:
    """A resolver asking `addr` ("host:port"), or the system's when addr is empty."""
    if not addr:
        r = dns.resolver.Resolver()
    else:
        host, _, port = addr.rpartition(":")
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [host]
        r.port = int(port)
    r.lifetime = LOOKUP_LIFETIME_S
    return r


def _query(resolver: dns.resolver.Resolver, name: str, rdtype: str):
    """The answer's records, [] for "no such record"; DNSError for NXDOMAIN (permanent) or trouble."""
    try:
        return list(resolver.resolve(name, rdtype, search=False))
    except dns.resolver.NXDOMAIN:
        raise DNSError(f"{name}: the domain does not exist", True, "5.1.2") from None
    except dns.resolver.NoAnswer:
        return []
    except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.BadEscape) as e:
        # Not a name at all ("a..b", a label over 63 bytes): no retry fixes it.
        raise DNSError(f"{name}: not a valid domain name ({e})", True, "5.1.2") from None
    except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as e:
        raise DNSError(f"{name}: DNS look-up failed ({type(e).__name__})", False, "4.4.3") from None
    except dns.exception.DNSException as e:
        raise DNSError(f"{name}: DNS look-up failed ({e})", False, "4.4.3") from None


def mail_hosts(domain: str, resolver: dns.resolver.Resolver) -> list[str]:
    """The IP addresses to try for mail to `domain`, in order."""
    if domain.startswith("[") and domain.endswith("]"):
        lit = domain[1:-1]
        if lit.lower().startswith("ipv6:"):
            lit = lit[5:]
        try:
            return [str(ipaddress.ip_address(lit))]
        except ValueError:
            raise DNSError(f"{domain}: not an address literal", True, "5.1.2") from None
    mx = _query(resolver, domain, "MX")
    if len(mx) == 1 and mx[0].exchange == dns.name.root:
        raise DNSError(f"{domain}: the domain accepts no mail (null MX)", True, "5.1.10")
    hosts = [r.exchange.to_text(omit_final_dot=True) for r in sorted(mx, key=lambda r: (r.preference, str(r.exchange)))
             if r.exchange != dns.name.root] or [domain]
    addrs: list[str] = []
    temporary: DNSError | None = None
    for host in hosts:
        for rdtype in ("A", "AAAA"):
            try:
                for r in _query(resolver, host, rdtype):
                    if r.address not in addrs:
                        addrs.append(r.address)
            except DNSError as e:
                if not e.permanent:
                    temporary = e
                elif host == domain and not mx:
                    raise  # no MX and the name does not exist
    if not addrs:
        if temporary is not None:
            raise temporary
        if mx:
            raise DNSError(f"{domain}: no MX host has an address", False, "4.4.4")
        raise DNSError(f"{domain}: no MX and no address records", True, "5.1.2")
    return addrs
