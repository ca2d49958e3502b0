"""The small web framework every app of the frontends is written in.

    Request     what a handler sees: method, path, query, headers, cookies,
                the user and session, and the body as a stream
                (`read`, `form`, `multipart`)
    Response    status, headers and a body (bytes, or an iterable that is
                streamed); helpers html / text / redirect / json_response
    HTTPError   raise it from a handler to answer with a friendly error page
    Router      `@router.route("GET", "/drive/folder/<folder_id>")`, with
                log-in, admin and CSRF checks declared per route
    App         the dispatcher: route lookup, session, checks, error pages

The framework never buffers a request body: `read()` pulls from the socket
(through the HTTP codec), `form()` is capped at MAX_FORM_BYTES (413 above),
and `multipart()` yields parts whose content is streamed too.

Range and conditional GET helpers (`parse_range`, `not_modified`,
`http_date`) are here so every app that sends files answers the same way.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import logging
import mimetypes
import os
import re
import stat
import time
from typing import Callable, Iterable, Iterator
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from httpserver.http11 import REASONS, Headers
from httpserver.multipart import (NEED_DATA, Done, MultipartError, MultipartParser, PartData, PartEnd,
                                  PartStart, boundary_from_content_type, parse_header_params)
from src.kv import KVError

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 1024 * 1024
READ_CHUNK = 64 * 1024
CSRF_HEADER = "x-csrf-token"


class ClientGone(Exception):
    """The client closed or vanished while we were reading its request body."""


class BodyCut(Exception):
    """A response body that cannot go on for a reason that is not a bug (the
    file was deleted while it was being sent): the server cuts the
    connection, as for any failure after the head, but logs one INFO line
    instead of an ERROR with a traceback."""


class HTTPError(Exception):
    """Answer with `status` and a friendly page saying `message`."""

    def __init__(self, status: int, message: str = "", headers: Iterable[tuple[str, str]] = ()):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message or REASONS.get(status, "Error")
        self.headers = list(headers)


# -- the request ---------------------------------------------------------------

class Request:
    """One request. The body is a stream: read it once, with `read`, `form` or `multipart`."""

    def __init__(self, method: str, target: str, headers: Headers, body=None,
                 client_addr: str = "", version: str = "1.1"):
        self.method = method
        self.target = target
        self.headers = headers
        self.version = version
        self.client_addr = client_addr
        raw_path, _, self.query_string = target.partition("?")
        if raw_path.startswith(("http://", "https://")):  # absolute-form (proxies)
            raw_path = "/" + raw_path.split("/", 3)[3] if raw_path.count("/") >= 3 else "/"
        self.raw_path = raw_path
        self.path = unquote(raw_path, errors="replace")
        self._query: dict[str, list[str]] | None = None
        self._cookies: dict[str, str] | None = None
        self._body = body            # an object with read(n) -> bytes (b"" at the end)
        self._form: dict[str, list[str]] | None = None
        self._parts: Iterator["Part"] | None = None
        self.user: str | None = None
        self.session = None
        self.route = None
        self.params: dict[str, str] = {}
        self.ctx = None

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            self._query = parse_qs(self.query_string, keep_blank_values=True) if self.query_string else {}
        return self._query

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first query value of `name`."""
        v = self.query.get(name)
        return v[0] if v else default

    @property
    def cookies(self) -> dict[str, str]:
        if self._cookies is None:
            self._cookies = parse_cookies(self.headers.get_all("cookie"))
        return self._cookies

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").split(";", 1)[0].strip().lower()

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes of the body (all of it for n < 0); b"" at the end."""
        if self._body is None:
            return b""
        return self._body.read(n)

    def form(self) -> dict[str, list[str]]:
        """The urlencoded form body (cached); 413 over MAX_FORM_BYTES, 415 for another type."""
        if self._form is not None:
            return self._form
        ctype = self.content_type
        if ctype not in ("application/x-www-form-urlencoded", ""):
            raise HTTPError(415, "This page expects a form.")
        data = bytearray()
        while True:
            chunk = self.read(READ_CHUNK)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_FORM_BYTES:
                raise HTTPError(413, "The form is too large.")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "The form is not valid UTF-8.") from None
        self._form = parse_qs(text, keep_blank_values=True) if text else {}
        return self._form

    def field(self, name: str, default: str | None = None) -> str | None:
        """The first value of form field `name`."""
        v = self.form().get(name)
        return v[0] if v else default

    def multipart(self) -> Iterator["Part"]:
        """The parts of a multipart/form-data body, streamed (see `Part`)."""
        if self._parts is None:
            self._parts = _parts(self)
        return self._parts


def parse_cookies(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for header in values:
        for item in header.split(";"):
            name, sep, value = item.strip().partition("=")
            if sep and name and name not in out:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                out[name] = value
    return out


class Part:
    """One part of a multipart body: a form field or an uploaded file.

    `read(n)` and iteration give the content in pieces; moving on to the next
    part skips whatever is left of this one.
    """

    def __init__(self, stream: "_PartStream", headers: Headers):
        self._stream = stream
        self.headers = headers
        disp, params = parse_header_params(headers.get("content-disposition") or "")
        self.name = params.get("name", "")
        self.filename = params.get("filename")
        self.content_type = (headers.get("content-type") or
                             ("application/octet-stream" if self.filename is not None else "text/plain"))
        self._buf = b""
        self.done = False

    def read(self, n: int = -1) -> bytes:
        out = bytearray(self._buf)
        self._buf = b""
        while (n < 0 or len(out) < n) and not self.done:
            ev = self._stream.next_event()
            if type(ev) is PartData:
                out += ev.data
            else:
                self.done = True
        if n >= 0 and len(out) > n:
            self._buf = bytes(out[n:])
            del out[n:]
        return bytes(out)

    def text(self, limit: int = MAX_FORM_BYTES) -> str:
        """The content of a plain field as text (413 if over `limit`, 400 if not UTF-8)."""
        data = self.read(limit + 1)
        if len(data) > limit:
            raise HTTPError(413, f"The field {self.name!r} is too large.")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "A form field is not valid UTF-8.") from None

    def __iter__(self) -> Iterator[bytes]:
        if self._buf:
            b, self._buf = self._buf, b""
            yield b
        while not self.done:
            ev = self._stream.next_event()
            if type(ev) is PartData:
                if ev.data:
                    yield ev.data
            else:
                self.done = True

    def skip(self) -> None:
        self._buf = b""
        while not self.done:
            if type(self._stream.next_event()) is not PartData:
                self.done = True


class _PartStream:
    """Feeds the pure multipart parser from the request body."""

    def __init__(self, req: Request, boundary: bytes):
        self.req = req
        self.parser = MultipartParser(boundary)

    def next_event(self):
        while True:
            ev = self.parser.next_event()
            if ev is not NEED_DATA:
                return ev
            self.parser.feed(self.req.read(READ_CHUNK))


def _parts(req: Request) -> Iterator[Part]:
    try:
        boundary = boundary_from_content_type(req.headers.get("content-type"))
    except MultipartError as e:
        raise HTTPError(400, f"Expected a multipart form: {e.text}.") from None
    stream = _PartStream(req, boundary)
    current: Part | None = None
    try:
        while True:
            if current is not None:
                current.skip()
            ev = stream.next_event()
            if type(ev) is Done:
                return
            if type(ev) is PartEnd:
                continue
            if type(ev) is PartStart:
                current = Part(stream, ev.headers)
                yield current
    except MultipartError as e:
        raise HTTPError(400, f"The upload is malformed: {e.text}.") from None


# -- responses -----------------------------------------------------------------

class Response:
    """What a handler returns. `body` is bytes or an iterable of bytes (streamed)."""

    __slots__ = ("status", "body", "headers", "content_type", "content_length")

    def __init__(self, status: int = 200, body: bytes | Iterable[bytes] = b"",
                 headers: list[tuple[str, str]] | None = None, content_type: str | None = None,
                 content_length: int | None = None):
        self.status = status
        self.body = body
        self.headers = list(headers) if headers else []
        self.content_type = content_type
        self.content_length = content_length

    def set_cookie(self, name: str, value: str, *, max_age: int | None = None, path: str = "/",
                   http_only: bool = True, same_site: str = "Lax", secure: bool = False) -> None:
        parts = [f"{name}={value}", f"Path={path}"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if http_only:
            parts.append("HttpOnly")
        if same_site:
            parts.append(f"SameSite={same_site}")
        if secure:
            parts.append("Secure")
        self.headers.append(("Set-Cookie", "; ".join(parts)))

    def delete_cookie(self, name: str, path: str = "/") -> None:
        self.set_cookie(name, "", max_age=0, path=path)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


def html(markup: str, status: int = 200) -> Response:
    return Response(status, markup.encode("utf-8"), content_type="text/html; charset=utf-8")


def text(s: str, status: int = 200) -> Response:
    return Response(status, s.encode("utf-8"), content_type="text/plain; charset=utf-8")


def json_response(obj, status: int = 200) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode(),
                    content_type="application/json")


def redirect(location: str, status: int = 303) -> Response:
    return Response(status, b"", [("Location", location)], content_type="text/plain; charset=utf-8")


def sign(req: Request, *parts: str) -> str:
    """A MAC of a redirect's message (its parts joined by ":"), keyed by the
    session's CSRF token. A page shows a message from its URL only under this
    session's signature, so a link from elsewhere cannot put its own words
    on it (the drive's notices, the admin console's banners)."""
    key = (req.session.csrf if req.session is not None else "").encode()
    return hmac.new(key, ":".join(parts).encode(), hashlib.sha256).hexdigest()[:24]


_ERROR_TITLES = {
    400: "That request did not make sense", 401: "Please log in", 403: "Not allowed",
    404: "Page not found", 405: "Not allowed here", 408: "Too slow", 409: "Already taken",
    413: "Too large", 415: "Wrong kind of data", 416: "Range not available",
    429: "Too many attempts", 500: "Something broke on our side",
    501: "Not implemented", 503: "Storage is unavailable right now",
}


def error_page(req: Request | None, status: int, message: str = "") -> Response:
    """A friendly page in the site's layout saying what went wrong (escaped)."""
    from httpserver.templates import page, render
    title = _ERROR_TITLES.get(status, REASONS.get(status, "Error"))
    if req is None or not req.user:
        back = '<a href="/">Go to the start page</a>'
    elif req.path.startswith("/drive"):     # (UX QA: a drive 404 led only to the dashboard)
        back = '<a href="/drive">Back to My Drive</a>'
    elif req.path.startswith("/mail"):
        back = '<a href="/mail">Back to your mail</a>'
    else:
        back = '<a href="/home">Back to your dashboard</a>'
    body = render('<section class="card error-card"><p class="status">Error {status}</p>'
                  '<h1>{title}</h1><p>{message}</p><p>{back}</p></section>',
                  status=status, title=title, message=message or REASONS.get(status, ""),
                  back=_markup(back))
    if req is None:
        req = Request("GET", "/", Headers())
    return page(req, title, body, status=status)


