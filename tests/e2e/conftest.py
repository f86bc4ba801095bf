"""A real headless Chromium for the browser tests (Debian's, driven by Playwright), and helpers
to bring a student's ComfyUI up in it through the real nginx stack.

Screenshots go to test-artifacts/ at the repository root (gitignored), for people to look at.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync

from comfyproxy.services import broadcast
from tests.dispatcher_fixtures import dispatcher_process  # noqa: F401  (the real dispatcher, as a process)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The official ComfyUI frontend takes several seconds to start in headless Chromium here.
COMFYUI_LOAD_MS = 60_000


@pytest.fixture
def chromium(monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API keeps an event loop on this thread; the test's ORM calls are
    # plain synchronous ones all the same.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def screenshot(request):
    """Save a screenshot of a page as test-artifacts/<test name>-<step>.png."""
    ARTIFACTS.mkdir(exist_ok=True)

    def save(page, step: str) -> Path:
        path = ARTIFACTS / f"{request.node.name}-{step}.png"
        page.screenshot(path=str(path))
        return path

    return save


def broadcast_now() -> None:
    """What the dispatcher does after each change it commits (on a thread of its own, since
    Playwright's event loop occupies this one)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(async_to_sync(broadcast.broadcast_queue_snapshot)).result(timeout=30)
