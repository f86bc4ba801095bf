"""The ComfyUI origin's access rules, in-process: entry tickets, the comfy_access cookie, the gate
view nginx asks, the refusal pages and the middleware that keeps teaching sessions out.

The same rules through a real nginx are in test_nginx.py.
"""

import json
from urllib.parse import quote, urlsplit

import pytest
from django.contrib.sessions.models import Session
from django.test import Client

from comfyproxy import gateway
from comfyproxy.models import Task
from comfyproxy.services import instances

pytestmark = pytest.mark.usefixtures("fast_password_hashing")

PORT = 8189
WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
}


def local_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def enter(user, instance_or_port=PORT) -> tuple[Client, str]:
    """Log in on the teaching site, then follow the practice page's entry link; returns the cookie."""
    client = Client()
    client.force_login(user)
    url = gateway.comfy_entry_url(user, instance_or_port, client.session.session_key)
    response = client.get(local_path(url))
    assert response.status_code == 302
    return client, response.cookies[gateway.ACCESS_COOKIE].value


def ask_gate(cookie="", *, username="alice", port=PORT, unsafe="", origin=""):
    """What nginx's auth_request sends (its headers are set by nginx, never by the browser)."""
    return Client().get(
        "/_gate/comfy/",
        headers={
            "X-Comfy-Access": cookie,
            "X-Comfy-User": quote(username, safe=""),
            "X-Comfy-Port": str(port),
            "X-Comfy-Unsafe": unsafe,
            "X-Comfy-Origin": origin,
        },
    )


def refusal(response) -> tuple[int, str]:
    return response.status_code, response.headers.get("X-Comfy-Refusal", "")


@pytest.fixture
def alice(student, register_instance):
    register_instance(student, PORT)
    return student


# --- Entry -------------------------------------------------------------------------------


def test_entry_link_is_on_the_comfyui_origin_and_names_no_session(alice, settings):
    client = Client()
    client.force_login(alice)
    session_key = client.session.session_key
    url = gateway.comfy_entry_url(alice, PORT, session_key)
    assert url.startswith(settings.COMFY_PUBLIC_ORIGIN + "/comfyui-enter/?ticket=")
    assert session_key not in url


def test_entry_sets_a_cookie_for_exactly_that_instance_and_opens_it_with_a_trailing_slash(alice):
    client = Client()
    client.force_login(alice)
    response = client.get(local_path(gateway.comfy_entry_url(alice, PORT, client.session.session_key)))
    assert response.status_code == 302
    assert response["Location"] == f"/comfyui/alice/{PORT}/"
    cookie = response.cookies[gateway.ACCESS_COOKIE]
    assert cookie["path"] == f"/comfyui/alice/{PORT}/"
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"


def test_an_entry_link_works_once(alice):
    client = Client()
    client.force_login(alice)
    path = local_path(gateway.comfy_entry_url(alice, PORT, client.session.session_key))
    assert client.get(path).status_code == 302
    again = client.get(path, headers={"Accept": "text/html"})
    assert again.status_code == 403
    assert 'data-code="entry_link_expired"' in again.content.decode()
    assert gateway.ACCESS_COOKIE not in again.cookies


@pytest.mark.parametrize("ticket", ["", "made-up", "x" * 43, "../../etc"])
def test_a_made_up_entry_link_gets_a_page_not_an_error(db, ticket):
    response = Client().get("/comfyui-enter/", {"ticket": ticket}, headers={"Accept": "text/html"})
    assert response.status_code == 403
    assert 'data-code="entry_link_expired"' in response.content.decode()


def test_a_student_gets_no_entry_to_another_students_comfyui(alice, other_student):
    instance = alice.comfy_instance
    client = Client()
    client.force_login(other_student)
    with pytest.raises(gateway.errors.NotYourInstance):
        gateway.comfy_entry_url(other_student, instance, client.session.session_key)


def test_a_teacher_enters_a_students_comfyui(alice, teacher):
    _client, cookie = enter(teacher, alice.comfy_instance)
    assert refusal(ask_gate(cookie)) == (200, "")


def test_no_entry_without_a_session_or_outside_the_port_range(alice):
    with pytest.raises(gateway.errors.NotAuthenticated):
        gateway.comfy_entry_url(alice, PORT, None)
    client = Client()
    client.force_login(alice)
    with pytest.raises(gateway.PortOutOfRange):
        gateway.comfy_entry_url(alice, 22, client.session.session_key)


