"""The submit endpoints: ComfyUI's shape at /comfyui/<user>/<port>/prompt, the seed's at /api/v1."""

import json

import pytest

from comfyproxy.models import Task, TaskStatus

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}},
}
PORT = 8189


def comfy_body(**extra):
    return {
        "client_id": "browser-1",
        "prompt": WORKFLOW,
        "extra_data": {"extra_pnginfo": {"workflow": {}}},
        **extra,
    }


def post_json(client, url, body, **headers):
    return client.post(url, data=json.dumps(body), content_type="application/json", **headers)


@pytest.fixture
def alice(student, register_instance):
    register_instance(student, PORT)
    return student


def test_comfyui_submit_answers_in_comfyui_shape_with_our_prompt_id(alice, comfy_client_for):
    body = comfy_body(number=-5, front=True)
    response = post_json(comfy_client_for(alice), f"/comfyui/alice/{PORT}/api/prompt", body)
    assert response.status_code == 200
    data = response.json()
    assert set(data) >= {"prompt_id", "number", "node_errors", "queue"}
    assert data["node_errors"] == {}
    task = Task.objects.get(pk=data["prompt_id"])
    assert task.status == TaskStatus.QUEUED
    assert task.client_id == "browser-1"
    assert task.extra_data == {"extra_pnginfo": {"workflow": {}}}
    assert data["queue"]["position"] == 1


@pytest.mark.parametrize("path", ["prompt", "api/prompt", "api/prompt/"])
def test_both_comfyui_spellings_of_the_submit_path_reach_the_queue(alice, comfy_client_for, path):
    response = post_json(comfy_client_for(alice), f"/comfyui/alice/{PORT}/{path}", comfy_body())
    assert response.status_code == 200
    assert Task.objects.filter(pk=response.json()["prompt_id"]).exists()


def test_second_student_is_told_how_many_are_ahead(
    alice, other_student, register_instance, comfy_client_for, queue_settings
):
    queue_settings.max_concurrent_override = 1
    queue_settings.save()
    register_instance(other_student, PORT + 1)
    post_json(comfy_client_for(alice), f"/comfyui/alice/{PORT}/prompt", comfy_body())
    response = post_json(comfy_client_for(other_student), f"/comfyui/bob/{PORT + 1}/prompt", comfy_body())
    assert response.json()["queue"]["position"] == 2


def test_seed_execute_api_reports_position_and_message(alice, client_for):
    response = post_json(client_for(alice), "/api/v1/comfy_proxy/execute/alice", comfy_body())
    assert response.status_code == 200
    data = response.json()
    assert data["status"] == "queued"
    assert data["task_id"] == data["prompt_id"]
    assert {"position", "max_concurrent", "processing_count", "message"} <= set(data)


def test_queue_status_counts(alice, client_for):
    client = client_for(alice)
    post_json(client, "/api/v1/comfy_proxy/execute/alice", comfy_body())
    data = client.get("/api/v1/comfy_proxy/queue/status").json()
    assert data["queue_length"] == 1
    assert data["processing_count"] == 0
    assert data["available_slots"] == data["max_concurrent"]


# --- refusals: each has ComfyUI's error shape (or the API's) and a stable code ------------


def comfy_error_type(response):
    body = response.json()
    assert set(body) == {"error", "node_errors"}
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    return body["error"]["type"]


def test_malformed_json_is_400(alice, comfy_client_for):
    client = comfy_client_for(alice)
    response = client.post(f"/comfyui/alice/{PORT}/prompt", data="{nope", content_type="application/json")
    assert response.status_code == 400
    assert comfy_error_type(response) == "malformed_json"


def test_missing_prompt_is_400_no_prompt(alice, comfy_client_for):
    response = post_json(comfy_client_for(alice), f"/comfyui/alice/{PORT}/prompt", {"client_id": "x"})
    assert response.status_code == 400
    assert comfy_error_type(response) == "no_prompt"


def test_messages_are_chinese_by_default_and_english_on_request(alice, comfy_client_for):
    client = comfy_client_for(alice)
    chinese = post_json(client, f"/comfyui/alice/{PORT}/prompt", {"client_id": "x"})
    english = post_json(
        client, f"/comfyui/alice/{PORT}/prompt", {"client_id": "x"}, HTTP_ACCEPT_LANGUAGE="en"
    )
    assert english.json()["error"]["message"] == "No prompt provided."
    assert chinese.json()["error"]["message"] != english.json()["error"]["message"]


