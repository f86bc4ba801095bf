"""The ComfyUI emulator beyond the recorded traces: routes, queue, validation, files, stats, faults, load."""

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from comfyproxy.emulator.catalog import NodeCatalog
from comfyproxy.emulator.config import FaultMode, config_from_options, parse_port_spec
from comfyproxy.emulator.data import load_workflow, workflow_names
from comfyproxy.emulator.files import InstanceFiles
from comfyproxy.emulator.nodes import NodeContext, behavior_for
from comfyproxy.emulator.png import solid_png
from tests.emulator_fixtures import WebSocketRecorder, emulator_process
from tests.processes import wait_until

_fresh_ports = itertools.count()


@pytest.fixture(scope="module")
def emulator():
    with emulator_process(port_count=12, job_seconds=0.05) as emulator:
        yield emulator


@pytest.fixture
def index(emulator) -> int:
    """Index of a port of `emulator` that no other test uses: a fresh ComfyUI instance."""
    return next(_fresh_ports)


@pytest.fixture
def new_emulator():
    """Dedicated emulators for one test: `new_emulator(port_count=3, job_seconds=0.5)`."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(emulator_process(**options))


def with_inputs(workflow: dict, node_id: str, **inputs) -> dict:
    changed = json.loads(json.dumps(workflow))
    changed[node_id]["inputs"].update(inputs)
    return changed


async def run(client: httpx.AsyncClient, socket: WebSocketRecorder, prompt: dict, **fields) -> dict:
    """Submit with the socket's client id and wait for the terminal event; returns the history entry."""
    since = len(socket.messages)
    client_id = socket.messages[0]["data"]["sid"]
    reply = await client.post("/prompt", json={"prompt": prompt, "client_id": client_id, **fields})
    assert reply.status_code == 200, reply.text
    prompt_id = reply.json()["prompt_id"]
    await socket.wait_for_event("executing", node=None, prompt_id=prompt_id, since=since)
    return (await client.get(f"/history/{prompt_id}")).json()[prompt_id]


def status_of(message: dict) -> int | None:
    return message["data"]["status"]["exec_info"]["queue_remaining"] if message["type"] == "status" else None


async def validation_error(client: httpx.AsyncClient, prompt: dict) -> dict:
    reply = await client.post("/prompt", json={"prompt": prompt})
    assert reply.status_code == 400, reply.text
    return reply.json()


async def node_error(client: httpx.AsyncClient, prompt: dict, node_id: str) -> dict:
    """The one validation error reported for `node_id`."""
    (error,) = (await validation_error(client, prompt))["node_errors"][node_id]["errors"]
    return error


# Options


def test_port_specs_accept_ranges_and_lists():
    assert parse_port_spec("8189-8191") == (8189, 8190, 8191)
    assert parse_port_spec("8189,8191,8200-8202") == (8189, 8191, 8200, 8201, 8202)
    for bad in ("", "abc", "10-5", "0", "70000"):
        with pytest.raises(argparse.ArgumentTypeError, match="port"):
            parse_port_spec(bad)


def test_fault_ports_must_be_served_ports():
    options = {"ports": (1, 2), "fail_ports": (2,), "hang_ports": (), "refuse_ports": ()}
    assert config_from_options(options).initial_faults == {2: FaultMode.FAIL}
    with pytest.raises(ValueError, match="not among --ports"):
        config_from_options({**options, "refuse_ports": (3,)})


# Routes and frontend


