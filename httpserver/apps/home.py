"""The dashboard at /home: one card per app (Drive, Mail, and Admin for administrators)."""

from __future__ import annotations

from httpserver.templates import Markup, page, render
from httpserver.web import Request, Router

_CARD = """<a class="card app-card app-{key}" href="{href}">
  <span class="app-icon" aria-hidden="true">{icon}</span>
  <span class="app-text"><strong>{title}</strong><span>{blurb}</span></span>
</a>"""

_ICONS = {
    "drive": '<svg viewBox="0 0 24 24"><path d="M3 6.5A1.5 1.5 0 0 1 4.5 5H10l2 2h7.5A1.5 1.5 0 0 1 21 8.5v9a1.5 '
             '1.5 0 0 1-1.5 1.5h-15A1.5 1.5 0 0 1 3 17.5z"/></svg>',
    "mail": '<svg viewBox="0 0 24 24"><path d="M3 6h18v12H3z M3 6l9 7 9-7" fill="none" stroke-width="2" '
            'stroke-linejoin="round"/></svg>',
    "admin": '<svg viewBox="0 0 24 24"><path d="M4 5h16v4H4z M4 11h16v4H4z M4 17h16v2H4z"/><circle cx="7" cy="7" '
             'r="1" fill="#fff"/><circle cx="7" cy="13" r="1" fill="#fff"/></svg>',
}


def register(router: Router, ctx) -> None:
    domain = ctx.config.mail.domain

    @router.route("GET", "/home")
    def home(req: Request):
        cards = [("drive", "/drive", "Drive", "Upload, organise and download your files."),
                 ("mail", "/mail", "Mail", f"Read and send mail as {req.user}@{domain}.")]
        if req.session.admin:
            cards.append(("admin", "/admin", "Admin console",
                          "Processes, tablets and raw data of the whole cluster."))
        html_cards = Markup("\n").join(
            render(_CARD, key=k, href=h, title=t, blurb=b, icon=Markup(_ICONS[k])) for k, h, t, b in cards)
        body = render('<section class="welcome"><h1>Hello, {user}</h1>'
                      '<p class="lead">What would you like to do?</p></section>'
                      '<div class="cards">{cards}</div>', user=req.user, cards=html_cards)
        return page(req, "Home", body, active="home")
