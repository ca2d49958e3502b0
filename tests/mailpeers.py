"""Test peers for the relay: a tiny DNS server (dnspython) and an SMTP peer (aiosmtpd), both on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.harness import free_port


class DNSStub:
    """Answers A/AAAA/MX queries from a dict over UDP on 127.0.0.1; NXDOMAIN for unknown names.

    records: {"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.1"]}}
    """

    def __init__(self, records: dict[str, dict[str, list[str]]]):
        self.records = {k.lower().rstrip(".") + ".": v for k, v in records.items()}
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _loop(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            try:
                q = dns.message.from_wire(data)
            except Exception:
                continue
            r = dns.message.make_response(q)
            r.flags |= dns.flags.AA
            question = q.question[0]
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            entry = self.records.get(name)
            if entry is None:
                r.set_rcode(dns.rcode.NXDOMAIN)
            else:
                values = entry.get(rdtype, [])
                if values:
                    r.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", rdtype, values))
            self.sock.sendto(r.to_wire(), peer)


class PeerHandler:
    """An aiosmtpd handler: replies to DATA from a script, rejects RCPTs starting with 'reject'."""

    def __init__(self, data_replies: list[str] | None = None, delay_s: float = 0.0):
        self.data_replies = list(data_replies or [])
        self.delay_s = delay_s
        self.received: list[tuple[str, list[str], bytes]] = []
        self.attempts = 0
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("reject"):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        with self.lock:
            self.attempts += 1
            reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 OK"
            if reply.startswith("250"):
                self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return reply


class SMTPPeer:
    """An aiosmtpd server on 127.0.0.1 (a free port), as a context manager."""

    def __init__(self, handler: PeerHandler, port: int | None = None):
        from aiosmtpd.controller import Controller
        self.handler = handler
        self.port = port or free_port()
        self.controller = Controller(handler, hostname="127.0.0.1", port=self.port)

    def __enter__(self):
        self.controller.start()
        return self

    def __exit__(self, *exc):
        self.controller.stop()
