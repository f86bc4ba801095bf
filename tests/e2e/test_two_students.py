"""End to end, as a class meets it: with room for one run at a time, two students log in, start
ComfyUI from the practice page and press ComfyUI's own Queue button inside it. The second one's
page says, live, that one is ahead ("前方还有 1 人排队"), then shows their run start and finish,
without anyone reloading anything.

Everything is real: nginx for both origins, Django under uvicorn, the dispatcher process, Redis,
ComfyUI emulators started by the local launcher, the official frontend, Debian's Chromium.
"""

import contextlib
import json
from pathlib import Path

import pytest
from playwright.sync_api import expect

from comfyproxy.launchers import LaunchError, launcher_for
from comfyproxy.models import ComfyInstance, Task, TaskStatus
from tests.e2e.conftest import COMFYUI_LOAD_MS
from tests.processes import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

WORKFLOWS = Path(__file__).resolve().parents[2] / "comfyproxy" / "emulator" / "data" / "workflows"
CARD = "#comfyui-queue-notification .card"
RUN_TIMEOUT_MS = 60_000


def blur_chain(blurs: int) -> bytes:
    """An API-format workflow of 1024x1024 blurs, about 1.5 s each on the emulator (no weights needed)."""
    nodes = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 7},
        }
    }
    for number in range(2, blurs + 2):
        nodes[str(number)] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [str(number - 1), 0], "blur_radius": 31, "sigma": 10.0},
        }
    nodes[str(blurs + 2)] = {"class_type": "PreviewImage", "inputs": {"images": [str(blurs + 1), 0]}}
    return json.dumps(nodes).encode()


# Long enough for the second student to be seen waiting behind it, even on a busy machine.
FIRST_WORKFLOW = ("blur_chain_8.json", blur_chain(8))
# Long enough to be seen running.
SECOND_WORKFLOW = ("slow_blur_chain.json", (WORKFLOWS / "slow_blur_chain.json").read_bytes())


@pytest.fixture
def class_of_two(nginx_gateway, make_student, queue_settings):
    queue_settings.max_concurrent_override = 1
    queue_settings.save()
    yield make_student("alice"), make_student("bob")
    # The students' ComfyUIs were started by the web server's local launcher: stop them.
    for instance in ComfyInstance.objects.exclude(launcher_handle={}):
        with contextlib.suppress(LaunchError):  # already gone
            launcher_for(instance).stop(instance)


@pytest.fixture
def dispatcher(nginx_gateway, dispatcher_process):
    process = dispatcher_process(**nginx_gateway.env)
    process.wait_for_log("event=lease_acquired")
    return process


class StudentBrowser:
    """One student's browser: the practice page with their ComfyUI in its frame."""

    def __init__(self, chromium, gateway, user, screenshot):
        self.context = chromium.new_context(locale="zh-CN", viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.name = user.get_username()
        self.screenshot = screenshot
        self.gateway = gateway
        self.navigations = []

    def log_in_and_start_comfyui(self) -> None:
        page = self.page
        page.goto(self.gateway.site_url("/accounts/login/?next=/practice/"))
        page.locator("input[name=username]").fill(self.name)
        page.locator("input[name=password]").fill(f"pw-{self.name}")
        page.locator("input[name=password]").press("Enter")
        page.wait_for_url("**/practice/")
        page.locator("#start-button").click()
        expect(self.comfyui.get_by_test_id("queue-button")).to_be_visible(timeout=COMFYUI_LOAD_MS)
        # ComfyUI 1.27 publishes `graph` at the very end of its start-up (after restoring the last
        # workflow, which would otherwise replace the one the test opens).
        frame = page.locator("#comfy-frame").element_handle().content_frame()
        frame.wait_for_function("() => 'graph' in window", timeout=COMFYUI_LOAD_MS)
        # From here on nothing may reload, neither the practice page nor ComfyUI in its frame.
        page.on("framenavigated", lambda frame: self.navigations.append(frame.url))

    @property
    def comfyui(self):
        return self.page.frame_locator("#comfy-frame")

    @property
    def card(self):
        return self.comfyui.locator(CARD)

    def queue_workflow(self, file_name: str, workflow: bytes) -> Task:
        """Open the workflow file in ComfyUI (as its Open dialog does) and press its Queue button."""
        file_input = self.comfyui.locator("#comfy-file-input")
        with self.page.expect_console_message(
            lambda message: f"open workflow workflows/{file_name}" in message.text
        ):
            file_input.set_input_files(
                files=[{"name": file_name, "mimeType": "application/json", "buffer": workflow}]
            )
        with self.page.expect_response(
            lambda response: response.url.endswith("/api/prompt") and response.request.method == "POST"
        ) as reply:
            self.comfyui.get_by_test_id("queue-button").locator("button").first.click()
        assert reply.value.status == 200, reply.value.text()
        submitted = json.loads(reply.value.request.post_data)["prompt"]
        assert submitted.keys() == json.loads(workflow).keys(), "ComfyUI submitted the workflow it was given"
        return Task.objects.get(pk=reply.value.json()["prompt_id"])

    def snap(self, step: str) -> None:
        self.screenshot(self.page, f"{self.name}-{step}")


def test_the_second_student_sees_their_place_live_then_their_run(
    chromium, nginx_gateway, class_of_two, dispatcher, screenshot
):
    alice, bob = (StudentBrowser(chromium, nginx_gateway, user, screenshot) for user in class_of_two)
    alice.log_in_and_start_comfyui()
    bob.log_in_and_start_comfyui()

    first = alice.queue_workflow(*FIRST_WORKFLOW)
    wait_until(
        lambda: Task.objects.filter(pk=first.pk, status=TaskStatus.PROCESSING).exists(),
        timeout=RUN_TIMEOUT_MS / 1000,
        message="the first student's run to start",
    )

    second = bob.queue_workflow(*SECOND_WORKFLOW)
    expect(bob.card).to_contain_text("前方还有 1 人排队", timeout=15_000)
    expect(bob.card).to_contain_text("最多支持 1 人同时执行")
    expect(alice.card).to_contain_text("正在执行", timeout=15_000)
    bob.snap("waiting")
    alice.snap("running")
    second.refresh_from_db()
    assert second.status == TaskStatus.QUEUED, "bob's task waited for the only slot"

    expect(bob.card).to_contain_text("正在执行", timeout=RUN_TIMEOUT_MS)
    first.refresh_from_db()
    assert first.status == TaskStatus.COMPLETED, "bob's run started only once alice's had finished"
    expect(bob.card).to_contain_text("执行完成", timeout=RUN_TIMEOUT_MS)
    bob.snap("finished")

    second.refresh_from_db()
    assert second.status == TaskStatus.COMPLETED
    assert second.outputs, "ComfyUI reported the run's outputs"
    assert (alice.navigations, bob.navigations) == ([], []), "a page or its ComfyUI reloaded"
