"""Through a real nginx (as comfy_nginx_config writes it), Django under uvicorn and the emulator.

Each test builds its people and instances in a database the server shares; the stack itself
starts once per run (tests/nginx_fixtures.py). Decisions of the gate are cached by nginx for a
few seconds per cookie, so every test enters with fresh cookies.
"""

import json
import time
from urllib.parse import quote

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from comfyproxy import gateway
from comfyproxy.models import Task
from comfyproxy.services import instances
from tests.nginx_fixtures import GATE_CACHE_SECONDS
from tests.processes import wait_until

pytestmark = pytest.mark.usefixtures("fast_password_hashing")

QUEUE_SCRIPT_TAG = '<script src="/static/comfyproxy/comfyui-queue.js"></script>'
PAGE = {"Accept": "text/html,application/xhtml+xml"}
WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
}


def page_code(response) -> str:
    """The refusal code a friendly page carries (the text itself is translated)."""
    marker = 'data-code="'
    text = response.text
    start = text.index(marker) + len(marker)
    return text[start : text.index('"', start)]


def same_origin(gateway_stack) -> dict:
    return {"Origin": gateway_stack.comfy_origin}


@pytest.fixture
def alice(nginx_gateway, make_student, register_instance):
    user = make_student("alice")
    register_instance(user, nginx_gateway.emulator_ports[0])
    return user


@pytest.fixture
def alice_on_echo(nginx_gateway, make_student, register_instance):
    """A student whose "ComfyUI" is the echo upstream, which reports what reached it."""
    user = make_student("alice")
    register_instance(user, nginx_gateway.echo_port)
    return user


@pytest.fixture
def teacher_user(nginx_gateway):
    return get_user_model().objects.create_user("teacher", password="pw-teacher", is_staff=True)


# --- Routing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "path", "status", "served_by"),
    [
        ("site", "/accounts/login/", 200, "django"),
        ("site", "/api/v1/comfy_proxy/queue/status", 401, "django"),
        ("site", "/static/admin/css/base.css", 200, "nginx"),
        ("site", "/_gate/comfy/", 404, "nginx"),
        ("site", "/_gate/refused/", 404, "nginx"),
        ("comfy", "/", 404, "nginx"),
        ("comfy", "/accounts/login/", 404, "nginx"),
        ("comfy", "/admin/", 404, "nginx"),
        ("comfy", "/api/v1/comfy_proxy/queue/status", 404, "nginx"),
        ("comfy", "/static/admin/css/base.css", 404, "nginx"),
        # The directory the injected queue script is served from, on its page's own origin.
        ("comfy", "/static/comfyproxy/site.css", 200, "nginx"),
        ("comfy", "/_gate/comfy/", 404, "nginx"),
        ("comfy", "/_comfy_gate", 404, "nginx"),
        ("comfy", "/comfyui/", 404, "nginx"),
    ],
)
def test_routing_table(nginx_gateway, origin, path, status, served_by):
    base = nginx_gateway.site_origin if origin == "site" else nginx_gateway.comfy_origin
    response = httpx.get(base + path)
    assert response.status_code == status
    # Django marks every response it makes; nginx's own answers and files carry no such header.
    assert ("X-Content-Type-Options" in response.headers) == (served_by == "django")


def test_site_websockets_reach_channels_with_the_session(nginx_gateway, alice):
    session = nginx_gateway.login(alice)
    url = nginx_gateway.site_origin.replace("http", "ws", 1) + "/ws/comfy_proxy/queue/"
    with connect(
        url,
        origin=nginx_gateway.site_origin,
        additional_headers={"Cookie": f"sessionid={session}"},
        open_timeout=10,
    ) as socket:
        assert json.loads(socket.recv(timeout=10))["type"]


