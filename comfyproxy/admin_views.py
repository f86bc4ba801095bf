"""The teacher's pages inside admin: the live queue board and the usage of a class session.

Mounted by `TaskAdmin.get_urls` behind `admin_site.admin_view` (staff only); each view also
checks the model permission it needs. The board renders the same frame the teacher socket
sends and then follows the socket; its buttons post to one action view that calls
`services.control`.
"""

import io
import json
import math
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views import View

from comfyproxy import errors
from comfyproxy.models import QueueSettings, Task
from comfyproxy.services import control, usage
from comfyproxy.services.broadcast import Viewer, read_viewer_state, render_frame

QUEUE_SOCKET_PATH = "/ws/comfy_proxy/queue/"


def format_duration(seconds: float | None) -> str:
    """1:05 or 1:02:05, readable in every language (the board's script writes the same)."""
    if seconds is None:
        return "–"
    total = max(int(seconds), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class AdminPageView(View):
    model_admin = None
    permission = "view"

    def dispatch(self, request, *args, **kwargs):
        allowed = {
            "view": self.model_admin.has_view_permission,
            "change": self.model_admin.has_change_permission,
        }[self.permission](request)
        if not allowed:
            raise PermissionDenied
        return super().dispatch(request, *args, **kwargs)

    def page(self, request, template: str, title: str, **context) -> TemplateResponse:
        return TemplateResponse(
            request,
            template,
            {
                **self.model_admin.admin_site.each_context(request),
                "opts": self.model_admin.model._meta,
                "title": title,
                **context,
            },
        )


# --- The live board -------------------------------------------------------------------------


class BoardView(AdminPageView):
    def get(self, request):
        viewer = Viewer(request.user.pk, whole_queue=True)
        can_act = self.model_admin.has_change_permission(request)
        can_change_settings = request.user.has_perm("comfyproxy.change_queuesettings")
        board = {
            "socketPath": QUEUE_SOCKET_PATH,
            "actionUrl": reverse("admin:comfyproxy_board_act"),
            "taskUrl": reverse("admin:comfyproxy_task_change", args=["00000000-0000-0000-0000-000000000000"]),
            "serverNow": timezone.now().timestamp(),
            "canAct": can_act,
            "initial": json.loads(render_frame(read_viewer_state(viewer), viewer)),
            "text": board_texts(),
        }
        return self.page(
            request,
            "admin/comfyproxy/board.html",
            _("Live queue"),
            board=board,
            can_change_settings=can_change_settings,
            queue_settings=QueueSettings.load(),
        )


def board_texts() -> dict:
    """What the board's script writes, translated here so the script needs no catalog."""
    return {
        "running": _("Running"),
        "waiting": _("Waiting"),
        "freeSlots": _("Free slots"),
        "cap": _("At most at once"),
        "paused": _("The queue is paused: nothing new starts."),
        "live": _("Live"),
        "reconnecting": _("Connection lost, reconnecting…"),
        "student": _("Student"),
        "instance": _("Instance"),
        "runningFor": _("Running for"),
        "position": _("Position"),
        "waitedFor": _("Waited"),
        "estimatedStart": _("Estimated start"),
        "startsNow": _("now"),
        "status": _("Status"),
        "reason": _("Reason"),
        "finishedAt": _("Finished"),
        "nothingRunning": _("Nothing is running."),
        "nobodyWaiting": _("Nobody is waiting."),
        "nothingFinished": _("Nothing finished in the last minutes."),
        "recentlyFinished": _("Recently finished"),
        "stopping": _("stopping…"),
        "interrupt": _("Interrupt"),
        "cancel": _("Cancel"),
        "toFront": _("Move to front"),
        "statuses": {
            "queued": _("queued"),
            "processing": _("processing"),
            "completed": _("completed"),
            "failed": _("failed"),
            "cancelled": _("cancelled"),
        },
    }


class BoardActionForm(forms.Form):
    ACTIONS = ("cancel", "interrupt", "move_to_front", "pause", "resume", "set_cap")
    TASK_ACTIONS = ("cancel", "interrupt", "move_to_front")

    action = forms.ChoiceField(choices=[(action, action) for action in ACTIONS])
    task = forms.UUIDField(required=False)
    # Empty returns to the configured default.
    cap = forms.IntegerField(required=False)

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("action") in self.TASK_ACTIONS and not cleaned.get("task"):
            raise forms.ValidationError(_("Choose a task."), code="no_task")
        return cleaned


class BoardActionView(AdminPageView):
    """The board's buttons: one POST per action, then back to the board with what it did."""

    permission = "change"
    http_method_names = ["post"]

    def post(self, request):
        form = BoardActionForm(request.POST)
        if not form.is_valid():
            messages.error(request, " ".join(error for errors_ in form.errors.values() for error in errors_))
            return self.back()
        action = form.cleaned_data["action"]
        try:
            result = self.perform(request, action, form.cleaned_data)
        except errors.QueueError as error:
            messages.error(request, error.message)
        else:
            level = messages.SUCCESS if result.affected else messages.WARNING
            messages.add_message(request, level, result.message)
        return self.back()

    def perform(self, request, action: str, data: dict) -> control.ActionResult:
        actor = request.user
        if action in BoardActionForm.TASK_ACTIONS:
            task = Task.objects.filter(pk=data["task"]).first()
            if task is None:
                raise errors.TaskNotFound()
            service = {
                "cancel": control.cancel_tasks,
                "interrupt": control.interrupt_tasks,
                "move_to_front": control.move_to_front,
            }[action]
            return service(actor=actor, tasks=[task])
        if not actor.has_perm("comfyproxy.change_queuesettings"):
            raise PermissionDenied
        if action == "pause":
            return control.pause_queue(actor=actor)
        if action == "resume":
            return control.resume_queue(actor=actor)
        return control.set_max_concurrent(actor=actor, value=data["cap"])

    def back(self):
        # 303: the browser fetches the board with GET, so reloading it never re-posts.
        return HttpResponseRedirect(reverse("admin:comfyproxy_board"), status=303)


class StopIdleInstancesView(AdminPageView):
    """The instance list's button: stop now what the monitor would stop as idle."""

    permission = "change"
    http_method_names = ["post"]

    def post(self, request):
        try:
            result = control.stop_idle_instances(actor=request.user)
        except errors.QueueError as error:
            messages.error(request, error.message)
        else:
            messages.add_message(
                request, messages.SUCCESS if result.affected else messages.WARNING, result.message
            )
        return HttpResponseRedirect(reverse("admin:comfyproxy_comfyinstance_changelist"), status=303)


# --- Usage of a class session -----------------------------------------------------------------


class UsageWindowForm(forms.Form):
    since = forms.DateTimeField(
        label=gettext_lazy("From"), widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    until = forms.DateTimeField(
        label=gettext_lazy("Until"), widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )

    def clean(self):
        cleaned = super().clean()
        since, until = cleaned.get("since"), cleaned.get("until")
        if since and until and since >= until:
            raise forms.ValidationError(_("The start must be before the end."), code="empty_window")
        return cleaned

    @classmethod
    def from_query(cls, query) -> "UsageWindowForm":
        """The window in the query string, or today's class day when none is given."""
        if "since" in query or "until" in query:
            return cls(query)
        return cls(window_query(timezone.localdate(), days=1))


# What <input type="datetime-local"> sends, in local time.
LOCAL_INPUT_FORMAT = "%Y-%m-%dT%H:%M"


def window_query(first_day, *, days: int) -> dict:
    """The query for whole local days starting at `first_day`."""
    since, _end = usage.day_window(first_day)
    _start, until = usage.day_window(first_day + timedelta(days=days - 1))
    return {
        "since": timezone.localtime(since).strftime(LOCAL_INPUT_FORMAT),
        "until": timezone.localtime(until).strftime(LOCAL_INPUT_FORMAT),
    }


def quick_windows() -> list[tuple[str, str]]:
    """(label, query string) of the windows a teacher picks most."""
    today = timezone.localdate()
    return [
        (_("Today"), urlencode(window_query(today, days=1))),
        (_("Yesterday"), urlencode(window_query(today - timedelta(days=1), days=1))),
        (_("Last 7 days"), urlencode(window_query(today - timedelta(days=6), days=7))),
    ]


class UsageView(AdminPageView):
    def get(self, request):
        form = UsageWindowForm.from_query(request.GET)
        report = None
        if form.is_valid():
            report = usage.usage_report(since=form.cleaned_data["since"], until=form.cleaned_data["until"])
        return self.page(
            request,
            "admin/comfyproxy/usage.html",
            _("Usage of a class session"),
            form=form,
            report=report,
            quick_windows=quick_windows(),
            rows=[shown(student) for student in report.students] if report else [],
            overall=shown(report.overall) if report else None,
            hour_chart=hour_chart(report.tasks_by_hour) if report else None,
            student_chart=student_chart(report.students) if report else None,
            query=urlencode({"since": form.data.get("since", ""), "until": form.data.get("until", "")}),
        )


def shown(row: usage.Usage) -> dict:
    """A usage row with its durations written the way the board writes them."""
    return {
        "usage": row,
        "wait_median": format_duration(row.wait.median),
        "wait_p90": format_duration(row.wait.p90),
        "run_median": format_duration(row.run.median),
        "run_p90": format_duration(row.run.p90),
    }


class UsageCsvView(AdminPageView):
    def get(self, request):
        form = UsageWindowForm.from_query(request.GET)
        if not form.is_valid():
            return JsonResponse(
                {
                    "code": "invalid_window",
                    "message": _("Choose a valid time window."),
                    "details": form.errors,
                },
                status=400,
                json_dumps_params={"ensure_ascii": False},
            )
        since, until = form.cleaned_data["since"], form.cleaned_data["until"]
        report = usage.usage_report(since=since, until=until)
        out = io.StringIO()
        # The byte-order mark makes spreadsheet programs read the file as UTF-8 (names in Chinese).
        out.write("\ufeff")
        usage.write_csv(report, out)
        response = HttpResponse(out.getvalue(), content_type="text/csv; charset=utf-8")
        name = f"usage-{timezone.localtime(since):%Y%m%d-%H%M}-{timezone.localtime(until):%Y%m%d-%H%M}.csv"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response


# --- Charts, drawn on the server as SVG -------------------------------------------------------
#
# Geometry is worked out here in SVG user units; chart.html only draws what it is given.


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str
    css_class: str = ""


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "middle"


@dataclass(frozen=True)
class GridLine:
    x1: float
    y1: float
    x2: float
    y2: float
    label: Label


@dataclass(frozen=True)
class Chart:
    width: float
    height: float
    bars: list[Bar]
    labels: list[Label]
    grid: list[GridLine]


def axis_steps(largest: int) -> list[int]:
    """Whole-number ticks from 0 that cover `largest` in about five steps of 1, 2 or 5 × 10ⁿ."""
    wanted = max(1, math.ceil(largest / 5))
    magnitude = 1
    while not any(magnitude * factor >= wanted for factor in (1, 2, 5)):
        magnitude *= 10
    step = next(magnitude * factor for factor in (1, 2, 5) if magnitude * factor >= wanted)
    return list(range(0, step * max(1, math.ceil(largest / step)) + 1, step))


# Hour chart: a column per hour, the count axis on the left.
HOUR_AXIS_WIDTH, HOUR_SLOT, HOUR_PLOT_TOP, HOUR_PLOT_HEIGHT, HOUR_LABELS_HEIGHT = 36, 36, 8, 160, 24


def hour_chart(tasks_by_hour: list[int]) -> Chart | None:
    """Tasks submitted per hour of the day, from the first busy hour to the last."""
    busy = [hour for hour, count in enumerate(tasks_by_hour) if count]
    if not busy:
        return None
    hours = range(busy[0], busy[-1] + 1)
    steps = axis_steps(max(tasks_by_hour))
    scale = HOUR_PLOT_HEIGHT / steps[-1]
    baseline = HOUR_PLOT_TOP + HOUR_PLOT_HEIGHT
    right = HOUR_AXIS_WIDTH + HOUR_SLOT * len(hours)
    bars, labels = [], []
    for index, hour in enumerate(hours):
        count = tasks_by_hour[hour]
        x = HOUR_AXIS_WIDTH + index * HOUR_SLOT
        bars.append(
            Bar(x + 4, baseline - count * scale, HOUR_SLOT - 8, count * scale, f"{hour:02d}:00 – {count}")
        )
        labels.append(Label(x + HOUR_SLOT / 2, baseline + 16, f"{hour:02d}:00"))
    grid = [
        GridLine(
            HOUR_AXIS_WIDTH,
            baseline - step * scale,
            right,
            baseline - step * scale,
            Label(HOUR_AXIS_WIDTH - 6, baseline - step * scale + 4, str(step), "end"),
        )
        for step in steps
    ]
    return Chart(right + 8, baseline + HOUR_LABELS_HEIGHT, bars, labels, grid)


# Student chart: a row per student, names on the left, the count axis below.
# Each outcome is a segment of the student's bar, with the CSS class that colours it.
OUTCOMES = (
    ("completed", "completed"),
    ("failed", "failed"),
    ("cancelled", "cancelled"),
    ("unfinished", "active"),
)
NAMES_WIDTH, ROW_HEIGHT, STUDENT_PLOT_WIDTH, AXIS_LABELS_HEIGHT = 150, 24, 480, 24


def student_chart(students: list[usage.Usage]) -> Chart | None:
    """One horizontal bar per student, split by outcome."""
    if not students:
        return None
    steps = axis_steps(max(student.total for student in students))
    scale = STUDENT_PLOT_WIDTH / steps[-1]
    plot_bottom = ROW_HEIGHT * len(students)
    bars, labels = [], []
    for index, student in enumerate(students):
        y = index * ROW_HEIGHT
        labels.append(Label(NAMES_WIDTH - 8, y + ROW_HEIGHT / 2 + 4, student.username, "end"))
        x = float(NAMES_WIDTH)
        for attribute, css_class in OUTCOMES:
            count = getattr(student, attribute)
            if count:
                title = f"{student.username}: {count}"
                bars.append(Bar(x, y + 3, count * scale, ROW_HEIGHT - 6, title, css_class))
                x += count * scale
    grid = [
        GridLine(
            NAMES_WIDTH + step * scale,
            0,
            NAMES_WIDTH + step * scale,
            plot_bottom,
            Label(NAMES_WIDTH + step * scale, plot_bottom + 16, str(step)),
        )
        for step in steps
    ]
    return Chart(NAMES_WIDTH + STUDENT_PLOT_WIDTH + 16, plot_bottom + AXIS_LABELS_HEIGHT, bars, labels, grid)