async def test_every_route_answers_the_same_under_api(emulator, index):
    paths = [
        "/embeddings",
        "/models",
        "/models/checkpoints",
        "/models/no-such-folder",
        "/extensions",
        "/system_stats",
        "/features",
        "/prompt",
        "/object_info",
        "/object_info/EmptyImage",
        "/object_info/NoSuchNode",
        "/history",
        "/history/unknown",
        "/queue",
        "/settings",
        "/settings/Comfy.InstalledVersion",
        "/users",
        "/userdata?dir=workflows",
        "/userdata/user.css",
        "/i18n",
        "/workflow_templates",
        "/experiment/models",
        "/experiment/models/loras",
        "/view?filename=missing.png",
        "/",
    ]
    async with httpx.AsyncClient(base_url=emulator.url(index)) as client:
        for path in paths:
            plain, api = await client.get(path), await client.get("/api" + path)
            assert (api.status_code, api.headers.get("content-type"), api.content) == (
                plain.status_code,
                plain.headers.get("content-type"),
                plain.content,
            ), path
        assert (await client.get("/object_info/NoSuchNode")).json() == {}
        assert list((await client.get("/object_info")).json()) == list(NodeCatalog.load().object_info)
        assert (await client.get("/internal/logs")).status_code == 200
        assert (await client.get("/api/internal/logs")).status_code == 404
    async with WebSocketRecorder.connect(
        emulator.ws_url(index).replace("/ws", "/api/ws") + "?clientId=api"
    ) as socket:
        greeting = await socket.wait_for_event("status")
        assert greeting["data"]["sid"] == "api"


async def test_the_official_frontend_is_served_at_root_and_under_api(emulator, index):
    async with httpx.AsyncClient(base_url=emulator.url(index)) as client:
        for path in ("/", "/api/"):
            page = await client.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"] == "text/html"
            assert (page.headers["cache-control"], page.headers["pragma"], page.headers["expires"]) == (
                "no-cache",
                "no-cache",
                "0",
            )
            assert "<title>ComfyUI</title>" in page.text
        script = re.search(r'src="\./(assets/index-[\w-]+\.js)"', page.text)[1]
        asset = await client.get("/" + script)
        assert asset.status_code == 200
        assert asset.headers["cache-control"] == "no-cache"
        assert "javascript" in asset.headers["content-type"]