def _markup(s: str):
    from httpserver.templates import Markup
    return Markup(s)


# -- conditional GET and ranges (RFC 9110 §13, §14) -------------------------------

def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    bare = etag[2:] if etag.startswith("W/") else etag
    for t in header.split(","):
        t = t.strip()
        if t.startswith("W/"):
            t = t[2:]
        if t == bare:
            return True
    return False


def not_modified(req: Request, etag: str | None = None, last_modified: float | None = None) -> bool:
    """True if a GET/HEAD can be answered 304 (If-None-Match first, then If-Modified-Since)."""
    if req.method not in ("GET", "HEAD"):
        return False
    inm = req.headers.get("if-none-match")
    if inm is not None:
        return etag is not None and etag_matches(inm, etag)
    if last_modified is not None:
        since = parse_http_date(req.headers.get("if-modified-since"))
        if since is not None and int(last_modified) <= since:
            return True
    return False


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The (start, end inclusive) of a single `bytes=` range, or None to send everything.

    Malformed headers and multi-range requests are ignored (RFC 9110 allows
    it); a well-formed range that misses the content raises HTTPError 416
    with `Content-Range: bytes */size`.
    """
    if not value:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if not (first + last).isascii():
        return None
    # A position of more than 18 digits is past the end of any file; int()
    # of 4300+ digits would even raise.
    first, last = (x and (x.lstrip("0") or "0") for x in (first, last))
    first, last = (_HUGE if len(x) > 18 else x for x in (first, last))
    if first == "":
        if last == "":
            return None
        n = int(last)
        if n == 0 or size == 0:
            raise HTTPError(416, "The requested range is empty.", [("Content-Range", f"bytes */{size}")])
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None                      # invalid: ignore the header
    end = int(last) if last else size - 1
    if start >= size:
        raise HTTPError(416, "The requested range is past the end of the file.",
                        [("Content-Range", f"bytes */{size}")])
    return start, min(end, size - 1)


_HUGE = str(10 ** 18)


def range_applies(req: Request, etag: str | None, last_modified: float | None) -> bool:
    """False if an If-Range precondition says the client's copy is stale."""
    ir = req.headers.get("if-range")
    if ir is None:
        return True
    ir = ir.strip()
    if ir.startswith(('"', 'W/"')):
        return etag is not None and not ir.startswith("W/") and ir == etag
    t = parse_http_date(ir)
    return t is not None and last_modified is not None and int(last_modified) == int(t)


