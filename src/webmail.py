"""Webmail logic with no HTTP in it: what the mail pages need from messages.

The web pages (httpserver/apps/mail.py) are a thin shell around this module:

    compose form ──parse_recipients──► addresses ──build_message──► RFC 5322 bytes
    stored bytes ──parse_message──► DisplayMessage (decoded headers, text,
                                     sanitised HTML, attachment list)
    DisplayMessage ──reply_draft / forward_draft──► Draft (pre-filled form)
    RFC 5322 bytes ──send──► local Inboxes, the relay queue, the sender's Sent
                             (src/mailstore.py, as the SMTP server delivers)

Invariants the pages rely on:

- `build_message` always produces a complete RFC 5322 message: Date,
  Message-ID, From, To/Cc, MIME-Version, UTF-8 bodies in a 7-bit transfer
  encoding (so any relay takes them), non-ASCII header text RFC 2047-encoded
  and non-ASCII attachment names RFC 2231-encoded, CRLF line ends. No header
  can be injected through a field: addresses are validated against a strict
  grammar and CR/LF are removed from free text.
- `parse_message` never raises on a malformed message; the worst case is the
  raw text shown as plain text.
- `sanitize_html` is an allow-list: only the tags and attributes named below
  survive, links only to http/https/mailto, no images, no styles, no
  forms; the content of script-like elements is dropped, not shown. What it
  returns can be put inside a page as it is and cannot run script, load
  anything remote, or break out of the element that holds it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import html
import mimetypes
import re
import secrets
from dataclasses import dataclass, field
from email import errors as email_errors
from email import policy as email_policy
from email.header import Header
from email.message import EmailMessage, Message
from email.parser import BytesParser, Parser
from email.utils import format_datetime, getaddresses, make_msgid, parsedate_to_datetime
from html.parser import HTMLParser

from src import mailfmt
from src.accounts import POSTMASTER_USER

# Limits for what a user may type into the compose form.
MAX_RECIPIENTS = 100
MAX_SUBJECT_CHARS = 998 - len("Subject: ")   # RFC 5322 2.1.1 line limit
MAX_FILENAME_CHARS = 200
MAX_REFERENCES = 20                           # message ids kept in References
PREVIEW_CHARS = 120

# The policy of messages we write: CRLF line ends (SMTP's), and 7-bit transfer
# encodings for bodies so a relay without 8BITMIME still takes them.
OUTGOING = email_policy.SMTP.clone(cte_type="7bit")
# Parsing: the modern API (decoded header strings, get_body/iter_attachments).
INCOMING = email_policy.default


class ComposeError(ValueError):
    """A problem with what the user typed; str() is the message to show them."""


# -- addresses ----------------------------------------------------------------

# RFC 5321 dot-atom local part (no quoted strings: nobody types them in a web
# form, and refusing them keeps addresses safe in every header and log line).
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NAMED_RE = re.compile(r"^[^<>]*<([^<>]*)>$")  # `Display Name <addr>`


def valid_address(addr: str) -> bool:
    """True for `local@domain` with a dot-atom local part and a DNS domain name."""
    if addr.count("@") != 1 or len(addr) > 254:
        return False
    local, domain = addr.split("@")
    if not local or len(local) > 64 or not _LOCAL_RE.match(local):
        return False
    labels = domain.split(".")
    return 0 < len(domain) <= 253 and all(_LABEL_RE.match(label) for label in labels)


def parse_recipients(text: str, local_domain: str) -> list[str]:
    """The addresses in a To/Cc field, lower-cased domain, in order, deduplicated.

    Addresses are separated by commas or semicolons and may be written as
    `Name <addr>`. A bare username (no '@') means that user at `local_domain`.
    Raises ComposeError naming the first address that is not valid.
    """
    text = (text or "").replace(";", ",")
    if "\r" in text or "\n" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    out: list[str] = []
    seen: set[str] = set()
    for chunk in text.split(","):
        chunk = chunk.strip()
        if not chunk:
            continue
        m = _NAMED_RE.match(chunk)
        addr = (m.group(1) if m else chunk).strip()
        if addr and "@" not in addr and _LOCAL_RE.match(addr):
            addr = f"{addr}@{local_domain}"
        if not addr or not valid_address(addr):
            raise ComposeError(f"“{chunk}” is not a valid e-mail address.")
        local, domain = addr.split("@")
        addr = f"{local}@{domain.lower()}"
        key = addr.lower()
        if key not in seen:
            seen.add(key)
            out.append(addr)
        if len(out) > MAX_RECIPIENTS:
            raise ComposeError(f"At most {MAX_RECIPIENTS} recipients per message.")
    return out


def split_local(addr: str, local_domain: str) -> str | None:
    """The username if `addr` is at `local_domain` (case-insensitive), else None."""
    local, _, domain = addr.rpartition("@")
    if local and domain.lower() == local_domain.lower():
        return local.lower()
    return None


# -- building outgoing messages -------------------------------------------------

@dataclass
class Attachment:
    """A file to attach: a name, a MIME type and the bytes."""

    filename: str
    content_type: str
    data: bytes


def clean_filename(name: str | None, default: str = "attachment") -> str:
    """A safe base name: no directories, no control characters, bounded length."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '"<>|:*?')
    name = name.strip(" .")
    if not name:
        return default
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:20] if dot else ""
        name = (stem if dot else name)[: MAX_FILENAME_CHARS - len(ext) - 1] + ("." + ext if ext else "")
    return name