async def test_host_origin_guard_covers_websockets_and_answers_options(emulator, index):
    url = emulator.url(index)
    with pytest.raises(InvalidStatus) as refused:
        async with WebSocketRecorder.connect(emulator.ws_url(index, "x"), origin="http://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    async with WebSocketRecorder.connect(emulator.ws_url(index, "x"), origin=url) as socket:
        await socket.wait_for_event("feature_flags")
    async with httpx.AsyncClient(base_url=url) as client:
        options = await client.options("/prompt", headers={"Origin": "http://evil.example"})
        assert (options.status_code, options.content) == (403, b"")
        assert (await client.options("/prompt")).status_code == 200


# Prompts


async def test_queue_runs_by_number_and_front_and_survives_a_duplicate_key(new_emulator):
    emulator = new_emulator(job_seconds=0.5)
    text = load_workflow("text_ok")
    async with (
        httpx.AsyncClient(base_url=emulator.url()) as client,
        WebSocketRecorder.connect(emulator.ws_url(0, "q")) as socket,
    ):
        blocker = await client.post(
            "/prompt", json={"prompt": load_workflow("basic_invert"), "client_id": "q"}
        )
        await socket.wait_for_event("execution_start", prompt_id=blocker.json()["prompt_id"])

        async def submit(prompt_id: str, **fields) -> httpx.Response:
            body = {"prompt": text, "client_id": "q", "prompt_id": prompt_id, **fields}
            return await client.post("/prompt", json=body)

        assert (await submit("late", number=10)).json()["number"] == 10.0
        assert (await submit("early", number=5)).json()["number"] == 5.0
        assert (await submit("first", front=True)).json()["number"] == -1
        assert (await submit("same-key", number=20)).status_code == 200
        clash = await submit("same-key", number=20)
        assert (clash.status_code, clash.text) == (
            500,
            "500 Internal Server Error\n\nServer got itself in trouble",
        )

        # The clashing item was queued all the same: both run.
        done = {"type": "executing", "data": {"node": None, "prompt_id": "same-key"}}
        await socket.wait_until(lambda messages: messages.count(done) == 2)
    starts = [m["data"]["prompt_id"] for m in socket.messages if m["type"] == "execution_start"]
    assert starts[1:] == ["first", "early", "late", "same-key", "same-key"]


async def test_validation_reports_the_failing_inputs_like_comfyui(emulator, index):
    basic = load_workflow("basic_invert")
    scale = {
        "1": basic["1"],
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "cubic",
                "width": 8,
                "height": 8,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    async with httpx.AsyncClient(base_url=emulator.url(index)) as client:
        error = await node_error(client, scale, "2")
        assert error["type"] == "value_not_in_list"
        assert (
            error["details"]
            == "upscale_method: 'cubic' not in ['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']"
        )

        error = await node_error(client, with_inputs(basic, "1", width="wide"), "1")
        assert (error["type"], error["message"]) == (
            "invalid_input_type",
            "Failed to convert an input value to a INT value",
        )
        assert error["details"] == "width, wide, invalid literal for int() with base 10: 'wide'"

        error = await node_error(client, with_inputs(basic, "1", color=2**24), "1")
        assert (error["type"], error["message"]) == (
            "value_bigger_than_max",
            "Value 16777216 bigger than max of 16777215",
        )

        text_into_image = {"1": load_workflow("text_ok")["1"], "2": basic["2"], "3": basic["3"]}
        error = await node_error(client, text_into_image, "2")
        assert error["type"] == "return_type_mismatch"
        assert error["details"] == "image, received_type(STRING) mismatch input_type(IMAGE)"

        missing_file = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        error = await node_error(client, missing_file, "1")
        assert (error["type"], error["details"]) == (
            "custom_validation_failed",
            "image - Invalid image file: nope.png",
        )

        two_saves = {
            **with_inputs(basic, "2", image=["1", 7]),
            "4": with_inputs(basic, "3", filename_prefix="y")["3"],
        }
        shared = (await validation_error(client, two_saves))["node_errors"]["2"]
        assert (shared["class_type"], shared["dependent_outputs"]) == ("ImageInvert", ["3", "4"])


async def test_widget_values_are_converted_and_kept_converted(emulator, index):
    async with (
        httpx.AsyncClient(base_url=emulator.url(index)) as client,
        WebSocketRecorder.connect(emulator.ws_url(index, "conv")) as socket,
    ):
        await socket.wait_for_event("status")
        entry = await run(
            client, socket, with_inputs(load_workflow("basic_invert"), "1", width="32", height=16.0)
        )
    assert entry["prompt"][2]["1"]["inputs"]["width"] == 32
    assert entry["status"]["status_str"] == "success"


async def test_cache_serves_identical_reruns_until_memory_is_freed(emulator, index):
    basic = load_workflow("basic_invert")
    renamed = with_inputs(basic, "3", filename_prefix="renamed")
    async with (
        httpx.AsyncClient(base_url=emulator.url(index)) as client,
        WebSocketRecorder.connect(emulator.ws_url(index, "cache")) as socket,
    ):
        await socket.wait_for_event("status")

        async def cached_nodes(prompt) -> list[str]:
            entry = await run(client, socket, prompt)
            return entry["status"]["messages"][1][1]["nodes"]

        assert await cached_nodes(basic) == []
        assert await cached_nodes(basic) == ["1", "2", "3"]
        # Only the changed node runs again; what feeds it comes from the cache.
        assert await cached_nodes(renamed) == ["1", "2"]
        assert (await client.post("/free", json={"free_memory": True})).status_code == 200
        assert await cached_nodes(renamed) == []


async def test_saved_images_are_real_pngs_numbered_per_prefix(emulator, index):
    async with (
        httpx.AsyncClient(base_url=emulator.url(index)) as client,
        WebSocketRecorder.connect(emulator.ws_url(index, "png")) as socket,
    ):
        await socket.wait_for_event("status")
        prompt = with_inputs(
            load_workflow("basic_invert"), "1", width=40, height=20, batch_size=2, color=0x102030
        )
        prompt["3"]["inputs"]["filename_prefix"] = "sub/pic"
        entry = await run(client, socket, prompt, extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}})
        images = entry["outputs"]["3"]["images"]
        assert images == [
            {"filename": "pic_00001_.png", "subfolder": "sub", "type": "output"},
            {"filename": "pic_00002_.png", "subfolder": "sub", "type": "output"},
        ]
        png = (await client.get("/view", params={"filename": "pic_00002_.png", "subfolder": "sub"})).content
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert struct.unpack(">II", png[16:24]) == (40, 20)
        assert b"tEXtprompt\x00" in png
        assert b"tEXtworkflow\x00" in png

        again = await run(client, socket, with_inputs(prompt, "1", color=1))
        assert again["outputs"]["3"]["images"][0]["filename"] == "pic_00003_.png"
        assert (await client.get("/view", params={"filename": "../secrets"})).status_code == 400
        assert (
            await client.get("/view", params={"filename": "a.png", "subfolder": "../.."})
        ).status_code == 403