def content_disposition(filename: str, inline: bool = False) -> str:
    """A Content-Disposition value that is safe for any file name (RFC 6266):
    the exact name in `filename*=` (UTF-8, percent-encoded: RFC 8187), and an
    ASCII stand-in in `filename=` for clients that do not read that. The
    stand-in keeps visible ASCII only, and not '"', '\\' or ';' (they would
    end or break the quoted value) nor '%' (a client could decode it as an
    escape): each of those, and space, becomes "_".

    The one function for the drive's downloads and the mail's attachments;
    the caller passes a name that is already safe as a name (the webmail's
    come from `clean_filename`)."""
    fallback = "".join(c if 32 < ord(c) < 127 and c not in '"\\%;' else "_" for c in filename) or "download"
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def send_bytes(req: Request, data: bytes, content_type: str, *, etag: str | None = None,
               last_modified: float | None = None, filename: str | None = None,
               cache_control: str | None = None) -> Response:
    """Serve `data` with conditional GET and single Range support."""
    headers = [("Accept-Ranges", "bytes")]
    if etag:
        headers.append(("ETag", etag))
    if last_modified is not None:
        headers.append(("Last-Modified", http_date(last_modified)))
    if cache_control:
        headers.append(("Cache-Control", cache_control))
    if filename is not None:
        headers.append(("Content-Disposition", content_disposition(filename)))
    if not_modified(req, etag, last_modified):
        return Response(304, b"", headers)
    size = len(data)
    r = parse_range(req.headers.get("range"), size) if req.method in ("GET", "HEAD") else None
    if r is not None and range_applies(req, etag, last_modified):
        start, end = r
        headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        return Response(206, data[start:end + 1], headers, content_type=content_type)
    return Response(200, data, headers, content_type=content_type)