_MIME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


def clean_content_type(content_type: str | None, filename: str) -> str:
    """`type/subtype` from the upload if well-formed, else guessed from the name."""
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if _MIME_RE.match(ct) and ct != "application/octet-stream":
        return ct
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def one_line(text: str) -> str:
    """Free header text with CR, LF and other control characters made spaces."""
    return "".join(" " if (ord(ch) < 32 or ord(ch) == 127) else ch for ch in text).strip()


# Text from a message made safe to show (control and bidi characters removed).
clean_text = mailfmt.without_hidden


def clean_line(text: str) -> str:
    """Header text made safe to show, on one line."""
    return clean_text(one_line(text))


def build_message(*, sender: str, to: list[str], cc: list[str] = (), subject: str = "",
                  body: str = "", attachments: list[Attachment] = (), in_reply_to: str | None = None,
                  references: list[str] = (), domain: str, now: _dt.datetime | None = None) -> bytes:
    """An RFC 5322 message as the bytes to store and send (CRLF line ends).

    `sender`, `to` and `cc` must be addresses that passed `parse_recipients`
    (or `valid_address`); `domain` names the host part of the Message-ID.
    """
    for addr in [sender, *to, *cc]:
        if not valid_address(addr):
            raise ComposeError(f"“{addr}” is not a valid e-mail address.")
    if not to and not cc:
        raise ComposeError("Add at least one recipient.")
    subject = one_line(subject)
    if len(subject) > MAX_SUBJECT_CHARS:
        raise ComposeError(f"The subject is longer than {MAX_SUBJECT_CHARS} characters.")
    msg = EmailMessage(policy=OUTGOING)
    msg["Date"] = format_datetime(now or _dt.datetime.now(_dt.timezone.utc))
    msg["From"] = sender
    if to:
        msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    if "=?" in subject:
        # The header parser would decode "=?utf-8?q?hi?=" typed by the user
        # (someone writing about MIME) into "hi", and the folder writes it out
        # as it is: encode the whole subject, so every reader gets it literally.
        msg.set_raw("Subject", Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n"))
    else:
        msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain=domain)
    ids = [i for i in (clean_msgid(r) for r in references) if i]
    if in_reply_to and clean_msgid(in_reply_to):
        msg["In-Reply-To"] = clean_msgid(in_reply_to)
        if clean_msgid(in_reply_to) not in ids:
            ids.append(clean_msgid(in_reply_to))
    if ids:
        msg["References"] = " ".join(ids[-MAX_REFERENCES:])
    # Normalise line ends: browsers send CRLF in textareas.
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    if text and not text.endswith("\n"):
        text += "\n"
    msg.set_content(text, charset="utf-8")
    for att in attachments:
        name = clean_filename(att.filename)
        maintype, _, subtype = clean_content_type(att.content_type, name).partition("/")
        if f"{maintype}/{subtype}" in _ATTACHED_MESSAGE:
            # A forwarded message stays a message (RFC 2046 allows it no
            # base64): as it is if 7-bit, else as a plain .eml file.
            if att.data.isascii():
                inner = BytesParser(policy=OUTGOING).parsebytes(att.data)
                msg.add_attachment(inner, cte="7bit", filename=name)
                continue
            maintype, subtype = "application", "octet-stream"
        # Bytes, so even text files stay byte-exact (base64, no charset guessing).
        msg.add_attachment(att.data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=OUTGOING)


_MSGID_RE = re.compile(r"<[^<>\s]{1,250}@[^<>\s]{1,250}>")


def clean_msgid(value: str | None) -> str | None:
    """The first `<id@host>` in a header value, or None."""
    if not value:
        return None
    m = _MSGID_RE.search(value)
    return m.group(0) if m else None


# -- reading stored messages --------------------------------------------------

@dataclass
class AttachmentInfo:
    index: int            # position among the message's leaf parts (stable)
    filename: str
    content_type: str
    size: int             # decoded bytes


