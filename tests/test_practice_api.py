"""The practice API: /api/v1/practice/start-practice, stop-practice, status and presence."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from comfyproxy.models import ComfyInstance, InstanceState

START = "/api/v1/practice/start-practice"
STOP = "/api/v1/practice/stop-practice"
STATUS = "/api/v1/practice/status"
PRESENCE = "/api/v1/practice/presence"


@pytest.fixture
def alice(student, client_for):
    return client_for(student)


def test_start_answers_in_the_seed_shape_with_the_proxy_url(local_comfy, alice, settings):
    response = alice.post(START)

    assert response.status_code == 200
    data = response.json()
    port = data["port"]
    assert port in local_comfy.ports
    assert data["status"] == "success"
    assert data["state"] == "running"
    assert data["url"] == f"/comfyui/alice/{port}/"
    # Students never learn the GPU server's own address; only the proxied path.
    assert data["direct_url"] is None
    assert data["iframe_url"].startswith(settings.COMFY_PUBLIC_ORIGIN)
    assert data["message"]


def test_a_teacher_practising_also_sees_the_gpu_servers_own_address(local_comfy, teacher, client_for):
    data = client_for(teacher).post(START).json()
    assert data["direct_url"] == f"http://127.0.0.1:{data['port']}"


def test_start_says_so_in_chinese(local_comfy, alice):  # Chinese-text assertion
    assert alice.post(START).json()["message"] == "实训环境启动成功"


def test_status_follows_start_and_stop(local_comfy, alice):
    assert alice.get(STATUS).json() | {"message": ""} == {
        "state": "stopped",
        "running": False,
        "port": None,
        "url": None,
        "iframe_url": None,
        "direct_url": None,
        "healthy": None,
        "started_at": None,
        "message": "",
    }
    port = alice.post(START).json()["port"]

    running = alice.get(STATUS).json()
    assert (running["state"], running["running"], running["url"]) == (
        "running",
        True,
        f"/comfyui/alice/{port}/",
    )

    stopped = alice.post(STOP)
    assert stopped.status_code == 200
    assert (stopped.json()["status"], stopped.json()["state"]) == ("success", "stopped")
    assert alice.get(STATUS).json()["state"] == "stopped"


def test_pressing_start_again_keeps_the_same_instance(local_comfy, alice):
    first = alice.post(START).json()
    assert alice.post(START).json()["url"] == first["url"]
    assert ComfyInstance.objects.count() == 1


def test_a_start_that_fails_says_the_gpu_server_cannot_be_reached(local_comfy, alice, settings):
    settings.COMFY_LOCAL_COMMAND = "{python} -c 'raise SystemExit(1)'"

    response = alice.post(START)

    assert response.status_code == 502
    assert response.json()["code"] == "gpu_server_unreachable"
    assert alice.get(STATUS).json()["state"] == "failed"


def test_a_failed_start_says_so_in_chinese(local_comfy, alice, settings):  # Chinese-text assertion
    settings.COMFY_LOCAL_COMMAND = "{python} -c 'raise SystemExit(1)'"
    assert alice.post(START).json()["message"] == "无法连接到算力服务器"


def test_no_free_port_is_a_503_with_its_own_code(
    local_comfy, alice, other_student, register_instance, settings
):
    settings.COMFY_PORT_RANGE = (local_comfy.ports[0], local_comfy.ports[0])
    register_instance(other_student, local_comfy.ports[0])

    response = alice.post(START)

    assert (response.status_code, response.json()["code"]) == (503, "no_free_port")


def test_start_while_starting_is_a_409(local_comfy, alice, student):
    ComfyInstance.objects.create(
        user=student, host="127.0.0.1", port=local_comfy.ports[0], state=InstanceState.STARTING
    )
    response = alice.post(START)
    assert (response.status_code, response.json()["code"]) == (409, "instance_busy")


def test_presence_marks_the_instance_as_in_use(local_comfy, alice, student):
    alice.post(START)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    ComfyInstance.objects.filter(user=student).update(last_activity_at=an_hour_ago)

    response = alice.post(PRESENCE)

    assert response.status_code == 200
    assert response.json()["state"] == "running"
    assert ComfyInstance.objects.get(user=student).last_activity_at > an_hour_ago


def test_a_student_sees_only_their_own_instance(local_comfy, alice, other_student, client_for):
    alice.post(START)
    assert client_for(other_student).get(STATUS).json()["state"] == "stopped"


@pytest.mark.parametrize(
    ("method", "path"), [("post", START), ("post", STOP), ("get", STATUS), ("post", PRESENCE)]
)
def test_anonymous_visitors_are_asked_to_log_in(db, method, path):
    response = getattr(Client(), method)(path)
    assert (response.status_code, response.json()["code"]) == (401, "not_authenticated")


@pytest.mark.parametrize("path", [START, STOP, PRESENCE])
def test_actions_refuse_a_post_without_the_csrf_token(student, path):
    client = Client(enforce_csrf_checks=True)
    client.force_login(student)
    response = client.post(path)
    assert (response.status_code, response.json()["code"]) == (403, "forbidden")


def test_start_by_get_is_refused_with_a_code(alice):
    response = alice.get(START)
    assert (response.status_code, response.json()["code"]) == (405, "method_not_allowed")