def _content_type(path: str) -> str:
    ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "image/svg+xml"):
        ctype += "; charset=utf-8"
    return ctype


class _StaticEntry:
    __slots__ = ("path", "checked", "mtime", "size", "data", "ctype", "etag", "headers")


class StaticFiles:
    """Files of one directory served at /static/<name>, small ones cached in memory.

    Names are checked lexically (no '..' segment, no backslash or NUL), then
    resolved once with realpath, so a symlink cannot lead out of the root.
    A cached file is re-checked with one stat at most every RECHECK_S, so an
    edited file is served fresh within that time.
    """

    CACHE_MAX_FILE = 512 * 1024
    RECHECK_S = 1.0
    MAX_ENTRIES = 1024

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._cache: dict[str, _StaticEntry] = {}

    def _lookup(self, name: str) -> _StaticEntry:
        now = time.monotonic()
        e = self._cache.get(name)
        if e is not None and now - e.checked < self.RECHECK_S:
            return e
        if "\\" in name or "\0" in name or any(seg in ("", ".", "..") for seg in name.split("/")):
            raise HTTPError(404, "No such file.")
        path = e.path if e is not None else os.path.realpath(os.path.join(self.root, name))
        if not path.startswith(self.root + os.sep):
            raise HTTPError(404, "No such file.")
        try:
            st = os.stat(path)
        except OSError:
            self._cache.pop(name, None)
            raise HTTPError(404, "No such file.") from None
        if not stat.S_ISREG(st.st_mode):
            raise HTTPError(404, "No such file.")
        if e is None or e.mtime != st.st_mtime or e.size != st.st_size:
            with open(path, "rb") as f:
                data = f.read()
            e = _StaticEntry()
            e.path, e.mtime, e.size, e.data, e.ctype = path, st.st_mtime, len(data), data, _content_type(path)
            e.etag = f'"{int(st.st_mtime * 1000):x}-{len(data):x}"'
            e.headers = [("Accept-Ranges", "bytes"), ("ETag", e.etag),
                         ("Last-Modified", http_date(st.st_mtime)), ("Cache-Control", "public, max-age=300")]
        e.checked = now
        if e.size <= self.CACHE_MAX_FILE and len(self._cache) < self.MAX_ENTRIES:
            self._cache[name] = e
        return e

    def serve(self, req: Request, name: str) -> Response:
        e = self._lookup(name)
        h = req.headers
        if h.get("range") is None and h.get("if-none-match") is None and h.get("if-modified-since") is None:
            return Response(200, e.data, list(e.headers), content_type=e.ctype)   # the common case, fast
        return send_bytes(req, e.data, e.ctype, etag=e.etag, last_modified=e.mtime,
                          cache_control="public, max-age=300")


