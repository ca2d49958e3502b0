"""Sign-up, log-in, log-out and password change: the fixed routes of DESIGN.md.

    GET  /          the start page: log-in and sign-up forms (303 to /home when logged in)
    POST /signup    username, password  -> 303 /home + cookie; 400 invalid; 409 taken
    POST /login     username, password  -> 303 /home + cookie; 401 wrong; 429 throttled
    POST /logout    csrf                -> 303 /, the session is gone everywhere
    GET  /account   the change-password form
    POST /account   csrf, old, new, confirm -> 200 done (other sessions end); 400 / 403 on errors

Failed answers re-render the start page with the error and the forms, so a
person can correct and retry at once. Wrong password and unknown user get the
same answer and take the same time (src.accounts equalises the hash cost).
"""

from __future__ import annotations

import hmac
import logging
import math

from httpserver.templates import Markup, csrf_field, page, render
from httpserver.web import HTTPError, Request, Router, redirect
from httpserver.sessions import COOKIE
from src.accounts import (MAX_PASSWORD, MIN_PASSWORD, AccountError, InvalidPassword, InvalidUsername,
                          UsernameTaken, WrongPassword, normalize_username)
from src.throttle import Throttled

log = logging.getLogger(__name__)


def local_path(value: str | None) -> str:
    """`value` if it is a path on this site ("/drive/f/..."), else "": the
    page to return to after log-in must never lead to another site
    ("//evil.example", "/\\evil.example", "https://...")."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")) or len(value) > 2048:
        return ""
    if any(ord(c) < 32 or c == "\\" for c in value):
        return ""
    return value

_LANDING = """
<section class="hero">
  <h1>Your files and mail, in one place.</h1>
  <p class="lead">PennCloud keeps your drive and your mailbox on a replicated store
  that survives crashed servers. Log in, or make an account in seconds.</p>
</section>
{notice}
<div class="auth-grid">
  <section class="card" id="login">
    <h2>Log in</h2>
    <form method="post" action="/login" class="stack">{next_field}
      <label>Username <input name="username" autocomplete="username" required value="{login_user}"
        autocapitalize="none" spellcheck="false"></label>
      <label>Password <input name="password" type="password" autocomplete="current-password" required></label>
      <button type="submit" class="primary">Log in</button>
    </form>
  </section>
  <section class="card" id="signup">
    <h2>Create an account</h2>
    <form method="post" action="/signup" class="stack">
      <label>Username <input name="username" autocomplete="username" required maxlength="32"
        pattern="[A-Za-z0-9]([A-Za-z0-9._\\-]{{0,30}}[A-Za-z0-9_\\-])?" value="{signup_user}"
        autocapitalize="none" spellcheck="false"
        title="1-32 letters, digits, '.', '_' or '-', starting with a letter or digit, not ending with '.'"></label>
      <p class="hint">1-32 letters, digits, '.', '_' or '-', starting with a letter or digit and not
        ending with '.'. It is also your mail address: <em>name</em>@{domain}.</p>
      <label>Password <input name="password" type="password" autocomplete="new-password" required
        minlength="{min_pw}" maxlength="{max_pw}"></label>
      <p class="hint">At least {min_pw} characters.</p>
      <button type="submit" class="primary">Sign up</button>
    </form>
  </section>
</div>
"""

_ACCOUNT = """
<section class="card narrow">
  <h1>Your account</h1>
  <p>You are logged in as <strong>{user}</strong>; your mail address is <strong>{address}</strong>.</p>
  {notice}
  <h2>Change your password</h2>
  <form method="post" action="/account" class="stack">
    {csrf}
    <label>Current password <input name="old" type="password" autocomplete="current-password" required></label>
    <label>New password <input name="new" type="password" autocomplete="new-password" required
      minlength="{min_pw}" maxlength="{max_pw}"></label>
    <label>New password, again <input name="confirm" type="password" autocomplete="new-password" required
      minlength="{min_pw}" maxlength="{max_pw}"></label>
    <button type="submit" class="primary">Change password</button>
  </form>
  <p class="hint">Changing your password logs you out on every other device.</p>
