"""Property-based fuzzing of the submit, status and cancel endpoints (Hypothesis, Django's test client).

Whatever arrives (wrong types, huge or deeply nested bodies, NUL and lone surrogates, missing
fields, invalid UTF-8, any content type), the answer is never a 5xx. It is either the
endpoint's success reply, or a refusal in the documented shape (ComfyUI's error object on
/comfyui/..., `{"code", "message", "details"}` on /api/v1) whose code is one of the documented
codes, with that code's HTTP status. Whatever is accepted can be stored and sent on to
ComfyUI as it is.

The normal run sends about two thousand requests, the same ones every run (derandomized);
`-m slow` sends thousands more random ones and prints how to replay a failure. On PostgreSQL
(`-m postgres`) it also proves that nothing the database refuses gets as far as the database.
"""

import json
import uuid
from decimal import Decimal
from urllib.parse import quote

import pytest
from django.conf import settings as django_settings
from django.test import Client
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from comfyproxy.comfy.client import PromptRequest
from comfyproxy.models import Task

pytestmark = pytest.mark.postgres

PORT = 8189
BOB_PORT = 8190
# Small enough that "too large" is reached in a few kB; the real limit is tens of MB.
BODY_LIMIT = 16 * 1024

# Every refusal code these endpoints document, with its HTTP status (comfyproxy/errors.py,
# comfyproxy/api/errors.py). A new code must be added here on purpose.
DOCUMENTED_REFUSALS = {
    "bad_request": 400,
    "malformed_json": 400,
    "no_prompt": 400,
    "invalid_prompt": 400,
    "invalid_request": 400,
    "not_authenticated": 401,
    "forbidden": 403,
    "cross_site_request": 403,
    "not_found": 404,
    "user_not_found": 404,
    "task_not_found": 404,
    "method_not_allowed": 405,
    "instance_not_running": 409,
    "instance_busy": 409,
    "task_finished": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "too_many_tasks": 429,
    "throttled": 429,
    "queue_unavailable": 503,
}

# Deterministic in the normal suite: the same examples every run, so a failure reproduces.
FAST = hypothesis_settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
THOROUGH = hypothesis_settings(
    max_examples=1000,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- What clients send --------------------------------------------------------------------

# Any code point, lone surrogates and NUL included (Hypothesis leaves surrogates out by default).
CHARACTERS = st.characters() | st.characters(categories=["Cs"]) | st.sampled_from("\x00\ufeff\uffff\u2028")
TEXT = st.text(CHARACTERS, max_size=12)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**80)
    # NaN and the infinities are written as NaN/Infinity, which strict JSON does not have.
    | st.floats()
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=16,
)
NODE_IDS = st.integers(0, 99).map(str) | TEXT
NODES = (
    st.fixed_dictionaries(
        {
            "class_type": st.sampled_from(["EmptyImage", "SaveImage", "ImageInvert"]) | TEXT,
            "inputs": st.dictionaries(TEXT, JSON_VALUES, max_size=4),
        }
    )
    | JSON_VALUES
)
PROMPTS = st.dictionaries(NODE_IDS, NODES, max_size=4) | JSON_VALUES
# A ComfyUI /prompt body with each field present or missing, right or wrong, plus strays.
SUBMISSIONS = st.fixed_dictionaries(
    {},
    optional={
        "prompt": PROMPTS,
        "client_id": TEXT | JSON_VALUES,
        "extra_data": st.dictionaries(TEXT, JSON_VALUES, max_size=3) | JSON_VALUES,
        "partial_execution_targets": st.lists(NODE_IDS, max_size=3) | JSON_VALUES,
        "number": JSON_VALUES,
        "front": JSON_VALUES,
        "prompt_id": TEXT,
    },
).flatmap(lambda body: st.dictionaries(TEXT, JSON_VALUES, max_size=2).map(lambda extra: {**extra, **body}))


# What a well-behaved frontend may send: every one of these must be queued exactly as sent.
CLEAN_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
CLEAN_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | CLEAN_TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(CLEAN_TEXT, children, max_size=3),
    max_leaves=12,
)
VALID_SUBMISSIONS = st.fixed_dictionaries(
    {
        "prompt": st.dictionaries(
            st.integers(0, 99).map(str) | CLEAN_TEXT,
            st.fixed_dictionaries(
                {"class_type": CLEAN_TEXT, "inputs": st.dictionaries(CLEAN_TEXT, CLEAN_JSON, max_size=3)}
            ),
            min_size=1,
            max_size=4,
        )
    },
    optional={
        "client_id": CLEAN_TEXT,
        "extra_data": st.dictionaries(CLEAN_TEXT, CLEAN_JSON, max_size=3),
        "partial_execution_targets": st.lists(CLEAN_TEXT, max_size=3),
        # Queue order is ours: these are dropped, never refused.
        "number": CLEAN_JSON,
        "front": CLEAN_JSON,
    },
)


