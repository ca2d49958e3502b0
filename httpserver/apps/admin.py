"""The admin console (`/admin`, administrators only).

Pages (every route is `admin=True`: 403 for a logged-in user who is not an
administrator, GETs, POSTs and the JSON endpoint alike):

    GET  /admin                              every process, the tablet map, actions
    GET  /admin/status.json                  the same data as JSON (+ the two page
                                             fragments, rendered and escaped here),
                                             polled by admin.js every 2 s
    POST /admin/servers/<id>/kill|wake       KILL / WAKE a tablet server
    POST /admin/frontends/<id>/disable|enable  through the LB's control endpoint
    GET  /admin/data                         raw data: the tablet servers
    GET  /admin/data/<server>                its tablets (TABLETS)
    GET  /admin/data/<server>/<tablet>       its rows, a page at a time (ROWS)
    GET  /admin/data/<server>/<tablet>/row?r=<hex>           the row's columns
    GET  /admin/data/<server>/<tablet>/value?r=<hex>&c=<hex> one value

Actions ask for confirmation: with JavaScript a `confirm()` dialog, without
it a confirmation page (a POST without `confirm=yes` answers with that page).
The result comes back as a banner on /admin (redirect after POST). The
redirect's query (`did`, `id`, `ok`, `why`) carries `sig`, an HMAC of it
keyed by the session's CSRF token, as the drive does with its messages: a
link from anywhere else shows no banner, so it cannot put its own words (a
fake reason, a phishing link) on the administrator's console.

Row and column names are arbitrary bytes: in URLs they travel as hex, on the
page they are shown with `show_name` (UTF-8 where possible, `\\xNN` otherwise)
and HTML-escaped by the templates like every other value. Values show their
size and their first 4 KB, as text when that is printable UTF-8, else as a
hex dump. Rows, columns and values are read through the app's KV client
(the primary of the row's tablet); the list of rows comes from the chosen
server itself (ROWS), so a secondary's copy can be inspected too.
"""

from __future__ import annotations

import hmac
import logging
import time
from urllib.parse import urlencode

from httpserver.apps.admin_data import PREVIEW_BYTES, ClusterView, preview, show_name
from httpserver.templates import Markup, csrf_field, page, render
from httpserver.web import HTTPError, json_response, redirect, sign
from src.heartbeat import LBControlError
from src.kv import MAX_NAME_BYTES, BadRequest, KVError, NotFound

log = logging.getLogger(__name__)

ROWS_PAGE = 50
MAX_ROWS_PAGE = 500
MAX_COLUMNS_SHOWN = 1000
REFRESH_S = 2

SERVER_ACTIONS = {"kill": "Kill", "wake": "Wake"}
FRONTEND_ACTIONS = {"disable": "Disable", "enable": "Enable"}

# Result banners: fixed texts around the process id and, for a failure, the
# reason the server gave; both shown only under this session's signature.
BANNER_FIELDS = ("did", "id", "ok", "why")
_DONE = {
    "kill": "{id} was killed: it dropped its memory as in a crash and refuses requests. "
            "Its tablets fail over to their secondaries. Press Wake to restart it.",
    "wake": "{id} is waking up: it recovers from its disk and its peers, then serves again.",
    "disable": "{id} is disabled: the load balancer sends it no visitors.",
    "enable": "{id} is enabled again.",
}

_STATE_CLASS = {"up": "ok", "serving": "ok", "alive": "ok", "stopped": "muted", "disabled": "warn",
                "recovering": "warn", "killed": "bad", "down": "bad", "dead": "bad", "unknown": "muted"}



def _why(e: Exception) -> str:
    """Why a tablet server did not answer, for people: its protocol's
    `RETRY killed` means it was KILLed from this console."""
    text = str(e) or type(e).__name__
    if text.rstrip().endswith("killed"):
        return "it was killed from the console (Wake it in the process table)"
    return text