</section>
"""


def notice(message: str, kind: str = "error") -> Markup:
    role = "alert" if kind == "error" else "status"
    return render('<p class="notice {kind}" role="{role}">{message}</p>', kind=kind, role=role, message=message)


def register(router: Router, ctx) -> None:
    accounts = ctx.accounts
    sessions = ctx.sessions
    throttle = ctx.throttle
    domain = ctx.config.mail.domain

    def landing(req: Request, status: int = 200, error: str = "", login_user: str = "",
                signup_user: str = "", anchor: str = "", info: str = ""):
        nxt = local_path(req.arg("next") if req.method == "GET" else req.field("next"))
        if nxt and not error and not info:
            info = "Please log in to see that page."
        shown = notice(error) if error else notice(info, "info") if info else Markup("")
        body = render(_LANDING, notice=shown, login_user=login_user, signup_user=signup_user, domain=domain,
                      min_pw=MIN_PASSWORD, max_pw=MAX_PASSWORD,
                      next_field=render('<input type="hidden" name="next" value="{v}">', v=nxt) if nxt else "")
        resp = page(req, "Welcome", body, status=status)
        return resp

    def logged_in(req: Request, user: str):
        if req.session is not None:
            sessions.destroy(req.session.sid, req.session.user)
        s = sessions.create(user, admin=accounts.is_admin(user))
        resp = redirect(local_path(req.field("next")) or "/home")
        # No Max-Age: the browser keeps the cookie while it runs, and the
        # server's sliding expiry decides how long the session lives.
        resp.set_cookie(COOKIE, s.sid)
        return resp

    @router.route("GET", "/", login=False)
    def start_page(req: Request):
        if req.user:        # (logged in meanwhile, in another tab: straight on)
            return redirect(local_path(req.arg("next")) or "/home")
        return landing(req)

    @router.route("POST", "/signup", login=False, csrf=False)
    def signup(req: Request):
        username = req.field("username", "") or ""
        password = req.field("password", "") or ""
        try:
            user = accounts.create(username, password)
        except UsernameTaken as e:
            return landing(req, 409, f"{e} Please choose another name.", signup_user=username)
        except (InvalidUsername, InvalidPassword) as e:
            return landing(req, 400, str(e), signup_user=username)
        log.info("new account %s", user)
        return logged_in(req, user)

    @router.route("POST", "/login", login=False, csrf=False)
    def login(req: Request):
        username = req.field("username", "") or ""
        password = req.field("password", "") or ""
        try:
            user = throttle.attempt(username, req.client_addr, lambda: accounts.verify(username, password))
        except Throttled as e:
            wait = math.ceil(e.wait_s)
            resp = landing(req, 429, f"Too many failed log-ins. Please wait {wait} seconds "
                                     "and try again.", login_user=username)
            resp.headers.append(("Retry-After", str(wait)))
            return resp
        if user is None:
            log.info("failed log-in for %r from %s", username.strip().lower()[:64], req.client_addr)
            return landing(req, 401, "That username and password do not match.", login_user=username)
        return logged_in(req, user)

    @router.route("POST", "/logout", login=False, csrf=False)
    def logout(req: Request):
        if req.session is not None:
            got = req.field("csrf") or req.headers.get("x-csrf-token") or ""
            if not hmac.compare_digest(got.encode(), req.session.csrf.encode()):
                raise HTTPError(403, "This form has expired. Please reload the page and try again.")
            sessions.destroy(req.session.sid, req.session.user)
        resp = redirect("/")
        resp.delete_cookie(COOKIE)
        return resp

    def account_page(req: Request, status: int = 200, message: str = "", kind: str = "error"):
        body = render(_ACCOUNT, user=req.user, address=f"{req.user}@{domain}", csrf=csrf_field(req),
                      notice=notice(message, kind) if message else Markup(""),
                      min_pw=MIN_PASSWORD, max_pw=MAX_PASSWORD)
        return page(req, "Your account", body, status=status)

    @router.route("GET", "/account")
    def account(req: Request):
        return account_page(req)

    @router.route("POST", "/account")
    def change_password(req: Request):
        old = req.field("old", "") or ""
        new = req.field("new", "") or ""
        if new != (req.field("confirm", "") or ""):
            return account_page(req, 400, "The two new passwords are not the same.")
        try:
            accounts.change_password(req.user, old, new)
        except WrongPassword as e:
            return account_page(req, 403, str(e))
        except AccountError as e:
            return account_page(req, 400, str(e))
        ended = sessions.destroy_user(req.user, keep=req.session.sid)
        log.info("password changed for %s; %d other sessions ended", req.user, ended)
        return account_page(req, 200, "Your password was changed. Your other sessions were logged out.",
                            kind="ok")


__all__ = ["register", "notice", "normalize_username"]