def _encode(value, ascii_only: bool) -> bytes:
    # Written as a careless client would: lone surrogates become invalid UTF-8 bytes.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _nested(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return ('{"prompt": {"1": ' + opener * depth + "1" + closer * depth + "}}").encode()


def _padded(size: int) -> bytes:
    head = b'{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"pad": "'
    tail = b'"}}}}'
    return head + b"x" * max(size - len(head) - len(tail), 0) + tail


def _truncated(data: tuple[bytes, int]) -> bytes:
    body, cut = data
    return body[: cut % (len(body) + 1)]


BODIES = st.one_of(
    st.tuples(SUBMISSIONS, st.booleans()).map(lambda pair: _encode(*pair)),
    st.tuples(JSON_VALUES, st.booleans()).map(lambda pair: _encode(*pair)),
    st.tuples(st.integers(1, 3000), st.sampled_from(["[", '{"a":'])).map(lambda pair: _nested(*pair)),
    st.integers(BODY_LIMIT - 64, BODY_LIMIT + 64).map(_padded),
    # A number too long for Python to read (more than 4300 digits).
    st.integers(1, 6000).map(
        lambda digits: b'{"prompt": {"1": {"inputs": {"seed": ' + b"9" * digits + b"}}}}"
    ),
    st.tuples(SUBMISSIONS.map(lambda body: _encode(body, True)), st.integers()).map(_truncated),
    st.binary(max_size=64),
    st.sampled_from([b"", b"   ", b"null", b"NaN", b"-Infinity", b'"prompt"', b"{}", b"[]"]),
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "",
    ]
) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
# Path segments as raw bytes, %-escaped: invalid UTF-8 and NUL included. Not "/", which
# would make it a different URL altogether.
PATH_SEGMENTS = st.binary(min_size=1, max_size=16).filter(lambda raw: b"/" not in raw).map(
    lambda raw: quote(raw, safe="")
) | TEXT.filter(lambda text: text and "/" not in text).map(
    lambda text: quote(text.encode("utf-8", "surrogatepass"), safe="")
)


# --- What every answer must look like ------------------------------------------------------


def _json(response) -> dict:
    assert response.status_code < 500, response.content[:2000]
    assert response["Content-Type"].startswith("application/json"), response.content[:500]
    return json.loads(response.content)


def assert_refusal_code(code, status: int) -> None:
    assert code in DOCUMENTED_REFUSALS, f"undocumented code {code!r}"
    assert DOCUMENTED_REFUSALS[code] == status, f"{code} answered {status}"


def comfy_refusal_or_task(response) -> Task | None:
    """ComfyUI's reply: the queued task, or ComfyUI's error shape with a documented code."""
    body = _json(response)
    if response.status_code == 200:
        assert set(body) >= {"prompt_id", "number", "node_errors"}
        return Task.objects.get(pk=body["prompt_id"])
    assert set(body) == {"error", "node_errors"}
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    assert body["error"]["message"]
    assert_refusal_code(body["error"]["type"], response.status_code)
    return None


def api_refusal_or_state(response) -> dict | None:
    """/api/v1's reply: the task's state, or `{"code", "message", "details"}` with a documented code."""
    body = _json(response)
    if response.status_code == 200:
        assert set(body) >= {"task_id", "prompt_id", "status", "position", "message"}
        return body
    assert set(body) == {"code", "message", "details"}
    assert body["message"]
    assert_refusal_code(body["code"], response.status_code)
    return None


def as_json_numbers(value):
    """`value` with every number exact: PostgreSQL's jsonb gives 1e16 back as 10000000000000000."""
    return json.loads(json.dumps(value), parse_float=Decimal, parse_int=Decimal)


def assert_forwardable(task: Task, sent: bytes) -> None:
    """What was accepted is what ComfyUI gets, and it can be written as strict JSON."""
    body = json.loads(sent)
    assert as_json_numbers(task.prompt) == as_json_numbers(body["prompt"])
    assert task.client_id == (body.get("client_id") or "")
    request = PromptRequest(
        prompt_id=str(task.id),
        prompt=task.prompt,
        client_id=task.client_id,
        extra_data=task.extra_data,
        partial_execution_targets=task.partial_execution_targets,
    )
    json.dumps(request.body(), allow_nan=False).encode("utf-8")


def post_raw(client, path: str, body: bytes, content_type: str):
    """POST these exact bytes (`client.post` would re-encode them for a charset in the type)."""
    return client.generic("POST", path, data=body, content_type=content_type)


# --- People and clients ---------------------------------------------------------------------


@pytest.fixture
def alice(student, register_instance, queue_settings, settings):
    register_instance(student, PORT)
    # Every accepted example stays queued: keep the per-student limit out of the way.
    queue_settings.max_queued_per_student = 32767
    queue_settings.save()
    settings.COMFY_MAX_PROMPT_BYTES = BODY_LIMIT
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = BODY_LIMIT
    return student


