"""The drive pages: folders, uploads, downloads, previews (docs/drive.md).

Routes (every one needs a log-in; every POST needs the CSRF token):

    GET  /drive                              the root folder
    GET  /drive/f/<folder>                   a folder (?sort=name|size|date, &desc=1)
    GET  /drive/file/<folder>/<name>         download (attachment); Range, ETag, HEAD
    GET  /drive/view/<folder>/<name>         the bytes for an inline preview (safe types only)
    GET  /drive/item/<folder>/<name>         preview + rename / move / delete forms (?do=...)
    POST /drive/upload/<folder>              multipart: csrf, file (one or many)
    POST /drive/mkdir/<folder>               name
    POST /drive/rename/<folder>              name, new_name [, id]
    POST /drive/move/<folder>                name, dest [, id]
    POST /drive/delete/<folder>              name [, id]

A POST answers `303` back to the folder with a message, or, when the request
says `Accept: application/json` (the page's JavaScript), JSON. A refused
request answers its status (400 bad name, 404 unknown item, 409 name taken or
bad move, 413 over quota) with the folder page and the message, so it all
works with plain forms.

Items are addressed by the folder id and the name (a name is unique in its
folder); the optional `id` field makes an action fail if the name now means a
different item. Every call into src/drive.py passes `req.user`, which is what
scopes it: another user's folder ids simply do not exist for this user.

Files are served with `X-Content-Type-Options: nosniff` and a CSP sandbox;
HTML, SVG and anything else that could run script on our origin is never
served inline with its own type (the preview shows it as text).
"""

from __future__ import annotations

import codecs
import hmac
import logging
import random
import re
import threading
import time
import weakref
from urllib.parse import quote, urlencode

from httpserver.templates import Markup, csrf_field, page, render
from httpserver.web import (BodyCut, HTTPError, Response, content_disposition, etag_matches, http_date,
                            json_response, parse_range, range_applies, redirect, sign)
from src.drive import Drive, DriveError, Entry, ItemNotFound, Usage, human_size
from src.kv import KVError

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024           # how much of an upload we take from the socket at a time
TEXT_PREVIEW_BYTES = 64 * 1024   # a text preview shows at most this much
SWEEP_INTERVAL_S = 30.0
SWEEPER_TICK_S = 1.0             # how often the sweeper thread looks whether its frontend stopped

# Served inline with their own type for previews: none of these can run script.
INLINE_TYPES = {
    "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/avif", "image/x-icon",
    "image/vnd.microsoft.icon", "application/pdf", "text/plain",
}
INLINE_PREFIXES = ("video/", "audio/")
# Shown as text in the preview (and served as text/plain by /view).
TEXT_TYPES = {"application/json", "application/xml", "application/javascript", "application/x-sh",
              "application/x-python", "application/toml", "application/x-yaml", "image/svg+xml",
              "application/x-tex", "application/sql"}
TEXT_SUFFIXES = (".md", ".py", ".c", ".h", ".go", ".rs", ".java", ".toml", ".yaml", ".yml", ".ini",
                 ".cfg", ".log", ".csv", ".tsv", ".sh", ".ts", ".sql", ".conf", ".txt")


def register(router, ctx) -> None:
    app = DriveApp(ctx)
    r = router.route
    r("GET", "/drive")(app.root_page)
    r("GET", "/drive/f/<folder>")(app.folder_page)
    r("GET", "/drive/file/<folder>/<name>")(app.download)
    r("GET", "/drive/view/<folder>/<name>")(app.view)
    r("GET", "/drive/item/<folder>/<name>")(app.item_page)
    r("POST", "/drive/upload/<folder>")(app.upload)
    r("POST", "/drive/mkdir/<folder>")(app.mkdir)
    r("POST", "/drive/rename/<folder>")(app.rename)
    r("POST", "/drive/move/<folder>")(app.move)
    r("POST", "/drive/delete/<folder>")(app.delete)
    app.start_sweeper()


def folder_url(folder: str, root: str | None = None, **query) -> str:
    base = "/drive" if folder == root else f"/drive/f/{folder}"
    q = {k: v for k, v in query.items() if v}
    return base + ("?" + urlencode(q) if q else "")