@dataclass
class DisplayMessage:
    """A parsed message, ready to be shown (every string still needs escaping)."""

    from_: str = ""
    to: str = ""
    cc: str = ""
    reply_to: str = ""
    subject: str = ""
    date: str = ""
    date_dt: _dt.datetime | None = None
    message_id: str | None = None
    references: list[str] = field(default_factory=list)
    text: str = ""            # the plain text body ("" if none)
    html: str = ""            # the sanitised HTML body ("" if none)
    attachments: list[AttachmentInfo] = field(default_factory=list)

    @property
    def body_text(self) -> str:
        """The body as text: the text part, else the HTML part as text."""
        return self.text if self.text.strip() or not self.html else html_to_text(self.html)


# Headers whose value is addresses: shown as the email package writes them
# only when it could read every address in them.
_ADDRESS_HEADERS = frozenset({"from", "to", "cc", "reply-to", "sender", "bcc"})


def _raw_header(msg: Message, name: str) -> str | None:
    """The first `name` header as it came, undecoded (8-bit bytes as the
    parser's surrogate escapes)."""
    for key, value in msg.raw_items():
        if key.lower() == name.lower():
            return value
    return None


def _header_text(raw: str) -> str:
    """A raw header value as text: 8-bit bytes read as UTF-8 if they are
    valid UTF-8, else as Windows-1252 (as bodies are: mailers put Latin-1 in
    headers too), RFC 2047 words decoded where they decode, unfolded."""
    text = " ".join(mailfmt.raw_header_text(raw.encode("utf-8", "surrogateescape")).split())
    if "=?" in text:
        try:
            text = str(INCOMING.header_factory("X-Unstructured", text))
        except Exception:
            pass
    return text


def _unreadable_addresses(value) -> bool:
    """True if the email package could not read an address of an address
    header: it then keeps only what it understood ("Alice" of `Alice
    <alice@host.>`), and the page must show what was really written."""
    defects = getattr(value, "defects", ())
    return (any(isinstance(d, email_errors.InvalidHeaderDefect) for d in defects)
            or any(not a.domain for a in getattr(value, "addresses", ())))


def _header(msg: Message, name: str) -> str:
    raw = _raw_header(msg, name)
    if raw is None:
        return ""
    try:
        if raw.isascii():
            value = msg.get(name)
        else:  # 8-bit bytes: the package would show them as U+FFFD
            value = INCOMING.header_factory(name, _header_text(raw))
        if name.lower() in _ADDRESS_HEADERS and _unreadable_addresses(value):
            return clean_line(_header_text(raw))
        return clean_line(str(value))
    except Exception:  # a header the email package cannot parse: show it raw
        return clean_line(_header_text(raw))


def _part_text(part: Message) -> str:
    return clean_text(_decode_text(part).replace("\r\n", "\n").replace("\r", "\n"))


def _decode_text(part: Message) -> str:
    """A text part as str. With a charset it names (or none, or us-ascii, as
    many mailers send UTF-8 or Windows-1252 unlabelled), bytes that do not fit
    are read as UTF-8 if they are valid UTF-8, else as Windows-1252."""
    payload = part.get_payload(decode=True) or b""
    charset = (part.get_content_charset() or "us-ascii").lower()
    if charset not in ("us-ascii", "ascii"):
        try:
            return payload.decode(charset)
        except (LookupError, UnicodeDecodeError):
            pass
    for fallback in ("utf-8", "cp1252"):
        try:
            return payload.decode(fallback)
        except UnicodeDecodeError:
            continue
    return payload.decode("utf-8", "replace")


# A message attached to a message (a forward "as attachment", the returned
# message of a bounce) is one part of the outer message, shown as a block of
# its own and saved as a .eml file; its own attachments are not the outer's.
_ATTACHED_MESSAGE = frozenset({"message/rfc822", "message/global"})


def _leaves(msg: Message):
    """The parts of `msg` that are not multiparts, in order; a message/* part
    is one leaf (the parser has parsed what is inside it, but that is not
    the outer message's)."""
    stack = [msg]
    while stack:
        part = stack.pop()
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            stack.extend(reversed(part.get_payload()))
        else:
            yield part


def _inner_message(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    return None


# Attached messages are saved as they came: long header lines not refolded,
# 8-bit bytes kept, CRLF line ends as stored.
_EML_POLICY = INCOMING.clone(linesep="\r\n", refold_source="none")


def _part_bytes(part: Message) -> bytes:
    """The content of a leaf part as a file: decoded, or for an attached
    message the message itself."""
    if part.get_content_type() in _ATTACHED_MESSAGE:
        inner = _inner_message(part)
        return inner.as_bytes(policy=_EML_POLICY) if inner is not None else b""
    return part.get_payload(decode=True) or b""


def _is_attachment(part: Message) -> bool:
    disp = (part.get_content_disposition() or "").lower()
    return disp == "attachment" or part.get_filename() is not None


# Parts nested deeper than this are not shown (the parser has built them, but
# a message of thousands of nested multiparts must not exhaust the stack here).
MAX_NESTING = 400

# The machine-readable parts of delivery and disposition reports (RFC 3464,
# RFC 8098): header blocks that are text, shown as such.
_REPORT_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status",
                           "message/disposition-notification", "message/global-disposition-notification"})


