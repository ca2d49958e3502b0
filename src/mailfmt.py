"""Building and reading RFC 5322 messages: the few pieces PennCloud writes itself.

Shared by the SMTP server (the `Received:` trace header), the relay (delivery
status notifications, RFC 3464, for mail that could not be delivered), the
mail store (the summary of a message's headers kept in a folder index) and
the webmail (which builds whole messages with `email.message.EmailMessage`
itself, and reads raw 8-bit header bytes with `raw_header_text`, as the
summary does).

Messages are bytes with CRLF line endings everywhere: that is what SMTP
carries, what POP3 returns and what the store keeps. Nothing here does I/O;
the current time is an argument wherever it matters, so tests are repeatable.
"""

from __future__ import annotations

import email.utils
import os
from dataclasses import dataclass
from typing import Iterator
from email.errors import HeaderParseError
from email.header import decode_header, make_header

# Only this much of a message is parsed for its summary: headers are at the
# top, and a message whose header block is larger is summarised from this part.
MAX_HEADER_SCAN = 64 * 1024


@dataclass(frozen=True)
class Summary:
    """What a folder listing shows of a message, taken from its headers."""

    sender: str = ""
    to: str = ""
    subject: str = ""
    date: str = ""
    message_id: str = ""


def header_block(raw: bytes, limit: int = MAX_HEADER_SCAN) -> bytes:
    """The header section of `raw` (up to and including the blank line), at most `limit` bytes."""
    head = raw[:limit]
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = head.find(sep)
        if i >= 0:
            return head[: i + len(sep)]
    return head


_SUMMARY_FIELDS = {b"from": "sender", b"to": "to", b"subject": "subject", b"date": "date",
                   b"message-id": "message_id"}


def raw_header_text(value: bytes) -> str:
    """Raw 8-bit header bytes as text: UTF-8 (RFC 6532) when they decode as
    UTF-8, else Windows-1252 (old mailers put Latin-1 names in headers
    unencoded; the webmail reads such bodies the same way)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("cp1252", "replace")


def _text(value: bytes) -> str:
    """A header value as readable text (`raw_header_text`), RFC 2047 words
    decoded, folding removed. A broken encoded word (cut-off base64, an
    unknown charset) is shown as it stands: this runs for every delivered
    message, and raising here would refuse the mail.
    """
    s = raw_header_text(value)
    if "=?" in s:
        try:
            s = str(make_header(decode_header(s)))
        except (ValueError, LookupError, UnicodeError, HeaderParseError):
            pass
    return " ".join(s.split())[:1000]


def header_fields(raw: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every header field of `raw` as (lower-cased name, value with folding
    undone), in order. A small hand-written reader rather than the `email`
    package: it runs for every delivered message."""
    name: bytes | None = None
    value = b""
    for line in header_block(raw).split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):  # a folded continuation
            if name is not None:
                value += b" " + line.strip()
            continue
        if name is not None:
            yield name, value
        field, colon, rest = line.partition(b":")
        name, value = (field.strip().lower(), rest.strip()) if colon else (None, b"")
    if name is not None:
        yield name, value


def summarize(raw: bytes) -> Summary:
    """The From, To, Subject, Date and Message-ID of a message (first of each), decoded for display."""
    found: dict[str, bytes] = {}
    for name, value in header_fields(raw):
        field = _SUMMARY_FIELDS.get(name)
        if field is not None and field not in found:
            found[field] = value
    return Summary(**{k: _text(v) for k, v in found.items()})


def header_text(value: bytes) -> str:
    """A header value as a person sees it: `_text`, and the characters the
    webmail never shows (`without_hidden`) gone."""
    return without_hidden(_text(value))


# Never shown: C0 controls but TAB and LF (NUL, ESC...), DEL, the C1 controls,
# and the bidi embeddings, overrides and isolates, which let a sender make
# "gnp.exe" read "exe.png" or reverse whatever follows on the page.
_HIDDEN = dict.fromkeys([*range(0x00, 0x09), *range(0x0b, 0x20), *range(0x7f, 0xa0),
                         *range(0x202a, 0x202f), *range(0x2066, 0x206a)])


def without_hidden(text: str) -> str:
    """Text from a message made safe to show: the characters above removed."""
    return text.translate(_HIDDEN)