def test_non_ascii_usernames_get_an_encoded_path(make_student, register_instance):
    zhang = make_student("张三")
    register_instance(zhang, PORT)
    client = Client()
    client.force_login(zhang)
    response = client.get(local_path(gateway.comfy_entry_url(zhang, PORT, client.session.session_key)))
    encoded = f"/comfyui/{quote('张三')}/{PORT}/"
    assert response["Location"] == encoded
    assert response.cookies[gateway.ACCESS_COOKIE]["path"] == encoded
    assert refusal(ask_gate(response.cookies[gateway.ACCESS_COOKIE].value, username="张三")) == (200, "")


# --- The gate ----------------------------------------------------------------------------


def test_gate_allows_the_owner(alice):
    _client, cookie = enter(alice)
    assert refusal(ask_gate(cookie)) == (200, "")


def test_gate_refuses_anonymous_without_touching_the_database(alice, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert refusal(ask_gate("")) == (401, "not_authenticated")
        assert refusal(ask_gate("forged:value")) == (401, "not_authenticated")


def test_an_allowed_decision_costs_three_queries(alice, django_assert_num_queries):
    _client, cookie = enter(alice)
    # The originating session, its user, the instance.
    with django_assert_num_queries(3):
        assert refusal(ask_gate(cookie)) == (200, "")


def test_a_cookie_counts_only_for_the_instance_it_was_issued_for(alice, other_student, register_instance):
    register_instance(other_student, PORT + 1)
    _client, bobs_cookie = enter(other_student, PORT + 1)
    _client, alices_cookie = enter(alice)
    assert refusal(ask_gate(bobs_cookie, username="alice", port=PORT)) == (401, "not_authenticated")
    assert refusal(ask_gate(alices_cookie, username="alice", port=PORT + 1)) == (401, "not_authenticated")
    assert refusal(ask_gate(alices_cookie, username="bob", port=PORT + 1)) == (401, "not_authenticated")


def test_a_teacher_who_is_no_longer_staff_is_refused(alice, teacher):
    _client, cookie = enter(teacher, alice.comfy_instance)
    teacher.is_staff = False
    teacher.save()
    assert refusal(ask_gate(cookie)) == (403, "forbidden")


def test_gate_refuses_a_port_that_is_not_the_students_running_instance(alice):
    _client, cookie = enter(alice, PORT + 5)
    assert refusal(ask_gate(cookie, port=PORT + 5)) == (403, "instance_not_running")


def test_gate_refuses_a_stopped_instance(alice):
    _client, cookie = enter(alice)
    instances.mark_instance_stopped(alice.comfy_instance)
    assert refusal(ask_gate(cookie)) == (403, "instance_not_running")


def test_gate_refuses_an_instance_on_another_host_than_the_gpu_server(student, register_instance):
    register_instance(student, PORT, host="10.9.9.9")
    _client, cookie = enter(student)
    assert refusal(ask_gate(cookie)) == (403, "instance_not_running")


def test_gate_refuses_a_port_the_range_no_longer_holds(alice, settings):
    _client, cookie = enter(alice)
    settings.COMFY_PORT_RANGE = (PORT + 1, PORT + 10)
    assert refusal(ask_gate(cookie)) == (403, "port_out_of_range")


def test_gate_checks_origin_only_on_requests_that_change_something(alice, settings):
    _client, cookie = enter(alice)
    evil = "http://evil.example"
    assert refusal(ask_gate(cookie, unsafe="1", origin=evil)) == (403, "cross_site_request")
    assert refusal(ask_gate(cookie, unsafe="1", origin=settings.SITE_ORIGIN)) == (403, "cross_site_request")
    assert refusal(ask_gate(cookie, unsafe="1", origin=settings.COMFY_PUBLIC_ORIGIN)) == (200, "")
    # No Origin: not a browser, so not a forged cross-site request.
    assert refusal(ask_gate(cookie, unsafe="1")) == (200, "")
    assert refusal(ask_gate(cookie, origin=evil)) == (200, "")


def test_logging_out_of_the_teaching_site_ends_comfyui_access(alice):
    client, cookie = enter(alice)
    client.logout()
    assert refusal(ask_gate(cookie)) == (401, "not_authenticated")


def test_a_password_change_ends_comfyui_access(alice):
    _client, cookie = enter(alice)
    alice.set_password("a-new-password")
    alice.save()
    assert refusal(ask_gate(cookie)) == (401, "not_authenticated")


def test_a_deactivated_account_loses_comfyui_access(alice):
    _client, cookie = enter(alice)
    alice.is_active = False
    alice.save()
    assert refusal(ask_gate(cookie)) == (401, "not_authenticated")


def test_a_session_of_someone_else_does_not_revive_a_grant(alice, other_student):
    client, cookie = enter(alice)
    session_key = client.session.session_key
    # The same session key now logged in as another user (it cannot happen through login,
    # which cycles the key, but the rule must not depend on that).
    session = Session.objects.get(pk=session_key)
    data = session.get_decoded()
    data["_auth_user_id"] = str(other_student.pk)
    session.session_data = Session.objects.encode(data)
    session.save()
    assert refusal(ask_gate(cookie)) == (401, "not_authenticated")


# --- Refusal pages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "template_code"),
    [
        ("instance_not_running", 409, "instance_not_running"),
        ("instance_unreachable", 502, "instance_unreachable"),
        ("not_authenticated", 401, "not_authenticated"),
        ("forbidden", 403, "forbidden"),
        ("cross_site_request", 403, "cross_site_request"),
        ("no-such-reason", 404, "port_out_of_range"),
    ],
)
def test_refusal_page_for_people_can_be_framed_by_the_teaching_site(
    db, settings, code, status, template_code
):
    response = Client().post("/_gate/refused/", headers={"X-Comfy-Refusal": code, "Accept": "text/html"})
    assert response.status_code == status
    assert f'data-code="{template_code}"' in response.content.decode()
    assert "X-Frame-Options" not in response
    assert response["Content-Security-Policy"] == f"frame-ancestors 'self' {settings.SITE_ORIGIN}"


