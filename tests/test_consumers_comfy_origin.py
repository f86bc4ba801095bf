"""The queue as the script injected into ComfyUI sees it: the instance's own socket and endpoints
on the ComfyUI origin, where only that instance's `comfy_access` counts, never the session."""

import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing.websocket import WebsocketCommunicator
from django.conf import settings
from django.contrib.sessions.models import Session
from django.test import Client

from comfyproxy import gateway
from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import broadcast, queue
from teaching.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("fast_password_hashing")]

WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}
ALICE_PORT, BOB_PORT = 8189, 8190


@pytest.fixture
def alice(student, register_instance):
    register_instance(student, ALICE_PORT)
    return student


@pytest.fixture
def bob(other_student, register_instance):
    register_instance(other_student, BOB_PORT)
    return other_student


def submit(user) -> Task:
    return queue.submit_task(actor=user, owner=user, body={"prompt": WORKFLOW})


def instance_path(user, port: int, rest: str) -> str:
    return f"{gateway.instance_path(user.get_username(), port)}{rest}"


def cookie_header(client: Client) -> bytes:
    return "; ".join(f"{name}={morsel.value}" for name, morsel in client.cookies.items()).encode()


def comfy_socket(
    path: str, cookies: bytes, origin: str = settings.COMFY_PUBLIC_ORIGIN
) -> WebsocketCommunicator:
    headers = [(b"origin", origin.encode()), (b"host", b"127.0.0.1:8081"), (b"cookie", cookies)]
    return WebsocketCommunicator(application, path, headers=headers)


async def test_a_students_comfyui_page_gets_their_tasks_at_once(alice, bob, comfy_client_for):
    mine = await sync_to_async(submit)(alice)
    theirs = await sync_to_async(submit)(bob)
    browser = await sync_to_async(comfy_client_for)(alice)

    communicator = comfy_socket(instance_path(alice, ALICE_PORT, "queue-ws/"), cookie_header(browser))
    accepted, _ = await communicator.connect()
    assert accepted
    frame = await communicator.receive_json_from()

    assert [(task["task_id"], task["position"]) for task in frame["tasks"]] == [(str(mine.id), 1)]
    assert str(theirs.id) not in json.dumps(frame)
    assert "board" not in frame

    await sync_to_async(queue.cancel_task)(actor=alice, task=mine)
    await broadcast.broadcast_queue_snapshot()
    update = await communicator.receive_json_from(timeout=5)
    assert update["tasks"][0]["status"] == "cancelled"
    await communicator.disconnect()


async def test_a_teacher_on_a_students_comfyui_sees_that_students_tasks_only(
    alice, bob, teacher, comfy_client_for
):
    mine = await sync_to_async(submit)(alice)
    await sync_to_async(submit)(bob)
    browser = await sync_to_async(comfy_client_for)(
        teacher, await sync_to_async(lambda: alice.comfy_instance)()
    )

    communicator = comfy_socket(instance_path(alice, ALICE_PORT, "queue-ws/"), cookie_header(browser))
    accepted, _ = await communicator.connect()
    assert accepted
    frame = await communicator.receive_json_from()

    assert [task["task_id"] for task in frame["tasks"]] == [str(mine.id)]
    assert "board" not in frame, "student JavaScript on this page must not read the whole class's queue"
    await communicator.disconnect()


def refused_cases(alice, bob, teacher, comfy_client_for):
    """(why, path, cookies, origin) that must each be refused."""
    alice_browser = comfy_client_for(alice)
    teacher_session = Client()
    teacher_session.force_login(teacher)
    alice_path = instance_path(alice, ALICE_PORT, "queue-ws/")
    return [
        ("no cookie at all", alice_path, b"", settings.COMFY_PUBLIC_ORIGIN),
        (
            "a teacher's teaching-site session only",
            alice_path,
            cookie_header(teacher_session),
            settings.COMFY_PUBLIC_ORIGIN,
        ),
        (
            "alice's access on bob's instance",
            instance_path(bob, BOB_PORT, "queue-ws/"),
            cookie_header(alice_browser),
            settings.COMFY_PUBLIC_ORIGIN,
        ),
        (
            "alice's access on another port",
            instance_path(alice, BOB_PORT, "queue-ws/"),
            cookie_header(alice_browser),
            settings.COMFY_PUBLIC_ORIGIN,
        ),
        ("a page of the teaching site", alice_path, cookie_header(alice_browser), settings.SITE_ORIGIN),
        ("a page of another site", alice_path, cookie_header(alice_browser), "https://evil.example"),
    ]