@pytest.fixture
def api_client(alice):
    """The teaching site's API as a browser uses it: session cookie, CSRF token, same origin."""
    client = Client(enforce_csrf_checks=True, HTTP_ORIGIN=django_settings.SITE_ORIGIN)
    client.force_login(alice)
    token = "t" * 32
    client.cookies[django_settings.CSRF_COOKIE_NAME] = token
    client.defaults["HTTP_X_CSRFTOKEN"] = token
    return client


@pytest.fixture
def comfy_client(alice, comfy_client_for, settings):
    client = comfy_client_for(alice)
    client.defaults["HTTP_ORIGIN"] = settings.COMFY_PUBLIC_ORIGIN
    return client


@pytest.fixture
def someone_elses_task(other_student, register_instance, make_task):
    register_instance(other_student, BOB_PORT)
    return make_task(other_student, port=BOB_PORT)


# --- Submitting ------------------------------------------------------------------------------


def check_comfy_submit(comfy_client, body: bytes, content_type: str, spelling: str) -> None:
    response = post_raw(comfy_client, f"/comfyui/alice/{PORT}/{spelling}", body, content_type)
    task = comfy_refusal_or_task(response)
    if task is not None:
        assert_forwardable(task, body)


def check_api_submit(api_client, body: bytes, content_type: str) -> None:
    response = post_raw(api_client, "/api/v1/comfy_proxy/execute/alice", body, content_type)
    state = api_refusal_or_state(response)
    if state is not None:
        assert content_type.split(";")[0].strip().lower() == "application/json"
        assert_forwardable(Task.objects.get(pk=state["task_id"]), body)


@FAST
@given(
    body=BODIES, content_type=CONTENT_TYPES, spelling=st.sampled_from(["prompt", "api/prompt", "api/prompt/"])
)
@example(body=b'{"prompt": {"\\ud800": 1}}', content_type="application/json", spelling="prompt")
@example(
    body=b'{"prompt": {"1": {}}, "client_id": "\\udfff"}', content_type="application/json", spelling="prompt"
)
@example(
    body=b'{"prompt": {"1": {"inputs": {"x": NaN}}}}', content_type="application/json", spelling="prompt"
)
@example(
    body=b'{"prompt": {"1": {"inputs": {"x": 1e999}}}}', content_type="application/json", spelling="prompt"
)
def test_comfyui_submit_answers_every_body_in_comfyuis_shape(comfy_client, body, content_type, spelling):
    check_comfy_submit(comfy_client, body, content_type, spelling)


@FAST
@given(body=BODIES, content_type=CONTENT_TYPES)
@example(body=b'{"prompt": {"\\ud800": 1}}', content_type="application/json")
@example(body=b'{"prompt": {"1": {}}}', content_type="multipart/form-data; boundary=xyz")
def test_api_submit_answers_every_body_in_the_api_shape(api_client, body, content_type):
    check_api_submit(api_client, body, content_type)


@FAST
@given(username=PATH_SEGMENTS, body=SUBMISSIONS.map(lambda body: _encode(body, False)))
@example(username="a%00b", body=b'{"prompt": {"1": {}}}')
def test_submitting_for_any_username_is_refused_or_queued_for_that_user(
    api_client, comfy_client, username, body
):
    api = post_raw(api_client, f"/api/v1/comfy_proxy/execute/{username}", body, "application/json")
    state = api_refusal_or_state(api)
    comfy = post_raw(comfy_client, f"/comfyui/{username}/{PORT}/prompt", body, "application/json")
    task = comfy_refusal_or_task(comfy)
    for accepted in (state and Task.objects.get(pk=state["task_id"]), task):
        if accepted:
            assert accepted.owner.username == "alice"


@FAST
@given(
    body=VALID_SUBMISSIONS,
    ascii_only=st.booleans(),
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "Application/JSON"]),
    target=st.sampled_from(["prompt", "api/prompt", "api"]),
)
def test_every_valid_workflow_is_queued_as_sent(
    comfy_client, api_client, body, ascii_only, content_type, target
):
    raw = _encode(body, ascii_only)
    if target == "api":
        state = api_refusal_or_state(
            post_raw(api_client, "/api/v1/comfy_proxy/execute/alice", raw, content_type)
        )
        task = Task.objects.get(pk=state["task_id"])
    else:
        task = comfy_refusal_or_task(
            post_raw(comfy_client, f"/comfyui/alice/{PORT}/{target}", raw, content_type)
        )
    assert task is not None
    assert_forwardable(task, raw)
    assert as_json_numbers(task.extra_data) == as_json_numbers(body.get("extra_data") or {})
    assert task.partial_execution_targets == body.get("partial_execution_targets")


