"""The outbound ComfyUI client, against scripted replies (httpx.MockTransport).

The precise failure orders here (a 500 after ComfyUI already queued the prompt, a timeout
after sending) are hard to provoke in a real server at the right instant; the dispatcher
tests cover the same client against the emulator.
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from comfyproxy.comfy.client import (
    Accepted,
    ComfyClient,
    ComfyProtocolError,
    ComfyRejected,
    ComfyServerError,
    ComfyUnreachable,
    PromptLocation,
    PromptRequest,
    PromptState,
    RetryPolicy,
)
from comfyproxy.comfy.watcher import FrameReader

BASE = "http://127.0.0.1:8189"
PROMPT_ID = "5f0c1d1e-0000-4000-8000-000000000001"
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}
FINISHED = {
    PROMPT_ID: {
        "prompt": [0, PROMPT_ID, WORKFLOW, {}, ["1"]],
        "outputs": {"1": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
        "status": {"status_str": "success", "completed": True, "messages": [["execution_start", {}]]},
    }
}


class ScriptedComfyUI:
    """Answers each route from a list of replies (the last one repeats) and records requests."""

    def __init__(self, **routes):
        self.routes = {key.replace("_", " /", 1): list(replies) for key, replies in routes.items()}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        key = f"{request.method} {'/history' if path.startswith('/history/') else path}"
        replies = self.routes[key]
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def sent(self, method: str, path: str) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.method == method and r.url.path == path]


def client_for(comfy: ScriptedComfyUI, attempts: int = 3) -> ComfyClient:
    return ComfyClient(
        transport_factory=lambda: httpx.MockTransport(comfy),
        retry=RetryPolicy(attempts=attempts, first_backoff=0),
    )


def ok(body) -> httpx.Response:
    return httpx.Response(200, json=body)


def accepted() -> httpx.Response:
    return ok({"prompt_id": PROMPT_ID, "number": 3, "node_errors": {}})


def queue(running=(), pending=()) -> httpx.Response:
    return ok(
        {
            "queue_running": [[0, pid, WORKFLOW, {}, ["1"]] for pid in running],
            "queue_pending": [[1, pid, WORKFLOW, {}, ["1"]] for pid in pending],
        }
    )


SERVER_ERROR = httpx.Response(500, text="500 Internal Server Error\n\nServer got itself in trouble")
REQUEST = PromptRequest(
    prompt_id=PROMPT_ID,
    prompt=WORKFLOW,
    client_id="browser-1",
    extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}},
    partial_execution_targets=["1"],
)


async def test_submission_forwards_the_students_fields_with_our_prompt_id():
    comfy = ScriptedComfyUI(POST_prompt=[accepted()])
    async with client_for(comfy) as client:
        result = await client.submit_exactly_once(BASE, REQUEST)
    assert result == Accepted(prompt_id=PROMPT_ID, number=3.0, node_errors={})
    [body] = comfy.sent("POST", "/prompt")
    assert body == {
        "prompt_id": PROMPT_ID,
        "prompt": WORKFLOW,
        "client_id": "browser-1",
        "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}},
        "partial_execution_targets": ["1"],
    }


async def test_no_client_id_or_targets_means_none_are_sent():
    comfy = ScriptedComfyUI(POST_prompt=[accepted()])
    async with client_for(comfy) as client:
        await client.submit_exactly_once(BASE, PromptRequest(prompt_id=PROMPT_ID, prompt=WORKFLOW))
    [body] = comfy.sent("POST", "/prompt")
    assert set(body) == {"prompt_id", "prompt", "extra_data"}


async def test_validation_errors_carry_comfyuis_error_and_node_errors_and_are_not_retried():
    error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"}
    node_errors = {"2": {"errors": [{"type": "required_input_missing"}], "class_type": "ImageInvert"}}
    comfy = ScriptedComfyUI(
        POST_prompt=[httpx.Response(400, json={"error": error, "node_errors": node_errors})]
    )
    async with client_for(comfy) as client:
        with pytest.raises(ComfyRejected) as rejected:
            await client.submit_exactly_once(BASE, REQUEST)
    assert (rejected.value.error, rejected.value.node_errors) == (error, node_errors)
    assert len(comfy.sent("POST", "/prompt")) == 1


async def test_a_500_after_comfyui_queued_the_prompt_is_not_sent_again():
    comfy = ScriptedComfyUI(POST_prompt=[SERVER_ERROR], GET_queue=[queue(running=[PROMPT_ID])])
    async with client_for(comfy) as client:
        result = await client.submit_exactly_once(BASE, REQUEST)
    assert result == PromptLocation(PromptState.RUNNING)
    assert len(comfy.sent("POST", "/prompt")) == 1


async def test_a_500_is_retried_once_comfyui_shows_it_does_not_have_the_prompt():
    comfy = ScriptedComfyUI(POST_prompt=[SERVER_ERROR, accepted()], GET_queue=[queue()], GET_history=[ok({})])
    async with client_for(comfy) as client:
        result = await client.submit_exactly_once(BASE, REQUEST)
    assert isinstance(result, Accepted)
    assert len(comfy.sent("POST", "/prompt")) == 2
    # It looked before sending again: /queue first, then /history.
    paths = [r.url.path for r in comfy.requests]
    assert paths == ["/prompt", "/queue", f"/history/{PROMPT_ID}", "/prompt"]


async def test_a_timeout_whose_prompt_already_finished_returns_the_history():
    comfy = ScriptedComfyUI(
        POST_prompt=[httpx.ReadTimeout("no reply")], GET_queue=[queue()], GET_history=[ok(FINISHED)]
    )
    async with client_for(comfy) as client:
        result = await client.submit_exactly_once(BASE, REQUEST)
    assert result.state is PromptState.FINISHED
    assert result.history.succeeded
    assert len(comfy.sent("POST", "/prompt")) == 1


async def test_refused_connections_are_retried_without_looking_then_reported_as_refused():
    refused = httpx.ConnectError("refused")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    comfy = ScriptedComfyUI(POST_prompt=[refused])
    async with client_for(comfy, attempts=3) as client:
        with pytest.raises(ComfyUnreachable) as failure:
            await client.submit_exactly_once(BASE, REQUEST)
    assert failure.value.refused
    assert not failure.value.maybe_delivered
    assert [r.url.path for r in comfy.requests] == ["/prompt"] * 3


async def test_a_silent_comfyui_never_gets_the_prompt_twice():
    comfy = ScriptedComfyUI(
        POST_prompt=[httpx.ReadTimeout("no reply")], GET_queue=[httpx.ReadTimeout("no reply")]
    )
    async with client_for(comfy, attempts=4) as client:
        with pytest.raises(ComfyUnreachable) as failure:
            await client.submit_exactly_once(BASE, REQUEST)
    assert failure.value.maybe_delivered
    assert len(comfy.sent("POST", "/prompt")) == 1


async def test_before_send_can_stop_a_submission():
    class Fenced(Exception):
        pass

    def refuse():
        raise Fenced

    comfy = ScriptedComfyUI(POST_prompt=[accepted()])
    async with client_for(comfy) as client:
        with pytest.raises(Fenced):
            await client.submit_exactly_once(BASE, REQUEST, before_send=refuse)
    assert comfy.requests == []


async def test_a_reply_without_our_prompt_id_is_a_protocol_error():
    comfy = ScriptedComfyUI(POST_prompt=[ok({"prompt_id": "someone-else", "number": 1, "node_errors": {}})])
    async with client_for(comfy) as client:
        with pytest.raises(ComfyProtocolError):
            await client.submit_exactly_once(BASE, REQUEST)


async def test_a_5xx_on_reads_is_a_server_error():
    comfy = ScriptedComfyUI(GET_history=[SERVER_ERROR])
    async with client_for(comfy) as client:
        with pytest.raises(ComfyServerError):
            await client.history(BASE, PROMPT_ID)


@pytest.mark.parametrize(
    ("queue_reply", "history_reply", "state"),
    [
        (queue(running=[PROMPT_ID]), ok({}), PromptState.RUNNING),
        (queue(pending=[PROMPT_ID]), ok({}), PromptState.PENDING),
        (queue(running=["other"]), ok(FINISHED), PromptState.FINISHED),
        (queue(running=["other"]), ok({}), PromptState.UNKNOWN),
    ],
)
async def test_locate_reads_the_queue_then_the_history(queue_reply, history_reply, state):
    comfy = ScriptedComfyUI(GET_queue=[queue_reply], GET_history=[history_reply])
    async with client_for(comfy) as client:
        assert (await client.locate(BASE, PROMPT_ID)).state is state


async def test_history_entries_tell_success_error_and_interruption_apart():
    error = {"prompt_id": PROMPT_ID, "node_id": "2", "exception_message": "bad regex"}
    entries = {
        "ok": FINISHED[PROMPT_ID],
        "error": {"outputs": {}, "status": {"status_str": "error", "messages": [["execution_error", error]]}},
        "interrupted": {
            "outputs": {},
            "status": {"status_str": "error", "messages": [["execution_interrupted", {"node_id": "3"}]]},
        },
    }
    comfy = ScriptedComfyUI(
        GET_history=[
            ok({PROMPT_ID: entries["ok"]}),
            ok({PROMPT_ID: entries["error"]}),
            ok({PROMPT_ID: entries["interrupted"]}),
        ]
    )
    async with client_for(comfy) as client:
        success = await client.history(BASE, PROMPT_ID)
        failure = await client.history(BASE, PROMPT_ID)
        interrupted = await client.history(BASE, PROMPT_ID)
    assert (success.succeeded, success.interrupted) == (True, False)
    assert success.outputs == FINISHED[PROMPT_ID]["outputs"]
    assert (failure.succeeded, failure.execution_error) == (False, error)
    assert (interrupted.succeeded, interrupted.interrupted) == (False, True)


async def test_interrupt_names_the_prompt_and_cancel_deletes_it_from_the_pending_queue():
    empty = httpx.Response(200)
    comfy = ScriptedComfyUI(POST_interrupt=[empty], POST_queue=[empty])
    async with client_for(comfy) as client:
        await client.delete_pending(BASE, PROMPT_ID)
        await client.interrupt(BASE, PROMPT_ID)
    assert comfy.sent("POST", "/queue") == [{"delete": [PROMPT_ID]}]
    assert comfy.sent("POST", "/interrupt") == [{"prompt_id": PROMPT_ID}]


def status(remaining: int) -> str:
    return json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}}})


def test_the_watcher_reads_history_only_when_a_frame_may_mean_a_prompt_ended():
    frames = FrameReader()
    seen = [
        frames.may_have_ended(frame)
        for frame in [
            status(0),  # on connecting: something may have ended while we were away
            status(1),  # our prompt was queued
            status(1),  # ... and taken by the worker
            json.dumps({"type": "progress_state", "data": {"prompt_id": PROMPT_ID, "nodes": {}}}),
            json.dumps({"type": "executing", "data": {"node": "2", "prompt_id": PROMPT_ID}}),
            status(0),  # it left the queue
            json.dumps({"type": "executing", "data": {"node": None, "prompt_id": PROMPT_ID}}),
            json.dumps({"type": "execution_interrupted", "data": {"prompt_id": PROMPT_ID}}),
            "not json",
        ]
    ]
    assert seen == [True, False, False, False, False, True, True, True, False]


WARM_UP_THEN_REQUEST = """
import asyncio, json, sys
from comfyproxy.comfy.client import ComfyClient

async def main():
    async def answer(reader, writer):
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n")
        writer.write(b"Content-Length: 2\\r\\n\\r\\n{}")
        await writer.drain()

    comfy = await asyncio.start_server(answer, "127.0.0.1", 0)
    base_url = "http://127.0.0.1:%d" % comfy.sockets[0].getsockname()[1]
    client = ComfyClient()
    if sys.argv[1] == "warm":
        await client.warm_up()
    before = set(sys.modules)
    assert await client.history(base_url, "p") is None
    await client.aclose()
    print(json.dumps(sorted(set(sys.modules) - before)))

asyncio.run(main())
"""


@pytest.mark.parametrize("warm", [True, False])
def test_after_the_warm_up_the_first_request_to_comfyui_loads_no_module(warm):
    """The dispatcher warms up at start, so its first hand-off does not load the HTTP stack."""
    result = subprocess.run(
        [sys.executable, "-c", WARM_UP_THEN_REQUEST, "warm" if warm else "cold"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(result.stdout)
    if warm:
        assert loaded == []
    else:  # what the warm-up saves: without it, the first request loads the HTTP stack
        assert "httpcore" in loaded
