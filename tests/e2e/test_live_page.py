"""The live page (`/ui/`) in a real browser: Debian's chromium driven by Playwright, against the whole
local system. Playwright's own browser download is not reachable, so it drives /usr/bin/chromium
(`apt-get install chromium`, which .ci/run does)."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage, Error, Locator, Page, expect, sync_playwright

from tools import run, services

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000  # bounds every wait: a write's read-back alone may take a few seconds on a busy machine
NUMBER = re.compile(r"^\d[\d,]*(\.\d+)?( ms| s| %|/s)?$")


@dataclass
class ScriptErrors:
    """What the page's scripts reported: uncaught exceptions and console errors."""

    messages: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.messages.append(f"console: {message.text} ({message.location.get('url', '')})")

    def on_page_error(self, error: Error) -> None:
        self.messages.append(f"pageerror: {error.message}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    if CHROMIUM == "/usr/bin/chromium":
        services.ensure_packages(["chromium"])  # apt-get, as for MariaDB and nginx, when it is missing
    if not os.access(CHROMIUM, os.X_OK):  # fail, never skip: CI must run this test
        pytest.fail(f"{CHROMIUM} not found: `apt-get install -y chromium` (.ci/run does), or set CHROMIUM")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def script_errors() -> ScriptErrors:
    return ScriptErrors()


@pytest.fixture
def page(browser: BrowserContext, gateway, script_errors: ScriptErrors) -> Iterator[Page]:
    """The live page, loaded, its first page of todos shown; its script errors go to script_errors."""
    page = browser.new_page()
    page.on("console", script_errors.on_console)
    page.on("pageerror", script_errors.on_page_error)
    page.goto(f"{gateway.base}/ui/")
    expect(page.locator("#todo-list")).to_have_attribute("aria-busy", "false", timeout=WAIT_MS)
    try:
        yield page
    finally:
        page.close()


def create_on_page(page: Page, title: str) -> Locator:
    """Type the title, press Enter; the todo's element once its read-side lag is measured."""
    field_ = page.locator("input[name=title]")
    field_.press_sequentially(title)
    field_.press("Enter")
    todo = page.locator("[data-todo-id]", has_text=title)
    expect(todo.locator("[data-lag-ms]")).to_have_attribute(
        "data-lag-ms", re.compile(r"^\d+$"), timeout=WAIT_MS
    )
    return todo


def shown_ids(page: Page) -> list[int]:
    ids = page.locator("#todo-list > [data-todo-id]").evaluate_all(
        "nodes => nodes.map(n => n.dataset.todoId)"
    )
    return [int(i) for i in ids]


def test_first_page_lists_what_get_todo_lists_first(page, gateway, script_errors):
    # The earlier tests' events may still be reaching the read model (unordered delivery): compare a
    # page loaded while GET /todo answered the same before and after it.
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        listed = gateway.request("GET", "/todo")
        assert listed.status == 200
        page.reload()
        expect(page.locator("#todo-list")).to_have_attribute("aria-busy", "false", timeout=WAIT_MS)
        shown = shown_ids(page)
        if gateway.request("GET", "/todo").body == listed.body:
            break
        assert time.monotonic() < deadline, "the read model kept changing"
    assert shown == [item["id"] for item in listed.body["items"]]
    unlabelled = page.locator("input, select, textarea").evaluate_all(
        "fields => fields.filter(f => f.labels.length === 0).map(f => f.outerHTML)"
    )
    assert unlabelled == []
    assert script_errors.messages == []


def test_enter_creates_a_todo_shown_with_its_read_side_lag_and_live_pipeline_numbers(
    page, gateway, script_errors
):
    title = f"typed in a browser {uuid.uuid4().hex[:8]}"

    todo = create_on_page(page, title)

    todo_id = int(todo.get_attribute("data-todo-id"))
    lag_ms = int(todo.locator("[data-lag-ms]").get_attribute("data-lag-ms"))
    assert 0 <= lag_ms < 10_000
    read = gateway.request("GET", f"/todo/{todo_id}")
    assert read.status == 200 and read.body["title"] == title
    expect(todo.locator(".version")).to_have_text(f"#{todo_id} v1")

    for name in ("outbox-pending", "consumer-retries", "events-applied", "dead-letters", "cache-hit-ratio"):
        expect(page.locator(f'[data-metric="{name}"]')).to_have_text(NUMBER, timeout=WAIT_MS)
    expect(page.locator("#partitions dd[data-partition]").first).to_have_text(NUMBER, timeout=WAIT_MS)
    # The event of this very write reaches the percentiles and the chart at the next scrape.
    for name in ("lag-p50", "lag-p90", "lag-p99"):
        expect(page.locator(f'[data-metric="{name}"]')).to_have_text(NUMBER, timeout=WAIT_MS)
    expect(page.locator("#lag-chart circle").first).to_be_attached(timeout=WAIT_MS)
    expect(page.locator("#pipeline-errors li")).to_have_count(0)
    assert script_errors.messages == []


def test_a_todo_changed_elsewhere_is_reread_and_the_page_says_so(page, gateway, script_errors):
    todo = create_on_page(page, f"changed behind the page {uuid.uuid4().hex[:8]}")
    todo_id = int(todo.get_attribute("data-todo-id"))
    elsewhere = gateway.request("PATCH", f"/todo/{todo_id}", {"title": f"renamed elsewhere {todo_id}"})
    assert elsewhere.status == 200

    todo.get_by_role("button", name="Complete").click()  # If-Match: "1", the version the page shows

    expect(page.locator("#messages")).to_contain_text("changed elsewhere; reloaded", timeout=WAIT_MS)
    again = page.locator(f'[data-todo-id="{todo_id}"]')
    expect(again.locator(".title")).to_have_text(f"renamed elsewhere {todo_id}", timeout=WAIT_MS)
    expect(again.locator(".version")).to_have_text(f"#{todo_id} v2")
    assert gateway.request("GET", f"/todo/{todo_id}?min_version=2").body["status"] == "CREATED"
    # The browser logs the 412 answer itself as a failed resource; nothing else may be reported.
    assert [m for m in script_errors.messages if "status of 412" not in m] == []


def test_pipeline_api_answers_one_document_and_404_elsewhere(gateway):
    document = gateway.request("GET", "/ui/api/pipeline")
    assert document.status == 200
    body = document.body
    components = ["create_todo", "update_todo", "delete_todo", "get_todos"]
    components += ["project_event", "relay_outbox", "dead_letter", "reconcile", "kafkasource"]
    assert list(body["components"]) == components
    down = {name for name, up in body["components"].items() if up == "down"}
    assert {error["component"] for error in body["errors"]} == down  # a slow scrape is named, not hidden
    if "kafkasource" not in down:
        assert all(isinstance(p["lag"], int) for p in body["consumer"]["partitions"])
    assert set(body["projection"]["events"]) == {"applied", "skipped", "rejected", "failed"}
    assert set(body["projection"]["lag_ms_60s"]) == {"count", "p50", "p90", "p99"}
    assert set(body["reconcile"]["drift"]) == {"missing", "different", "extra"}

    unknown = gateway.request("GET", "/ui/api/nothing-here")
    assert unknown.status == 404
    assert unknown.body["error"]["code"] == "not_found"


@pytest.fixture
def dead_letter_down(system: run.System) -> Iterator[None]:
    """The module's dead_letter process killed for the test, started again (and ready) after it."""
    dead_letter = next(child for child in system.children if child.name == "dead_letter")
    assert dead_letter.process is not None
    os.killpg(dead_letter.process.pid, signal.SIGKILL)  # its gunicorn master and worker
    dead_letter.process.wait(10)
    yield
    system._start(dead_letter)  # what the runner's supervisor does, without its backoff
    run.wait_http_ready(system, "dead_letter", f"{run.BY_NAME['dead_letter'].url}/healthz")


def test_a_component_that_is_down_is_named_and_the_page_keeps_working(
    page, script_errors, dead_letter_down: None
):
    expect(page.locator('#pipeline-errors [data-component="dead_letter"]')).to_have_text(
        "dead_letter unreachable", timeout=WAIT_MS
    )
    expect(page.locator('[data-metric="dead-letters"]')).to_have_text("—")
    expect(page.locator('[data-metric="events-applied"]')).to_have_text(NUMBER)
    create_on_page(page, f"written while dead_letter is down {uuid.uuid4().hex[:8]}")
    assert script_errors.messages == []
