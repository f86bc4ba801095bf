"""The queue script inside the official ComfyUI frontend (1.27.10, served by the emulator), injected
by the real nginx on the ComfyUI origin: ComfyUI keeps working, and the card follows the student's
task live, in Chinese unless the teaching site was switched to English, with a working cancel
button and a polling fallback when the queue socket is unavailable.

No dispatcher runs here: the test changes task rows and broadcasts as the dispatcher would.
"""

import json
import time

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from comfyproxy.gateway import comfy_entry_url
from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import queue
from tests.e2e.conftest import COMFYUI_LOAD_MS, broadcast_now

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("fast_password_hashing"),
]

WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}
CARD = "#comfyui-queue-notification .card"
SCRIPT = "comfyui-queue.js"


@pytest.fixture
def busy_class(nginx_gateway, make_student, register_instance, make_task, queue_settings):
    """Cap 1 and another student's workflow running: alice's next one has to wait."""
    queue_settings.max_concurrent_override = 1
    queue_settings.save()
    alice_port, bob_port = nginx_gateway.emulator_ports[:2]
    alice, bob = make_student("alice"), make_student("bob")
    register_instance(alice, alice_port)
    register_instance(bob, bob_port)
    make_task(bob, status=TaskStatus.PROCESSING, port=bob_port)
    return alice, alice_port


def open_comfyui(chromium, gateway, user, port: int, *, language: str | None = None, route_queue_socket=None):
    """The student's ComfyUI as the practice page's iframe opens it, in a browser set to Chinese
    (as the school's are); returns the page and the queue script's problems.

    Those are uncaught errors raised in the script and what it reports itself: it catches its
    own errors and logs them with its prefix. (ComfyUI 1.27.10 raises one uncaught TypeError
    of its own on this emulator with or without the script, so errors are told apart by source.)
    """
    context = chromium.new_context(viewport={"width": 1280, "height": 800}, locale="zh-CN")
    if language:
        context.add_cookies([{"name": "django_language", "value": language, "url": gateway.comfy_origin}])
    page = context.new_page()
    problems = []
    page.on("pageerror", lambda error: SCRIPT in (error.stack or "") and problems.append(error.stack))
    page.on(
        "console",
        lambda message: message.text.startswith("[comfyui-queue]") and problems.append(message.text),
    )
    if route_queue_socket is not None:
        page.route_web_socket("**/queue-ws/", route_queue_socket)
    page.goto(comfy_entry_url(user, port, gateway.login(user)))
    expect(page.get_by_test_id("queue-button")).to_be_visible(timeout=COMFYUI_LOAD_MS)
    return page, problems


def press_comfyuis_queue_button(page) -> dict:
    with page.expect_response(
        lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST"
    ) as reply:
        page.get_by_test_id("queue-button").locator("button").first.click()
    assert reply.value.status == 200, reply.value.text()
    return reply.value.json()


def test_comfyui_still_works_and_the_card_follows_the_task(chromium, nginx_gateway, busy_class, screenshot):
    alice, port = busy_class
    page, problems = open_comfyui(chromium, nginx_gateway, alice, port)
    expect(page.locator("#graph-canvas")).to_be_visible()
    expect(page.locator(CARD)).to_have_count(0)

    reply = press_comfyuis_queue_button(page)
    task = Task.objects.get(pk=reply["prompt_id"])
    assert task.status == TaskStatus.QUEUED
    assert task.client_id, "ComfyUI's own client id travels with the task"
    broadcast_now()

    card = page.locator(CARD)
    expect(card).to_contain_text("⏳ 系统繁忙")
    expect(card).to_contain_text("前方还有 1 人排队")
    expect(card).to_contain_text("最多支持 1 人同时执行")
    expect(card.get_by_role("button", name="取消排队")).to_be_visible()
    screenshot(page, "queued")

    Task.objects.filter(pk=task.pk).update(status=TaskStatus.PROCESSING, started_at=timezone.now())
    broadcast_now()
    expect(card).to_contain_text("正在执行")

    Task.objects.filter(pk=task.pk).update(status=TaskStatus.COMPLETED, finished_at=timezone.now())
    broadcast_now()
    expect(card).to_contain_text("执行完成")
    screenshot(page, "completed")

    # ComfyUI itself is undisturbed: its canvas, its own queue button and no script errors.
    expect(page.get_by_test_id("queue-button")).to_be_enabled()
    assert problems == []


def test_a_second_workflow_waits_for_the_students_own_run_not_the_queue(
    chromium, nginx_gateway, busy_class, make_task, queue_settings
):
    alice, port = busy_class
    queue_settings.max_concurrent_override = 3  # slots free: only alice's own run holds her next one
    queue_settings.save()
    make_task(alice, status=TaskStatus.PROCESSING, port=port)
    page, problems = open_comfyui(chromium, nginx_gateway, alice, port)

    press_comfyuis_queue_button(page)
    broadcast_now()

    queued = page.locator(CARD).filter(has_text="前方还有 1 人排队")
    expect(queued).to_contain_text("⏳ 等你的上一个任务完成后开始")
    expect(queued).not_to_contain_text("即将开始")
    assert problems == []