def _state_class(state: str) -> str:
    return _STATE_CLASS.get(state.split(" ")[0].rstrip(","), "warn")


def _banner_sig(req, fields: dict) -> str:
    """The signature of a result banner's query fields (web.sign)."""
    return sign(req, urlencode([(k, fields.get(k) or "") for k in BANNER_FIELDS]))


def _hex_arg(req, name: str) -> bytes:
    v = req.arg(name)
    if v is None:
        raise HTTPError(400, f"The link is missing its '{name}' part.")
    try:
        b = bytes.fromhex(v)
    except ValueError:
        raise HTTPError(400, "That link is damaged (a name must be hex).") from None
    if not 1 <= len(b) <= MAX_NAME_BYTES:
        raise HTTPError(400, f"That link is damaged (a name is 1 to {MAX_NAME_BYTES} bytes).")
    return b


# -- fragments (also sent in status.json) ----------------------------------------------------


def processes_html(req, snap: dict) -> Markup:
    rows = []
    for p in snap["processes"]:
        actions = []
        for act in p.get("actions", []):
            if p["kind"] == "kvserver":
                label, url = SERVER_ACTIONS[act], f"/admin/servers/{p['id']}/{act}"
            else:
                label, url = FRONTEND_ACTIONS[act], f"/admin/frontends/{p['id']}/{act}"
            danger = " danger" if act in ("kill", "disable") else ""
            actions.append(render(
                '<form method="post" action="{url}" class="adm-action" data-confirm="{q}">{csrf}'
                '<button type="submit" class="adm-btn{danger}">{label}</button></form>',
                url=url, q=f"{label} {p['id']}?", csrf=csrf_field(req), danger=danger, label=label))
        rows.append(render(
            '<tr><td><strong>{id}</strong>{kind}</td><td class="adm-mono">{addr}</td>'
            '<td><span class="adm-state {cls}">{state}</span>{note}</td><td>{role}</td><td>{load}</td>'
            '<td>{hb}</td><td class="adm-detail">{detail}</td><td class="adm-actions">{actions}</td></tr>',
            id=p["id"], kind=render('<div class="adm-sub">{k}</div>', k=p["kind"]) if p["kind"] != p["id"] else "",
            addr=p["addr"], cls=_state_class(p["state"]), state=p["state"],
            note=render('<div class="adm-sub">{n}</div>', n=p["note"]) if p.get("note") else "",
            role=p.get("role", ""), load=p.get("load", ""), hb=p.get("heartbeat", ""),
            detail=p.get("detail", ""), actions=Markup("").join(actions)))
    return render(
        '<div class="adm-scroll"><table class="adm-table"><thead><tr><th>Process</th><th>Address</th>'
        '<th>State</th><th>Role</th><th>Load</th><th>Last heartbeat</th><th>Detail</th><th></th></tr></thead>'
        '<tbody>{rows}</tbody></table></div>', rows=Markup("").join(rows))