async def test_the_instance_socket_is_refused_without_that_instances_access(
    alice, bob, teacher, comfy_client_for
):
    cases = await sync_to_async(refused_cases)(alice, bob, teacher, comfy_client_for)
    for why, path, cookies, origin in cases:
        communicator = comfy_socket(path, cookies, origin)
        accepted, _ = await communicator.connect()
        assert not accepted, why


async def test_access_ends_with_the_teaching_session(alice, comfy_client_for):
    browser = await sync_to_async(comfy_client_for)(alice)
    await sync_to_async(Session.objects.all().delete)()

    communicator = comfy_socket(instance_path(alice, ALICE_PORT, "queue-ws/"), cookie_header(browser))
    accepted, _ = await communicator.connect()
    assert not accepted


# --- the polling fallback and the cancel button, over HTTP ---------------------------------


def test_queue_status_is_the_sockets_frame(alice, bob, comfy_client_for):
    mine, theirs = submit(alice), submit(bob)
    response = comfy_client_for(alice).get(instance_path(alice, ALICE_PORT, "queue-status/"))

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    frame = response.json()
    assert frame["type"] == "queue"
    assert [(task["task_id"], task["position"]) for task in frame["tasks"]] == [(str(mine.id), 1)]
    assert str(theirs.id) not in response.content.decode()


def test_queue_status_refuses_the_teaching_session(alice, client_for):
    response = client_for(alice).get(instance_path(alice, ALICE_PORT, "queue-status/"))
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


def test_leaving_the_queue_from_comfyui(alice, comfy_client_for):
    task = submit(alice)
    response = comfy_client_for(alice).post(
        instance_path(alice, ALICE_PORT, f"queue-cancel/{task.id}/"),
        headers={"Origin": settings.COMFY_PUBLIC_ORIGIN},
    )

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    task.refresh_from_db()
    assert (task.status, task.reason) == (TaskStatus.CANCELLED, "cancelled_by_owner")


@pytest.mark.parametrize(
    ("origin", "code"),
    [("https://evil.example", "cross_site_request"), (settings.SITE_ORIGIN, "cross_site_request")],
)
def test_leaving_the_queue_from_another_origin_is_refused(alice, comfy_client_for, origin, code):
    task = submit(alice)
    response = comfy_client_for(alice).post(
        instance_path(alice, ALICE_PORT, f"queue-cancel/{task.id}/"), headers={"Origin": origin}
    )
    assert (response.status_code, response.json()["code"]) == (403, code)
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED


def test_a_comfyui_page_cannot_cancel_another_students_task(alice, bob, comfy_client_for):
    theirs = submit(bob)
    response = comfy_client_for(alice).post(
        instance_path(alice, ALICE_PORT, f"queue-cancel/{theirs.id}/"),
        headers={"Origin": settings.COMFY_PUBLIC_ORIGIN},
    )
    assert response.status_code in (403, 404)
    theirs.refresh_from_db()
    assert theirs.status == TaskStatus.QUEUED


@pytest.mark.parametrize("task_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000"])
def test_cancelling_an_unknown_task_says_so(alice, comfy_client_for, task_id):
    response = comfy_client_for(alice).post(
        instance_path(alice, ALICE_PORT, f"queue-cancel/{task_id}/"),
        headers={"Origin": settings.COMFY_PUBLIC_ORIGIN},
    )
    assert (response.status_code, response.json()["code"]) == (404, "task_not_found")