def test_a_comfyui_address_on_the_teaching_site_continues_on_the_comfyui_origin(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    site = nginx_gateway.site_client(alice)
    response = site.get(f"/comfyui/alice/{port}/")
    assert response.status_code == 302
    assert response.headers["Location"] == f"/comfyui-open/alice/{port}/"
    response = site.get(response.headers["Location"])
    assert response.headers["Location"].startswith(nginx_gateway.comfy_origin + "/comfyui-enter/?ticket=")
    browser = httpx.Client(follow_redirects=True)
    page = browser.get(response.headers["Location"])
    assert page.status_code == 200
    assert str(page.url) == nginx_gateway.comfy_url(f"/comfyui/alice/{port}/")


def test_an_instance_address_without_its_trailing_slash_gets_one(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    response = httpx.get(nginx_gateway.comfy_url(f"/comfyui/alice/{port}?x=1"))
    assert response.status_code == 302
    assert response.headers["Location"] == f"/comfyui/alice/{port}/?x=1"


# --- The gate ----------------------------------------------------------------------------


def test_the_owner_gets_comfyui_with_the_queue_script_injected_once(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    response = nginx_gateway.comfy_client(alice, port).get(f"/comfyui/alice/{port}/", headers=PAGE)
    assert response.status_code == 200
    page = response.text
    assert page.count(QUEUE_SCRIPT_TAG) == 1
    assert QUEUE_SCRIPT_TAG + "</head>" in page
    assert "./assets/index-" in page  # ComfyUI's own page, relative URLs intact


def test_the_injection_survives_a_browser_asking_for_gzip(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    comfy = nginx_gateway.comfy_client(alice, port)
    response = comfy.get(f"/comfyui/alice/{port}/", headers={**PAGE, "Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.text.count(QUEUE_SCRIPT_TAG) == 1


def test_a_teacher_gets_a_students_comfyui(nginx_gateway, alice, teacher_user):
    port = nginx_gateway.emulator_ports[0]
    response = nginx_gateway.comfy_client(teacher_user, alice.comfy_instance).get(f"/comfyui/alice/{port}/")
    assert response.status_code == 200
    assert QUEUE_SCRIPT_TAG in response.text


def test_anonymous_gets_a_page_saying_to_start_from_the_practice_page(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    response = httpx.get(nginx_gateway.comfy_url(f"/comfyui/alice/{port}/"), headers=PAGE)
    assert response.status_code == 401
    assert page_code(response) == "not_authenticated"
    fetched = httpx.get(nginx_gateway.comfy_url(f"/comfyui/alice/{port}/api/queue"))
    assert fetched.status_code == 401
    assert fetched.json()["error"]["type"] == "not_authenticated"


def test_another_student_does_not_get_in(nginx_gateway, alice, make_student, register_instance):
    alice_port, bob_port = nginx_gateway.emulator_ports[:2]
    bob = make_student("bob")
    register_instance(bob, bob_port)
    bobs_browser = nginx_gateway.comfy_client(bob, bob_port)
    assert bobs_browser.get(f"/comfyui/bob/{bob_port}/").status_code == 200
    # bob's cookie belongs to his own instance's path: at alice's he is nobody.
    response = bobs_browser.get(f"/comfyui/alice/{alice_port}/", headers=PAGE)
    assert (response.status_code, page_code(response)) == (401, "not_authenticated")
    # Sending his cookie there by hand changes nothing.
    forced = httpx.get(
        nginx_gateway.comfy_url(f"/comfyui/alice/{alice_port}/"),
        cookies={gateway.ACCESS_COOKIE: bobs_browser.cookies[gateway.ACCESS_COOKIE]},
    )
    assert forced.status_code == 401
    # And the teaching site will not give him a way in.
    site = nginx_gateway.site_client(bob)
    response = site.get(f"/comfyui-open/alice/{alice_port}/", headers=PAGE)
    assert (response.status_code, page_code(response)) == (403, "forbidden")


def test_a_students_access_to_a_port_that_is_not_their_instance_never_reaches_it(
    nginx_gateway, alice, make_student, register_instance
):
    bob_port = nginx_gateway.emulator_ports[1]
    register_instance(make_student("bob"), bob_port)
    # A ticket for alice at bob's port (the entry does not know where alice runs; the gate does).
    comfy = nginx_gateway.comfy_client(alice, bob_port)
    response = comfy.get(f"/comfyui/alice/{bob_port}/", headers=PAGE)
    assert (response.status_code, page_code(response)) == (409, "instance_not_running")
    assert comfy.get(f"/comfyui/bob/{bob_port}/").status_code == 401


@pytest.mark.parametrize(
    "port_of", ["ssh", "postgres", "redis", "django", "nginx", "range_edge", "zero_padded"]
)
def test_ports_outside_the_range_are_never_connected_to(nginx_gateway, alice, port_of):
    first, last = nginx_gateway.port_range
    port = {
        "ssh": "22",
        "postgres": "5432",
        "redis": "6379",
        "django": str(nginx_gateway.django_port),
        "nginx": nginx_gateway.comfy_origin.rsplit(":", 1)[1],
        "range_edge": str(last + 1),
        "zero_padded": f"0{first}",
    }[port_of]
    comfy = nginx_gateway.comfy_client(alice, nginx_gateway.emulator_ports[0])
    response = comfy.get(f"/comfyui/alice/{port}/system_stats")
    assert response.status_code == 404
    assert "X-Content-Type-Options" not in response.headers  # nginx itself, no upstream asked


def test_comfyuis_websocket_needs_access_and_a_same_origin_page(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    comfy = nginx_gateway.comfy_client(alice, port)
    url = (
        nginx_gateway.comfy_origin.replace("http", "ws", 1) + f"/comfyui/alice/{port}/ws?clientId=nginx-test"
    )
    cookie = f"{gateway.ACCESS_COOKIE}={comfy.cookies[gateway.ACCESS_COOKIE]}"
    with connect(url, origin=nginx_gateway.comfy_origin, additional_headers={"Cookie": cookie}) as socket:
        hello = json.loads(socket.recv(timeout=10))
        assert hello["type"] == "status"
        assert hello["data"]["sid"] == "nginx-test"
    with pytest.raises(InvalidStatus) as anonymous:
        connect(url, origin=nginx_gateway.comfy_origin, open_timeout=10)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as cross_site:
        connect(url, origin="http://evil.example", additional_headers={"Cookie": cookie}, open_timeout=10)
    assert cross_site.value.response.status_code == 403


def test_cross_site_posts_to_comfyui_are_refused(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    comfy = nginx_gateway.comfy_client(alice, port)
    path = f"/comfyui/alice/{port}/api/settings/Comfy.TestSetting"
    refused = comfy.post(path, json="x", headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "cross_site_request"
    # The teaching site's pages may not post to ComfyUI either.
    refused = comfy.post(path, json="x", headers={"Origin": nginx_gateway.site_origin})
    assert refused.status_code == 403
    accepted = comfy.post(path, json="x", headers=same_origin(nginx_gateway))
    assert accepted.status_code == 200


# --- What reaches ComfyUI ----------------------------------------------------------------


def test_no_cookie_reaches_comfyui_and_the_browsers_host_does(nginx_gateway, alice_on_echo):
    port = nginx_gateway.echo_port
    comfy = nginx_gateway.comfy_client(alice_on_echo, port)
    # What a browser holds for this host: the teaching site's session and CSRF cookies too.
    comfy.cookies.set("sessionid", nginx_gateway.login(alice_on_echo), domain="127.0.0.1")
    comfy.cookies.set("csrftoken", "t" * 32, domain="127.0.0.1")
    seen = comfy.get(f"/comfyui/alice/{port}/api/queue", headers={"Accept-Encoding": "gzip"}).json()
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert "cookie" not in headers
    assert headers["host"] == nginx_gateway.comfy_origin.removeprefix("http://")
    assert "accept-encoding" not in headers


def test_the_raw_path_reaches_comfyui_with_its_escapes(nginx_gateway, alice_on_echo):
    port = nginx_gateway.echo_port
    comfy = nginx_gateway.comfy_client(alice_on_echo, port)
    raw = "/api/userdata/workflows%2Fmy%20flow.json?overwrite=true&full_info=1"
    seen = comfy.get(f"/comfyui/alice/{port}{raw}").json()
    assert seen["raw_path"] == raw


def test_a_workflow_in_a_folder_is_saved_and_read_back_through_nginx(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    comfy = nginx_gateway.comfy_client(alice, port)
    name = f"workflows%2Fnginx-{time.monotonic_ns()}.json"
    saved = comfy.post(
        f"/comfyui/alice/{port}/api/userdata/{name}",
        content=b'{"nodes": []}',
        headers=same_origin(nginx_gateway),
    )
    assert saved.status_code == 200, saved.text
    read = comfy.get(f"/comfyui/alice/{port}/api/userdata/{name}")
    assert read.status_code == 200
    assert read.json() == {"nodes": []}


def test_dot_segments_are_refused(nginx_gateway, alice_on_echo):
    port = nginx_gateway.echo_port
    comfy = nginx_gateway.comfy_client(alice_on_echo, port)
    before = len(nginx_gateway.echo.requests)
    assert comfy.get(f"/comfyui/alice/{port}/x/%2e%2e/api/queue").status_code == 400
    assert len(nginx_gateway.echo.requests) == before


def test_large_uploads_reach_comfyui(nginx_gateway, alice_on_echo):
    port = nginx_gateway.echo_port
    comfy = nginx_gateway.comfy_client(alice_on_echo, port)
    image = b"\x89PNG" + b"\0" * (5 * 1024 * 1024)
    response = comfy.post(
        f"/comfyui/alice/{port}/upload/image",
        files={"image": ("big.png", image, "image/png")},
        headers=same_origin(nginx_gateway),
    )
    assert response.status_code == 200
    assert response.json()["body_length"] > len(image)


# --- Submission goes to the queue ----------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    ["prompt", "api/prompt", "api/prompt/", "/api//prompt", "API/prompt", "api/Prompt", "api/%70rompt"],
)
def test_every_spelling_of_submit_reaches_the_queue_and_never_comfyui(nginx_gateway, alice_on_echo, spelling):
    port = nginx_gateway.echo_port
    comfy = nginx_gateway.comfy_client(alice_on_echo, port)
    before = len(nginx_gateway.echo.requests)
    response = comfy.post(
        f"/comfyui/alice/{port}/{spelling}",
        json={"client_id": "browser-1", "prompt": WORKFLOW},
        headers=same_origin(nginx_gateway),
    )
    assert response.status_code == 200, response.text
    task = Task.objects.get(pk=response.json()["prompt_id"])
    assert (task.owner, task.port, task.client_id) == (alice_on_echo, port, "browser-1")
    assert len(nginx_gateway.echo.requests) == before


def test_reading_the_queue_counter_still_asks_comfyui(nginx_gateway, alice_on_echo):
    port = nginx_gateway.echo_port
    seen = nginx_gateway.comfy_client(alice_on_echo, port).get(f"/comfyui/alice/{port}/api/prompt").json()
    assert (seen["method"], seen["raw_path"]) == ("GET", "/api/prompt")


@pytest.mark.parametrize(
    ("method", "endpoint"),
    [("GET", "queue-status/"), ("POST", "queue-cancel/00000000-0000-0000-0000-000000000000/")],
)
def test_the_queue_scripts_endpoints_are_answered_by_django_not_comfyui(
    nginx_gateway, alice_on_echo, method, endpoint
):
    port = nginx_gateway.echo_port
    comfy = nginx_gateway.comfy_client(alice_on_echo, port)
    before = len(nginx_gateway.echo.requests)
    response = comfy.request(method, f"/comfyui/alice/{port}/{endpoint}", headers=same_origin(nginx_gateway))
    assert "X-Content-Type-Options" in response.headers  # Django's
    assert len(nginx_gateway.echo.requests) == before


def test_the_queue_scripts_socket_is_answered_by_channels(nginx_gateway, alice_on_echo):
    port = nginx_gateway.echo_port
    comfy = nginx_gateway.comfy_client(alice_on_echo, port)
    before = len(nginx_gateway.echo.requests)
    url = nginx_gateway.comfy_origin.replace("http", "ws", 1) + f"/comfyui/alice/{port}/queue-ws/"
    cookie = f"{gateway.ACCESS_COOKIE}={comfy.cookies[gateway.ACCESS_COOKIE]}"
    with connect(url, origin=nginx_gateway.comfy_origin, additional_headers={"Cookie": cookie}) as socket:
        assert json.loads(socket.recv(timeout=10))
    assert len(nginx_gateway.echo.requests) == before


def test_submission_never_acts_with_a_teaching_session(nginx_gateway, alice_on_echo, teacher_user):
    port = nginx_gateway.echo_port
    response = httpx.post(
        nginx_gateway.comfy_url(f"/comfyui/alice/{port}/api/prompt"),
        json={"prompt": WORKFLOW},
        headers=same_origin(nginx_gateway),
        cookies={"sessionid": nginx_gateway.login(teacher_user)},
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "not_authenticated"
    assert not Task.objects.exists()


def test_a_non_ascii_username_reaches_its_comfyui_and_submits(nginx_gateway, make_student, register_instance):
    port = nginx_gateway.emulator_ports[2]
    zhang = make_student("张三")
    register_instance(zhang, port)
    comfy = nginx_gateway.comfy_client(zhang, port)
    base = f"/comfyui/{quote('张三')}/{port}/"
    assert QUEUE_SCRIPT_TAG in comfy.get(base).text
    response = comfy.post(base + "api/prompt", json={"prompt": WORKFLOW}, headers=same_origin(nginx_gateway))
    assert response.status_code == 200
    assert Task.objects.get(pk=response.json()["prompt_id"]).owner == zhang


# --- Stopped instances and revocation ------------------------------------------------------


def test_an_instance_that_does_not_answer_gets_the_friendly_stopped_page(
    nginx_gateway, make_student, register_instance
):
    port = nginx_gateway.silent_port
    student = make_student("alice")
    register_instance(student, port)
    response = nginx_gateway.comfy_client(student, port).get(f"/comfyui/alice/{port}/", headers=PAGE)
    assert (response.status_code, page_code(response)) == (502, "instance_unreachable")
    assert nginx_gateway.site_url("/practice/") in response.text


def test_a_stopped_instance_gets_the_friendly_stopped_page(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    comfy = nginx_gateway.comfy_client(alice, port)
    instances.mark_instance_stopped(alice.comfy_instance)
    response = comfy.get(f"/comfyui/alice/{port}/", headers=PAGE)
    assert (response.status_code, page_code(response)) == (409, "instance_not_running")


def test_logging_out_ends_access_within_the_gate_cache_time(nginx_gateway, alice):
    port = nginx_gateway.emulator_ports[0]
    session_key = nginx_gateway.login(alice)
    comfy = nginx_gateway.comfy_client(alice, port, session_key=session_key)
    assert comfy.get(f"/comfyui/alice/{port}/api/queue").status_code == 200
    Session.objects.filter(pk=session_key).delete()
    wait_until(
        lambda: comfy.get(f"/comfyui/alice/{port}/api/queue").status_code == 401,
        # The gate's cache time (5 s), one refresh behind a stale answer, and a slow machine.
        timeout=GATE_CACHE_SECONDS + 3,
        interval=0.2,
        message="access to end after logout",
    )
