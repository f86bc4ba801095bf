"""The emulator against the recordings of a real ComfyUI 0.3.64 server (tests/data/comfyui_traces).

Each test replays one recorded scenario on a fresh emulated instance, with the same requests in the
same order, and compares every recorded reply (status, content type, body) and every socket's events.
Ids, timestamps, tracebacks and PreviewImage's random file prefix are normalized away; numbers keep
their JSON type (1 is not 1.0). Where the recording's timing cannot be reproduced with short jobs (the
interrupt scenario), the events of each prompt are compared with consecutive `executing` merged.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from comfyproxy.emulator.data import RECORDED_BODIES_DIR, load_workflow
from tests.emulator_fixtures import WebSocketRecorder, emulator_process

TRACES_DIR = Path(__file__).parent / "data" / "comfyui_traces"

_UNRECORDED = object()  # the trace did not note the reply's content type
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SERVER_SID = re.compile(r"^[0-9a-f]{32}$")
_TEMP_PREFIX = re.compile(r"ComfyUI_temp_[a-z]{5}_")
_FILE_COUNTER = re.compile(r"_\d{5}_\.png$")
_WS_LINE = re.compile(r"^\[\s*[\d.]+\] WS<([^>]*)> TEXT (.*)$")
_HTTP_LINE = re.compile(r"^\[\s*[\d.]+\] (GET|POST) (\S+) -> (\d+) (.*)$")
_CONTENT_TYPE = re.compile(r"^([\w.+-]+/[\w.+-]+(?:; charset=[\w-]+)?) ?(.*)$")


@dataclass
class HttpRecord:
    method: str
    path: str
    status: int
    content_type: object  # str, None (no header), or _UNRECORDED
    body: str


@dataclass
class Trace:
    http: list[HttpRecord] = field(default_factory=list)
    ws: dict[str, list[dict]] = field(default_factory=dict)


def parse_trace(name: str) -> Trace:
    trace = Trace()
    text_body: HttpRecord | None = None  # a text/plain reply continues on the following lines
    for line in (TRACES_DIR / f"{name}.log").read_text().splitlines():
        if ws := _WS_LINE.match(line):
            trace.ws.setdefault(ws[1], []).append(json.loads(ws[2]))
            text_body = None
        elif http := _HTTP_LINE.match(line):
            method, path, status, rest = http.groups()
            if rest.startswith("None"):
                content_type, body = None, ""
            elif rest.startswith(("{", "[")):
                content_type, body = _UNRECORDED, rest
            else:
                content_type, body = _CONTENT_TYPE.match(rest).groups()
            record = HttpRecord(method, path, int(status), content_type, body)
            trace.http.append(record)
            text_body = (
                record if isinstance(content_type, str) and content_type.startswith("text/plain") else None
            )
        elif text_body is not None and not line.startswith("==="):
            text_body.body += "\n" + line
        else:
            text_body = None
    return trace


def normalize(value, *, file_counters: bool = True, key: str | None = None):
    """Comparable form: ids, timestamps, tracebacks, random prefixes masked; JSON number types kept."""
    if key == "timestamp":
        return "<timestamp>"
    if key == "traceback":
        return (
            "<traceback>"
            if isinstance(value, list) and all(isinstance(line, str) for line in value)
            else value
        )
    if isinstance(value, dict):
        return {
            normalize(k, file_counters=file_counters): normalize(v, file_counters=file_counters, key=k)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [normalize(item, file_counters=file_counters) for item in value]
    if isinstance(value, bool):
        return f"<bool {value}>"
    if isinstance(value, float):
        return f"<float {value!r}>"
    if isinstance(value, str):
        value = _TEMP_PREFIX.sub("ComfyUI_temp_<random>_", _UUID.sub("<uuid>", value))
        value = _SERVER_SID.sub("<sid>", value)
        return value if file_counters else _FILE_COUNTER.sub("_<n>_.png", value)
    return value


class Replay:
    """Sends the requests of a recorded scenario and checks each reply against the recording."""

    def __init__(self, trace: Trace, client: httpx.AsyncClient, *, file_counters: bool = True):
        self.trace = trace
        self.client = client
        self.file_counters = file_counters
        self._next = 0

    async def request(self, method: str, path: str, **options) -> httpx.Response:
        record = self.trace.http[self._next]
        self._next += 1
        assert (method, normalize(path)) == (record.method, normalize(record.path))
        response = await self.client.request(method, path, **options)
        assert response.status_code == record.status, response.text
        if record.content_type is not _UNRECORDED:
            assert response.headers.get("content-type") == record.content_type
        if record.body.startswith(("{", "[")):
            assert self.normalize(response.json()) == self.normalize(json.loads(record.body))
        else:
            assert response.text == record.body
        return response

    def normalize(self, value):
        return normalize(value, file_counters=self.file_counters)

    def assert_socket(self, client: str, socket: WebSocketRecorder) -> None:
        """The socket got exactly the recorded events (progress_state only if the recording kept it)."""
        recorded = self.trace.ws[client]
        received = socket.messages
        if not any(message["type"] == "progress_state" for message in recorded):
            received = [message for message in received if message["type"] != "progress_state"]
        assert self.normalize(received) == self.normalize(recorded)

    def assert_all_replayed(self) -> None:
        assert self._next == len(self.trace.http), f"replayed {self._next} of {len(self.trace.http)} replies"


def with_inputs(workflow: dict, node_id: str, **inputs) -> dict:
    changed = json.loads(json.dumps(workflow))
    changed[node_id]["inputs"].update(inputs)
    return changed


def status_of(message: dict) -> int | None:
    return message["data"]["status"]["exec_info"]["queue_remaining"] if message["type"] == "status" else None


async def advance_counter(client: httpx.AsyncClient, to: int) -> None:
    """Make the next prompt number `to`, as on the recorded server (any JSON body counts)."""
    for _ in range(to):
        assert (await client.post("/prompt", json={})).status_code == 400


async def finished(socket: WebSocketRecorder, prompt_id: str, since: int = 0) -> None:
    await socket.wait_for_event("executing", node=None, prompt_id=prompt_id, since=since)


@pytest.fixture(scope="module")
def fast_emulator():
    with emulator_process(port_count=4, job_seconds=0.05) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def slow_emulator():
    # Workflows of 1 s (5 nodes of 0.2 s): long enough to queue, delete and interrupt while one runs.
    with emulator_process(port_count=2, job_seconds=1.0) as emulator:
        yield emulator


async def test_s1_run_cached_rerun_and_run_without_client_id(fast_emulator):
    trace = parse_trace("s1_basic")
    prompt = load_workflow("basic_invert")
    async with (
        httpx.AsyncClient(base_url=fast_emulator.url(0)) as client,
        WebSocketRecorder.connect(fast_emulator.ws_url(0, "probeclient1")) as socket,
    ):
        replay = Replay(trace, client)
        await socket.wait_for_event("feature_flags")

        run_a = await replay.request("POST", "/prompt", json={"prompt": prompt, "client_id": "probeclient1"})
        run_a_id = run_a.json()["prompt_id"]
        await finished(socket, run_a_id)
        await replay.request("GET", f"/history/{run_a_id}")

        run_b = {
            "prompt": prompt,
            "client_id": "probeclient1",
            "prompt_id": "my-own-id-0001",
            "extra_data": {"extra_pnginfo": {"workflow": {"note": "x"}}},
        }
        await replay.request("POST", "/api/prompt", json=run_b)
        await finished(socket, "my-own-id-0001")
        await replay.request("GET", "/api/history/my-own-id-0001")

        # Without client_id nothing prompt-scoped arrives: the broadcast status 0 tells it is done.
        since = len(socket.messages)
        run_c_id = "0b7f6c3e-1111-4222-8333-444455556666"
        await replay.request(
            "POST", "/prompt", json={"prompt": with_inputs(prompt, "1", color=255), "prompt_id": run_c_id}
        )
        await socket.wait_for(lambda message: status_of(message) == 0, since=since)
        await replay.request("GET", f"/history/{run_c_id}")
        await replay.request("GET", "/queue")
        await replay.request("GET", "/prompt")

    replay.assert_all_replayed()
    replay.assert_socket("probeclient1", socket)


async def test_s2_validation_errors_numbers_and_prompt_ids(fast_emulator):
    trace = parse_trace("s2_errors")
    basic = load_workflow("basic_invert")
    async with (
        httpx.AsyncClient(base_url=fast_emulator.url(1)) as client,
        WebSocketRecorder.connect(fast_emulator.ws_url(1, "probeclient2")) as socket,
    ):
        # The recording continued on the server of s1, whose output folder already held two images.
        replay = Replay(trace, client, file_counters=False)
        await advance_counter(client, 3)
        await socket.wait_for_event("feature_flags")

        def post(prompt, **fields):
            return replay.request(
                "POST", "/prompt", json={"prompt": prompt, "client_id": "probeclient2", **fields}
            )

        await replay.request("POST", "/prompt", content=b"{not json")
        await replay.request("POST", "/prompt", content=b"")
        await replay.request("POST", "/prompt", json={"client_id": "probeclient2"})
        await post(load_workflow("invalid_unknown_class"))
        await post(load_workflow("invalid_missing_input"))
        await post(with_inputs(basic, "1", width=0))
        await post({"1": basic["1"]})
        await post({"1": basic["1"], "2": {"inputs": basic["2"]["inputs"]}, "3": basic["3"]})
        await post(with_inputs(basic, "2", image=["99", 0]))
        await post(with_inputs(basic, "2", image=["1", 5]))
        await post([1, 2])
        await replay.request("POST", "/prompt", json=[1, 2])

        two_outputs = {
            **with_inputs(basic, "1", color=7),
            "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "probe_err"}},
        }
        partly_valid = await post(two_outputs)
        await finished(socket, partly_valid.json()["prompt_id"])
        await replay.request("GET", f"/history/{partly_valid.json()['prompt_id']}")

        numbered = with_inputs(basic, "1", color=8)
        await post(numbered, prompt_id=12345, number=7.5)
        await finished(socket, "12345")
        in_front = await post(numbered, front=True)
        await finished(socket, in_front.json()["prompt_id"])

        for color in (9, 10):
            since = len(socket.messages)
            await post(with_inputs(basic, "1", color=color), prompt_id="dup-1")
            await finished(socket, "dup-1", since)
        (entry,) = (await client.get("/history/dup-1")).json().values()
        assert entry["prompt"][0] == 16
        assert entry["prompt"][2]["1"]["inputs"]["color"] == 10

        preview_too = {
            **with_inputs(basic, "1", color=11),
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        partial = await post(preview_too, partial_execution_targets=["4"])
        await finished(socket, partial.json()["prompt_id"])
        await replay.request("GET", f"/history/{partial.json()['prompt_id']}")

    replay.assert_all_replayed()
    replay.assert_socket("probeclient2", socket)


async def test_s4_queue_delete_and_interrupts(slow_emulator):
    trace = parse_trace("s4_interrupt")
    slow = load_workflow("slow_blur_chain")
    async with (
        httpx.AsyncClient(base_url=slow_emulator.url(0)) as client,
        WebSocketRecorder.connect(slow_emulator.ws_url(0, "qclient")) as socket,
        WebSocketRecorder.connect(slow_emulator.ws_url(0, "observer2")) as observer,
    ):
        replay = Replay(trace, client)
        await advance_counter(client, 31)
        await socket.wait_for_event("feature_flags")
        await observer.wait_for_event("feature_flags")

        def submit(prompt_id: str, color: int):
            body = {
                "prompt": with_inputs(slow, "1", color=color),
                "prompt_id": prompt_id,
                "client_id": "qclient",
            }
            return replay.request("POST", "/prompt", json=body)

        for color in (101, 102):
            await submit(f"slow-time-{color}", color)
            await finished(socket, f"slow-time-{color}")

        await submit("job-A", 201)
        await socket.wait_for_event("executing", prompt_id="job-A")
        await submit("job-B", 202)
        await submit("job-C", 203)
        queue = (await client.get("/queue")).json()
        assert [item[1] for item in queue["queue_running"]] == ["job-A"]
        assert [item[:2] for item in queue["queue_pending"]] == [[34, "job-B"], [35, "job-C"]]
        await replay.request("POST", "/queue", json={"delete": ["job-C"]})
        await replay.request("POST", "/interrupt", json={"prompt_id": "job-B"})
        await replay.request("POST", "/queue", json={"delete": ["job-A"]})
        queue = (await client.get("/queue")).json()
        assert [item[1] for item in queue["queue_running"] + queue["queue_pending"]] == ["job-A", "job-B"]
        await replay.request("POST", "/interrupt", json={"prompt_id": "job-A"})
        await finished(socket, "job-A")
        status = (await client.get("/history/job-A")).json()["job-A"]["status"]
        assert (status["status_str"], status["completed"]) == ("error", False)
        assert [message[0] for message in status["messages"]] == [
            "execution_start",
            "execution_cached",
            "execution_interrupted",
        ]

        await socket.wait_for_event("executing", prompt_id="job-B")
        assert (await client.post("/interrupt")).status_code == 200
        await finished(socket, "job-B")
        await replay.request("GET", "/history/job-C")

        await submit("job-D", 301)
        await socket.wait_for_event("executing", prompt_id="job-D")
        await submit("job-E", 302)
        await submit("job-F", 303)
        await replay.request("POST", "/api/queue", json={"clear": True})
        await replay.request("GET", "/queue")
        await replay.request("POST", "/api/interrupt", json={"prompt_id": "job-D"})
        await finished(socket, "job-D")
        await replay.request("GET", "/queue")

    replay.assert_all_replayed()
    for client_id, recorder in (("qclient", socket), ("observer2", observer)):
        recorded, received = trace.ws[client_id], recorder.messages
        assert [status_of(m) for m in received if m["type"] == "status"] == [
            status_of(m) for m in recorded if m["type"] == "status"
        ]
        for prompt_id in (
            "slow-time-101",
            "slow-time-102",
            "job-A",
            "job-B",
            "job-C",
            "job-D",
            "job-E",
            "job-F",
        ):
            assert prompt_story(received, prompt_id) == prompt_story(recorded, prompt_id), prompt_id
    assert set(observer.types()) == {"status", "feature_flags"}


def prompt_story(messages: list[dict], prompt_id: str) -> list[str]:
    """The events of one prompt, with a run of `executing` (one per node) counted once."""
    story = []
    for message in messages:
        if message["type"] == "progress_state" or message["data"].get("prompt_id") != prompt_id:
            continue
        event = message["type"]
        if event == "executing" and message["data"]["node"] is None:
            event = "executing(null)"
        if not (story and story[-1] == event == "executing"):
            story.append(event)
    return story


async def test_s5_runtime_error_with_and_without_client_id(fast_emulator):
    trace = parse_trace("s5_runtime_error")
    async with (
        httpx.AsyncClient(base_url=fast_emulator.url(2)) as client,
        WebSocketRecorder.connect(fast_emulator.ws_url(2, "errclient")) as socket,
        WebSocketRecorder.connect(fast_emulator.ws_url(2, "observer")) as observer,
    ):
        replay = Replay(trace, client)
        await advance_counter(client, 28)
        await socket.wait_for_event("feature_flags")
        await observer.wait_for_event("feature_flags")

        for name in ("text_ok", "runtime_error_regex"):
            body = {"prompt": load_workflow(name), "client_id": "errclient"}
            prompt_id = (await replay.request("POST", "/prompt", json=body)).json()["prompt_id"]
            await finished(socket, prompt_id)
            await replay.request("GET", f"/history/{prompt_id}")

        since = len(observer.messages)
        anonymous = await replay.request(
            "POST", "/prompt", json={"prompt": load_workflow("runtime_error_regex")}
        )
        await observer.wait_for(lambda message: status_of(message) == 0, since=since)
        await socket.wait_for(lambda message: status_of(message) == 0, since=since)
        status = (await client.get(f"/history/{anonymous.json()['prompt_id']}")).json()
        (entry,) = status.values()
        assert [message[0] for message in entry["status"]["messages"]][-1] == "execution_error"

    replay.assert_all_replayed()
    replay.assert_socket("errclient", socket)
    replay.assert_socket("observer", observer)


async def test_s6_sockets_origin_guard_history_files_and_misc(slow_emulator):
    trace = parse_trace("s6_misc")
    port = slow_emulator.ports[1]
    async with httpx.AsyncClient(base_url=slow_emulator.url(1)) as client:
        replay = Replay(trace, client)
        await advance_counter(client, 39)
        async with (
            WebSocketRecorder.connect(slow_emulator.ws_url(1)) as anonymous,
            WebSocketRecorder.connect(slow_emulator.ws_url(1, "same")) as same_first,
        ):
            await anonymous.wait_for_event("feature_flags")
            await same_first.wait_for_event("feature_flags")
            async with WebSocketRecorder.connect(slow_emulator.ws_url(1, "same")) as same_second:
                await same_second.wait_for_event("feature_flags")
                text = with_inputs(load_workflow("text_ok"), "1", string_b="dup-socket")
                dup = await replay.request("POST", "/prompt", json={"prompt": text, "client_id": "same"})
                await finished(same_second, dup.json()["prompt_id"])

                # Reconnect while node 2 runs: the new socket (same clientId) is told the running node.
                async with WebSocketRecorder.connect(slow_emulator.ws_url(1, "recon")) as recon_first:
                    body = {
                        "prompt": load_workflow("slow_blur_chain"),
                        "prompt_id": "recon-1",
                        "client_id": "recon",
                    }
                    await replay.request("POST", "/prompt", json=body)
                    await recon_first.wait_for_event("executing", node="2", prompt_id="recon-1")
                    async with WebSocketRecorder.connect(slow_emulator.ws_url(1, "recon")) as recon:
                        await finished(recon, "recon-1")
            replay.assert_socket("None", anonymous)
            replay.assert_socket("same#1", same_first)
            replay.assert_socket("same#2", same_second)
            replay.assert_socket("recon", recon)

        for origin, host, status in (
            ("http://evil.example", None, 403),
            (f"http://127.0.0.1:{port}", None, 400),
            (f"http://localhost:{port}", None, 403),
            ("http://127.0.0.1:9999", None, 403),
            ("http://evil.example", "comfy.example.org", 400),
        ):
            headers = {"Origin": origin} | ({"Host": host} if host else {})
            assert (await client.post("/prompt", json={}, headers=headers)).status_code == status, origin

        history = (await client.get("/history", params={"max_items": 2})).json()
        assert list(history) == [dup.json()["prompt_id"], "recon-1"]
        await replay.request("GET", "/history/does-not-exist")
        await replay.request("POST", "/history", json={"delete": ["dup-1"]})
        await replay.request("GET", "/history/dup-1")

        async with WebSocketRecorder.connect(slow_emulator.ws_url(1, "viewer")) as viewer:
            saved = await client.post(
                "/prompt", json={"prompt": load_workflow("basic_invert"), "client_id": "viewer"}
            )
            await finished(viewer, saved.json()["prompt_id"])
        image = await client.get(
            "/view", params={"filename": "probe_basic_00001_.png", "type": "output", "subfolder": ""}
        )
        assert (image.status_code, image.headers["content-type"]) == (200, "image/png")
        assert image.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert (await client.get("/api/view", params={"filename": "missing.png"})).status_code == 404
        upload = await client.post("/upload/image", files={"image": ("up.png", image.content, "image/png")})
        assert upload.json() == {"name": "up.png", "subfolder": "", "type": "input"}

        await replay.request("POST", "/free", json={"unload_models": True, "free_memory": True})
        await replay.request("POST", "/interrupt", content=b"{not json")
        for path in ("/api/", "/index.html"):
            page = await client.get(path)
            assert (page.status_code, page.headers["content-type"]) == (200, "text/html")
        assert (await client.get("/prompt/x")).status_code == 404
        assert (await client.get("/history/does-not-exist")).json() == {}
    replay.assert_all_replayed()


def _frontend_load_requests() -> list[tuple[str, int, str | None, str]]:
    """(path, status, content type, body file) of the replies the frontend fetched on page load."""
    requests = []
    readme = (RECORDED_BODIES_DIR / "README.md").read_text()
    for path, status, content_type in re.findall(r"^GET (\S+) -> (\d+) (.*?) ?\(\d+ bytes\)$", readme, re.M):
        body_file = re.sub(r"[/?&=%]", "_", path.lstrip("/")) + ".body"
        requests.append((path, int(status), content_type or None, body_file))
    return requests


@pytest.mark.parametrize(("path", "status", "content_type", "body_file"), _frontend_load_requests())
async def test_frontend_page_load_replies_are_the_recorded_ones(
    fast_emulator, path, status, content_type, body_file
):
    async with httpx.AsyncClient(base_url=fast_emulator.url(3)) as client:
        response = await client.get(path)
    recorded = (RECORDED_BODIES_DIR / body_file).read_bytes()
    assert response.status_code == status
    assert response.headers.get("content-type") == content_type
    if path == "/api/system_stats":
        # The only difference: the emulated server states its own port.
        stats = response.json()
        assert stats["system"]["argv"][-1] == str(fast_emulator.ports[3])
        stats["system"]["argv"][-1] = "8188"
        assert stats == json.loads(recorded)
    else:
        assert response.content == recorded