# -- routing ---------------------------------------------------------------------

_PARAM = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)(?::(path))?>")


class Route:
    __slots__ = ("method", "pattern", "regex", "handler", "login", "admin", "csrf", "session", "static")

    def __init__(self, method, pattern, handler, login, admin, csrf, session):
        self.method = method
        self.pattern = pattern
        self.handler = handler
        self.login = login
        self.admin = admin
        self.csrf = csrf
        self.session = session
        self.static = "<" not in pattern
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern must start with '/': {pattern!r}")
        out, pos = [], 0
        for m in _PARAM.finditer(pattern):
            out.append(re.escape(pattern[pos:m.start()]))
            out.append(f"(?P<{m.group(1)}>.+)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)")
            pos = m.end()
        out.append(re.escape(pattern[pos:]))
        self.regex = re.compile("".join(out))


class Router:
    """Routes by method and path pattern; `<name>` is one segment, `<name:path>` the rest."""

    def __init__(self):
        self.routes: list[Route] = []
        self._static: dict[str, dict[str, Route]] = {}

    def route(self, method: str, pattern: str, *, login: bool = True, admin: bool = False,
              csrf: bool = True, session: bool = True) -> Callable:
        """Decorator: `handler(req, **params) -> Response` for `method` on `pattern`.

        login   no session: GET/HEAD answer 303 to the log-in page
                `/?next=<this path>` (for /home: plain `/`), other methods 401
        admin   a logged-in user who is not an administrator gets 403
        csrf    non-GET requests must carry the session's CSRF token (else 403)
        session look the session up at all (False for static files: faster)
        """
        def deco(fn):
            self.add(method, pattern, fn, login=login, admin=admin, csrf=csrf, session=session)
            return fn
        return deco

    def add(self, method: str, pattern: str, handler, *, login=True, admin=False, csrf=True,
            session=True) -> Route:
        r = Route(method.upper(), pattern, handler, login or admin, admin, csrf, session)
        for old in self.routes:
            if old.method == r.method and old.pattern == r.pattern:
                raise ValueError(f"route {r.method} {r.pattern} registered twice")
        self.routes.append(r)
        if r.static:
            self._static.setdefault(pattern, {})[r.method] = r
        return r

    def match(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]]:
        """The route and its (percent-decoded) parameters; HTTPError 404 or
        405, or 501 for a method HTTP does not define (RFC 9110 15.6.2: 405
        would say that this page happens not to allow it)."""
        if method not in KNOWN_METHODS:
            raise HTTPError(501, f"This server does not know the {method[:32]} method.")
        allowed: set[str] = set()
        byname = self._static.get(raw_path)
        if byname is not None:
            r = byname.get(method) or (byname.get("GET") if method == "HEAD" else None)
            if r is not None:
                return r, {}
            allowed.update(byname)
        for r in self.routes:
            if r.static:
                continue
            m = r.regex.fullmatch(raw_path)
            if m is None:
                continue
            if r.method == method or (method == "HEAD" and r.method == "GET"):
                return r, {k: unquote(v, errors="replace") for k, v in m.groupdict().items()}
            allowed.add(r.method)
        if allowed:
            if "GET" in allowed:
                allowed.add("HEAD")
            raise HTTPError(405, "This address does not accept that kind of request.",
                            [("Allow", ", ".join(sorted(allowed)))])
        raise HTTPError(404, "There is no page at this address.")


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


