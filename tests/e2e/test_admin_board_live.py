"""The teacher's live board in a real Chromium, through the real nginx: it follows a task from
queued to running to finished with no reload, and its buttons steer the queue.

No dispatcher runs here: the test changes task rows and broadcasts as the dispatcher would.
"""

import re

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from playwright.sync_api import expect

from comfyproxy.models import QueueSettings, Task, TaskStatus
from comfyproxy.services import queue
from tests.e2e.conftest import broadcast_now

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fast_password_hashing"),
]

WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}


@pytest.fixture
def board(chromium, nginx_gateway, teacher):
    """The board as a teacher opens it from admin, in English; its script's errors are collected."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": nginx_gateway.login(teacher),
                "url": nginx_gateway.site_origin,
            }
        ]
    )
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(nginx_gateway.site_origin + reverse("admin:comfyproxy_board"))
    expect(page.locator("[data-connection]")).to_have_text("Live")
    yield page
    context.close()
    assert errors == [], "the board's script raised"


def test_the_board_follows_a_task_without_a_reload(board, nginx_gateway, student, register_instance):
    register_instance(student, nginx_gateway.emulator_ports[0])
    waiting = board.locator("[data-table=waiting] tbody tr")
    running = board.locator("[data-table=running] tbody tr")
    expect(waiting).to_have_text(["Nobody is waiting."])

    task = queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW})
    broadcast_now()
    expect(waiting.first).to_contain_text("alice")
    expect(board.locator("[data-figure=queue_length]")).to_have_text("1")

    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.PROCESSING, started_at=now, submitted_at=now)
    broadcast_now()
    expect(waiting).to_have_text(["Nobody is waiting."])
    expect(running.first).to_contain_text("alice")
    # "Running for" counts up on its own, from the server's clock.
    expect(running.first.locator("td").nth(2)).to_have_text(re.compile(r"^0:0[1-9]$"), timeout=5000)

    Task.objects.filter(pk=task.pk).update(status=TaskStatus.COMPLETED, finished_at=timezone.now())
    broadcast_now()
    expect(running).to_have_text(["Nothing is running."])
    expect(board.locator("[data-table=finished] tbody tr").first).to_contain_text("completed")


def test_the_board_buttons_pause_the_queue_and_cancel_a_task(
    board, nginx_gateway, student, register_instance
):
    register_instance(student, nginx_gateway.emulator_ports[0])
    task = queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW})
    broadcast_now()

    board.get_by_role("button", name="Pause the queue").click()
    expect(board.locator(".messagelist")).to_contain_text("paused")
    expect(board.locator("[data-paused]")).to_be_visible()
    assert QueueSettings.load().paused

    board.locator("[data-table=waiting]").get_by_role("button", name="Cancel").click()
    expect(board.locator(".messagelist")).to_contain_text("Cancelled 1 task")
    assert Task.objects.get(pk=task.pk).status == TaskStatus.CANCELLED