def _inline_text(part: Message) -> bool:
    """A part shown in the body: a text part (any text/* subtype) that is not
    a file (no name, not `attachment`)."""
    return part.get_content_maintype() == "text" and not _is_attachment(part)


def _rank(part: Message, prefer_html: bool, depth: int = 0) -> int:
    """How good `part` is as the chosen alternative: the preferred one of
    text/html and text/plain, then the other, then any other text; 0 for
    something that cannot be shown. A multipart counts as its best leaf."""
    if depth > MAX_NESTING:
        return 0
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        return max((_rank(p, prefer_html, depth + 1) for p in part.get_payload()), default=0)
    if not _inline_text(part):
        return 0
    ctype = part.get_content_type()
    if ctype == "text/html":
        return 3 if prefer_html else 2
    if ctype == "text/plain":
        return 2 if prefer_html else 3
    return 1


def _report_text(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):  # the parser made each header block a message
        return clean_text("".join(str(block) for block in payload).replace("\r\n", "\n"))
    return _part_text(part)


def _body_blocks(part: Message, prefer_html: bool, out: list, depth: int = 0) -> None:
    """The parts of the body to show, in order, as ("text" | "html", str).

    Every inline text part is shown where it is (a list footer after the
    main text, a patch after the covering note); of each multipart/alternative
    only its best part: HTML first when `prefer_html`, else plain text."""
    if depth > MAX_NESTING:
        return
    ctype = part.get_content_type()
    if ctype in _REPORT_TYPES:
        out.append(("text", _report_text(part)))
    elif ctype in _ATTACHED_MESSAGE:
        inner = _inner_message(part)
        if inner is not None:
            head = [(k, _header(inner, k)) for k in ("From", "Date", "Subject", "To", "Cc")]
            names = [a.filename for a in (_attachment_info(i, p) for i, p in enumerate(_leaves(inner))) if a]
            if names:
                head.append(("Attachments", ", ".join(names) + " (in the attached message)"))
            blocks: list = []
            _body_blocks(inner, prefer_html, blocks, depth + 1)
            out.append(("message", ([(k, v) for k, v in head if v], blocks)))
    elif part.is_multipart() and part.get_content_maintype() == "multipart":
        kids = part.get_payload()
        if ctype == "multipart/alternative":
            ranked = [(_rank(k, prefer_html, depth + 1), i) for i, k in enumerate(kids)]
            best, i = max(ranked, default=(0, 0))  # ties: the last one (RFC 2046 5.1.4)
            kids = [kids[i]] if best else []
        for k in kids:
            _body_blocks(k, prefer_html, out, depth + 1)
    elif ctype == "text/rfc822-headers" and not _is_attachment(part):
        out.append(("text", _headers_text(_part_text(part))))
    elif _inline_text(part):
        kind = "html" if ctype == "text/html" else "text"
        out.append((kind, _part_text(part)))


def _headers_text(text: str) -> str:
    """A header block (a bounce's copy of the failed message's headers) with
    its RFC 2047 words decoded, so "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?="
    reads "Subject: Grüße"; a header that does not parse stays as it was."""
    try:
        msg = Parser(policy=INCOMING).parsestr(text, headersonly=True)
    except Exception:
        return text
    lines = []
    for name, value in msg.raw_items():
        try:
            value = str(msg.policy.header_fetch_parse(name, value))
        except Exception:
            pass
        lines.append(f"{name}: {clean_line(value)}")
    return "\n".join(lines) + "\n"


def _kinds(blocks: list) -> set[str]:
    """The kinds of part in `blocks`, attached messages included."""
    found = set()
    for kind, s in blocks:
        found |= _kinds(s[1]) if kind == "message" else {kind}
    return found


def _html_of(blocks: list) -> str:
    """The HTML view: HTML parts sanitised, text parts escaped in a <pre>,
    an attached message in a box headed by its From, Date and Subject."""
    out = []
    for kind, s in blocks:
        if kind == "html":
            out.append(sanitize_html(s))
        elif kind == "message":
            head, inner = s
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in head)
            out.append(f'<div class="mail-attached"><table class="mail-headers">{rows}</table>'
                       f"{_html_of(inner)}</div>")
        else:
            out.append(f'<pre class="mail-text">{html.escape(s, quote=False)}</pre>')
    return "\n".join(out)


