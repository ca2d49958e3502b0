"""Accounts in a real browser: sign up, log out, log in, a wrong password, the
account page, on desktop and phone sizes. Screenshots: docs/screenshots/accounts-*.png."""

from __future__ import annotations

import pytest

from httpserver.frontend import Frontend
from src.config import Node, parse_config
from src.kv import MemoryKV
from tests.browser import browser_page, launch_browser, screenshot  # noqa: F401

pytestmark = pytest.mark.browser


@pytest.fixture
def site(tmp_path):
    cfg = parse_config({"http": {"admin_password": "admin-secret-1"}}, "test.toml", str(tmp_path))
    fe = Frontend(cfg, Node("fe1", "127.0.0.1", 0), MemoryKV(), port=0).start()
    try:
        yield f"http://127.0.0.1:{fe.port}"
    finally:
        fe.stop()


def test_signup_logout_login_in_a_browser(site, browser_page):
    page = browser_page
    page.goto(site + "/")
    assert page.title() == "Welcome · PennCloud"
    screenshot(page, "accounts-landing")

    signup = page.locator("#signup")
    signup.get_by_label("Username").fill("Juliet")
    signup.get_by_label("Password").fill("correct horse")
    signup.get_by_role("button", name="Sign up").click()
    page.wait_for_url(site + "/home")
    assert page.locator("h1").inner_text() == "Hello, juliet"
    assert page.locator(".who .user").inner_text() == "juliet"
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["sid"]["httpOnly"] and cookies["sid"]["sameSite"] == "Lax"
    assert page.evaluate("document.cookie") == "", "the session cookie is HttpOnly"
    screenshot(page, "accounts-home")

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(site + "/")
    assert page.locator("#login").is_visible()
    page.goto(site + "/home")
    assert page.url == site + "/", "logged out: /home sends us back to the start page"

    login = page.locator("#login")
    login.get_by_label("Username").fill("juliet")
    login.get_by_label("Password").fill("wrong password")
    login.get_by_role("button", name="Log in").click()
    assert "do not match" in page.locator(".notice.error").inner_text()
    screenshot(page, "accounts-login-failed")

    login = page.locator("#login")
    assert login.get_by_label("Username").input_value() == "juliet", "the form is offered again, filled in"
    login.get_by_label("Password").fill("correct horse")
    login.get_by_role("button", name="Log in").click()
    page.wait_for_url(site + "/home")

    page.locator(".who .user").click()
    page.wait_for_url(site + "/account")
    assert "juliet@penncloud.local" in page.locator("main").inner_text()
    screenshot(page, "accounts-account")

    # The same pages on a phone: nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(site + "/home")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "accounts-home-phone")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(site + "/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "accounts-landing-phone")


def test_taken_name_page_offers_the_form_again(site, browser_page):
    page = browser_page
    for attempt in range(2):
        page.goto(site + "/")
        signup = page.locator("#signup")
        signup.get_by_label("Username").fill("kilo")
        signup.get_by_label("Password").fill("correct horse")
        signup.get_by_role("button", name="Sign up").click()
        if attempt == 0:
            page.wait_for_url(site + "/home")
            page.get_by_role("button", name="Log out").click()
            page.wait_for_url(site + "/")
    assert "taken" in page.locator(".notice.error").inner_text()
    assert page.locator("#signup").get_by_label("Username").input_value() == "kilo"
    screenshot(page, "accounts-signup-taken")


def test_admin_sees_the_admin_card(site, browser_page):
    page = browser_page
    page.goto(site + "/")
    login = page.locator("#login")
    login.get_by_label("Username").fill("admin")
    login.get_by_label("Password").fill("admin-secret-1")
    login.get_by_role("button", name="Log in").click()
    page.wait_for_url(site + "/home")
    assert page.locator(".app-card.app-admin").is_visible()
    assert page.locator("nav.nav a", has_text="Admin").is_visible()
    screenshot(page, "accounts-home-admin")
    r = page.goto(site + "/no/such/<page>")
    assert r.status == 404 and page.locator("h1").inner_text() == "Page not found"
    assert page.locator(".who .user").inner_text() == "admin", "error pages keep the site's header"
    screenshot(page, "accounts-error-404")