def map_html(snap: dict) -> Markup:
    m = snap["map"]
    if not m["servers"]:
        return Markup("<p>This cluster's config names no tablet servers.</p>")
    tablets = range(m["tablets"])
    has_primary = {t for cells in m["cells"].values() for t, r in cells.items() if r == "P"}
    head = Markup("").join(
        render('<th class="{cls}" title="tablet {t}">{t}</th>', t=t, cls="" if t in has_primary else "adm-orphan")
        for t in tablets)
    body = []
    for sid in m["servers"]:
        cells = m["cells"].get(sid, {})
        tds = []
        for t in tablets:
            role = cells.get(t) or cells.get(str(t))
            if role:
                name = {"P": "primary", "S": "secondary", "R": "recovering"}[role]
                tds.append(render('<td class="adm-cell {r}" title="{sid}: {name} of tablet {t}">{r}</td>',
                                  r=role, sid=sid, name=name, t=t))
            else:
                tds.append(Markup('<td class="adm-cell"></td>'))
        down = sid in m["down"]
        body.append(render('<tr class="{cls}"><th scope="row">{sid}{mark}</th>{tds}</tr>',
                           cls="adm-down" if down else "", sid=sid,
                           mark=Markup(' <span class="adm-sub">down</span>') if down else "",
                           tds=Markup("").join(tds)))
    orphans = [t for t in tablets if t not in has_primary]
    warn = render('<p class="adm-warn">No primary for tablet{s} {ts}: reads and writes there wait.</p>',
                  s="s" if len(orphans) > 1 else "", ts=", ".join(map(str, orphans))) if orphans else ""
    return render(
        '<div class="adm-scroll"><table class="adm-map"><thead><tr><th>Server</th>{head}</tr></thead>'
        '<tbody>{body}</tbody></table></div>'
        '<p class="adm-legend"><span class="adm-cell P">P</span> primary '
        '<span class="adm-cell S">S</span> secondary <span class="adm-cell R">R</span> recovering '
        '<span class="adm-cell"></span> not held · <span class="adm-orphan-key">red</span> tablet without a primary'
        ' · from {source}</p>{warn}',
        head=head, body=Markup("").join(body), source=m["source"], warn=warn)


def _crumbs(*parts) -> Markup:
    """A breadcrumb trail: (label, href) pairs; the last one is the current page."""
    items = [render('<a href="/admin">Admin</a>')]
    for i, (label, href) in enumerate(parts):
        if href and i < len(parts) - 1:
            items.append(render('<a href="{href}">{label}</a>', href=href, label=label))
        else:
            items.append(render('<span aria-current="page">{label}</span>', label=label))
    return render('<nav class="adm-crumbs">{items}</nav>', items=Markup(" › ").join(items))