def test_a_stopped_instance_gets_the_friendly_stopped_page(db, settings):
    response = Client().get(
        "/_gate/refused/", headers={"X-Comfy-Refusal": "instance_unreachable", "Accept": "text/html"}
    )
    page = response.content.decode()
    assert "⏸" in page
    assert f'href="{settings.SITE_ORIGIN}/practice/" target="_top"' in page


def test_refusal_for_comfyuis_frontend_is_in_comfyuis_error_shape(db):
    response = Client().get("/_gate/refused/", headers={"X-Comfy-Refusal": "instance_not_running"})
    assert response.status_code == 409
    body = response.json()
    assert body["error"]["type"] == "instance_not_running"
    assert body["node_errors"] == {}


def test_stopped_page_speaks_chinese_by_default(db):
    response = Client().get(
        "/_gate/refused/", headers={"X-Comfy-Refusal": "instance_unreachable", "Accept": "text/html"}
    )
    page = response.content.decode()
    assert "Your ComfyUI is not running" not in page
    assert any("\u4e00" <= char <= "\u9fff" for char in page)


# --- The ComfyUI origin never acts with a teaching session --------------------------------


def submit(client, username="alice", port=PORT, **headers):
    return client.post(
        f"/comfyui/{username}/{port}/api/prompt",
        data=json.dumps({"client_id": "c1", "prompt": WORKFLOW}),
        content_type="application/json",
        headers=headers,
    )


def test_submission_on_the_comfyui_origin_uses_comfy_access(alice):
    client, _cookie = enter(alice)
    response = submit(client)
    assert response.status_code == 200
    assert Task.objects.get(pk=response.json()["prompt_id"]).submitted_by == alice


def test_a_teachers_session_cookie_counts_for_nothing_under_comfyui(alice, teacher, client_for):
    response = submit(client_for(teacher))
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "not_authenticated"
    assert not Task.objects.exists()


def test_a_teacher_who_entered_submits_for_the_student(alice, teacher):
    client, _cookie = enter(teacher, alice.comfy_instance)
    response = submit(client)
    assert response.status_code == 200
    task = Task.objects.get(pk=response.json()["prompt_id"])
    assert (task.owner, task.submitted_by) == (alice, teacher)


# --- The teaching origin's /comfyui/ addresses -------------------------------------------


def test_opening_comfyui_from_the_teaching_site_continues_on_its_origin(alice, client_for, settings):
    response = client_for(alice).get(f"/comfyui-open/alice/{PORT}/")
    assert response.status_code == 302
    assert response["Location"].startswith(settings.COMFY_PUBLIC_ORIGIN + "/comfyui-enter/?ticket=")


def test_opening_another_students_comfyui_is_refused_with_a_page(alice, other_student, client_for):
    response = client_for(other_student).get(f"/comfyui-open/alice/{PORT}/", headers={"Accept": "text/html"})
    assert response.status_code == 403
    assert 'data-code="forbidden"' in response.content.decode()


def test_opening_a_stopped_comfyui_shows_the_stopped_page(alice, client_for):
    instances.mark_instance_stopped(alice.comfy_instance)
    response = client_for(alice).get(f"/comfyui-open/alice/{PORT}/", headers={"Accept": "text/html"})
    assert response.status_code == 409
    assert 'data-code="instance_not_running"' in response.content.decode()


def test_opening_comfyui_needs_a_login(alice):
    response = Client().get(f"/comfyui-open/alice/{PORT}/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