async def test_uploaded_images_feed_load_image(emulator, index):
    upload = solid_png(32, 16, (1, 2, 3), {}, 6)
    async with (
        httpx.AsyncClient(base_url=emulator.url(index)) as client,
        WebSocketRecorder.connect(emulator.ws_url(index, "up")) as socket,
    ):
        await socket.wait_for_event("status")

        async def upload_image(content: bytes) -> dict:
            reply = await client.post("/upload/image", files={"image": ("up.png", content, "image/png")})
            assert reply.status_code == 200
            return reply.json()

        assert await upload_image(upload) == {"name": "up.png", "subfolder": "", "type": "input"}
        assert (await upload_image(upload))["name"] == "up.png"  # same content: no copy
        assert (await upload_image(solid_png(8, 8, (0, 0, 0), {}, 6)))["name"] == "up (1).png"

        prompt = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "up.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        (image,) = (await run(client, socket, prompt))["outputs"]["2"]["images"]
        assert image["type"] == "temp"
        png = (await client.get("/view", params={**image})).content
        assert struct.unpack(">II", png[16:24]) == (32, 16)


async def test_user_data_and_settings_are_kept_per_instance(emulator, index):
    async with httpx.AsyncClient(base_url=emulator.url(index)) as client:
        saved = await client.post("/api/userdata/workflows%2Fa.json", content=b'{"nodes": []}')
        assert (saved.status_code, saved.json()) == (200, "workflows/a.json")
        assert (await client.get("/api/userdata/workflows%2Fa.json")).content == b'{"nodes": []}'
        listing = await client.get("/api/userdata", params={"dir": "workflows", "recurse": "true"})
        assert listing.json() == ["a.json"]
        (info,) = (await client.get("/api/userdata", params={"dir": "workflows", "full_info": "true"})).json()
        assert (info["path"], info["size"]) == ("a.json", 13)
        exists = await client.post(
            "/api/userdata/workflows%2Fa.json", params={"overwrite": "false"}, content=b""
        )
        assert exists.status_code == 409
        assert (await client.delete("/api/userdata/workflows%2Fa.json")).status_code == 204
        assert (await client.get("/api/userdata/workflows%2Fa.json")).status_code == 404

        assert (await client.post("/api/settings/Comfy.Theme", json="dark")).status_code == 200
        assert (await client.post("/api/settings", json={"Comfy.Locale": "fr"})).status_code == 200
        settings = (await client.get("/api/settings")).json()
        assert (settings["Comfy.Theme"], settings["Comfy.Locale"]) == ("dark", "fr")
        assert (await client.get("/api/settings/Comfy.Theme")).json() == "dark"
        assert (await client.get("/api/settings/Nothing")).json() is None


async def test_history_pages_and_deletes(emulator, index):
    text = load_workflow("text_ok")
    async with (
        httpx.AsyncClient(base_url=emulator.url(index)) as client,
        WebSocketRecorder.connect(emulator.ws_url(index, "h")) as socket,
    ):
        await socket.wait_for_event("status")
        for prompt_id in ("h1", "h2", "h3"):
            await run(client, socket, text, prompt_id=prompt_id)
        assert list((await client.get("/history", params={"max_items": 2})).json()) == ["h2", "h3"]
        assert list((await client.get("/history", params={"offset": 1})).json()) == ["h2", "h3"]
        assert list((await client.get("/history", params={"max_items": 1, "offset": 0})).json()) == ["h1"]
        assert (await client.post("/history", json={"delete": ["h2"]})).status_code == 200
        assert list((await client.get("/history")).json()) == ["h1", "h3"]
        await client.post("/history", json={"clear": True})
        assert (await client.get("/history")).json() == {}


# Timing


