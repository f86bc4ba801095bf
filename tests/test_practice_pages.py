"""The student's way in: landing page, login, the practice page, and its script in Chromium."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.test import Client

from comfyproxy.models import ComfyInstance, InstanceState
from tests.processes import free_port, port_open, stop_process, wait_for_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def english(client: Client) -> Client:
    client.cookies[settings.LANGUAGE_COOKIE_NAME] = "en"
    return client


def practice_state(response) -> dict:
    html = response.content.decode()
    start = html.index('<script id="practice-state" type="application/json">') + len(
        '<script id="practice-state" type="application/json">'
    )
    return json.loads(html[start : html.index("</script>", start)])


# --- Landing and login -------------------------------------------------------------------


def test_the_landing_page_is_chinese_by_default_and_offers_english(db):
    html = Client().get("/").content.decode()
    assert '<html lang="zh-hans">' in html
    assert 'name="language" value="en"' in html
    assert 'href="/accounts/login/?next=/practice/"' in html


def test_the_practice_page_speaks_chinese(student, client_for):  # Chinese-text assertion
    assert "启动ComfyUI" in client_for(student).get("/practice/").content.decode()


def test_switching_to_english_sticks(student, client_for):
    client = client_for(student)
    response = client.post("/i18n/setlang/", {"language": "en", "next": "/practice/"})
    assert response.status_code == 302
    html = client.get("/practice/").content.decode()
    assert '<html lang="en">' in html
    assert "Start ComfyUI" in html


def test_the_practice_page_asks_visitors_to_log_in_first(db):
    response = Client().get("/practice/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/practice/"


def test_logging_in_leads_to_the_practice_page(student):
    client = english(Client())
    assert 'name="username"' in client.get("/accounts/login/?next=/practice/").content.decode()

    response = client.post(
        "/accounts/login/", {"username": "alice", "password": "pw-alice", "next": "/practice/"}
    )

    assert (response.status_code, response["Location"]) == (302, "/practice/")
    assert client.get("/practice/").status_code == 200


def test_a_wrong_password_is_shown_on_the_login_page(student):
    response = english(Client()).post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert response.status_code == 200
    assert 'class="error"' in response.content.decode()


# --- The practice page -------------------------------------------------------------------


def test_a_student_without_comfyui_sees_the_start_button_and_no_frame(student, client_for):
    response = english(client_for(student)).get("/practice/")
    assert response.status_code == 200
    state = practice_state(response)
    assert (state["state"], state["iframe_url"]) == ("stopped", None)
    assert 'id="start-button"' in response.content.decode()


def test_a_running_instance_opens_through_the_comfyui_origin(student, client_for, register_instance):
    register_instance(student, 8189)

    state = practice_state(client_for(student).get("/practice/"))

    assert state["running"] is True
    assert state["url"] == "/comfyui/alice/8189/"
    assert state["iframe_url"].startswith(f"{settings.COMFY_PUBLIC_ORIGIN}/comfyui-enter/?ticket=")


def test_without_redis_the_page_still_renders_and_says_why(student, client_for, register_instance, settings):
    register_instance(student, 8189)
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    }

    response = english(client_for(student)).get("/practice/")

    assert response.status_code == 200
    assert practice_state(response)["iframe_url"] is None
    assert "temporarily unavailable" in response.content.decode()


def test_the_page_scripts_and_styles_are_served_from_the_project():
    assert finders.find("comfyproxy/practice.js")
    assert finders.find("comfyproxy/site.css")


# --- In Chromium ---------------------------------------------------------------------------


@pytest.fixture
def web_server(transactional_db, local_comfy, tmp_path):
    """uvicorn serving the teaching site, starting instances with the local launcher."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **local_comfy.env,
        "DATABASE_URL": f"sqlite:///{settings.DATABASES['default']['NAME']}",
        "SITE_ORIGIN": origin,
        # Nothing serves the ComfyUI origin here: the page only has to point its frame there.
        "COMFY_PUBLIC_ORIGIN": f"http://127.0.0.1:{free_port()}",
    }
    log = (tmp_path / "uvicorn.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "teaching.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=30, process=process)
        yield origin, env["COMFY_PUBLIC_ORIGIN"]
    finally:
        stop_process(process)
        log.close()


def serve_static(route):
    """Static files straight from the project (what nginx serves in production)."""
    name = route.request.url.split("/static/", 1)[1].split("?", 1)[0]
    found = finders.find(name)
    if found is None:
        route.fulfill(status=404, body="")
    else:
        route.fulfill(path=found)


@pytest.fixture
def browser_page(monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop on this thread; the test's ORM calls are sync.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_context(locale="en-US").new_page()
        script_errors = []
        page.on("pageerror", lambda error: script_errors.append(error))
        page.route("**/static/**", serve_static)
        yield page
        browser.close()
        assert script_errors == [], "the practice page's script raised"


def log_in(page, origin: str, user) -> None:
    client = Client()
    client.force_login(user)
    page.context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                "url": origin,
            },
            {"name": settings.LANGUAGE_COOKIE_NAME, "value": "en", "url": origin},
        ]
    )


@pytest.mark.e2e
def test_a_student_starts_and_stops_comfyui_from_the_practice_page(web_server, browser_page, student):
    from playwright.sync_api import expect

    origin, comfy_origin = web_server
    page = browser_page
    log_in(page, origin, student)
    page.goto(f"{origin}/practice/")
    frame = page.locator("#comfy-frame")
    expect(frame).to_be_hidden()

    page.get_by_role("button", name="Start ComfyUI").click()

    expect(frame).to_be_visible(timeout=30_000)
    instance = ComfyInstance.objects.get(user=student)
    assert instance.state == InstanceState.RUNNING
    assert port_open(instance.port)
    assert frame.get_attribute("src").startswith(f"{comfy_origin}/comfyui-enter/?ticket=")
    expect(page.get_by_role("link", name="Open in a new tab")).to_have_attribute("href", instance.proxy_path)
    expect(page.get_by_role("button", name="Start ComfyUI")).to_be_disabled()

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Stop ComfyUI").click()

    expect(frame).to_be_hidden(timeout=30_000)
    expect(page.get_by_role("button", name="Start ComfyUI")).to_be_enabled()
    wait_until(lambda: not port_open(instance.port), timeout=10, message="the instance's port to close")
    assert ComfyInstance.objects.get(user=student).state == InstanceState.STOPPED


@pytest.mark.e2e
def test_a_start_that_fails_is_explained_on_the_page(web_server, browser_page, student, local_comfy):
    from playwright.sync_api import expect

    origin, _comfy_origin = web_server
    page = browser_page
    log_in(page, origin, student)
    page.goto(f"{origin}/practice/")
    # Other programs hold every port of the range: there is no place to start ComfyUI.
    holders = [socket.create_server(("127.0.0.1", port)) for port in local_comfy.ports]
    try:
        page.get_by_role("button", name="Start ComfyUI").click()
        expect(page.locator("#practice-error")).to_contain_text("places", timeout=30_000)
    finally:
        for holder in holders:
            holder.close()
    expect(page.locator("#comfy-frame")).to_be_hidden()
    expect(page.get_by_role("button", name="Start ComfyUI")).to_be_enabled()