def item_url(kind: str, folder: str, name: str) -> str:
    return f"/drive/{kind}/{folder}/{quote(name, safe='')}"


def icon_of(e: Entry) -> str:
    if e.is_folder:
        return "folder"
    t = e.type
    name = e.name.lower()
    if t == "application/pdf":
        return "pdf"
    if t.startswith("image/"):
        return "image"
    if t.startswith("video/"):
        return "video"
    if t.startswith("audio/"):
        return "audio"
    if t in ("application/zip", "application/gzip", "application/x-tar", "application/x-7z-compressed",
             "application/x-bzip2", "application/x-xz", "application/x-rar-compressed", "application/vnd.rar") \
            or name.endswith((".tar.gz", ".tgz", ".zst")):
        return "archive"
    if t in ("text/html", "text/css", "application/javascript", "text/javascript", "application/json",
             "text/x-python", "application/x-sh", "text/x-c", "application/xml", "text/xml") \
            or name.endswith((".py", ".c", ".h", ".go", ".rs", ".java", ".ts", ".sh", ".js", ".json")):
        return "code"
    if t.startswith("text/") or name.endswith(TEXT_SUFFIXES):
        return "text"
    return "file"


def preview_kind(e: Entry) -> str | None:
    t = e.type
    if t.startswith("image/") and t in INLINE_TYPES:
        return "image"
    if t.startswith("video/"):
        return "video"
    if t.startswith("audio/"):
        return "audio"
    if t == "application/pdf":
        return "pdf"
    if t.startswith("text/") or t in TEXT_TYPES or e.name.lower().endswith(TEXT_SUFFIXES):
        return "text"
    return None


def fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + " UTC"


def wants_json(req) -> bool:
    return "application/json" in (req.headers.get("Accept") or "")


