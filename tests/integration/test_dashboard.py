"""The router's dashboard in a real headless Chromium, against a real router, a real node
serving the real Gemma GGUF, and the hub stand-in.

Every page a test opens is watched: at its end, no request may have gone anywhere but the
router, no URL may carry the key, no cookie may exist, and the console may hold no error but
the 4xx answers the page shows on purpose (a CSP violation would be one).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.browser_fixtures import PageWatch, distinct_colours
from tests.conftest import GEMMA_NAME
from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, start_node
from tests.procs import spawner
from tests.requirements import require_module
from tests.router_fixtures import call, free_url, start_router

require_module("playwright", "the test extra installs it")  # skipped, or failed under CI
from playwright.sync_api import expect  # noqa: E402 - only once playwright is known present

ADMIN = "sk-admin-dashboard-test-key"
REPO = "google/gemma-3-270m-it-gguf"
MODEL_ID = "dash/gemma"
BROKEN_REPO = "dash/broken-gguf"  # a GGUF no node accepts: its download fails validation
HEARTBEAT_S = 0.5
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

expect.set_options(timeout=20_000)


@dataclass
class Fleet:
    router: str
    node_id: str
    node_key: str
    api_key: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_gguf) -> Iterator[Fleet]:
    """Hub stand-in (the real Gemma, downloads slowed so progress shows), router, one node."""
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    try:
        root = tmp_path_factory.mktemp("hub")
        make_repo(root, REPO, {gemma_gguf.name: gemma_gguf})
        make_repo(root, BROKEN_REPO, {"broken-Q4_K_M.gguf": b"GGUF" + bytes(60)})
        # 2 connections at 16 MB/s each: the 250 MB download takes several heartbeats.
        hub = start_hub(spawn, root, "--bandwidth", "16M")
        router = start_router(
            spawn,
            tmp_path_factory.mktemp("home"),
            ADMIN,
            env={"HF_ENDPOINT": hub, "LLMLB_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S)},
        )
        node_key = create_key(router, ADMIN, "node")
        node = start_node(
            spawn,
            router,
            node_key,
            tmp_path_factory.mktemp("store"),
            "--connections",
            "2",
            env={"HF_ENDPOINT": hub},
        )
        nodes = call(router, "GET", "/v0/nodes", ADMIN).json["nodes"]
        node_id = next(entry["node_id"] for entry in nodes if entry["url"] == node)
        yield Fleet(router, node_id, node_key, create_key(router, ADMIN, "api"))
    finally:
        stop_all()


@contextmanager
def watched_page(browser: Any, fleet: Fleet, **context_options: Any) -> Iterator[Any]:
    """A fresh browser context and page, checked for foreign requests, console errors, keys in
    URLs and cookies when the block ends."""
    context = browser.new_context(**{"viewport": DESKTOP, **context_options})
    page = context.new_page()
    page.set_default_timeout(20_000)
    watch = PageWatch(fleet.router)
    watch.attach(page)
    try:
        yield page
        assert watch.foreign_requests() == [], "the page reached beyond the router"
        assert watch.page_errors == []
        assert watch.unexpected_console_errors() == []
        for request in watch.requests:
            assert ADMIN not in request.url, request.url
        assert context.cookies() == []
        api_calls = [r for r in watch.requests if re.search(r"/v[01]/", r.url)]
        for request in api_calls:
            assert request.headers.get("authorization", "").startswith("Bearer "), request.url
    finally:
        context.close()


@pytest.fixture
def page(browser, fleet) -> Iterator[Any]:
    with watched_page(browser, fleet) as opened:
        yield opened


def open_dashboard(page: Any, fleet: Fleet) -> None:
    page.goto(f"{fleet.router}/dashboard")
    expect(page.locator("#admin-key")).to_be_focused()


def sign_in(page: Any, fleet: Fleet, key: str = ADMIN) -> None:
    open_dashboard(page, fleet)
    page.fill("#admin-key", key)
    page.click("#signin-form button[type=submit]")
    if key == ADMIN:
        expect(page.locator("#nav")).to_be_visible()


def show(page: Any, view: str) -> None:
    page.click(f"#nav a[data-view={view}]")
    expect(page.locator(f"#view-{view}")).to_be_visible()


def screenshot(browser: Any, page: Any, path: Path) -> None:
    """Save a full-page screenshot and check it is not blank."""
    png = page.screenshot(path=str(path), full_page=True)
    assert distinct_colours(browser, png) >= 8, f"{path} looks blank"


def api_error(fleet: Fleet, method: str, path: str, key: str | None, body: Any = None) -> str:
    """How the page shows the error the API gives for this request."""
    reply = call(fleet.router, method, path, key, body)
    assert 400 <= reply.status < 500, reply.body
    error = reply.json["error"]
    return f"{error['message']} ({error['code']})"


def test_dashboard_is_served_with_a_strict_policy(fleet):
    reply = call(fleet.router, "GET", "/dashboard")  # the page holds no data: no key needed
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/html")
    policy = reply.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'"):
        assert directive in policy
    assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["x-content-type-options"] == "nosniff"
    html = reply.body.decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html), "inline style or handler"
    assert "http://" not in html and "https://" not in html
    for name, media in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = call(fleet.router, "GET", f"/dashboard/{name}")
        assert asset.status == 200 and asset.headers["content-type"].startswith(media)
        assert asset.headers["content-security-policy"] == policy
    script = call(fleet.router, "GET", "/dashboard/app.js").body.decode()
    assert "innerHTML" not in script and "eval(" not in script
    missing = call(fleet.router, "GET", "/dashboard/secrets.py")
    assert missing.status == 404 and missing.json["error"]["code"] == "not_found"
    # The traffic history is admin-only.
    assert call(fleet.router, "GET", "/v0/traffic").status == 401
    assert call(fleet.router, "GET", "/v0/traffic", fleet.api_key).status == 403
    traffic = call(fleet.router, "GET", "/v0/traffic", ADMIN).json
    assert {"interval_s", "t", "total", "models", "nodes", "balancer"} <= traffic.keys()


def test_a_wrong_key_is_refused_with_the_api_error(browser, page, fleet, tmp_path):
    sign_in(page, fleet, "sk-not-a-key-of-this-router")
    expected = api_error(fleet, "GET", "/v0/nodes", "sk-not-a-key-of-this-router")
    expect(page.locator("#signin-error")).to_have_text(f"Sign-in failed: {expected}")
    screenshot(browser, page, tmp_path / "signin-refused.png")
    # A valid key without the admin scope is refused too, with its own reason.
    page.fill("#admin-key", fleet.api_key)
    page.keyboard.press("Enter")
    expected = api_error(fleet, "GET", "/v0/nodes", fleet.api_key)
    expect(page.locator("#signin-error")).to_have_text(f"Sign-in failed: {expected}")
    expect(page.locator("#nav")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    assert fleet.api_key not in page.url


def test_fleet_shows_the_node_and_follows_changes_live(browser, page, fleet, tmp_path):
    sign_in(page, fleet)
    card = page.locator(f"#fleet-nodes [data-node='{fleet.node_id}']")
    expect(card).to_have_attribute("data-status", "online")
    expect(card).to_contain_text("cpu")  # the GPU backend the node reported
    expect(card).to_contain_text("Last heartbeat")
    # The key is in this tab's sessionStorage only: not in the URL, a cookie or localStorage.
    assert page.evaluate("sessionStorage.getItem('llmlb.adminKey')") == ADMIN
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
    assert ADMIN not in page.url
    page.evaluate("window.notReloaded = true")

    # A node registering later appears without a reload, then goes offline when it stays
    # silent (3 missed heartbeats), then disappears when removed.
    late = call(
        fleet.router, "POST", "/v0/nodes", fleet.node_key,
        {"node_id": "late-node", "url": free_url(), "slots": 2, "gpu": {"backend": "cuda"}},
    )  # fmt: skip
    assert late.status == 201, late.body
    late_card = page.locator("#fleet-nodes [data-node='late-node']")
    expect(late_card).to_be_visible(timeout=5_000)
    expect(late_card).to_contain_text("cuda")
    expect(page.locator("#fleet-summary")).to_have_text("1 of 2 nodes online", timeout=10_000)
    expect(late_card).to_have_attribute("data-status", "offline")
    screenshot(browser, page, tmp_path / "fleet.png")
    assert call(fleet.router, "DELETE", "/v0/nodes/late-node", ADMIN).status == 204
    expect(late_card).to_have_count(0, timeout=5_000)
    assert page.evaluate("window.notReloaded") is True


def test_register_watch_the_download_serve_and_delete(browser, page, fleet, tmp_path):
    sign_in(page, fleet)
    show(page, "models")
    result = page.locator("#reg-result")

    # The API's own errors, as they come: a repo the hub does not know, an invalid id.
    bad = {"repo": "nobody/no-such-repo"}
    page.fill("#reg-repo", bad["repo"])
    page.click("#reg-submit")
    expect(result).to_have_text(api_error(fleet, "POST", "/v1/models/register", ADMIN, bad))
    expect(result).to_have_class(re.compile(r"\berror\b"))
    invalid = {"repo": REPO, "id": "Bad Id!"}
    page.fill("#reg-id", invalid["id"])
    page.click("#reg-submit")
    expect(result).to_have_text(api_error(fleet, "POST", "/v1/models/register", ADMIN, invalid))

    # The real Gemma GGUF, from the hub stand-in.
    page.fill("#reg-repo", REPO)
    page.fill("#reg-filename", GEMMA_NAME)
    page.fill("#reg-id", MODEL_ID)
    page.click("#reg-submit")
    expect(result).to_have_text(f"Registered {MODEL_ID}: nodes are fetching it.")
    card = page.locator(f"#models-list [data-model='{MODEL_ID}']")
    expect(card).to_contain_text(REPO)
    registered = call(fleet.router, "GET", "/v0/models", ADMIN).json["models"]
    revision = next(m["revision"] for m in registered if m["id"] == MODEL_ID)
    expect(card).to_contain_text(revision[:12])  # the pinned revision
    expect(card).to_contain_text("gguf")

    # The progress bar moves, with bytes, rate and ETA, then the model is ready.
    placement = card.locator(f".placement[data-node='{fleet.node_id}']")
    seen = page.wait_for_function(
        """(selector) => {
            const row = document.querySelector(selector);
            if (!row || row.dataset.state !== "downloading") return null;
            const text = row.querySelector(".detail").textContent;
            const bar = row.querySelector("progress");
            return /iB of .*iB \\(\\d+ %\\) · .*iB\\/s · ETA \\d/.test(text)
                ? { text, value: bar.value, visible: !bar.hidden } : null;
        }""",
        arg=f"#models-list [data-model='{MODEL_ID}'] .placement[data-node='{fleet.node_id}']",
        polling=100,
        timeout=30_000,
    ).json_value()
    assert seen["visible"] and 0 < seen["value"] < 1, seen
    screenshot(browser, page, tmp_path / "models-downloading.png")
    expect(placement).to_have_attribute("data-state", "ready", timeout=60_000)
    assert placement.locator("progress").evaluate("bar => bar.value") == 1
    expect(placement).to_contain_text("ready to serve")
    # The model across the fleet: nodes ready, the share of the fleet's copies on disk.
    expect(card).to_contain_text("1 of 1 node ready · 100 % of the fleet's copies on disk")
    screenshot(browser, page, tmp_path / "models-ready.png")

    # Inference through the router moves the traffic charts, per model and per node.
    show(page, "traffic")
    rps = page.locator("#traffic-total [data-chart='rps']")
    expect(rps).to_have_attribute("data-max", "0")
    for _ in range(3):
        reply = call(
            fleet.router, "POST", "/v1/completions", fleet.api_key,
            {"model": MODEL_ID, "prompt": "Load balancers", "max_tokens": 2},
            timeout=120,
        )  # fmt: skip
        assert reply.status == 200, reply.body
    unknown = {"model": "no-such-model", "prompt": "x", "max_tokens": 1}
    assert call(fleet.router, "POST", "/v1/completions", fleet.api_key, unknown).status == 404
    expect(rps).not_to_have_attribute("data-max", "0", timeout=10_000)
    errors = page.locator("#traffic-total [data-chart='errors']")
    expect(errors).not_to_have_attribute("data-max", "0", timeout=10_000)
    model_row = page.locator(f"#traffic-models [data-name='{MODEL_ID}']")
    expect(model_row.locator("[data-chart='ttfb']")).not_to_have_attribute("data-points", "0")
    # a figure with its unit (ms on a quiet machine, seconds when the CPU is busy)
    expect(model_row.locator("[data-chart='ttfb'] .latest")).to_have_text(
        re.compile(r"p50 [\d.]+ m?s · p95 [\d.]+ m?s")
    )
    node_row = page.locator(f"#traffic-nodes [data-name='{fleet.node_id}']")
    expect(node_row.locator("[data-chart='rps']")).not_to_have_attribute("data-max", "0")
    drawn = node_row.locator("[data-chart='rps'] polyline, [data-chart='rps'] circle")
    expect(drawn).not_to_have_count(0)
    # The routing table: three choices, by two random choices (a short prompt has no keys).
    decisions = page.locator(f"#traffic-routing tbody tr[data-key='{MODEL_ID}']")
    expect(decisions.locator("td")).to_have_text(["0", "0", "0", "3"], timeout=10_000)
    screenshot(browser, page, tmp_path / "traffic.png")

    # Delete it from the page (two clicks: the first only arms the button).
    show(page, "models")
    delete = card.get_by_role("button", name="Delete")
    delete.click()
    card.get_by_role("button", name="Confirm delete").click()
    expect(card).to_have_count(0)
    expect(result).to_have_text(f"Deleted {MODEL_ID}.")
    models = call(fleet.router, "GET", "/v0/models", ADMIN).json["models"]
    assert MODEL_ID not in [m["id"] for m in models]


def test_a_failed_download_shows_the_nodes_reason_and_retries(browser, page, fleet, tmp_path):
    reply = call(fleet.router, "POST", "/v1/models/register", ADMIN, {"repo": BROKEN_REPO})
    assert reply.status == 201, reply.body
    model_id = reply.json["id"]
    try:
        sign_in(page, fleet)
        show(page, "models")
        card = page.locator(f"#models-list [data-model='{model_id}']")
        placement = card.locator(f".placement[data-node='{fleet.node_id}']")
        expect(placement).to_have_attribute("data-state", "failed")
        nodes = call(fleet.router, "GET", "/v0/nodes", ADMIN).json["nodes"]
        node = next(entry for entry in nodes if entry["node_id"] == fleet.node_id)
        reason = next(m["error"] for m in node["models"] if m["id"] == model_id)
        assert "unsupported GGUF version" in reason
        expect(placement.locator(".detail")).to_contain_text(reason)
        expect(placement.locator(".detail")).to_contain_text("attempt")
        screenshot(browser, page, tmp_path / "models-failed.png")
        placement.get_by_role("button", name="Retry now").click()
        expect(placement.locator(".note")).to_have_text("Retry requested: 1 node notified.")
    finally:
        assert call(fleet.router, "DELETE", f"/v1/models/{model_id}", ADMIN).status == 204


def test_a_new_key_is_shown_once_and_can_be_revoked(browser, page, fleet, tmp_path):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    sign_in(page, fleet)
    show(page, "keys")
    page.fill("#key-name", "dashboard-made")
    page.select_option("#key-scope", "api")
    page.click("#key-submit")
    secret_box = page.locator("#new-key-value")
    expect(secret_box).to_be_visible()
    secret = secret_box.input_value()
    assert secret.startswith("sk-") and len(secret) > 20
    assert call(fleet.router, "GET", "/v1/models", secret).status == 200  # it works
    card = page.locator("#keys-list .card", has_text="dashboard-made")
    expect(card).to_contain_text(secret[:7] + "...")
    expect(card.locator(".badge")).to_have_text("api")
    assert secret not in page.inner_text("body")  # only in the one-time box
    page.click("#copy-key")
    expect(page.locator("#copy-result")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    screenshot(browser, page, tmp_path / "keys-new.png")

    # Once dismissed (or after a reload) the secret is nowhere on the page.
    page.click("#dismiss-key")
    expect(page.locator("#new-key")).to_be_hidden()
    assert secret not in page.content()
    page.reload()
    expect(page.locator("#nav")).to_be_visible()  # still signed in: sessionStorage
    show(page, "keys")
    expect(card).to_be_visible()
    assert secret not in page.content()

    card.get_by_role("button", name="Revoke").click()
    card.get_by_role("button", name="Confirm revoke").click()
    expect(card).to_have_count(0)
    assert call(fleet.router, "GET", "/v1/models", secret).status == 401


def test_phone_width_dark_mode_and_keyboard_only(browser, fleet, tmp_path):
    with watched_page(browser, fleet, viewport=PHONE, color_scheme="dark") as page:
        open_dashboard(page, fleet)
        page.keyboard.type(ADMIN)
        page.keyboard.press("Enter")
        expect(page.locator("#nav")).to_be_visible()
        expect(page.locator(f"[data-node='{fleet.node_id}']")).to_be_visible()
        expect(page.locator("#fleet-title")).to_be_focused()
        # Back from the view's heading to the Keys link; follow it with the keyboard alone.
        for _ in range(10):
            page.keyboard.press("Shift+Tab")
            if page.evaluate("document.activeElement.dataset.view") == "keys":
                break
        page.keyboard.press("Enter")
        expect(page.locator("#view-keys")).to_be_visible()
        expect(page.locator("#keys-title")).to_be_focused()
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(15, 19, 23)"  # the dark palette
        for view in ("fleet", "models", "traffic", "keys"):
            show(page, view)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"{view} overflows a phone's width ({width}px)"
            screenshot(browser, page, tmp_path / f"phone-{view}.png")


def test_a_pending_node_is_approved_from_the_fleet_view(browser, page, fleet, tmp_path):
    body = {"node_id": "new-node", "url": free_url(), "node_secret": "new-node-secret-0123456789"}
    assert call(fleet.router, "POST", "/v0/nodes", fleet.node_key, body).status == 201
    # This router approves nodes as they join (the fixtures' default); revoked, the node is
    # pending as on a router with manual approval.
    revoked = call(fleet.router, "POST", "/v0/nodes/new-node/revoke", ADMIN)
    assert revoked.status == 200 and revoked.json["approval"] == "pending"
    sign_in(page, fleet)
    card = page.locator("#fleet-nodes [data-node='new-node']")
    expect(card).to_have_attribute("data-approval", "pending")
    expect(card.locator(".badge.pending")).to_have_text("pending approval")
    expect(page.locator("#fleet-summary")).to_contain_text("1 pending approval")
    approved = page.locator(f"#fleet-nodes [data-node='{fleet.node_id}']")
    expect(approved).to_have_attribute("data-approval", "approved")
    expect(approved.get_by_role("button")).to_have_count(0)
    screenshot(browser, page, tmp_path / "fleet-pending.png")
    card.get_by_role("button", name="Approve new-node").click()
    expect(card).to_have_attribute("data-approval", "approved")
    expect(card.get_by_role("status")).to_have_text("Approved new-node: it now serves clients.")
    expect(card.get_by_role("button")).to_have_count(0)
    expect(page.locator("#fleet-summary")).not_to_contain_text("pending")
    listed = call(fleet.router, "GET", "/v0/nodes", ADMIN).json["nodes"]
    assert {n["node_id"]: n["approval"] for n in listed}["new-node"] == "approved"
    assert call(fleet.router, "DELETE", "/v0/nodes/new-node", ADMIN).status == 204


def test_keys_show_their_limits_and_usage_shows_keys_models_and_budgets(
    browser, page, fleet, tmp_path
):
    made = call(
        fleet.router,
        "POST",
        "/v0/keys",
        ADMIN,
        {"scope": "api", "name": "metered-team", "rpm": 60, "budget_tokens": 5000,
         "budget_period": "month"},
    )
    assert made.status == 201
    body = {"model": "metered/nothing", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):  # refused (no such model): counted as requests with errors
        refused = call(fleet.router, "POST", "/v1/chat/completions", made.json["key"], body)
        assert refused.status == 404
    sign_in(page, fleet)
    show(page, "keys")
    card = page.locator("#keys-list .card", has_text="metered-team")
    expect(card).to_contain_text("rpm 60")
    expect(card).to_contain_text("budget 5000/month")
    show(page, "usage")
    row = page.locator("#usage-keys tbody tr", has_text="metered-team")
    expect(row).to_contain_text("3")
    expect(row).to_contain_text("5000 of 5000/month")
    expect(page.locator("#usage-models tbody tr", has_text="metered/nothing")).to_be_visible()
    expect(page.locator("#usage-chart figure")).to_have_count(1)
    screenshot(browser, page, tmp_path / "usage.png")
