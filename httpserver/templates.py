"""HTML that escapes every value by default, and the one page layout of the site.

`render(template, **values)` substitutes `{name}` fields (str.format syntax)
and HTML-escapes every value unless it is `Markup` (already-safe HTML, e.g.
the result of another `render`). So a user's file name or mail subject can
never become markup by accident: the unsafe thing (`Markup(user_input)`) has
to be written out on purpose.

`page(req, title, body)` wraps a body in the shared layout: the header with
the brand, the navigation (Home, Drive, Mail, and Admin for administrators),
the user's name and a log-out form carrying the CSRF field; extra
stylesheets and scripts from /static. Every app uses it, so the whole site
looks like one product.
"""

from __future__ import annotations

import html
import string
from typing import Iterable

_formatter = string.Formatter()


class Markup(str):
    """A str of HTML that is safe to insert as it is."""

    __slots__ = ()

    def __add__(self, other):
        return Markup(str.__add__(self, escape(other)))

    def __radd__(self, other):
        return Markup(escape(other) + str(self))

    def join(self, items: Iterable) -> "Markup":
        return Markup(str.join(self, (escape(i) for i in items)))


def escape(value) -> Markup:
    """HTML-escape `value` (quotes included) unless it is Markup already."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("")
    return Markup(html.escape(str(value), quote=True))


def render(template: str, **values) -> Markup:
    """`template` with `{name}` fields replaced by escaped `values`."""
    out = []
    for literal, field, spec, conv in _formatter.parse(template):
        out.append(literal)
        if field is None:
            continue
        if field not in values:
            raise KeyError(f"template field {field!r} has no value")
        v = values[field]
        if spec:
            v = format(v, spec)
        out.append(escape(v))
    return Markup("".join(out))


def csrf_field(req) -> Markup:
    """The hidden input every form of a logged-in page carries."""
    token = req.session.csrf if getattr(req, "session", None) else ""
    return render('<input type="hidden" name="csrf" value="{t}">', t=token)


_NAV = (("home", "Home", "/home"), ("drive", "Drive", "/drive"), ("mail", "Mail", "/mail"))

_LAYOUT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · PennCloud</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/style.css">
{css}</head>
<body>
<header class="topbar">
  <a class="brand" href="{brand_href}"><span class="logo" aria-hidden="true"></span>PennCloud</a>
  {nav}
</header>
<main class="content">
{body}
</main>
<footer class="footer">PennCloud · a teaching cloud</footer>
{js}</body>
</html>
"""


def _nav(req, active: str | None) -> Markup:
    user = getattr(req, "user", None)
    if not user:
        return Markup("")
    links = []
    items = list(_NAV)
    if getattr(req.session, "admin", False):
        items.append(("admin", "Admin", "/admin"))
    for key, label, href in items:
        cls = ' class="active" aria-current="page"' if key == active else ""
        links.append(render('<a href="{href}"{cls}>{label}</a>', href=href, cls=Markup(cls), label=label))
    return render(
        '<nav class="nav">{links}</nav>\n'
        '  <div class="who"><a class="user" href="/account" title="Account settings">{user}</a>'
        '<form method="post" action="/logout" class="inline">{csrf}'
        '<button type="submit" class="link">Log out</button></form></div>',
        links=Markup("").join(links), user=user, csrf=csrf_field(req))


def page_html(req, title: str, body, *, active: str | None = None, css: Iterable[str] = (),
              js: Iterable[str] = ()) -> Markup:
    """The whole page as Markup (see `page` for the Response)."""
    css_tags = Markup("").join(render('<link rel="stylesheet" href="/static/{f}">\n', f=f) for f in css)
    js_tags = Markup("").join(render('<script src="/static/{f}" defer></script>\n', f=f) for f in js)
    return render(_LAYOUT, title=title, css=css_tags, js=js_tags, body=escape(body),
                  nav=_nav(req, active), brand_href="/home" if getattr(req, "user", None) else "/")


def page(req, title: str, body, *, active: str | None = None, css: Iterable[str] = (),
         js: Iterable[str] = (), status: int = 200):
    """A `web.Response` with the whole page in the shared layout."""
    from httpserver.web import html as html_response
    return html_response(page_html(req, title, body, active=active, css=css, js=js), status=status)