def _text_of(blocks: list) -> str:
    out = []
    for kind, s in blocks:
        if kind == "html":
            out.append(html_to_text(sanitize_html(s)))
        elif kind == "message":
            head, inner = s
            out.append("\n".join(["---------- Attached message ----------", *(f"{k}: {v}" for k, v in head), "",
                                  _text_of(inner)]))
        else:
            out.append(s)
    return "\n".join(out)


def parse_message(raw: bytes) -> DisplayMessage:
    """Parse stored bytes for display; never raises on malformed input."""
    try:
        msg = BytesParser(policy=INCOMING).parsebytes(raw)
    except Exception:
        return DisplayMessage(text=raw.decode("utf-8", "replace"))
    d = DisplayMessage()
    d.from_ = _header(msg, "From")
    d.to = _header(msg, "To")
    d.cc = _header(msg, "Cc")
    d.reply_to = _header(msg, "Reply-To")
    d.subject = _header(msg, "Subject")
    d.date = _header(msg, "Date")
    try:
        d.date_dt = parsedate_to_datetime(d.date) if d.date else None
    except (TypeError, ValueError, IndexError):
        d.date_dt = None
    d.message_id = clean_msgid(_header(msg, "Message-ID"))
    d.references = _MSGID_RE.findall(_header(msg, "References"))
    try:
        for i, part in enumerate(_leaves(msg)):
            info = _attachment_info(i, part)
            if info is not None:
                d.attachments.append(info)
        # Two views of one body: plain text preferred (the text, the quote of
        # a reply) and HTML preferred (the formatted page).
        as_text: list = []
        _body_blocks(msg, False, as_text)
        as_html: list = []
        _body_blocks(msg, True, as_html)
    except Exception:
        return DisplayMessage(from_=d.from_, to=d.to, cc=d.cc, reply_to=d.reply_to, subject=d.subject,
                              date=d.date, date_dt=d.date_dt, message_id=d.message_id,
                              references=d.references, text=raw.decode("utf-8", "replace"))
    # Only HTML in it: `text` stays empty and `body_text` is the HTML's text.
    d.text = _text_of(as_text) if "text" in _kinds(as_text) else ""
    d.html = _html_of(as_html) if "html" in _kinds(as_html) else ""
    return d


def _attachment_info(i: int, part: Message) -> AttachmentInfo | None:
    """What the message page lists for leaf part `i`, if it is a file: a named
    or `attachment` part, a non-text part without a name (an inline image), or
    a text part other than the body's plain text and HTML (a patch, a CSV
    table, a calendar invitation): shown in the body too, but only as a file
    can it be saved or forwarded."""
    ctype = part.get_content_type()
    if ctype in _ATTACHED_MESSAGE:
        inner = _inner_message(part)
        subject = _header(inner, "Subject") if inner is not None else ""
        name = clean_filename(part.get_filename() or (subject[:80] + ".eml" if subject else ""), "message.eml")
        if not name.lower().endswith(".eml"):
            name += ".eml"
        return AttachmentInfo(i, name, ctype, len(_part_bytes(part)))
    if _is_attachment(part):
        name = clean_filename(part.get_filename())
    elif ctype == "text/calendar":
        name = "invite.ics"  # what Outlook and Gmail call it
    elif ctype in ("text/plain", "text/html") or part.get_content_maintype() in ("multipart", "message"):
        return None
    else:
        default = ".txt" if part.get_content_maintype() == "text" else ".bin"
        name = f"part{i + 1}{mimetypes.guess_extension(ctype) or default}"
    return AttachmentInfo(i, name, ctype, _decoded_size(part))


_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


def _decoded_size(part: Message) -> int:
    """The decoded size of a part, without decoding base64 (it is counted)."""
    if part.get("Content-Transfer-Encoding", "").strip().lower() == "base64":
        payload = part.get_payload()
        if isinstance(payload, str):
            return len(_B64_JUNK.sub(b"", payload.encode("ascii", "ignore"))) * 3 // 4
    return len(part.get_payload(decode=True) or b"")


def attachment_bytes(raw: bytes, index: int) -> tuple[str, str, bytes] | None:
    """(filename, content type, decoded bytes) of the leaf part `index`, if it
    is one `parse_message` lists as an attachment; None otherwise."""
    found = attachments_bytes(raw, [index])
    return found[0] if found else None


def attachments_bytes(raw: bytes, indexes) -> list[tuple[str, str, bytes]]:
    """`attachment_bytes` for several parts at once (one parse), in message order;
    indexes that are not attachments are left out."""
    wanted = set(indexes)
    out = []
    try:
        msg = BytesParser(policy=INCOMING).parsebytes(raw)
        for i, part in enumerate(_leaves(msg)):
            if i in wanted:
                info = _attachment_info(i, part)
                if info is not None:
                    out.append((info.filename, info.content_type, _part_bytes(part)))
    except Exception:
        return []
    return out