def test_anonymous_is_401(alice, client):
    response = post_json(client, f"/comfyui/alice/{PORT}/prompt", comfy_body())
    assert response.status_code == 401
    assert comfy_error_type(response) == "not_authenticated"


def test_another_students_instance_refuses_them(alice, other_student, register_instance, comfy_client_for):
    register_instance(other_student, PORT + 1)
    # bob's access is for his own instance's address only: at alice's he is nobody.
    response = post_json(comfy_client_for(other_student), f"/comfyui/alice/{PORT}/prompt", comfy_body())
    assert response.status_code == 401
    assert comfy_error_type(response) == "not_authenticated"


def test_teacher_may_submit_for_a_student(alice, teacher, comfy_client_for):
    client = comfy_client_for(teacher, alice.comfy_instance)
    response = post_json(client, f"/comfyui/alice/{PORT}/prompt", comfy_body())
    assert response.status_code == 200
    task = Task.objects.get(pk=response.json()["prompt_id"])
    assert task.owner == alice
    assert task.submitted_by == teacher


def test_wrong_port_is_409_instance_not_running(alice, comfy_client_for):
    response = post_json(comfy_client_for(alice, PORT + 7), f"/comfyui/alice/{PORT + 7}/prompt", comfy_body())
    assert response.status_code == 409
    assert comfy_error_type(response) == "instance_not_running"


def test_student_without_instance_gets_a_friendly_error(student, client_for):
    response = post_json(client_for(student), "/api/v1/comfy_proxy/execute/alice", comfy_body())
    assert response.status_code == 409
    assert response.json()["code"] == "instance_not_running"
    assert "ComfyUI" in response.json()["message"]


def test_body_over_the_limit_is_413(alice, comfy_client_for, settings):
    settings.COMFY_MAX_PROMPT_BYTES = 2048
    body = comfy_body(extra_data={"blob": "x" * 4096})
    response = post_json(comfy_client_for(alice), f"/comfyui/alice/{PORT}/prompt", body)
    assert response.status_code == 413
    assert comfy_error_type(response) == "body_too_large"


def test_per_student_limit_is_429(alice, comfy_client_for, queue_settings):
    queue_settings.max_queued_per_student = 2
    queue_settings.save()
    client = comfy_client_for(alice)
    codes = [post_json(client, f"/comfyui/alice/{PORT}/prompt", comfy_body()).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert Task.objects.count() == 2


def test_cross_site_post_is_refused(alice, comfy_client_for):
    response = post_json(
        comfy_client_for(alice),
        f"/comfyui/alice/{PORT}/prompt",
        comfy_body(),
        HTTP_ORIGIN="http://evil.example",
    )
    assert response.status_code == 403
    assert comfy_error_type(response) == "cross_site_request"


def test_deeply_nested_body_is_400_not_500(alice, comfy_client_for):
    deep = "[" * 100_000 + "]" * 100_000
    response = comfy_client_for(alice).post(
        f"/comfyui/alice/{PORT}/prompt", data='{"prompt": ' + deep + "}", content_type="application/json"
    )
    assert response.status_code == 400


def test_api_wrong_content_type_is_415(alice, client_for):
    response = client_for(alice).post(
        "/api/v1/comfy_proxy/execute/alice", data="prompt=1", content_type="text/plain"
    )
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"


def test_cancel_removes_a_queued_task_at_once(alice, client_for):
    client = client_for(alice)
    task_id = post_json(client, "/api/v1/comfy_proxy/execute/alice", comfy_body()).json()["task_id"]
    response = client.post(f"/api/v1/comfy_proxy/cancel/{task_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    again = client.post(f"/api/v1/comfy_proxy/cancel/{task_id}")
    assert again.status_code == 409
    assert again.json()["code"] == "task_finished"


def test_status_of_someone_elses_task_is_refused(alice, other_student, client_for):
    task_id = post_json(client_for(alice), "/api/v1/comfy_proxy/execute/alice", comfy_body()).json()[
        "task_id"
    ]
    response = client_for(other_student).get(f"/api/v1/comfy_proxy/status/{task_id}")
    assert response.status_code == 403


def test_unknown_task_is_404(alice, client_for):
    response = client_for(alice).get("/api/v1/comfy_proxy/status/not-a-uuid")
    assert response.status_code == 404
    assert response.json()["code"] == "task_not_found"