class DriveApp:
    def __init__(self, ctx):
        cfg = ctx.config.drive
        self.drive = Drive(ctx.kv, chunk_bytes=cfg.chunk_bytes, quota_bytes=cfg.quota_bytes)
        self.ctx = ctx
        ctx.drive = self.drive  # shared with the other apps (mail attaches drive files)

    # -- the sweeper ------------------------------------------------------------------

    def start_sweeper(self) -> None:
        """Every frontend sweeps the drive journal now and then (docs/drive.md),
        until it stops (`ctx.stop`). The thread holds only a weak reference
        to the app, so a frontend that is never stopped (a test's) does not
        live on through it."""
        ref = weakref.ref(self)
        stop = self.ctx.stop
        interval = SWEEP_INTERVAL_S

        def loop():
            # Start at a random point so frontends started together do not sweep in step.
            next_sweep = time.monotonic() + random.uniform(min(1.0, interval), interval)
            while not stop.wait(SWEEPER_TICK_S):
                if time.monotonic() < next_sweep:
                    continue
                next_sweep = time.monotonic() + interval
                app = ref()
                if app is None:
                    return
                try:
                    app.drive.sweep()
                except Exception:
                    log.warning("drive sweep failed; will retry", exc_info=True)
                del app

        threading.Thread(target=loop, name="drive-sweeper", daemon=True).start()

    # -- pages -------------------------------------------------------------------------

    def root_page(self, req):
        return self.folder_page(req, self._root(req))

    def folder_page(self, req, folder, *, error: str | None = None, status: int = 200):
        user = req.user
        try:
            crumbs = self.drive.breadcrumbs(user, folder)
            items = self.drive.listing(user, folder)
            usage = self.drive.usage(user)
        except DriveError as e:
            raise HTTPError(e.status, str(e)) from None
        except KVError:
            raise HTTPError(503, "The storage is not reachable right now; please try again in a moment.") from None
        sort = req.arg("sort", "name")
        desc = req.arg("desc") == "1"
        items = sort_items(items, sort, desc)
        root = crumbs[0][0]
        title = crumbs[-1][1] or "My Drive"
        body = render(
            '<div class="drive-page"><div class="drive-head">{crumbs}{quota}</div>\n{notices}\n'
            '<div class="drive-tools">\n'
            '<form id="upload-form" method="post" action="/drive/upload/{folder}" enctype="multipart/form-data">'
            '{csrf}<label for="file-input">Upload files</label>'
            '<input id="file-input" type="file" name="file" multiple>'
            '<button type="submit" class="primary">Upload</button></form>\n'
            '<form method="post" action="/drive/mkdir/{folder}" class="mkdir">{csrf}'
            '<label for="folder-name">New folder</label>'
            '<input id="folder-name" type="text" name="name" required maxlength="255" placeholder="Folder name">'
            '<button type="submit">Create</button></form>\n'
            '</div>\n<p class="drive-hint">You can also drop files anywhere on this page.</p>\n'
            '<ul id="uploads" hidden aria-live="polite"></ul>\n'
            '<div id="drop-overlay" hidden><span>Drop files to upload them here</span></div>\n'
            '{table}</div>',
            crumbs=self._crumbs(crumbs, root), quota=quota_bar(usage),
            notices=notices(*self._messages(req), error),
            folder=folder, csrf=csrf_field(req), table=self._table(req, folder, root, items, sort, desc))
        return page(req, title, body, active="drive", css=("drive.css",), js=("drive.js",), status=status)

    @staticmethod
    def _messages(req) -> tuple[str | None, str | None]:
        """The ?ok= / ?err= message of a redirect, shown only if this session signed it
        (so a link from elsewhere cannot put its own words on our page)."""
        sig = req.arg("sig") or ""
        ok, err = req.arg("ok"), req.arg("err")
        return (ok if ok and hmac.compare_digest(sig, sign(req, "ok", ok)) else None,
                err if err and hmac.compare_digest(sig, sign(req, "err", err)) else None)

    def _crumbs(self, crumbs, root) -> Markup:
        parts = []
        for i, (fid, name) in enumerate(crumbs):
            label = name or "My Drive"
            if i == len(crumbs) - 1:
                parts.append(render('<li aria-current="page">{label}</li>', label=label))
            else:
                parts.append(render('<li><a href="{href}">{label}</a></li>', href=folder_url(fid, root), label=label))
        return render('<nav aria-label="Folder path"><ol class="crumbs">{p}</ol></nav>', p=Markup("").join(parts))

    def _table(self, req, folder, root, items, sort, desc) -> Markup:
        if not items:
            return Markup('<p class="empty">This folder is empty. Upload files or create a folder above.</p>')

        def head(key, label, cls=""):
            on = sort == key
            href = folder_url(folder, root, sort=key, desc="1" if on and not desc else "")
            c = "sorted" + (" desc" if desc else "") if on else ""
            return render('<th class="{cls}" scope="col"><a href="{href}" class="{c}">{label}</a></th>',
                          cls=cls, href=href, c=c, label=label)

        rows = []
        for e in items:
            if e.is_folder:
                href = folder_url(e.id, root)
                size = "—"
            else:
                href = item_url("file", folder, e.name)
                size = human_size(e.size)
            rows.append(render(
                '<tr data-kind="{kind}"><td class="name"><a class="item" href="{href}">'
                '<i class="icon icon-{icon}" aria-hidden="true"></i><span>{name}</span></a></td>'
                '<td class="size">{size}</td><td class="date"><time datetime="{iso}">{date}</time></td>'
                '<td class="actions">{open}'
                '<a href="{item}?do=rename" data-action="rename" data-name="{name}" data-id="{id}" '
                'data-post="/drive/rename/{folder}">Rename</a>'
                '<a href="{item}?do=move">Move</a>'
                '<a href="{item}?do=delete" class="danger" data-action="delete" data-kind="{kind}" '
                'data-name="{name}" data-id="{id}" data-post="/drive/delete/{folder}">Delete</a>'
                '<a href="{item}" class="more" title="Actions" aria-label="Actions for {name}">\u22ef</a></td></tr>',
                kind=e.kind, href=href, icon=icon_of(e),
                name=e.name, size=size, iso=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.mtime)),
                date=fmt_time(e.mtime), id=e.id, folder=folder, item=item_url("item", folder, e.name),
                open=Markup("") if e.is_folder else render('<a href="{u}">Preview</a>',
                                                           u=item_url("item", folder, e.name))))
        return render('<table class="items"><thead><tr>{h1}{h2}{h3}<th scope="col"><span class="sr-only">'
                      'Actions</span></th></tr></thead><tbody>{rows}</tbody></table>',
                      h1=head("name", "Name"), h2=head("size", "Size", "size"), h3=head("date", "Modified", "date"),
                      rows=Markup("").join(rows))

    def item_page(self, req, folder, name):
        user = req.user
        try:
            e = self.drive.entry(user, folder, name)
            crumbs = self.drive.breadcrumbs(user, folder)
            folders = self.drive.folders(user)
        except DriveError as err:
            raise HTTPError(err.status, str(err)) from None
        root = crumbs[0][0]
        focus = req.arg("do", "")
        # The folder picker: every folder, indented; not the item itself or anything inside it.
        options, skip_depth = [], None
        for fid, fname, depth in folders:
            if skip_depth is not None:
                if depth > skip_depth:
                    continue
                skip_depth = None
            if fid == e.id:
                skip_depth = depth
                continue
            # An <option> collapses spaces and cannot be styled: no-break spaces keep a name's own.
            label = ("\u00a0\u00a0\u00a0" * depth) + (fname or "My Drive").replace(" ", "\u00a0")
            # The folder the item is in cannot be chosen (moving there does
            # nothing: the picker used to start on it, and Move "worked").
            options.append(render('<option value="{v}"{dis}>{label}</option>', v=fid,
                                  dis=Markup(" disabled" if fid == folder else ""),
                                  label=label + (" (here)" if fid == folder else "")))
        try:
            # Reads the file (a text preview): another tab may have deleted it
            # since the entry was read, which is a 404 like any other, not a 500.
            preview = self._preview(req, folder, e)
        except DriveError as err:
            raise HTTPError(err.status, str(err)) from None
        meta = ("Folder" if e.is_folder else f"{human_size(e.size)} · {e.type}") + f" · modified {fmt_time(e.mtime)}"
        what = "folder" if e.is_folder else "file"
        body = render(
            '<div class="drive-page"><div class="drive-head">{crumbs}</div>\n'
            '<h1>{name}</h1><p class="item-meta">{meta}</p>{actions}\n{preview}\n'
            '<div class="item-forms">\n'
            '<form method="post" action="/drive/rename/{folder}" class="{f_rename}">{csrf}'
            '<h2>Rename</h2><input type="hidden" name="name" value="{name}"><input type="hidden" name="id" value="{id}">'
            '<label for="new-name">New name</label>'
            '<input id="new-name" type="text" name="new_name" value="{name}" required maxlength="255">'
            '<button type="submit">Rename</button></form>\n'
            '<form method="post" action="/drive/move/{folder}" class="{f_move}">{csrf}'
            '<h2>Move</h2><input type="hidden" name="name" value="{name}"><input type="hidden" name="id" value="{id}">'
            '<label for="dest">Move to folder</label><select id="dest" name="dest" required>'
            '<option value="" selected disabled>Choose a folder…</option>{options}</select>'
            '<button type="submit">Move</button></form>\n'
            '<form method="post" action="/drive/delete/{folder}" class="{f_delete}">{csrf}'
            '<h2>Delete</h2><input type="hidden" name="name" value="{name}"><input type="hidden" name="id" value="{id}">'
            '<p>Delete the {what} \u201c{name}\u201d{rest}? This cannot be undone.</p>'
            '<button type="submit" class="danger">Delete permanently</button></form>\n'
            '</div>\n<p><a href="{back}">\u2190 Back to the folder</a></p></div>',
            crumbs=self._crumbs(crumbs + [("", e.name)], root), name=e.name, meta=meta,
            actions=Markup("") if e.is_folder else render(
                '<p class="item-actions"><a class="button" href="{dl}">Download</a> '
                '<a href="{view}" target="_blank" rel="noopener">Open in a new tab</a></p>',
                dl=item_url("file", folder, e.name), view=item_url("view", folder, e.name)),
            preview=preview, folder=folder, csrf=csrf_field(req), id=e.id, options=Markup("").join(options),
            f_rename="focus" if focus == "rename" else "", f_move="focus" if focus == "move" else "",
            f_delete="focus" if focus == "delete" else "", what=what,
            rest=" and everything in it" if e.is_folder else "", back=folder_url(folder, root))
        return page(req, e.name, body, active="drive", css=("drive.css",))

    def _preview(self, req, folder, e: Entry) -> Markup:
        if e.is_folder:
            return render('<p><a class="button" href="{u}">Open the folder</a></p>', u=folder_url(e.id))
        kind = preview_kind(e)
        src = item_url("view", folder, e.name)
        if kind == "image":
            return render('<div class="preview"><img src="{s}" alt="{n}"></div>', s=src, n=e.name)
        if kind == "video":
            return render('<div class="preview"><video src="{s}" controls preload="metadata"></video></div>', s=src)
        if kind == "audio":
            return render('<div class="preview"><audio src="{s}" controls preload="metadata"></audio></div>', s=src)
        if kind == "pdf":
            return render('<div class="preview"><iframe src="{s}" title="{n}"></iframe></div>', s=src, n=e.name)
        if kind == "text":
            if e.size == 0:
                return Markup('<div class="preview"><p>This file is empty.</p></div>')
            data = b"".join(bytes(p) for p in self.drive.read(req.user, e, 0, min(e.size, TEXT_PREVIEW_BYTES) - 1))
            more = render('<p class="item-meta">Showing the first {n}.</p>', n=human_size(TEXT_PREVIEW_BYTES)) \
                if e.size > TEXT_PREVIEW_BYTES else Markup("")
            return render('<div class="preview"><pre>{t}</pre></div>{more}',
                          t=text_of(data, cut=e.size > len(data)), more=more)
        return Markup('<div class="preview"><p>No preview for this kind of file; download it to open it.</p></div>')

    # -- downloads -------------------------------------------------------------------------

    def download(self, req, folder, name):
        return self._send(req, folder, name, inline=False)

    def view(self, req, folder, name):
        return self._send(req, folder, name, inline=True)

    def _send(self, req, folder, name, inline: bool):
        try:
            e = self.drive.entry(req.user, folder, name)
        except DriveError as err:
            raise HTTPError(err.status, str(err)) from None
        if e.is_folder:
            return redirect(folder_url(e.id))
        ctype = e.type or "application/octet-stream"
        csp = "sandbox; default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'"
        if inline:
            if ctype in INLINE_TYPES or ctype.startswith(INLINE_PREFIXES):
                disposition = "inline"
                if ctype == "application/pdf":
                    csp = None  # Chromium's PDF viewer does not run in a sandboxed document
            elif preview_kind(e) == "text":
                ctype, disposition = "text/plain", "inline"
            else:
                disposition = "attachment"
        else:
            disposition = "attachment"
        if ctype.startswith("text/") and "charset" not in ctype:
            ctype += "; charset=utf-8"
        etag = f'"{e.id}"'
        headers = [
            ("Content-Disposition", content_disposition(e.name, inline=disposition == "inline")),
            ("X-Content-Type-Options", "nosniff"),
            ("ETag", etag),
            ("Last-Modified", http_date(e.mtime)),
            ("Accept-Ranges", "bytes"),
            ("Cache-Control", "private, no-cache"),
        ]
        if csp:
            headers.append(("Content-Security-Policy", csp))
        if etag_matches(req.headers.get("If-None-Match"), etag):  # a file's bytes never change under one id
            return Response(304, headers=headers)
        start, end, status = 0, e.size - 1, 200
        rng = req.headers.get("Range")
        if rng and range_applies(req, etag, None):  # If-Range: only our strong ETag keeps the range
            try:
                r = parse_range(rng, e.size)
            except HTTPError:
                return Response(416, headers=headers + [("Content-Range", f"bytes */{e.size}")],
                                content_type="text/plain; charset=utf-8",
                                body=b"The requested range is not within the file.\n")
            if r is not None:
                start, end = r
                status = 206
                headers.append(("Content-Range", f"bytes {start}-{end}/{e.size}"))
        length = max(0, end - start + 1)
        body = _cut_if_deleted(self.drive.read(req.user, e, start, end)) if length else b""
        return Response(status, body=body, headers=headers, content_type=ctype, content_length=length)

    # -- actions ------------------------------------------------------------------------------

    def _root(self, req) -> str:
        try:
            return self.drive.root(req.user)
        except KVError:
            raise HTTPError(503, "The storage is not reachable right now; please try again in a moment.") from None

    def _done(self, req, folder, message: str, **extra):
        if wants_json(req):
            return json_response(dict(ok=True, message=message, **extra))
        return redirect(folder_url(folder, self._root(req), ok=message, sig=sign(req, "ok", message)))

    def _refused(self, req, folder, err: Exception, status: int):
        msg = str(err)
        if wants_json(req):
            return json_response({"ok": False, "error": msg}, status=status)
        try:
            return self.folder_page(req, folder, error=msg, status=status)
        except HTTPError:
            # The folder itself is gone (deleted in another tab, or never this
            # user's): My Drive with the message, and the same status, rather
            # than a bare error page that leads to the dashboard.
            return self.folder_page(req, self._root(req), error=msg, status=status)

    def _act(self, req, folder, action):
        """Run one form action with the errors every action shares."""
        try:
            return action()
        except DriveError as e:
            return self._refused(req, folder, e, e.status)
        except KVError:
            log.warning("drive action failed on the KV store", exc_info=True)
            return self._refused(req, folder, Exception(
                "The storage is not reachable right now; please try again in a moment."), 503)

    def mkdir(self, req, folder):
        f = req.form()
        name = first(f, "name")

        def act():
            e = self.drive.mkdir(req.user, folder, name)
            return self._done(req, folder, f"Created the folder \u201c{e.name}\u201d.", id=e.id, name=e.name)
        return self._act(req, folder, act)

    def rename(self, req, folder):
        f = req.form()
        name, new, expect = first(f, "name"), first(f, "new_name"), first(f, "id") or None

        def act():
            e = self.drive.rename(req.user, folder, name, new, expect)
            return self._done(req, folder, f"Renamed \u201c{name}\u201d to \u201c{e.name}\u201d.", name=e.name)
        return self._act(req, folder, act)

    def move(self, req, folder):
        f = req.form()
        name, dest, expect = first(f, "name"), first(f, "dest"), first(f, "id") or None

        def act():
            # The target's name first: read after the move, a target deleted
            # meanwhile (with what just landed in it) made a move that
            # happened answer 404.
            where = self.drive.breadcrumbs(req.user, dest)[-1][1] or "My Drive"
            e = self.drive.move(req.user, folder, name, dest, None, expect)
            return self._done(req, folder, f"Moved \u201c{e.name}\u201d to \u201c{where}\u201d.", name=e.name)
        return self._act(req, folder, act)

    def delete(self, req, folder):
        f = req.form()
        name, expect = first(f, "name"), first(f, "id") or None

        def act():
            e = self.drive.delete(req.user, folder, name, expect)
            return self._done(req, folder, f"Deleted \u201c{e.name}\u201d.", name=e.name)
        return self._act(req, folder, act)

    def upload(self, req, folder):
        """Each file part goes from the socket into chunks as it arrives (never whole in memory)."""
        user = req.user

        def act():
            self.drive.folder_meta(user, folder)
            length = req.headers.get("Content-Length")
            if length and length.isdigit():
                self.drive.check_fits(user, int(length))
            saved, failed = [], []
            for part in req.multipart():
                if part.filename is None:
                    continue  # csrf and any other plain field
                fname = upload_name(part.filename)
                if not fname:
                    continue  # the file input was left empty
                try:
                    up = self.drive.start_upload(user, folder, fname)
                except DriveError as e:
                    failed.append((fname, e))
                    continue
                try:
                    while True:
                        data = part.read(READ_BYTES)
                        if not data:
                            break
                        up.write(data)
                    saved.append(up.commit())
                except DriveError as e:
                    up.abort()
                    failed.append((fname, e))
                except BaseException:
                    up.abort()
                    raise
            if not saved and not failed:
                raise NoFiles("Choose one or more files to upload.")
            if failed and not saved:
                name, err = failed[0]
                raise type(err)(f"\u201c{name}\u201d was not uploaded: {err}" if len(failed) == 1 else
                                f"No file was uploaded: {err}")
            msg = upload_message(saved, failed)
            if wants_json(req):
                extra = {"name": saved[0].name, "id": saved[0].id, "size": saved[0].size} if len(saved) == 1 else {}
                return json_response(dict(ok=not failed, message=msg, saved=[e.name for e in saved],
                                          failed=[n for n, _ in failed], **extra),
                                     status=200 if not failed else 207)
            kind = "err" if failed else "ok"
            return redirect(folder_url(folder, self._root(req), **{kind: msg}, sig=sign(req, kind, msg)))
        return self._act(req, folder, act)