def estimated_seconds(workflow: dict, tmp_path) -> float:
    """What the timing model charges for a workflow (recorded workflows are chains in id order)."""
    catalog = NodeCatalog.load()
    files = InstanceFiles(tmp_path)
    files.prepare()
    outputs, total = {}, 0.0
    for node_id in sorted(workflow, key=int):
        node = workflow[node_id]
        arguments = {
            name: outputs[value[0]][value[1]] if isinstance(value, list) else value
            for name, value in node["inputs"].items()
        }
        behavior = behavior_for(catalog.classes[node["class_type"]])
        context = NodeContext(node_id=node_id, prompt=workflow, extra_pnginfo=None, files=files)
        result = behavior.run(context, **arguments)
        outputs[node_id] = result.outputs
        total += behavior.seconds(arguments, result)
    return total


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("basic_invert", 0.0, 0.02),
        ("text_ok", 0.0, 0.01),
        ("slow_blur_chain", 2.9, 3.4),
        ("slow_blur_chain_long", 6.0, 6.8),
        ("big_4096_scale", 1.5, 2.2),
    ],
)
def test_timing_model_matches_the_recorded_server_times(name, low, high, tmp_path):
    assert low <= estimated_seconds(load_workflow(name), tmp_path) <= high


async def test_without_job_seconds_a_blur_takes_its_modelled_time(new_emulator):
    emulator = new_emulator(job_seconds=None)
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    async with (
        httpx.AsyncClient(base_url=emulator.url()) as client,
        WebSocketRecorder.connect(emulator.ws_url(0, "t")) as socket,
    ):
        await socket.wait_for_event("status")
        messages = dict((await run(client, socket, prompt))["status"]["messages"])
    seconds = (messages["execution_success"]["timestamp"] - messages["execution_start"]["timestamp"]) / 1000
    assert 0.35 <= seconds <= 1.0  # 512x512 at radius 31: about 0.39 s


def test_all_recorded_workflows_are_shipped():
    assert workflow_names() == [
        "basic_invert",
        "big_4096_scale",
        "invalid_missing_input",
        "invalid_unknown_class",
        "runtime_error_regex",
        "slow_blur_chain",
        "slow_blur_chain_long",
        "text_ok",
    ]


# Stats


async def test_stats_count_submissions_executions_and_concurrency_over_all_ports(new_emulator):
    emulator = new_emulator(port_count=3, job_seconds=0.5)
    clients = [httpx.AsyncClient(base_url=emulator.url(index)) for index in range(3)]
    try:
        async with (
            WebSocketRecorder.connect(emulator.ws_url(0, "s")) as first,
            WebSocketRecorder.connect(emulator.ws_url(1, "s")) as second,
            WebSocketRecorder.connect(emulator.ws_url(2, "s")) as third,
        ):
            sockets = (first, second, third)
            replies = await asyncio.gather(
                *(
                    client.post(
                        "/prompt",
                        json={"prompt": load_workflow("text_ok"), "client_id": "s", "prompt_id": f"p{i}"},
                    )
                    for i, client in enumerate(clients)
                )
            )
            assert all(reply.status_code == 200 for reply in replies)
            await first.wait_for_event("executing", prompt_id="p0")
            during = await asyncio.to_thread(emulator.stats)
            assert during["running"] >= 1
            assert during["ports"][str(emulator.ports[0])]["running"] == "p0"
            for index, socket in enumerate(sockets):
                await socket.wait_for_event("executing", node=None, prompt_id=f"p{index}")
            await clients[0].post("/prompt", json={"prompt": {}})  # invalid: not a submission
            await run(clients[0], first, load_workflow("text_ok"), prompt_id="p0")
    finally:
        for client in clients:
            await client.aclose()

    stats = await asyncio.to_thread(emulator.stats)
    assert (stats["max_running_seen"], stats["running"]) == (3, 0)
    assert stats["submissions"] == {"p0": 2, "p1": 1, "p2": 1}
    assert stats["executions"] == {"p0": 2, "p1": 1, "p2": 1}
    await asyncio.to_thread(emulator.reset_stats)
    stats = await asyncio.to_thread(emulator.stats)
    assert (stats["max_running_seen"], stats["submissions"], stats["executions"]) == (0, {}, {})


# Faults


@pytest.fixture(scope="module")
def fault_emulator():
    with emulator_process(port_count=5, job_seconds=0.6) as emulator:
        yield emulator


