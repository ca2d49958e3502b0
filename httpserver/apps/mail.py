"""Webmail: the mail pages of the web app (Inbox, Sent, read, compose, reply,
forward, delete, attachments).

A thin HTTP shell: message logic is in src/webmail.py (building, parsing,
sanitising, quoting) and storage in src/mailstore.py (the same mailboxes the
SMTP and POP3 servers use), so mail sent here and from Thunderbird behaves
alike.

Routes (all need a log-in; every POST carries the session's CSRF token):

    GET  /mail                              Inbox, newest first (?page=N)
    GET  /mail/sent                         Sent, newest first
    GET  /mail/<folder>/<id>                read a message (marks it read)
    GET  /mail/<folder>/<id>/part/<n>       download attachment n
    GET  /mail/<folder>/<id>/source         the exact stored bytes (.eml)
    POST /mail/<folder>/<id>/delete         delete, back to the folder
    POST /mail/<folder>/<id>/unread         mark unread, back to the folder
    GET  /mail/compose                      new message; ?reply=, ?replyall=,
                                            ?forward=<folder>/<id> pre-fill it
    POST /mail/send                         multipart form: to, cc, subject,
                                            body, in_reply_to, references,
                                            attachment (files), drive_file
                                            (`<folder id>/<name>` references
                                            to drive files), fwd + fwd_part
                                            (attachments of a forwarded message)

`<folder>` is `inbox` or `sent`. Authorisation is by construction: every
store call names the session's user, so no id in a URL or form can reach
another user's mailbox.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import OrderedDict
from email.utils import format_datetime

from httpserver.templates import Markup, csrf_field, page, render
from httpserver.web import HTTPError, Response, content_disposition, redirect
from src import webmail
from src.drive import human_size  # one size format for the mail and drive pages
from src.kv import KVError
from src.mailstore import MailStore, MailStoreError, NoSuchMessage
from src.webmail import Attachment, ComposeError, Draft

log = logging.getLogger(__name__)

FOLDERS = {"inbox": "Inbox", "sent": "Sent"}
PAGE_SIZE = 50
# Only this much of a message's first chunk is parsed for its preview line,
# and, when that finds no text (a newsletter's 24 KB <style>, a huge header
# block), the next size up, to at most the last one.
PREVIEW_SCAN_BYTES = (16 * 1024, 64 * 1024, 256 * 1024)
# Previews are remembered per frontend: a stored message never changes, so a
# preview computed once is right for ever, and a list page then costs no body
# reads for the messages it showed before.
PREVIEW_CACHE_ENTRIES = 20_000
MAX_DRIVE_ATTACHMENTS = 20
MAX_FORM_FIELD_BYTES = 1024 * 1024    # one of to/cc/subject/body and the hidden fields
MAX_FORM_FIELDS_BYTES = 2 * MAX_FORM_FIELD_BYTES   # all of them together
READ_CHUNK = 64 * 1024
# A browser sends a whole file before it reads the answer: a file over the
# limit is read to its end (and dropped) so the user gets the form back with
# the draft, up to this many bytes per request; beyond it, a bare 413 page.
MAX_DROPPED_BYTES = 1024 ** 3


class MailApp:
    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.config
        self.domain = ctx.config.mail.domain
        # Bodies in chunks of the configured size, as SMTP, POP3 and the relay
        # store them (docs/mail.md), so a message is stored one way whoever wrote it.
        self.store = MailStore(ctx.kv, chunk_bytes=ctx.config.drive.chunk_bytes)
        self.accounts = ctx.accounts
        self.previews = PreviewCache(PREVIEW_CACHE_ENTRIES)

    # -- helpers -----------------------------------------------------------------

    def address(self, user: str) -> str:
        return f"{user}@{self.domain}"

    @staticmethod
    def folder_of(slug: str) -> str:
        folder = FOLDERS.get(slug)
        if folder is None:
            raise HTTPError(404, "There is no such mail folder.")
        return folder

    def load(self, req, slug: str, msg_id: str) -> tuple[str, bytes]:
        """(folder, raw bytes) of the user's own message; 404 for anything else."""
        folder = self.folder_of(slug)
        try:
            return folder, self.store.get_raw(req.user, folder, msg_id)
        except (NoSuchMessage, MailStoreError):
            raise HTTPError(404, "That message does not exist (it may have been deleted).") from None

    def preview_of(self, user: str, folder: str, msg_id: str) -> tuple[str, tuple[str, str, str]]:
        """(preview line, (From, To, Subject) as the message page shows them)."""
        key = (user, folder, msg_id)
        found = self.previews.get(key)
        if found is None:
            try:
                first = next(iter(self.store.iter_raw(user, folder, msg_id)), b"")
            except MailStoreError:
                return "", ("", "", "")
            for limit in PREVIEW_SCAN_BYTES:
                d = webmail.parse_message(first[:limit])
                found = webmail.preview(d), (d.from_, d.to, d.subject)
                if found[0] or len(first) <= limit:
                    break
            self.previews.put(key, found)
        return found

    def mail_page(self, req, title: str, body: Markup, status: int = 200, active_folder: str = "",
                  unread: int | None = None, js: tuple[str, ...] = ()) -> Response:
        """The page in the shared layout with the mail sidebar, with the
        Inbox's unread count on every mail page (two COLS: the Inbox's ids
        and its read marks; the Inbox page passes the count it has)."""
        if unread is None:
            try:
                unread = self.store.unread_count(self.store.ids(req.user, "Inbox"),
                                                 self.store.read_marks(req.user, "Inbox"))
            except (KVError, MailStoreError):
                unread = 0      # the page still works without its badge
        side = render(SIDEBAR, inbox_cls="active" if active_folder == "inbox" else "",
                      sent_cls="active" if active_folder == "sent" else "",
                      unread=render(' <span class="mail-count">{n}</span>', n=unread) if unread else "")
        return page(req, title, render(LAYOUT, side=side, main=body), active="mail", css=("mail.css",), js=js,
                    status=status)

    # -- folders -----------------------------------------------------------------

    def folder_view(self, req, slug: str) -> Response:
        folder = self.folder_of(slug)
        try:
            n = max(1, int(req.arg("page", "1")))
        except ValueError:
            n = 1
        # The page reads the folder's ids (one COLS) and only its own 50
        # messages; the unread count comes from the read marks (one COLS).
        marks = self.store.read_marks(req.user, folder) if folder == "Inbox" else set()
        ids = self.store.ids(req.user, folder)
        pages = max(1, (len(ids) + PAGE_SIZE - 1) // PAGE_SIZE)
        n = min(n, pages)
        shown = self.store.infos(req.user, folder, ids[(n - 1) * PAGE_SIZE: n * PAGE_SIZE])
        unread = 0
        if folder == "Inbox":
            unread = self.store.unread_count(ids, marks)
            self.store.heal_read_marks(req.user, folder, shown, marks)
        rows = []
        now = time.time()
        for m in shown:
            preview, heads = self.preview_of(req.user, folder, m.id)
            # The index's summary reads 8-bit header bytes as UTF-8 only (a
            # Latin-1 "René" is "Ren\ufffd"): then the parsed headers are right.
            sender, to, subject = (parsed if "\ufffd" in summary else summary
                                    for parsed, summary in zip(heads, (m.sender, m.to, m.subject)))
            who = webmail.display_address(to if folder == "Sent" else sender) or "(nobody)"
            rows.append(render(
                ROW, cls="unread" if not m.read else "read",
                href=f"/mail/{slug}/{m.id}" + (f"?page={n}" if n > 1 else ""), who=who,
                subject=webmail.clean_line(subject) or "(no subject)", preview=preview,
                date=short_date(m.date, m.received, now),
                full_date=webmail.clean_line(m.date) or f"received {arrival_time(m.received)}",
                mark=Markup('<span class="mail-dot" title="Unread"><span class="sr">unread</span></span>')
                if not m.read else "",
                size=human_size(m.size)))
        if rows:
            table = render(TABLE, rows=Markup("".join(rows)), who_label="To" if folder == "Sent" else "From")
        else:
            table = render(EMPTY, what="Your inbox is empty." if folder == "Inbox" else "You have not sent any mail yet.")
        pager = ""
        if pages > 1:
            prev_link = render('<a href="/mail{p}?page={n}">← Newer</a>', p="" if slug == "inbox" else "/sent",
                               n=n - 1) if n > 1 else ""
            next_link = render('<a href="/mail{p}?page={n}">Older →</a>', p="" if slug == "inbox" else "/sent",
                               n=n + 1) if n < pages else ""
            pager = render(PAGER, prev=prev_link, next=next_link, n=n, pages=pages)
        notice = render('<p class="mail-notice" role="status">Your message was sent.</p>') \
            if req.arg("sent") else render('<p class="mail-notice" role="status">The message was deleted.</p>') \
            if req.arg("deleted") else ""
        body = render(FOLDER_PAGE, title=folder, count=plural(len(ids), "message"), notice=notice,
                      unread=f", {unread} unread" if folder == "Inbox" and unread else "", table=table, pager=pager)
        return self.mail_page(req, folder, body, active_folder=slug, unread=unread if folder == "Inbox" else None)

    # -- one message ---------------------------------------------------------------

    def view(self, req, slug: str, msg_id: str) -> Response:
        folder, raw = self.load(req, slug, msg_id)
        try:
            self.store.mark_read(req.user, folder, msg_id)
        except MailStoreError:
            pass  # deleted meanwhile: still show what we read
        page = page_arg(req)            # the folder page it was opened from: Back returns there
        d = webmail.parse_message(raw)
        as_text = req.arg("as") == "text" or not d.html
        if as_text:
            content = render('<pre class="mail-text">{t}</pre>', t=d.body_text or "(no text)")
        else:
            content = render('<div class="mail-html">{h}</div>', h=Markup(d.html))
        toggle = ""
        if d.html and d.text.strip():
            toggle = render('<a class="mail-toggle" href="/mail/{s}/{i}{q}">{label}</a>', s=slug, i=msg_id,
                            q="" if as_text else "?as=text",
                            label="Show formatted" if as_text else "Show plain text")
        atts = ""
        if d.attachments:
            items = Markup("".join(render(
                ATT_ITEM, href=f"/mail/{slug}/{msg_id}/part/{a.index}", name=a.filename,
                type=a.content_type, size=human_size(a.size)) for a in d.attachments))
            atts = render(ATT_LIST, n=plural(len(d.attachments), "attachment"), items=items)
        cc_row = render(HEAD_ROW, k="Cc", v=d.cc) if d.cc else ""
        date_row = render(HEAD_ROW, k="Date", v=d.date) if d.date else self.arrival_row(req.user, folder, msg_id)
        body = render(
            VIEW, subject=d.subject or "(no subject)", from_=d.from_, to=d.to or "(undisclosed)", cc_row=cc_row,
            date_row=date_row, content=content, toggle=toggle, attachments=atts, slug=slug, id=msg_id,
            csrf=csrf_field(req), back=folder_link(slug, page), page=page, folder=folder,
            # (one's own sent mail is never unread: UX QA)
            unread_form="" if folder == "Sent" else render(UNREAD_FORM, slug=slug, id=msg_id, csrf=csrf_field(req),
                                                            page=page))
        resp = self.mail_page(req, d.subject or "(no subject)", body, active_folder=slug, js=("mail.js",))
        # Belt and braces on top of the sanitiser: nothing remote may load.
        resp.headers.append(("Content-Security-Policy",
                             "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-src 'none'; "
                             "base-uri 'none'; form-action 'self'"))
        # No Referer leaves the site (a link in a mail gives away nothing);
        # not `no-referrer`, which makes the browser send `Origin: null` with
        # our own forms on the page, and the Log out form was then refused.
        resp.headers.append(("Referrer-Policy", "same-origin"))
        return resp

    def arrival_row(self, user: str, folder: str, msg_id: str) -> Markup | str:
        """For a message without a Date header (smtplib adds none): when it
        arrived here, labelled so, instead of an empty Date row."""
        try:
            received = self.store.info(user, folder, msg_id).received
        except MailStoreError:
            return ""  # deleted meanwhile: no row rather than a wrong one
        return render(ARRIVAL_ROW, when=arrival_time(received))

    def part(self, req, slug: str, msg_id: str, index: str) -> Response:
        _, raw = self.load(req, slug, msg_id)
        if not index.isdigit() or len(index) > 6:
            raise HTTPError(404, "There is no such attachment.")
        found = webmail.attachment_bytes(raw, int(index))
        if found is None:
            raise HTTPError(404, "There is no such attachment.")
        name, _ctype, data = found
        # Always a download, never rendered by the browser on our origin (an
        # attached HTML or SVG file could otherwise run script here).
        return Response(200, data, headers=[
            ("Content-Disposition", content_disposition(name)),
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", "sandbox; default-src 'none'"),
            ("Cache-Control", "private, no-store"),
        ], content_type="application/octet-stream")

    def source(self, req, slug: str, msg_id: str) -> Response:
        _, raw = self.load(req, slug, msg_id)      # 404 for an unknown folder, as elsewhere
        return Response(200, raw, headers=[
            ("Content-Disposition", content_disposition(f"message-{msg_id}.eml")),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "private, no-store"),
        ], content_type="message/rfc822")

    def delete(self, req, slug: str, msg_id: str) -> Response:
        folder = self.folder_of(slug)
        try:
            self.store.delete(req.user, folder, msg_id)
        except (NoSuchMessage, MailStoreError):
            raise HTTPError(404, "That message does not exist (it may have been deleted already).") from None
        return redirect(folder_link(slug, page_arg(req), "deleted=1"))

    def unread(self, req, slug: str, msg_id: str) -> Response:
        folder = self.folder_of(slug)
        try:
            self.store.mark_read(req.user, folder, msg_id, read=False)
        except (NoSuchMessage, MailStoreError):
            raise HTTPError(404, "That message does not exist.") from None
        return redirect(folder_link(slug, page_arg(req)))

    # -- compose -------------------------------------------------------------------

    def source_of(self, req, ref: str | None):
        """(slug, id, DisplayMessage, raw) for a `<folder>/<id>` reference of the
        user's own mail; 404 if there is no such message, None without a reference."""
        if not ref:
            return None
        slug, _, msg_id = ref.partition("/")
        _, raw = self.load(req, slug, msg_id)
        return slug, msg_id, webmail.parse_message(raw), raw

    def compose(self, req) -> Response:
        draft = Draft(to=req.arg("to", "") or "")
        fwd = None
        if req.arg("reply") or req.arg("replyall"):
            _, _, d, _ = self.source_of(req, req.arg("reply") or req.arg("replyall"))
            draft = webmail.reply_draft(d, self.address(req.user), reply_all=bool(req.arg("replyall")))
        elif req.arg("forward"):
            fwd = self.source_of(req, req.arg("forward"))
            draft = webmail.forward_draft(fwd[2])
        return self.compose_page(req, draft, fwd=fwd)

    def compose_page(self, req, draft: Draft, *, error: str = "", fwd=None, status: int = 200,
                     fwd_checked: set[int] | None = None, drive_chosen: set[str] = frozenset(),
                     send_key: str = "") -> Response:
        fwd_block = ""
        if fwd is not None:
            slug, msg_id, d, _ = fwd
            items = Markup("".join(render(
                FWD_ITEM, index=a.index, name=a.filename, size=human_size(a.size),
                checked="checked" if fwd_checked is None or a.index in fwd_checked else "")
                for a in d.attachments))
            fwd_block = render(FWD_BLOCK, ref=f"{slug}/{msg_id}", items=items) if d.attachments else \
                render('<input type="hidden" name="fwd" value="{ref}">', ref=f"{slug}/{msg_id}")
        drive_block = self.drive_picker(req, drive_chosen)
        body = render(
            COMPOSE, csrf=csrf_field(req), send_key=send_key or webmail.new_send_key(), to=draft.to, cc=draft.cc, subject=draft.subject, body=draft.body,
            in_reply_to=draft.in_reply_to, references=draft.references, fwd=fwd_block, drive=drive_block,
            error=render('<p class="mail-error" role="alert">{e}</p>', e=error) if error else "",
            me=self.address(req.user), max_size=human_size(self.cfg.mail.max_message_bytes),
            max_files=human_size(self.cfg.mail.max_message_bytes * 3 // 4),
            max_bytes=self.cfg.mail.max_message_bytes)
        title = "New message" if not draft.subject else draft.subject
        return self.mail_page(req, title, body, status=status, active_folder="compose", js=("mail.js",))

    def drive_picker(self, req, chosen: set[str] = frozenset()) -> Markup | str:
        files = drive_files(self.ctx, req.user)
        if not files:
            return ""
        # A file the mail limit cannot take, once encoded, is shown but cannot
        # be ticked: it was refused only after Send (UX QA). Its size is known
        # here; mail.js adds the ticked ones' sizes to the chosen files'.
        limit = self.cfg.mail.max_message_bytes

        def item(ref: str, path: str, size: int) -> Markup:
            too_large = mail_size(size) > limit
            return render(DRIVE_ITEM, ref=ref, path=path, size=human_size(size), bytes=size,
                          checked="checked" if ref in chosen and not too_large else "",
                          disabled="disabled" if too_large else "",
                          note=" \u00b7 too large for mail" if too_large else "")
        items = Markup("".join(item(*f) for f in files))
        return render(DRIVE_BLOCK, items=items, open="open" if chosen else "")

    def send(self, req) -> Response:
        limit = self.cfg.mail.max_message_bytes
        fields: dict[str, list[str]] = {}
        uploads: list[Attachment] = []
        total = 0
        field_bytes = 0
        too_large = None  # (name, size) of the first file that did not fit
        dropped = 0
        for part in req.multipart():
            if part.filename is not None:
                if part.name != "attachment":
                    _drain(part)
                    continue
                data, size = _read_attachment(part, limit - total, MAX_DROPPED_BYTES - dropped)
                if data is None:
                    dropped += size
                    too_large = too_large or (part.filename or "attachment", size)
                    continue
                if part.filename == "" and not data:
                    continue  # an empty file input
                total += len(data)
                uploads.append(Attachment(part.filename, part.content_type or "", data))
            else:
                data = _read_bounded(part, MAX_FORM_FIELD_BYTES)
                field_bytes += len(data)
                if field_bytes > MAX_FORM_FIELDS_BYTES:
                    raise HTTPError(413, "That message is too long.")
                fields.setdefault(part.name or "", []).append(data.decode("utf-8", "replace"))

        def field(name: str) -> str:
            return fields.get(name, [""])[0]

        draft = Draft(to=field("to"), cc=field("cc"), subject=field("subject"), body=field("body"),
                      in_reply_to=field("in_reply_to"), references=field("references"))
        fwd = None
        fwd_checked = {int(v) for v in fields.get("fwd_part", []) if v.isdigit() and len(v) < 7}
        try:
            if field("fwd"):
                fwd = self.source_of(req, field("fwd"))
            if too_large is not None:
                name, size = too_large
                raise ComposeError(
                    f"\u201c{name}\u201d ({human_size(size)}) is larger than the {human_size(limit)} mail limit."
                    if size > limit else
                    f"\u201c{name}\u201d ({human_size(size)}) does not fit: the files attached from your "
                    f"computer can be at most {human_size(limit)} in all.")
            to = webmail.parse_recipients(draft.to, self.domain)
            cc = webmail.parse_recipients(draft.cc, self.domain)
            attachments = list(uploads)
            if fwd is not None and fwd_checked:
                attachments += [Attachment(*got) for got in webmail.attachments_bytes(fwd[3], fwd_checked)]
            attachments += self.drive_attachments(req, fields.get("drive_file", []),
                                                  room=limit - sum(len(a.data) for a in attachments))
            if sum(len(a.data) for a in attachments) > limit:
                raise ComposeError(f"The attachments are larger than the {human_size(limit)} limit.")
            raw = webmail.build_message(
                sender=self.address(req.user), to=to, cc=cc, subject=draft.subject, body=draft.body,
                attachments=attachments, in_reply_to=draft.in_reply_to or None,
                references=draft.references.split(), domain=self.domain)
            if len(raw) > limit:
                raise ComposeError(f"The message is {human_size(len(raw))}, over the {human_size(limit)} limit.")
            result = webmail.send(self.store, self.accounts, req.user, self.domain, to + cc, raw,
                                  send_key=field("send_key"))
        except ComposeError as e:
            error = str(e)
            if uploads or too_large is not None:
                error += " (Please choose the files to attach again.)"
            return self.compose_page(req, draft, error=error, fwd=fwd, status=413 if too_large else 400,
                                     fwd_checked=fwd_checked, drive_chosen=set(fields.get("drive_file", [])),
                                     send_key=field("send_key"))
        log.info("web mail from %s: %d local, %d remote recipients, %d bytes", req.user, len(result.local),
                 len(result.remote), len(raw))
        return redirect(f"/mail/sent?sent={result.sent_id}")

    def drive_attachments(self, req, refs: list[str], room: int) -> list[Attachment]:
        """The drive files chosen in the form (`<folder id>/<name>` references,
        each once), read only while they fit in `room` bytes together: each
        size is checked before its file is read, so a form naming twenty
        25 MiB files costs no 500 MiB of memory before it is refused."""
        refs = list(dict.fromkeys(r for r in refs if r))
        if not refs:
            return []
        if len(refs) > MAX_DRIVE_ATTACHMENTS:
            raise ComposeError(f"At most {MAX_DRIVE_ATTACHMENTS} files from the drive per message.")
        out = []
        limit = self.cfg.mail.max_message_bytes
        for ref in refs:
            got = drive_file(self.ctx, req.user, ref, limit, room)
            if got is None:
                raise ComposeError(f"\u201c{ref.partition('/')[2]}\u201d, chosen from your drive, no longer exists "
                                   f"(deleted or moved meanwhile?).")
            out.append(Attachment(*got))
            room -= len(got[2])
        return out


class PreviewCache:
    """A bounded least-recently-used map, safe to share between request threads."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


# -- the drive (src/drive.py), used read-only -----------------------------------

MAX_PICKER_FILES = 200      # files offered in the compose form's drive picker
MAX_PICKER_FOLDERS = 100    # folders walked to find them


def drive_files(ctx, user: str) -> list[tuple[str, str, int]]:
    """(reference, path, size) of the user's drive files, for the attach picker.

    A reference is `<folder id>/<name>`: how the drive names a file.
    """
    from src.drive import DriveError
    drive = ctx.drive   # the drive app's, set when it registered
    out: list[tuple[str, str, int]] = []
    try:
        folders = drive.folders(user, limit=MAX_PICKER_FOLDERS)
    except DriveError:
        return out
    paths: dict[int, str] = {}
    for folder_id, name, depth in folders:
        path = (paths.get(depth - 1, "") + "/" + name) if depth else ""
        paths[depth] = path
        try:
            entries = drive.listing(user, folder_id)
        except DriveError:
            continue
        for e in entries:
            if not e.is_folder:
                out.append((f"{folder_id}/{e.name}", f"{path}/{e.name}".lstrip("/"), e.size))
                if len(out) >= MAX_PICKER_FILES:
                    return out
    return out


def mail_size(n: int) -> int:
    """About how many bytes a file of `n` takes in a message: base64 (4 for
    every 3) with a line break every 76 characters (mail.js estimates alike)."""
    return -(-n // 3) * 4 * 78 // 76


def drive_file(ctx, user: str, ref: str, limit: int, room: int) -> tuple[str, str, bytes] | None:
    """(name, content type, bytes) of one of the user's drive files, or None.

    ComposeError, before anything is read, if the file is larger than the
    mail limit `limit`, or than the `room` the message has left.
    """
    from src.drive import DriveError
    folder_id, _, name = ref.partition("/")
    drive = ctx.drive   # the drive app's, set when it registered
    try:
        e = drive.entry(user, folder_id, name)
        if e.is_folder:
            return None
        if e.size > limit:
            raise ComposeError(f"“{e.name}” is larger than the {human_size(limit)} mail limit.")
        if e.size > room:
            raise ComposeError(f"The attachments are larger than the {human_size(limit)} limit.")
        return e.name, e.type, b"".join(drive.read(user, e))
    except DriveError:
        return None


# -- small helpers ---------------------------------------------------------------

def _drain(part) -> None:
    while part.read(READ_CHUNK):
        pass


def _read_attachment(part, room: int, max_dropped: int) -> tuple[bytes | None, int]:
    """(content, size) of an uploaded file; the content is None if the file
    is over `room`. Such a file is still read to its end, keeping nothing, so
    the form can be answered (413 if more than `max_dropped` bytes of it)."""
    buf = bytearray()
    size = 0
    while True:
        chunk = part.read(READ_CHUNK)
        if not chunk:
            return (bytes(buf) if size <= room else None), size
        size += len(chunk)
        if size <= room:
            buf += chunk
        elif size - room > max_dropped:
            raise HTTPError(413, "That is too large to send by mail.")
        elif buf:
            buf = bytearray()  # over the limit: keep nothing of it


def _read_bounded(part, limit: int) -> bytes:
    """A part's content; 413 (after nothing more is buffered) if over `limit`."""
    buf = bytearray()
    while True:
        chunk = part.read(READ_CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise HTTPError(413, "That is too large to send by mail.")


def page_arg(req) -> int:
    """The folder page a message was opened from (`?page=`, or the forms'
    `page` field), so that Back, Delete and Mark unread return there."""
    try:
        raw = req.arg("page") if req.method in ("GET", "HEAD") else (req.field("page") or req.arg("page"))
        return max(1, min(int(raw or 1), 1_000_000))
    except (ValueError, TypeError):
        return 1


def folder_link(slug: str, page: int, extra: str = "") -> str:
    base = "/mail" if slug == "inbox" else "/mail/sent"
    query = "&".join(q for q in (f"page={page}" if page > 1 else "", extra) if q)
    return base + (f"?{query}" if query else "")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def short_date(header: str, received: float, now: float) -> str:
    """"14:05" today, "22 Nov" this year, "22 Nov 2025" before (UTC)."""
    when = None
    if header:
        try:
            from email.utils import parsedate_to_datetime
            when = parsedate_to_datetime(header)
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
        except (TypeError, ValueError, IndexError):
            when = None
    if when is None:
        when = dt.datetime.fromtimestamp(received or 0, dt.timezone.utc)
    when = when.astimezone(dt.timezone.utc)
    today = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    if when.date() == today.date():
        return when.strftime("%H:%M")
    if when.year == today.year:
        return when.strftime("%d %b").lstrip("0")
    return when.strftime("%d %b %Y").lstrip("0")


def arrival_time(received: float) -> str:
    """When the store got a message, written like a Date header (in GMT)."""
    return format_datetime(dt.datetime.fromtimestamp(received or 0, dt.timezone.utc), usegmt=True)


# -- templates -----------------------------------------------------------------

LAYOUT = """<div class="mail">
<nav class="mail-side">{side}</nav>
<section class="mail-main">{main}</section>
</div>"""

SIDEBAR = """<a class="button mail-compose" href="/mail/compose">✎ Compose</a>
<ul>
<li><a class="{inbox_cls}" href="/mail">Inbox{unread}</a></li>
<li><a class="{sent_cls}" href="/mail/sent">Sent</a></li>
</ul>"""

FOLDER_PAGE = """<header class="mail-head"><h1>{title}</h1>
<span class="mail-muted">{count}{unread}</span></header>
{notice}{table}{pager}"""

TABLE = """<table class="mail-list">
<thead><tr><th class="mail-col-mark"></th><th class="mail-col-who">{who_label}</th><th class="mail-col-subject">Subject</th>
<th class="mail-col-date">Date</th></tr></thead>
<tbody>{rows}</tbody></table>"""

ROW = """<tr class="{cls}">
<td class="mail-col-mark">{mark}</td>
<td class="mail-col-who"><a href="{href}">{who}</a></td>
<td class="mail-col-subject"><a href="{href}"><span class="mail-subject">{subject}</span>
<span class="mail-preview">{preview}</span></a></td>
<td class="mail-col-date" title="{full_date}">{date}</td>
</tr>"""

EMPTY = """<p class="mail-empty">{what}</p>"""

PAGER = """<nav class="mail-pager">{prev} <span>Page {n} of {pages}</span> {next}</nav>"""

HEAD_ROW = """<tr><th>{k}</th><td>{v}</td></tr>"""

ARRIVAL_ROW = """<tr><th>Received</th><td>{when} <span class="mail-muted">(the message has no Date header; \
this is when it arrived)</span></td></tr>"""

UNREAD_FORM = """<form method="post" action="/mail/{slug}/{id}/unread" class="mail-inline">{csrf}<input type="hidden" name="page" value="{page}"><button type="submit">Mark unread</button></form>"""

VIEW = """<article class="mail-message">
<header class="mail-head"><h1>{subject}</h1></header>
<div class="mail-actions">
<a class="button" href="/mail/compose?reply={slug}/{id}">↩ Reply</a>
<a class="button" href="/mail/compose?replyall={slug}/{id}">↩ Reply all</a>
<a class="button" href="/mail/compose?forward={slug}/{id}">↪ Forward</a>
{unread_form}
<form method="post" action="/mail/{slug}/{id}/delete" class="mail-inline" data-confirm="Delete this message? This cannot be undone.">{csrf}<input type="hidden" name="page" value="{page}"><button type="submit" class="danger">Delete</button></form>
<a class="mail-back" href="{back}">← Back to {folder}</a>
</div>
<table class="mail-headers">
<tr><th>From</th><td>{from_}</td></tr>
<tr><th>To</th><td>{to}</td></tr>
{cc_row}
{date_row}
</table>
{attachments}
<div class="mail-body">{toggle}{content}</div>
<p class="mail-muted mail-source"><a href="/mail/{slug}/{id}/source">Download original (.eml)</a></p>
</article>"""

ATT_LIST = """<div class="mail-attachments"><h2>{n}</h2><ul>{items}</ul></div>"""

ATT_ITEM = """<li><a href="{href}">{name}</a> <span class="mail-muted">{type}, {size}</span></li>"""

COMPOSE = """<header class="mail-head"><h1>New message</h1><span class="mail-muted">from {me}</span></header>
{error}
<form class="mail-compose-form" method="post" action="/mail/send" enctype="multipart/form-data" \
data-max-bytes="{max_bytes}" data-max-size="{max_size}">
{csrf}
<input type="hidden" name="send_key" value="{send_key}">
<input type="hidden" name="in_reply_to" value="{in_reply_to}">
<input type="hidden" name="references" value="{references}">
<label>To <input type="text" name="to" value="{to}" placeholder="bob, carol@example.com" autocomplete="off"></label>
<label>Cc <input type="text" name="cc" value="{cc}" placeholder="(optional)" autocomplete="off"></label>
<label>Subject <input type="text" name="subject" value="{subject}"></label>
<textarea name="body" rows="16" aria-label="Message">{body}</textarea>
{fwd}
<fieldset class="mail-attach"><legend>Attach files from your computer</legend>
<input type="file" name="attachment" multiple>
<span class="mail-muted">Up to {max_size} in all, once encoded for mail (files grow by a third: about {max_files} of files).</span>
<p class="mail-error mail-too-large" role="alert" hidden></p></fieldset>
{drive}
<div class="mail-actions"><button type="submit" class="primary">Send</button>
<a href="/mail">Cancel</a></div>
</form>"""

FWD_BLOCK = """<fieldset class="mail-attach"><legend>Attachments of the forwarded message</legend>
<input type="hidden" name="fwd" value="{ref}">{items}</fieldset>"""

FWD_ITEM = """<label class="mail-check"><input type="checkbox" name="fwd_part" value="{index}" {checked}> {name} <span class="mail-muted">({size})</span></label>"""

DRIVE_BLOCK = """<details class="mail-attach" {open}><summary>Attach files from your drive</summary>{items}</details>"""

DRIVE_ITEM = """<label class="mail-check"><input type="checkbox" name="drive_file" value="{ref}" {checked} {disabled} data-size="{bytes}"> <span class="mail-path">{path}</span> <span class="mail-muted">({size}{note})</span></label>"""


def register(router, ctx) -> None:
    app = MailApp(ctx)

    @router.route("GET", "/mail")
    def inbox(req):
        return app.folder_view(req, "inbox")

    @router.route("GET", "/mail/sent")
    def sent(req):
        return app.folder_view(req, "sent")

    @router.route("GET", "/mail/compose")
    def compose(req):
        return app.compose(req)

    @router.route("POST", "/mail/send")
    def send(req):
        return app.send(req)

    @router.route("GET", "/mail/<folder>/<msg_id>")
    def view(req, folder, msg_id):
        return app.view(req, folder, msg_id)

    @router.route("GET", "/mail/<folder>/<msg_id>/part/<index>")
    def part(req, folder, msg_id, index):
        return app.part(req, folder, msg_id, index)

    @router.route("GET", "/mail/<folder>/<msg_id>/source")
    def source(req, folder, msg_id):
        return app.source(req, folder, msg_id)

    @router.route("POST", "/mail/<folder>/<msg_id>/delete")
    def delete(req, folder, msg_id):
        return app.delete(req, folder, msg_id)

    @router.route("POST", "/mail/<folder>/<msg_id>/unread")
    def unread(req, folder, msg_id):
        return app.unread(req, folder, msg_id)