# A whole Windows path, as old browsers sent it: C:\...\name or \\server\...\name.
_WINDOWS_PATH = re.compile(r"(?:[A-Za-z]:|\\\\[^\\]+)\\")


def upload_name(filename: str) -> str:
    """The name to save an uploaded file under, from its form-data filename.

    Browsers send '"' in a file name as %22 (HTML's multipart encoding) and a
    backslash as it is: a backslash is part of the name (legal on Linux and
    macOS), so only a whole Windows path, which old browsers sent, is cut at
    backslashes. A "/" never is in a name: keep what follows the last one.
    """
    name = filename.replace("%22", '"')
    if _WINDOWS_PATH.match(name):
        name = name.rsplit("\\", 1)[-1]
    return name.rsplit("/", 1)[-1]


class NoFiles(DriveError):
    status = 400


def _cut_if_deleted(chunks):
    """A download whose file another tab deletes meanwhile is cut (the head
    and its length are out), logged as what it is, not as damage."""
    try:
        yield from chunks
    except ItemNotFound as e:
        raise BodyCut(str(e)) from None


def upload_message(saved: list[Entry], failed: list) -> str:
    parts = []
    if len(saved) == 1:
        parts.append(f"Uploaded \u201c{saved[0].name}\u201d ({human_size(saved[0].size)}).")
    elif saved:
        parts.append(f"Uploaded {len(saved)} files ({human_size(sum(e.size for e in saved))}).")
    for name, err in failed:
        parts.append(f"\u201c{name}\u201d was not uploaded: {err}")
    return " ".join(parts)