def test_fail_mode_answers_500_to_everything_until_normal(fault_emulator):
    port = fault_emulator.ports[0]
    url = fault_emulator.url(0)
    fault_emulator.set_fault(port, "fail")
    for method, path in (("GET", "/prompt"), ("POST", "/api/prompt"), ("GET", "/ws")):
        reply = httpx.request(method, url + path)
        assert (reply.status_code, reply.text) == (
            500,
            "500 Internal Server Error\n\nServer got itself in trouble",
        )
    assert httpx.get(url + "/emulator/faults").json()[str(port)] == "fail"
    fault_emulator.set_fault(port, "normal")
    assert httpx.get(url + "/prompt").status_code == 200


def test_hang_mode_holds_requests_until_released(fault_emulator):
    port = fault_emulator.ports[1]
    url = fault_emulator.url(1)
    fault_emulator.set_fault(port, "hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url + "/prompt", timeout=0.3)
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(httpx.get, url + "/prompt", timeout=30)
        wait_until(
            lambda: fault_emulator.stats()["ports"][str(port)]["held_requests"] >= 1,
            timeout=10,
            message="a held request",
        )
        assert not held.done()
        fault_emulator.set_fault(port, "normal")
        assert held.result().json() == {"exec_info": {"queue_remaining": 0}}


async def test_refuse_mode_closes_the_port_but_keeps_the_instance(fault_emulator):
    port = fault_emulator.ports[2]
    async with (
        WebSocketRecorder.connect(fault_emulator.ws_url(2, "r")) as socket,
        httpx.AsyncClient(base_url=fault_emulator.url(2)) as kept_alive,
    ):
        await socket.wait_for_event("status")
        await run(kept_alive, socket, load_workflow("text_ok"), prompt_id="before")
        await asyncio.to_thread(fault_emulator.set_fault, port, "refuse")
        with pytest.raises(httpx.RemoteProtocolError):
            await kept_alive.get("/prompt")  # its open connection is dropped
        async with httpx.AsyncClient(base_url=fault_emulator.url(2)) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/prompt")
        await asyncio.to_thread(fault_emulator.set_fault, port, "normal")
        assert list((await kept_alive.get("/history")).json()) == ["before"]
        # The socket opened before the refusal still gets its prompt's events.
        await run(kept_alive, socket, load_workflow("text_ok"), prompt_id="after")


async def test_die_mode_loses_everything_and_comes_back_fresh(fault_emulator):
    port = fault_emulator.ports[3]
    url = fault_emulator.url(3)
    async with httpx.AsyncClient(base_url=url) as client:
        async with WebSocketRecorder.connect(fault_emulator.ws_url(3, "d")) as socket:
            await socket.wait_for_event("status")
            saved = await run(client, socket, load_workflow("basic_invert"))
            assert saved["outputs"]["3"]["images"][0]["filename"] == "probe_basic_00001_.png"
            slow = {"prompt": load_workflow("slow_blur_chain"), "client_id": "d", "prompt_id": "killed"}
            await client.post("/prompt", json=slow)
            await client.post("/prompt", json={**slow, "prompt_id": "lost"})
            await socket.wait_for_event("executing", prompt_id="killed")
            await asyncio.to_thread(fault_emulator.set_fault, port, "die")
            await socket.wait_closed()
        stats = await asyncio.to_thread(fault_emulator.stats)
        assert stats["ports"][str(port)] == {
            "mode": "die",
            "held_requests": 0,
            "running": None,
            "pending": 0,
            "history": 0,
        }
    async with httpx.AsyncClient(base_url=url) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/prompt")

    await asyncio.to_thread(fault_emulator.set_fault, port, "normal")
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/history")).json() == {}
        assert (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
        async with WebSocketRecorder.connect(fault_emulator.ws_url(3, "d")) as socket:
            await socket.wait_for_event("status")
            reply = await client.post(
                "/prompt", json={"prompt": load_workflow("basic_invert"), "client_id": "d"}
            )
            assert reply.json()["number"] == 0
            await socket.wait_for_event("executing", node=None, prompt_id=reply.json()["prompt_id"])
        # Files outlive the process: the old image is still there and numbering continues.
        history = (await client.get(f"/history/{reply.json()['prompt_id']}")).json()
        (entry,) = history.values()
        assert entry["outputs"]["3"]["images"][0]["filename"] == "probe_basic_00002_.png"
        assert (await client.get("/view", params={"filename": "probe_basic_00001_.png"})).status_code == 200
        # Cache and counters are gone with the old process.
        assert entry["status"]["messages"][1][1]["nodes"] == []


def test_a_port_can_kill_itself_and_get_the_answer(fault_emulator):
    port = fault_emulator.ports[4]
    reply = httpx.post(fault_emulator.url(4) + "/emulator/faults", json={"port": port, "mode": "die"})
    assert reply.json() == {"port": port, "mode": "die"}
    fault_emulator.modes[port] = "die"
    with pytest.raises(httpx.ConnectError):
        httpx.get(fault_emulator.url(4) + "/prompt")
    fault_emulator.set_fault(port, "normal")
    assert httpx.get(fault_emulator.url(4) + "/prompt").status_code == 200


def test_fault_control_rejects_unknown_ports_and_modes(fault_emulator):
    url = fault_emulator.url(0) + "/emulator/faults"
    assert httpx.post(url, json={"port": 1, "mode": "fail"}).status_code == 404
    assert httpx.post(url, json={"port": fault_emulator.ports[0], "mode": "explode"}).status_code == 400
    assert httpx.post(url, content=b"nonsense").status_code == 400


def test_ports_start_late_and_in_their_fault_modes(new_emulator):
    started = time.monotonic()
    emulator = new_emulator(
        port_count=4,
        initial_faults={1: "fail", 2: "hang", 3: "refuse"},
        extra_args=("--startup-seconds", "0.3"),
    )
    assert time.monotonic() - started >= 0.3
    assert emulator.control("GET", "/emulator/faults").json() == {
        str(emulator.ports[0]): "normal",
        str(emulator.ports[1]): "fail",
        str(emulator.ports[2]): "hang",
        str(emulator.ports[3]): "refuse",
    }
    assert httpx.get(emulator.url(1) + "/prompt").status_code == 500
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(emulator.url(2) + "/prompt", timeout=0.3)
    with pytest.raises(httpx.ConnectError):
        httpx.get(emulator.url(3) + "/prompt")
    emulator.set_fault(emulator.ports[3], "normal")
    assert httpx.get(emulator.url(3) + "/prompt").status_code == 200


def test_manage_py_command_runs_the_emulator(new_emulator):
    emulator = new_emulator(entry=("manage.py", "comfy_emulator"))
    assert httpx.get(emulator.url() + "/system_stats").json()["system"]["comfyui_version"] == "0.3.64"


# Load


async def test_ten_ports_run_300_jobs_with_hundreds_of_sockets(new_emulator):
    emulator = new_emulator(port_count=10, job_seconds=0.01)
    jobs_per_port, observers_per_port = 30, 20
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        owners = [
            await stack.enter_async_context(
                WebSocketRecorder.connect(emulator.ws_url(index, f"owner{index}"))
            )
            for index in range(10)
        ]
        observers = [
            await stack.enter_async_context(WebSocketRecorder.connect(emulator.ws_url(index)))
            for index in range(10)
            for _ in range(observers_per_port)
        ]
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=emulator.url(index)))
            for index in range(10)
        ]

        async def submit(index: int, job: int) -> str:
            prompt = with_inputs(load_workflow("basic_invert"), "1", color=job)
            reply = await clients[index].post(
                "/prompt", json={"prompt": prompt, "client_id": f"owner{index}"}
            )
            return reply.json()["prompt_id"]

        prompt_ids = await asyncio.gather(
            *(submit(index, job) for index in range(10) for job in range(jobs_per_port))
        )
        for position, prompt_id in enumerate(prompt_ids):
            await owners[position // jobs_per_port].wait_for_event(
                "executing", node=None, prompt_id=prompt_id
            )
        for observer in observers:
            await observer.wait_until(lambda messages: status_of(messages[-1]) == 0)
    elapsed = time.monotonic() - started

    stats = await asyncio.to_thread(emulator.stats)
    assert sum(stats["executions"].values()) == 300
    assert stats["max_running_seen"] <= 10
    assert elapsed < 60  # about 5 s on an idle 2-core machine; this only catches a collapse
