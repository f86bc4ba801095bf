"""The live board follows the teacher stream: a task queued, started and finished shows up on it,
over the Channels socket and in a real Chromium, without anyone reloading the page."""

import asyncio
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.staticfiles import finders
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import broadcast, control, queue
from teaching.asgi import application
from tests.processes import free_port, stop_process, wait_for_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_password_hashing")]

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
}
PORT = 8189


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


@pytest.fixture
def student_with_instance(student, register_instance):
    register_instance(student, PORT)
    return student


def submit(student) -> Task:
    return queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW})


def start(task: Task) -> None:
    """What the dispatcher records once ComfyUI accepted the task."""
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.PROCESSING, started_at=now, submitted_at=now)


def finish(task: Task) -> None:
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.COMPLETED, finished_at=timezone.now())


async def teacher_socket(teacher) -> tuple[WebsocketCommunicator, dict]:
    cookie = await sync_to_async(session_cookie)(teacher)
    communicator = WebsocketCommunicator(
        application,
        "/ws/comfy_proxy/queue/",
        headers=[
            (b"origin", settings.SITE_ORIGIN.encode()),
            (b"host", b"127.0.0.1:8080"),
            (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()),
        ],
    )
    accepted, _ = await communicator.connect()
    assert accepted
    return communicator, await communicator.receive_json_from(timeout=5)


async def next_board(communicator) -> dict:
    await broadcast.broadcast_queue_snapshot()
    return await communicator.receive_json_from(timeout=5)


def task_ids(tasks: list[dict]) -> list[str]:
    return [task["task_id"] for task in tasks]


async def test_the_board_follows_a_task_from_queued_to_finished(teacher, student_with_instance):
    communicator, frame = await teacher_socket(teacher)
    assert frame["board"]["waiting"] == frame["board"]["running"] == []

    task = await sync_to_async(submit)(student_with_instance)
    frame = await next_board(communicator)
    (waiting,) = frame["board"]["waiting"]
    assert (waiting["task_id"], waiting["username"], waiting["position"]) == (str(task.id), "alice", 1)
    assert frame["queue"]["queue_length"] == 1

    await sync_to_async(start)(task)
    frame = await next_board(communicator)
    assert frame["board"]["waiting"] == []
    (running,) = frame["board"]["running"]
    assert (running["task_id"], running["port"]) == (str(task.id), PORT)
    assert running["started_at"] is not None
    assert frame["queue"]["available_slots"] == frame["queue"]["max_concurrent"] - 1

    await sync_to_async(finish)(task)
    frame = await next_board(communicator)
    assert frame["board"]["running"] == []
    assert [(t["task_id"], t["status"]) for t in frame["board"]["finished"]] == [(str(task.id), "completed")]
    await communicator.disconnect()


async def test_what_teachers_do_shows_on_every_board(
    teacher, student_with_instance, other_student, register_instance
):
    await sync_to_async(register_instance)(other_student, PORT + 1)
    first = await sync_to_async(submit)(student_with_instance)
    second = await sync_to_async(submit)(other_student)
    communicator, frame = await teacher_socket(teacher)
    assert task_ids(frame["board"]["waiting"]) == [str(first.id), str(second.id)]

    await sync_to_async(control.move_to_front)(actor=teacher, tasks=[second])
    assert task_ids((await next_board(communicator))["board"]["waiting"]) == [str(second.id), str(first.id)]

    await sync_to_async(control.pause_queue)(actor=teacher)
    assert (await next_board(communicator))["queue"]["paused"] is True

    await sync_to_async(control.cancel_tasks)(actor=teacher, tasks=[first])
    frame = await next_board(communicator)
    assert task_ids(frame["board"]["waiting"]) == [str(second.id)]
    assert frame["board"]["finished"][0]["reason"] == "cancelled_by_teacher"
    await communicator.disconnect()


# --- In a real browser -----------------------------------------------------------------------


@pytest.fixture
def board_server(transactional_db, tmp_path):
    """uvicorn serving the teaching site on a free port, sharing the test database and Redis."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{settings.DATABASES['default']['NAME']}",
        "SITE_ORIGIN": origin,
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
        yield origin
    finally:
        stop_process(process)
        log.close()


def serve_static(route):
    """Static files straight from the project (what nginx or collectstatic serves in production)."""
    name = route.request.url.split("/static/", 1)[1].split("?", 1)[0]
    found = finders.find(name)
    if found is None:
        route.fulfill(status=404, body="")
    else:
        route.fulfill(path=found)


@pytest.fixture
def browser_page(monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API keeps an event loop on this thread; the test's own ORM calls are
    # plain synchronous ones all the same.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        context = browser.new_context(locale="en-US")
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(error))
        yield page
        browser.close()
        assert errors == [], "the board's script raised"


def broadcast_now():
    """What the dispatcher does after each change it commits (on a thread of its own, since
    Playwright's loop occupies this one)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, broadcast.broadcast_queue_snapshot()).result(timeout=10)


@pytest.mark.e2e
def test_the_board_in_chromium_updates_itself(board_server, browser_page, teacher, student_with_instance):
    from playwright.sync_api import expect

    page = browser_page
    page.context.add_cookies(
        [{"name": settings.SESSION_COOKIE_NAME, "value": session_cookie(teacher), "url": board_server}]
    )
    page.route("**/static/**", serve_static)
    page.goto(board_server + reverse("admin:comfyproxy_board"))
    expect(page.locator("[data-connection]")).to_have_text("Live")
    waiting_rows = page.locator("[data-table=waiting] tbody tr")
    running_rows = page.locator("[data-table=running] tbody tr")
    expect(waiting_rows).to_have_text(["Nobody is waiting."])

    task = submit(student_with_instance)
    broadcast_now()
    expect(waiting_rows.first).to_contain_text("alice")
    expect(page.locator("[data-figure=queue_length]")).to_have_text("1")

    start(task)
    broadcast_now()
    expect(waiting_rows).to_have_text(["Nobody is waiting."])
    expect(running_rows.first).to_contain_text("alice")
    expect(running_rows.first.locator("td").nth(2)).to_have_text(re.compile(r"^0:0\d$"))

    finish(task)
    broadcast_now()
    expect(running_rows).to_have_text(["Nothing is running."])
    expect(page.locator("[data-table=finished] tbody tr").first).to_contain_text("completed")

    page.get_by_role("button", name="Pause the queue").click()
    expect(page.locator("[data-paused]")).to_be_visible()
    expect(page.locator(".messagelist")).to_contain_text("paused")