_RULE_RE = re.compile(r"^\s*[-_=*]{3,}")  # "-- Forwarded message --" lines and rules


def preview(display: DisplayMessage, limit: int = PREVIEW_CHARS) -> str:
    """The first words of the body on one line, for the message list."""
    lines = [ln for ln in display.body_text.splitlines()
             if ln.strip() and not ln.lstrip().startswith(">") and not _RULE_RE.match(ln)]
    text = " ".join(" ".join(lines).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# -- reply and forward --------------------------------------------------------

@dataclass
class Draft:
    """What the compose form starts with."""

    to: str = ""
    cc: str = ""
    subject: str = ""
    body: str = ""
    in_reply_to: str = ""
    references: str = ""


def _prefixed(prefix: str, subject: str) -> str:
    s = subject.strip()
    if s.lower().startswith(prefix.lower()):
        return s
    return f"{prefix} {s}".rstrip()


def quote(text: str) -> str:
    """Each line of `text` prefixed with '> ' (or '>' before an already quoted line)."""
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    return "\n".join(">" + ("" if ln.startswith(">") or not ln else " ") + ln for ln in lines)


def _addr_list(value: str) -> list[str]:
    return [a for _, a in getaddresses([value]) if a and valid_address(a)]


def reply_draft(d: DisplayMessage, me: str, reply_all: bool = False) -> Draft:
    """A reply to `d` by `me` (an address): Re: subject, quoted body, thread ids."""
    author = _addr_list(d.reply_to) or _addr_list(d.from_)
    if not author and (d.reply_to or d.from_):
        # An address that cannot be used (`alice@host.`, `a@b@c`): put what
        # was written in To, where the user sees it and Send names the problem.
        author = [d.reply_to or d.from_]
    to = author[:]
    cc: list[str] = []
    if [a.lower() for a in author] == [me.lower()]:
        # Replying to one's own message (from Sent): write to its recipients again.
        to = [a for a in _addr_list(d.to) if a.lower() != me.lower()] or author
        author = to[:]
    if reply_all:
        mine = me.lower()
        seen = {a.lower() for a in to} | {mine}
        for a in _addr_list(d.to) + _addr_list(d.cc):
            if a.lower() not in seen:
                seen.add(a.lower())
                cc.append(a)
        if not to:  # replying to all of one's own sent message
            to, cc = cc, []
    when = d.date or "an unknown date"
    body = f"\n\nOn {when}, {d.from_ or 'someone'} wrote:\n{quote(d.body_text)}\n"
    refs = d.references + ([d.message_id] if d.message_id else [])
    return Draft(to=", ".join(to), cc=", ".join(cc), subject=_prefixed("Re:", d.subject), body=body,
                 in_reply_to=d.message_id or "", references=" ".join(refs[-MAX_REFERENCES:]))


def forward_draft(d: DisplayMessage) -> Draft:
    """A forward of `d`: Fwd: subject, the original headers and body quoted."""
    head = ["---------- Forwarded message ----------", f"From: {d.from_}", f"Date: {d.date}",
            f"Subject: {d.subject}", f"To: {d.to}"]
    if d.cc:
        head.append(f"Cc: {d.cc}")
    body = "\n\n" + "\n".join(head) + "\n\n" + d.body_text.rstrip("\n") + "\n"
    refs = d.references + ([d.message_id] if d.message_id else [])
    return Draft(subject=_prefixed("Fwd:", d.subject), body=body,
                 references=" ".join(refs[-MAX_REFERENCES:]))


# -- HTML sanitising ----------------------------------------------------------

# Tags kept (attributes dropped unless listed in _ALLOWED_ATTRS).
_ALLOWED_TAGS = frozenset("""
    a abbr b blockquote br caption cite code dd del div dl dt em h1 h2 h3 h4 h5 h6 hr i ins
    kbd li mark ol p pre q s samp small span strike strong sub sup table tbody td tfoot th
    thead tr tt u ul center font big
""".split())
_VOID_TAGS = frozenset({"br", "hr"})
# Every void element of HTML: they have no end tag, so dropping one must not
# wait for it (a `<link>` would otherwise swallow the rest of the message).
_HTML_VOID = frozenset("area base br col embed hr img input keygen link meta param source track wbr".split())
# Elements whose whole content is dropped (not shown as text).
_DROP_CONTENT = frozenset("""
    script style head title iframe frame frameset object embed applet noscript noembed noframes
    template svg math textarea select option xmp plaintext base meta link audio video canvas
    button form
""".split())
_ALLOWED_ATTRS = {
    "a": {"href", "title"},
    "abbr": {"title"},
    "td": {"colspan", "rowspan", "align"},
    "th": {"colspan", "rowspan", "align"},
    "ol": {"start"},
    "p": {"align"},
    "div": {"align"},
}
_SAFE_URL_RE = re.compile(r"^(https?://|mailto:)", re.I)
_NUMERIC_ATTRS = {"colspan", "rowspan", "start"}
_ALIGN_VALUES = {"left", "right", "center", "justify"}


def safe_url(url: str) -> str | None:
    """`url` if it is an absolute http(s) or mailto URL, else None.

    Browsers ignore tabs, newlines and leading control characters inside a
    URL scheme ("java\\tscript:"), so they are removed before the check.
    """
    stripped = "".join(ch for ch in url if ord(ch) > 32 and ord(ch) != 127)
    if not _SAFE_URL_RE.match(stripped):
        return None
    return stripped


class _Sanitizer(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.open: list[str] = []       # allowed elements opened and not yet closed
        self.dropping: list[str] = []   # stack of dropped-content elements we are inside

    def handle_starttag(self, tag, attrs):
        tag = tag.lower()
        if self.dropping:
            if tag in _DROP_CONTENT and tag not in _HTML_VOID:
                self.dropping.append(tag)
            return
        if tag in _DROP_CONTENT:
            if tag not in _HTML_VOID:
                self.dropping.append(tag)
            return
        if tag == "img":
            alt = next((v for k, v in attrs if k == "alt" and v), "")
            self.out.append(html.escape(f"[image: {alt}]" if alt else "[image]"))
            return
        if tag not in _ALLOWED_TAGS:
            return
        kept = []
        allowed = _ALLOWED_ATTRS.get(tag, ())
        for name, value in attrs:
            name = name.lower()
            if name not in allowed or value is None:
                continue
            if name == "href":
                value = safe_url(value)
                if value is None:
                    continue
            elif name in _NUMERIC_ATTRS:
                if not value.strip().isdigit() or not 0 < int(value) < 1000:
                    continue
                value = str(int(value))
            elif name == "align":
                if value.strip().lower() not in _ALIGN_VALUES:
                    continue
                value = value.strip().lower()
            kept.append(f' {name}="{html.escape(clean_text(value), quote=True)}"')
        if tag == "a":
            if "a" in self.open:  # links do not nest: the new one ends the old one
                self.handle_endtag("a")
            kept.append(' rel="noopener noreferrer nofollow" target="_blank"')
        self.out.append(f"<{tag}{''.join(kept)}>")
        if tag not in _VOID_TAGS:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        tag = tag.lower()
        if not self.dropping and tag in _ALLOWED_TAGS and tag not in _VOID_TAGS and self.open \
                and self.open[-1] == tag:
            self.open.pop()
            self.out.append(f"</{tag}>")
        elif self.dropping and self.dropping[-1] == tag:
            self.dropping.pop()  # a self-closed <svg/> or <script/>: nothing inside it

    def handle_endtag(self, tag):
        tag = tag.lower()
        if self.dropping:
            if tag in self.dropping:  # close it and anything left open inside it
                while self.dropping.pop() != tag:
                    pass
            return
        if tag not in self.open:
            return  # a stray end tag: never close what the page around us opened
        while self.open:
            t = self.open.pop()
            self.out.append(f"</{t}>")
            if t == tag:
                break

    def handle_data(self, data):
        if not self.dropping:
            self.out.append(html.escape(clean_text(data), quote=False))

    # Comments, doctypes, processing instructions and CDATA are dropped.
    def handle_comment(self, data):
        pass

    def handle_decl(self, decl):
        pass

    def handle_pi(self, data):
        pass

    def unknown_decl(self, data):
        pass

    def result(self) -> str:
        self.close()
        while self.open:
            self.out.append(f"</{self.open.pop()}>")
        return "".join(self.out)


# A browser ends <script> and <style> at "</style" followed by a space, "/"
# or ">", whatever comes before the ">" (`</style/>`, `</style x>`);
# html.parser (3.11) only at `</style>` and then took everything after such
# an end tag for style text and dropped it: the rest of the message vanished.
_RAW_TEXT_END = re.compile(r"</(script|style)(?=[\t\n\r\f />])[^>]*>", re.IGNORECASE)


def _raw_text_ends_as_browsers_do(markup: str) -> str:
    return _RAW_TEXT_END.sub(lambda m: f"</{m.group(1)}>", markup)


def sanitize_html(markup: str) -> str:
    """`markup` reduced to a safe allow-list of HTML (see the module docstring)."""
    s = _Sanitizer()
    s.feed(_raw_text_ends_as_browsers_do(markup))
    return s.result()


class _TextExtractor(HTMLParser):
    _BLOCK = frozenset("p div br tr li h1 h2 h3 h4 h5 h6 blockquote pre table hr dd dt".split())

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.dropping = 0

    def handle_starttag(self, tag, attrs):
        if tag in _DROP_CONTENT:
            # A void element (<link>, <meta>...) never gets an end tag: counted,
            # it would drop the rest of the message (as in the sanitiser).
            if tag not in _HTML_VOID:
                self.dropping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")  # cells of a row: "cell1 cell2", not "cell1cell2"

    def handle_endtag(self, tag):
        if tag in _DROP_CONTENT:
            if tag not in _HTML_VOID:
                self.dropping = max(0, self.dropping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.dropping:
            # Collapse runs of white space as a browser does, keeping one at each end.
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """The readable text of some HTML (for quoting and previews)."""
    p = _TextExtractor()
    p.feed(_raw_text_ends_as_browsers_do(markup))
    p.close()
    text = "".join(p.parts)
    lines = [re.sub(r" {2,}", " ", ln.strip()) for ln in text.split("\n")]
    out: list[str] = []
    for ln in lines:
        if ln or (out and out[-1]):
            out.append(ln)
    return "\n".join(out).strip()


# -- helpers for the HTTP layer -----------------------------------------------

def display_address(value: str) -> str:
    """A From/To value shortened for a list: the display name, else the address.

    A display name that looks like an address other than the real one
    (`"alice@penncloud.local" <evil@example.org>`) comes with the real
    address, and a value whose addresses cannot all be read is shown as it
    is, so an outsider cannot pass for a local user in the list."""
    if not value:
        return ""
    try:
        header = INCOMING.header_factory("To", value)
        if _unreadable_addresses(header):
            return clean_line(value)
        shown = []
        for a in header.addresses:
            name = a.display_name
            if name and "@" in name and name.strip().lower() != a.addr_spec.lower():
                shown.append(f"{name} <{a.addr_spec}>")
            else:
                shown.append(name or a.addr_spec)
        return clean_line(", ".join(shown) or value)
    except Exception:
        return clean_line(value)


# -- sending --------------------------------------------------------------------

@dataclass
class SendResult:
    local: list[str]        # usernames whose Inbox got the message
    remote: list[str]       # addresses queued for the relay
    sent_id: str            # the copy in the sender's Sent folder
    queue_id: str | None


_SEND_KEY_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def new_send_key() -> str:
    """The one-time key a compose form carries (see send)."""
    return secrets.token_urlsafe(18)


def send(store, accounts, user: str, domain: str, rcpts: list[str], raw: bytes,
         send_key: str = "") -> SendResult:
    """Deliver `raw` from `user` as authenticated SMTP submission does: each
    local recipient's Inbox, the relay queue for other domains, and a copy in
    the sender's Sent folder, in that order (the Sent copy last: it says the
    whole send is done).

    `store` is a src.mailstore.MailStore, `accounts` a src.accounts.Accounts.
    Every local recipient is checked before anything is stored, so a typo in
    one name stores nothing (ComposeError names the unknown user).

    `send_key`, the compose form's one-time key, makes a send idempotent: every
    copy is stored under an id derived from the sender and the key, so the
    same form sent again (after a frontend died mid-send and the user got an
    error page, or a double click) stores no second copy anywhere and
    completes whatever the first attempt had not. Without a valid key each
    call is a new message.
    """
    local: list[str] = []
    remote: list[str] = []
    for addr in rcpts:
        name = split_local(addr, domain)
        if name == "postmaster":
            name = POSTMASTER_USER  # RFC 5321 4.5.1, as the SMTP server does
        if name is None:
            remote.append(addr)
        elif not accounts.exists(name):
            raise ComposeError(f"There is no user “{name}” at {domain}.")
        elif name not in local:
            local.append(name)
    if not local and not remote:
        raise ComposeError("Add at least one recipient.")
    msg_id = None
    if _SEND_KEY_RE.fullmatch(send_key or ""):
        # The first attempt with this key picks the id (time-ordered, like
        # every message id) and records it; a retry finds it there.
        msg_id = store.id_for_send_key(user, hashlib.sha256(send_key.encode()).hexdigest()[:40])
        if store.has_message(user, "Sent", msg_id):
            # Done before (the reply was lost): nothing to do again; in
            # particular no second trip through the relay queue.
            return SendResult(local=local, remote=remote, sent_id=msg_id, queue_id=None)
    delivered = f"Return-Path: <{user}@{domain}>\r\n".encode() + raw   # final delivery's trace, as SMTP's
    for name in local:
        store.deliver(name, "Inbox", delivered, msg_id=msg_id)
    qid = store.enqueue_outgoing(user, f"{user}@{domain}", remote, raw, qid=msg_id) if remote else None
    sent_id = store.deliver(user, "Sent", raw, read=True, msg_id=msg_id)
    return SendResult(local=local, remote=remote, sent_id=sent_id, queue_id=qid)
