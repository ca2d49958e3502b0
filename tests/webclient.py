"""A small browser-like HTTP client for tests of the web apps: it keeps the
cookies a server sets (so a session lives on), reads the CSRF token from each
page it loads, and posts forms and multipart bodies the way a browser does."""

from __future__ import annotations

import http.client
import re
import uuid
from urllib.parse import urlencode

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


class Client:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    def request(self, method, path, body=b"", headers=None):
        """One request on a fresh connection; the response gets `.body` and `.text`."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            h = dict(headers or {})
            if self.cookies:
                h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        for v in r.headers.get_all("Set-Cookie") or []:
            name, _, rest = v.partition("=")
            value = rest.split(";", 1)[0]
            if "max-age=0" in v.lower() or value == "":
                self.cookies.pop(name.strip(), None)
            else:
                self.cookies[name.strip()] = value
        r.body = data
        r.text = data.decode("utf-8", "replace")
        m = CSRF_RE.search(r.text)
        if m:
            self.csrf = m.group(1)
        return r

    def get(self, path, headers=None):
        return self.request("GET", path, headers=headers)

    def post(self, path, fields=None, csrf=True, headers=None):
        """An application/x-www-form-urlencoded POST; `fields` a dict or (name, value) pairs."""
        items = list(fields.items() if isinstance(fields, dict) else fields or [])
        if csrf:
            items.insert(0, ("csrf", self.csrf))
        return self.request("POST", path, urlencode(items, doseq=True).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})

    def post_multipart(self, path, fields=(), files=(), csrf=True, headers=None):
        """A multipart/form-data POST. `fields`: (name, value) pairs; `files`:
        (name, filename, content type, bytes). The csrf field goes first, as in our forms."""
        boundary = uuid.uuid4().hex
        out = []
        items = ([("csrf", self.csrf)] if csrf else []) + list(fields)
        for name, value in items:
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                       + value.encode() + b"\r\n")
        for name, filename, ctype, data in files:
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                       f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
        out.append(f"--{boundary}--\r\n".encode())
        return self.request("POST", path, b"".join(out),
                            {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})

    def login(self, user, password):
        r = self.post("/login", {"username": user, "password": password}, csrf=False)
        assert r.status == 303, r.text
        self.get("/home")
        return self