def without_fields(raw: bytes, names: set[bytes]) -> bytes:
    """`raw` with every header field named in `names` (lower case) removed,
    continuation lines and all; the rest, body included, byte for byte."""
    head = header_block(raw)
    lines = head.split(b"\n")
    kept, dropping = [], False
    for line in lines[:-1]:                 # (the last piece is after the block's final LF)
        if line[:1] in (b" ", b"\t") and line.strip():
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() in names if b":" in line else False
        if not dropping:
            kept.append(line)
    return b"\n".join(kept + lines[-1:]) + raw[len(head):]


def submission_fields(raw: bytes, *, sender: str, domain: str, now: float) -> bytes:
    """The header fields a submission server adds when the client left them
    out (RFC 6409 8.2, 8.3: `Date:`, `Message-ID:`), and `From:` (RFC 5322
    requires one; the logged-in user is the author), as bytes to put in
    front of the message. Scripts and printers submit mail without them, and
    other servers refuse or junk such mail."""
    have = {name for name, _ in header_fields(raw)}
    out = b""
    if b"from" not in have:
        out += f"From: <{sender}>\r\n".encode()
    if b"date" not in have:
        out += f"Date: {format_date(now)}\r\n".encode()
    if b"message-id" not in have:
        out += f"Message-ID: {new_message_id(domain)}\r\n".encode()
    return out


def new_message_id(domain: str) -> str:
    """A fresh `<...@domain>` Message-ID."""
    return f"<{os.urandom(12).hex()}@{domain}>"


def format_date(now: float) -> str:
    """An RFC 5322 date for the unix time `now` (UTC)."""
    return email.utils.formatdate(now, usegmt=True)


def received_header(*, helo: str, peer_ip: str, by_host: str, protocol: str, msg_id: str,
                    recipient: str | None, now: float) -> bytes:
    """The `Received:` trace line (RFC 5321 section 4.4) an SMTP server prepends.

    `protocol` is "SMTP", "ESMTP" or "ESMTPA" (authenticated, RFC 3848).
    `recipient` is named only when the message has exactly one (privacy).
    """
    helo = _safe(helo) or "unknown"
    parts = f"Received: from {helo} ([{_safe(peer_ip)}])\r\n\tby {by_host} (PennCloud) with {protocol} id {msg_id}"
    if recipient:
        parts += f"\r\n\tfor <{_safe(recipient)}>"
    return (parts + f";\r\n\t{format_date(now)}\r\n").encode("ascii", "replace")


def _safe(s: str) -> str:
    """Printable ASCII only, so a client cannot inject header lines through HELO."""
    return "".join(c for c in s if 0x21 <= ord(c) <= 0x7E and c not in "<>;()[]")[:255]


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the remote server's reply, e.g. "550 5.1.1 no such user"


def bounce(*, domain: str, to: str, original: bytes, failed: list[FailedRecipient], now: float,
           reason: str) -> bytes:
    """A delivery status notification (RFC 3464) telling `to` that `failed` did not get `original`.

    A `multipart/report; report-type=delivery-status` with three parts: a text
    for people, the machine-readable `message/delivery-status`, and the
    original's headers (`text/rfc822-headers`), never its body.
    """
    boundary = "=_bounce_" + os.urandom(8).hex()
    human = (
        "This is the mail system at " + domain + ".\r\n\r\n"
        "Your message could not be delivered to one or more recipients.\r\n"
        + reason + "\r\n\r\n"
        + "".join(f"<{f.address}>: {f.diagnostic}\r\n" for f in failed)
    )
    status = f"Reporting-MTA: dns; {domain}\r\nArrival-Date: {format_date(now)}\r\n"
    for f in failed:
        status += (f"\r\nFinal-Recipient: rfc822; {f.address}\r\nAction: failed\r\nStatus: {f.status}\r\n"
                   f"Diagnostic-Code: smtp; {' '.join(f.diagnostic.split())}\r\n")
    headers = header_block(original).rstrip(b"\r\n") + b"\r\n"
    out = (
        f"From: Mail Delivery System <mailer-daemon@{domain}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {format_date(now)}\r\n"
        f"Message-ID: {new_message_id(domain)}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        f"\r\n"
        f"This is a MIME-encapsulated message.\r\n"
        f"\r\n--{boundary}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Description: Notification\r\n\r\n"
        f"{human}"
        f"\r\n--{boundary}\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"Content-Description: Delivery report\r\n\r\n"
        f"{status}"
        f"\r\n--{boundary}\r\n"
        f"Content-Type: text/rfc822-headers\r\n"
        f"Content-Description: Undelivered message headers\r\n\r\n"
    ).encode("utf-8", "replace")
    return out + headers + f"\r\n--{boundary}--\r\n".encode()