def register(router, ctx) -> None:
    cfg = ctx.config
    view = ClusterView(cfg, ctx.kv)

    def server_or_404(server_id: str):
        n = view.server_node(server_id)
        if n is None:
            raise HTTPError(404, "There is no tablet server by that name in this cluster.")
        return n

    def admin_page(req, title, body, status=200):
        return page(req, title, body, active="admin", css=("admin.css",), js=("admin.js",), status=status)

    # -- the console ---------------------------------------------------------------------

    @router.route("GET", "/admin", admin=True)
    def console(req):
        snap = view.snapshot()
        flash = ""
        did, who = req.arg("did"), req.arg("id") or ""
        fields = {k: req.arg(k) for k in BANNER_FIELDS}
        signed = hmac.compare_digest(req.arg("sig") or "", _banner_sig(req, fields))
        if did in _DONE and signed:
            if req.arg("ok") == "1":
                flash = render('<div class="adm-flash ok" role="status">{text}</div>', text=_DONE[did].format(id=who))
            else:
                flash = render('<div class="adm-flash bad" role="alert">Could not {did} {id}: {why}</div>',
                               did=did, id=who, why=req.arg("why") or "unknown error")
        body = render(
            '<div class="adm-head"><h1>Admin console</h1>'
            '<p class="adm-sub"><span id="adm-updated" data-refresh="{refresh}">Updated {when}</span> · '
            '<a href="/admin">Reload</a> · <a href="/admin/data">Browse raw data</a></p></div>{flash}'
            '<section class="card adm-card"><h2>Processes</h2><div id="adm-procs">{procs}</div></section>'
            '<section class="card adm-card"><h2>Tablet map</h2><div id="adm-map">{map}</div></section>',
            refresh=REFRESH_S, when=time.strftime("%H:%M:%S", time.localtime(snap["time"])), flash=flash,
            procs=processes_html(req, snap), map=map_html(snap))
        return admin_page(req, "Admin", body)

    @router.route("GET", "/admin/status.json", admin=True)
    def status_json(req):
        snap = view.snapshot()
        return json_response({"snapshot": snap, "updated": time.strftime("%H:%M:%S", time.localtime(snap["time"])),
                              "html": {"processes": str(processes_html(req, snap)), "map": str(map_html(snap))}})

    def confirm_page(req, question: str, action_url: str, label: str):
        body = render(
            '<section class="card adm-card adm-confirm"><h1>{q}</h1>'
            '<form method="post" action="{url}">{csrf}<input type="hidden" name="confirm" value="yes">'
            '<button type="submit" class="adm-btn danger">{label}</button> <a href="/admin">Cancel</a></form>'
            '</section>', q=question, url=action_url, csrf=csrf_field(req), label=label)
        return admin_page(req, question, body)

    def done(req, action: str, who: str, error: str | None = None):
        q = {"did": action, "id": who, "ok": "0" if error else "1"}
        if error:
            q["why"] = error[:200]
        q["sig"] = _banner_sig(req, q)
        return redirect("/admin?" + urlencode(q))

    @router.route("POST", "/admin/servers/<server_id>/<action>", admin=True)
    def server_action(req, server_id, action):
        n = server_or_404(server_id)
        if action not in SERVER_ACTIONS:
            raise HTTPError(404, "Tablet servers can be killed or woken, nothing else.")
        form = req.form()
        if form.get("confirm", [""])[0] != "yes":
            return confirm_page(req, f"{SERVER_ACTIONS[action]} {n.id}?", f"/admin/servers/{n.id}/{action}",
                                SERVER_ACTIONS[action])
        try:
            c = view.client(n.addr)
            c.kill() if action == "kill" else c.wake()
        except (KVError, OSError) as e:
            log.warning("admin %s: %s of %s failed: %s", req.user, action, n.id, e)
            return done(req, action, n.id, str(e) or type(e).__name__)
        log.info("admin %s: %s %s", req.user, action, n.id)
        return done(req, action, n.id)

    @router.route("POST", "/admin/frontends/<fe_id>/<action>", admin=True)
    def frontend_action(req, fe_id, action):
        if fe_id not in {n.id for n in cfg.frontends}:
            raise HTTPError(404, "There is no frontend by that name in this cluster.")
        if action not in FRONTEND_ACTIONS:
            raise HTTPError(404, "Frontends can be disabled or enabled, nothing else.")
        form = req.form()
        if form.get("confirm", [""])[0] != "yes":
            return confirm_page(req, f"{FRONTEND_ACTIONS[action]} {fe_id}?", f"/admin/frontends/{fe_id}/{action}",
                                FRONTEND_ACTIONS[action])
        try:
            view.lb().set_enabled(fe_id, action == "enable")
        except LBControlError as e:
            log.warning("admin %s: %s of %s failed: %s", req.user, action, fe_id, e)
            return done(req, action, fe_id, str(e))
        log.info("admin %s: %s %s", req.user, action, fe_id)
        return done(req, action, fe_id)

    # -- the raw data browser -------------------------------------------------------------------

    @router.route("GET", "/admin/data", admin=True)
    def data_servers(req):
        items = Markup("").join(
            render('<li><a href="/admin/data/{id}">{id}</a> <span class="adm-mono adm-sub">{addr}</span></li>',
                   id=n.id, addr=n.addr) for n in cfg.kvservers)
        body = render('{crumbs}<h1>Raw data</h1><p>Pick a tablet server, then a tablet, a row, a column.</p>'
                      '<section class="card adm-card"><ul class="adm-list">{items}</ul></section>',
                      crumbs=_crumbs(("Data", None)), items=items or Markup("<li>No tablet servers.</li>"))
        return admin_page(req, "Raw data", body)

    @router.route("GET", "/admin/data/<server_id>", admin=True)
    def data_tablets(req, server_id):
        n = server_or_404(server_id)
        try:
            lines = view.client(n.addr).tablets()
            error = ""
        except (KVError, OSError) as e:
            lines, error = [], _why(e)
        rows = []
        for line in lines:
            parts = line.split()
            if not parts or not parts[0].isdigit():
                continue
            fields = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
            count = fields.get("rows", "")
            rows.append(render(
                '<tr><td><a href="/admin/data/{sid}/{t}">tablet {t}</a></td><td>{role}</td>'
                '<td class="num">{rows}</td><td class="num">{bytes}</td></tr>',
                sid=n.id, t=parts[0], role=parts[1] if len(parts) > 1 else "",
                rows=f"about {count}" if count else "", bytes=fields.get("bytes", "")))
        # TABLETS adds the checkpoint's row count to the memtables' (kvserver
        # tablet stats): until the next checkpoint a row changed since the
        # last one may count twice and a deleted row still counts. Counting exactly would mean
        # reading the whole tablet, so the page says what the number is.
        table = render('<table class="adm-table"><thead><tr><th>Tablet</th><th>Role here</th>'
                       '<th class="num">Rows</th><th class="num">Bytes</th></tr></thead><tbody>{rows}</tbody></table>'
                       '<p class="adm-sub">Row counts are estimates: until a tablet\'s next checkpoint, a row '
                       'changed since the last one may count twice and a deleted row still counts. '
                       'A tablet\'s page lists its rows themselves.</p>',
                       rows=Markup("").join(rows)) if rows else render('<p>{msg}</p>', msg=(
                           f"{n.id} does not answer: {error}" if error else f"{n.id} holds no tablets."))
        body = render('{crumbs}<h1>{sid} <span class="adm-sub adm-mono">{addr}</span></h1>'
                      '<section class="card adm-card">{table}</section>',
                      crumbs=_crumbs(("Data", "/admin/data"), (n.id, None)), sid=n.id, addr=n.addr, table=table)
        return admin_page(req, f"{n.id} tablets", body)

    def tablet_number(tablet: str) -> int:
        if not (tablet.isascii() and tablet.isdigit() and len(tablet) <= 9) or int(tablet) >= cfg.cluster.tablets:
            raise HTTPError(404, f"No such tablet: this cluster has tablets 0 to {cfg.cluster.tablets - 1}.")
        return int(tablet)

    @router.route("GET", "/admin/data/<server_id>/<tablet>", admin=True)
    def data_rows(req, server_id, tablet):
        n = server_or_404(server_id)
        t = tablet_number(tablet)
        after = _hex_arg(req, "after") if req.arg("after") else None
        try:
            limit = max(1, min(MAX_ROWS_PAGE, int(req.arg("limit") or ROWS_PAGE)))
        except ValueError:
            limit = ROWS_PAGE
        try:
            names = view.client(n.addr).rows(t, after, limit)
            error = ""
        except BadRequest:
            # The page asks for a valid limit and name, so the one thing the
            # server can refuse is the tablet: it answered, it does not hold it.
            raise HTTPError(404, f"{n.id} does not hold tablet {t}. Its page lists the tablets it holds.") from None
        except (KVError, OSError) as e:
            names, error = [], _why(e)
        items = Markup("").join(
            render('<li><a class="adm-mono" href="/admin/data/{sid}/{t}/row?r={hex}">{name}</a></li>',
                   sid=n.id, t=t, hex=name.hex(), name=show_name(name)) for name in names)
        nav = []
        if after is not None:
            nav.append(render('<a href="/admin/data/{sid}/{t}?limit={limit}">« first page</a>',
                              sid=n.id, t=t, limit=limit))
        if len(names) == limit:
            nav.append(render('<a rel="next" href="/admin/data/{sid}/{t}?after={hex}&amp;limit={limit}">next page »</a>',
                              sid=n.id, t=t, hex=names[-1].hex(), limit=limit))
        where = render("after {name}", name=show_name(after)) if after is not None else "from the start"
        if error:
            content = render('<p class="adm-warn">{sid} does not answer: {e}</p>', sid=n.id, e=error)
        elif not names:
            content = render('<p>No rows {where}.</p>', where=where)
        else:
            content = render('<p class="adm-sub">{count} rows {where}</p><ol class="adm-rows">{items}</ol>',
                             count=len(names), where=where, items=items)
        body = render('{crumbs}<h1>Tablet {t} on {sid}</h1><section class="card adm-card">{content}'
                      '<p class="adm-pager">{nav}</p></section>',
                      crumbs=_crumbs(("Data", "/admin/data"), (n.id, f"/admin/data/{n.id}"), (f"tablet {t}", None)),
                      t=t, sid=n.id, content=content, nav=Markup(" · ").join(nav))
        return admin_page(req, f"Tablet {t}", body)

    @router.route("GET", "/admin/data/<server_id>/<tablet>/row", admin=True)
    def data_row(req, server_id, tablet):
        n = server_or_404(server_id)
        t = tablet_number(tablet)
        row = _hex_arg(req, "r")
        try:
            cols = ctx.kv.cols(row)
            error = ""
        except (KVError, OSError) as e:
            cols, error = [], _why(e)
        shown = cols[:MAX_COLUMNS_SHOWN]
        items = Markup("").join(
            render('<li><a class="adm-mono" href="/admin/data/{sid}/{t}/value?r={r}&amp;c={c}">{name}</a></li>',
                   sid=n.id, t=t, r=row.hex(), c=c.hex(), name=show_name(c)) for c in shown)
        more = render('<p class="adm-sub">… and {k} more columns.</p>', k=len(cols) - len(shown)) \
            if len(cols) > len(shown) else ""
        if error:
            content = render('<p class="adm-warn">Could not read the row: {e}</p>', e=error)
        elif not cols:
            content = Markup("<p>The row has no columns (it no longer exists).</p>")
        else:
            content = render('<p class="adm-sub">{count} columns</p><ul class="adm-rows">{items}</ul>{more}',
                             count=len(cols), items=items, more=more)
        body = render('{crumbs}<h1 class="adm-mono adm-name">{name}</h1><section class="card adm-card">{content}</section>',
                      crumbs=_crumbs(("Data", "/admin/data"), (n.id, f"/admin/data/{n.id}"),
                                     (f"tablet {t}", f"/admin/data/{n.id}/{t}"), ("row", None)),
                      name=show_name(row), content=content)
        return admin_page(req, "Row", body)

    @router.route("GET", "/admin/data/<server_id>/<tablet>/value", admin=True)
    def data_value(req, server_id, tablet):
        n = server_or_404(server_id)
        t = tablet_number(tablet)
        row, col = _hex_arg(req, "r"), _hex_arg(req, "c")
        try:
            value = ctx.kv.get(row, col)
        except NotFound:
            raise HTTPError(404, "That cell does not exist (any more).") from None
        except (KVError, OSError) as e:
            raise HTTPError(503, f"Could not read the cell: {e}") from None
        kind, text = preview(value)
        shown = min(len(value), PREVIEW_BYTES)
        body = render(
            '{crumbs}<h1 class="adm-mono adm-name">{rname} <span class="adm-sub">/</span> {cname}</h1>'
            '<section class="card adm-card"><p><strong>{size}</strong> bytes{cut} · shown as {kind}</p>'
            '<pre class="adm-value {kind}">{text}</pre></section>',
            crumbs=_crumbs(("Data", "/admin/data"), (n.id, f"/admin/data/{n.id}"),
                           (f"tablet {t}", f"/admin/data/{n.id}/{t}"),
                           ("row", f"/admin/data/{n.id}/{t}/row?r={row.hex()}"), ("value", None)),
            rname=show_name(row), cname=show_name(col), size=len(value),
            cut=f" (the first {shown} shown)" if shown < len(value) else "", kind=kind, text=text)
        return admin_page(req, "Value", body)