def test_comfyuis_errors_are_shown_readably(chromium, nginx_gateway, busy_class, screenshot):
    alice, port = busy_class
    task = queue.submit_task(actor=alice, owner=alice, body={"prompt": WORKFLOW}, port=port)
    page, problems = open_comfyui(chromium, nginx_gateway, alice, port)
    expect(page.locator(CARD)).to_contain_text("前方还有 1 人排队")

    Task.objects.filter(pk=task.pk).update(
        status=TaskStatus.FAILED,
        reason="validation",
        finished_at=timezone.now(),
        comfy_error={
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
        },
        node_errors={
            "1": {
                "class_type": "EmptyImage",
                "errors": [{"message": "Value bigger than max", "details": "width: 99999 > 16384"}],
            }
        },
    )
    broadcast_now()

    card = page.locator(CARD)
    expect(card).to_contain_text("❌ 执行失败")
    expect(card).to_contain_text("Prompt outputs failed validation")
    expect(card).to_contain_text("EmptyImage #1: Value bigger than max – width: 99999 > 16384")
    screenshot(page, "failed")
    card.get_by_role("button", name="关闭").click()
    expect(page.locator(CARD)).to_have_count(0)
    assert problems == []


def test_leaving_the_queue_from_the_card(chromium, nginx_gateway, busy_class):
    alice, port = busy_class
    task = queue.submit_task(actor=alice, owner=alice, body={"prompt": WORKFLOW}, port=port)
    page, problems = open_comfyui(chromium, nginx_gateway, alice, port)

    page.locator(CARD).get_by_role("button", name="取消排队").click()

    expect(page.locator(CARD)).to_contain_text("已取消")
    task.refresh_from_db()
    assert (task.status, task.reason) == (TaskStatus.CANCELLED, "cancelled_by_owner")
    assert problems == []


def test_the_card_speaks_english_when_the_teaching_site_does(chromium, nginx_gateway, busy_class, screenshot):
    alice, port = busy_class
    queue.submit_task(actor=alice, owner=alice, body={"prompt": WORKFLOW}, port=port)
    page, _errors = open_comfyui(chromium, nginx_gateway, alice, port, language="en")

    card = page.locator(CARD)
    expect(card).to_contain_text("1 ahead of you in the queue")
    expect(card).to_contain_text("Up to 1 can run at once")
    expect(card.get_by_role("button", name="Leave the queue")).to_be_visible()
    screenshot(page, "english")


def test_without_the_queue_socket_the_card_follows_by_polling(chromium, nginx_gateway, busy_class):
    alice, port = busy_class
    task = queue.submit_task(actor=alice, owner=alice, body={"prompt": WORKFLOW}, port=port)
    page, problems = open_comfyui(
        chromium, nginx_gateway, alice, port, route_queue_socket=lambda socket: socket.close()
    )
    expect(page.locator(CARD)).to_contain_text("前方还有 1 人排队")

    Task.objects.filter(pk=task.pk).update(status=TaskStatus.PROCESSING, started_at=timezone.now())

    # No broadcast: only the status endpoint, polled every 5 s, can tell the page.
    expect(page.locator(CARD)).to_contain_text("正在执行", timeout=15_000)
    assert problems == []


def test_after_the_socket_drops_the_card_reconnects_and_catches_up(chromium, nginx_gateway, busy_class):
    alice, port = busy_class
    task = queue.submit_task(actor=alice, owner=alice, body={"prompt": WORKFLOW}, port=port)
    sockets = []

    def relay(socket):
        socket.connect_to_server()
        sockets.append(socket)

    page, problems = open_comfyui(chromium, nginx_gateway, alice, port, route_queue_socket=relay)
    expect(page.locator(CARD)).to_contain_text("前方还有 1 人排队")
    assert len(sockets) == 1

    sockets[0].close()
    # Changed while the page is cut off, and never broadcast: only a fresh connection tells.
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.PROCESSING, started_at=timezone.now())

    expect(page.locator(CARD)).to_contain_text("正在执行")
    # Playwright's sync API runs route handlers only while the test is inside one of its calls.
    deadline = time.monotonic() + 10
    while len(sockets) < 2:
        assert time.monotonic() < deadline, "the script did not open a new queue socket"
        page.wait_for_timeout(50)
    assert problems == []


def test_the_script_adds_no_globals_to_comfyuis_page(chromium, nginx_gateway, busy_class):
    alice, port = busy_class
    injected, _problems = open_comfyui(chromium, nginx_gateway, alice, port)
    plain = chromium.new_context(locale="zh-CN").new_page()
    # The same frontend straight from the emulator, without nginx and so without the script.
    plain.goto(nginx_gateway.emulator.url(0) + "/")
    for page in (injected, plain):
        # ComfyUI sets its own globals (app, graph) only at the end of its start-up.
        page.wait_for_function("() => 'app' in window && 'graph' in window", timeout=COMFYUI_LOAD_MS)

    names = "() => Object.getOwnPropertyNames(window).sort()"
    added = set(injected.evaluate(names)) - set(plain.evaluate(names))
    assert added == set(), json.dumps(sorted(added))
    assert injected.locator("script[src$='comfyui-queue.js']").count() == 1