# -- the dispatcher ----------------------------------------------------------------

class App:
    """Turns a Request into a Response: route, session, checks, handler, error pages."""

    def __init__(self, router: Router, sessions=None):
        self.router = router
        self.sessions = sessions

    def __call__(self, req: Request) -> Response:
        if req.method == "OPTIONS" and req.raw_path == "*":     # the server as a whole (RFC 9110 9.3.7)
            return Response(200, headers=[("Allow", "GET, HEAD, POST")])
        try:
            route, params = self.router.match(req.method, req.raw_path)
            req.route = route
            req.params = params
            if route.session:
                self._load_session(req)
            if route.login and req.user is None:
                if req.method in ("GET", "HEAD"):
                    # To the log-in page, which says why and comes back here
                    # (not for /home, whose answer DESIGN.md fixes: "/", and
                    # where a log-in goes anyway).
                    if req.raw_path == "/home":
                        return redirect("/")
                    return redirect("/?" + urlencode({"next": req.raw_path}))
                raise HTTPError(401, "Your session has ended. Please log in again.")
            if route.admin and not req.session.admin:
                raise HTTPError(403, "This page is for administrators only.")
            if req.method not in ("GET", "HEAD", "OPTIONS"):
                if route.csrf:
                    self._check_csrf(req)
                else:
                    self._check_origin(req)
            return route.handler(req, **params)
        except (ClientGone, ConnectionError):
            raise
        except HTTPError as e:
            if req.route is None:
                self._load_session(req)     # a 404/405 page still shows who is logged in
            resp = error_page(req, e.status, e.message)
            resp.headers.extend(e.headers)
            return resp
        except KVError as e:
            log.warning("storage error on %s %s: %s", req.method, req.raw_path, e)
            return error_page(req, 503, "The storage cluster did not answer in time. Please try again.")
        except Exception:
            log.exception("handler for %s %s failed", req.method, req.raw_path)
            return error_page(req, 500, "An unexpected error happened. It has been logged.")

    def _load_session(self, req: Request) -> None:
        if self.sessions is None or req.session is not None:
            return
        try:
            s = self.sessions.get(req.cookies.get("sid"))
        except KVError:
            if req.route is None:
                return              # only for an error page: do without
            raise
        if s is not None:
            req.session = s
            req.user = s.user

    @staticmethod
    def _check_origin(req: Request) -> None:
        """Forms without a session to hold a token (sign-up, log-in): a
        browser names the page a POST comes from in `Origin`; one from another
        site is refused. Otherwise a page elsewhere could log a visitor in
        to an account of the attacker's choosing ("login CSRF"), whose
        drive and mail the victim would then fill. Clients that send no
        Origin (curl, scripts) are not browsers and carry no one's cookies."""
        origin = req.headers.get("origin")
        if origin is None:
            return
        host = req.headers.get("host") or ""        # the load balancer passes it on as it came
        if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
            raise HTTPError(403, "This form did not come from this site.")

    @staticmethod
    def _check_csrf(req: Request) -> None:
        want = req.session.csrf if req.session is not None else None
        if want is None:
            raise HTTPError(403, "This form has expired. Please reload the page and try again.")
        got = req.headers.get(CSRF_HEADER)
        if got is None:
            ctype = req.content_type
            if ctype == "multipart/form-data":
                parts = req.multipart()
                first = next(parts, None)
                if first is not None and first.name == "csrf":
                    got = first.text(256)
            elif ctype in ("application/x-www-form-urlencoded", ""):
                got = req.field("csrf")
        if got is None or not hmac.compare_digest(got.encode(), want.encode()):
            raise HTTPError(403, "This form has expired or did not come from this site. "
                                 "Please reload the page and try again.")