def test_a_50_mb_body_is_413_before_it_is_read(comfy_client, api_client, settings):
    settings.COMFY_MAX_PROMPT_BYTES = settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 20 * 1024 * 1024
    body = _padded(50 * 1024 * 1024)
    response = comfy_client.post(f"/comfyui/alice/{PORT}/prompt", data=body, content_type="application/json")
    assert (response.status_code, response.json()["error"]["type"]) == (413, "body_too_large")
    response = api_client.post(
        "/api/v1/comfy_proxy/execute/alice", data=body, content_type="application/json"
    )
    assert (response.status_code, response.json()["code"]) == (413, "body_too_large")


def test_100k_nodes_are_refused_as_not_a_workflow(comfy_client, settings):
    settings.COMFY_MAX_PROMPT_BYTES = settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 20 * 1024 * 1024
    prompt = {str(node): {"class_type": "EmptyImage", "inputs": {}} for node in range(100_000)}
    body = json.dumps({"prompt": prompt})
    response = comfy_client.post(f"/comfyui/alice/{PORT}/prompt", data=body, content_type="application/json")
    assert (response.status_code, response.json()["error"]["type"]) == (400, "invalid_prompt")
    assert not Task.objects.exists()


# --- Status and cancel -------------------------------------------------------------------------

TASK_IDS = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda value: value.hex.upper()),
    PATH_SEGMENTS,
    st.sampled_from(["0", "-1", "00000000-0000-0000-0000-000000000000", "%00", "%ED%A0%80", "%FF"]),
)


@FAST
@given(which=st.sampled_from(["own", "other", "fuzzed"]), fuzzed=TASK_IDS)
def test_status_and_cancel_answer_any_task_id_in_the_api_shape(
    api_client, make_task, alice, someone_elses_task, which, fuzzed
):
    own = make_task(alice, port=PORT)
    task_id = {"own": str(own.pk), "other": str(someone_elses_task.pk)}.get(which, fuzzed)
    status = api_refusal_or_state(api_client.get(f"/api/v1/comfy_proxy/status/{task_id}"))
    # As browsers send it: fetch(url, {method: "POST"}) has no body.
    cancel = api_refusal_or_state(post_raw(api_client, f"/api/v1/comfy_proxy/cancel/{task_id}", b"", ""))
    if which == "own":
        assert (status["status"], cancel["status"]) == ("queued", "cancelled")
    else:
        assert (status, cancel) == (None, None)
    someone_elses_task.refresh_from_db()
    assert someone_elses_task.status == "queued"


@FAST
@given(body=BODIES, content_type=CONTENT_TYPES)
def test_cancel_answers_any_body_in_the_api_shape(api_client, make_task, alice, body, content_type):
    own = make_task(alice, port=PORT)
    cancel = api_refusal_or_state(
        post_raw(api_client, f"/api/v1/comfy_proxy/cancel/{own.pk}", body, content_type)
    )
    own.refresh_from_db()
    # The body means nothing to cancel; one the API cannot read may be refused, never half-done.
    assert own.status == ("cancelled" if cancel else "queued")


@FAST
@given(which=st.sampled_from(["own", "other", "fuzzed"]), fuzzed=TASK_IDS, body=BODIES)
def test_the_comfyui_pages_cancel_answers_any_task_id_in_the_api_shape(
    comfy_client, make_task, alice, someone_elses_task, which, fuzzed, body
):
    own = make_task(alice, port=PORT)
    task_id = {"own": str(own.pk), "other": str(someone_elses_task.pk)}.get(which, fuzzed)
    response = post_raw(
        comfy_client, f"/comfyui/alice/{PORT}/queue-cancel/{task_id}/", body, "application/json"
    )
    state = api_refusal_or_state(response)
    if which == "own":
        assert state["status"] == "cancelled"
    else:
        assert state is None


def test_unknown_methods_get_the_api_shape_too(api_client):
    task_id = uuid.uuid4()
    for method, path in [
        ("get", "/api/v1/comfy_proxy/execute/alice"),
        ("put", f"/api/v1/comfy_proxy/cancel/{task_id}"),
        ("delete", f"/api/v1/comfy_proxy/status/{task_id}"),
    ]:
        response = getattr(api_client, method)(path)
        assert api_refusal_or_state(response) is None
        assert response.json()["code"] == "method_not_allowed"


# --- The long run -------------------------------------------------------------------------------


@pytest.mark.slow
@THOROUGH
@given(
    target=st.sampled_from(["prompt", "api/prompt", "api"]),
    body=BODIES,
    content_type=CONTENT_TYPES,
)
def test_many_more_random_bodies(comfy_client, api_client, target, body, content_type):
    if target == "api":
        check_api_submit(api_client, body, content_type)
    else:
        check_comfy_submit(comfy_client, body, content_type, target)