def first(form: dict, key: str) -> str:
    v = form.get(key) or [""]
    return v[0]


def sort_items(items: list[Entry], key: str, desc: bool) -> list[Entry]:
    """Folders stay above files whichever way the table is sorted."""
    if key == "size":
        k = lambda e: (e.size, e.name.casefold())  # noqa: E731
    elif key == "date":
        k = lambda e: (e.mtime, e.name.casefold())  # noqa: E731
    else:
        k = lambda e: (e.name.casefold(), e.name)  # noqa: E731
    folders = sorted((e for e in items if e.is_folder), key=k, reverse=desc)
    files = sorted((e for e in items if not e.is_folder), key=k, reverse=desc)
    return folders + files


def text_of(data: bytes, cut: bool) -> str:
    """A text file's bytes as text to show: UTF-16 or UTF-8 when a byte-order
    mark says so, else UTF-8 when they are UTF-8 (a character cut at the
    end of a preview excepted), else Windows-1252, as old editors wrote
    Latin-1 text (UX QA: "caf\ufffd" for a Latin-1 "café")."""
    for bom, codec in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                       (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return data.decode(codec, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if cut and e.start >= len(data) - 3:
            return data[:e.start].decode("utf-8", errors="replace")
        return data.decode("cp1252", errors="replace")


def quota_bar(u: Usage) -> Markup:
    # Rounded down, and with what is free once it is under a twentieth: "40 MiB
    # of 40 MiB used", a full bar and 100% said nothing of the 20 KB left.
    pct = int(100 * u.fraction)
    free = max(0, u.quota - u.used)
    return render('<div class="quota" title="{pct}% used"><div>{used} of {quota} used{left}</div>'
                  '<div class="quota-bar{full}" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
                  'aria-valuenow="{pct}" aria-label="Storage used"><span style="width: {pct}%"></span></div></div>',
                  pct=pct, used=human_size(u.used), quota=human_size(u.quota),
                  left=f" · {human_size(free)} free" if u.fraction >= 0.95 else "",
                  full=" full" if u.fraction >= 0.95 else "")


def notices(ok: str | None, err: str | None, error: str | None = None) -> Markup:
    """The page's messages: a redirect's (ok / err) and this request's own error."""
    err = error or err
    out = Markup("")
    if ok:
        out += render('<p class="notice ok" role="status">{m}</p>', m=ok)
    if err:
        out += render('<p class="notice error" role="alert">{m}</p>', m=err)
    return out
