"""The queue's state. The database is the truth; Redis holds nothing that cannot be rebuilt.

State changes happen only in `comfyproxy.services`; these classes describe rows and
name the questions the rest of the code asks about them.
"""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class TaskStatus(models.TextChoices):
    QUEUED = "queued", _("queued")
    PROCESSING = "processing", _("processing")
    COMPLETED = "completed", _("completed")
    FAILED = "failed", _("failed")
    CANCELLED = "cancelled", _("cancelled")


TERMINAL_STATUSES = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)
ACTIVE_STATUSES = (TaskStatus.QUEUED, TaskStatus.PROCESSING)


class TaskReason(models.TextChoices):
    """Why a task ended the way it did (stable codes shown to students and in metrics)."""

    NONE = "", _("none")
    VALIDATION = "validation", _("ComfyUI rejected the workflow")
    EXECUTION_ERROR = "execution_error", _("the workflow failed while running")
    TIMEOUT = "timeout", _("the run took longer than allowed")
    COMFY_UNREACHABLE = "comfy_unreachable", _("ComfyUI could not be reached")
    COMFY_SERVER_ERROR = "comfy_server_error", _("ComfyUI answered with an error")
    INSTANCE_STOPPED = "instance_stopped", _("the ComfyUI instance stopped")
    LOST = "lost", _("ComfyUI lost the task")
    INTERRUPTED = "interrupted", _("interrupted in ComfyUI")
    CANCELLED_BY_OWNER = "cancelled_by_owner", _("cancelled by the student")
    CANCELLED_BY_TEACHER = "cancelled_by_teacher", _("cancelled by a teacher")


class TaskQuerySet(models.QuerySet):
    def queued(self):
        return self.filter(status=TaskStatus.QUEUED)

    def processing(self):
        return self.filter(status=TaskStatus.PROCESSING)

    def active(self):
        return self.filter(status__in=ACTIVE_STATUSES)

    def finished(self):
        return self.filter(status__in=TERMINAL_STATUSES)

    def in_queue_order(self):
        return self.order_by("queue_order", "queued_at", "id")


class Task(models.Model):
    """One submitted workflow. Its id is also the prompt id ComfyUI runs it under."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="comfy_tasks",
        verbose_name=_("student"),
    )
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("submitted by"),
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text=_("Who pressed Queue: the student, or a teacher acting for them."),
    )
    instance = models.ForeignKey(
        "ComfyInstance",
        on_delete=models.SET_NULL,
        null=True,
        related_name="tasks",
        verbose_name=_("instance"),
    )
    # Where it runs, kept even if the instance row is later reassigned.
    host = models.CharField(max_length=255, verbose_name=_("host"))
    port = models.PositiveIntegerField(verbose_name=_("port"))

    # What ComfyUI's frontend sent, forwarded untouched (queue order fields excepted).
    client_id = models.CharField(max_length=200, blank=True, verbose_name=_("ComfyUI client id"))
    prompt = models.JSONField(verbose_name=_("workflow"))
    extra_data = models.JSONField(default=dict, blank=True, verbose_name=_("extra data"))
    partial_execution_targets = models.JSONField(
        null=True, blank=True, verbose_name=_("partial execution targets")
    )

    status = models.CharField(
        max_length=16, choices=TaskStatus.choices, default=TaskStatus.QUEUED, verbose_name=_("status")
    )
    reason = models.CharField(
        max_length=32, choices=TaskReason.choices, blank=True, default="", verbose_name=_("reason")
    )
    error_message = models.TextField(blank=True, default="", verbose_name=_("error message"))
    # ComfyUI's own error object and node_errors, shown to the student as ComfyUI would.
    comfy_error = models.JSONField(null=True, blank=True, verbose_name=_("ComfyUI error"))
    node_errors = models.JSONField(default=dict, blank=True, verbose_name=_("node errors"))
    outputs = models.JSONField(default=dict, blank=True, verbose_name=_("outputs"))

    # FIFO key: a clock reading at submission; "move to front" puts it below the head.
    queue_order = models.BigIntegerField(verbose_name=_("queue order"))
    comfy_number = models.FloatField(null=True, blank=True, verbose_name=_("ComfyUI number"))
    dispatch_attempts = models.PositiveSmallIntegerField(default=0, verbose_name=_("dispatch attempts"))
    cancel_requested_at = models.DateTimeField(null=True, blank=True, verbose_name=_("cancel requested at"))

    queued_at = models.DateTimeField(default=timezone.now, verbose_name=_("queued at"))
    started_at = models.DateTimeField(
        null=True, blank=True, verbose_name=_("started at")
    )  # claimed by the dispatcher
    submitted_at = models.DateTimeField(
        null=True, blank=True, verbose_name=_("submitted at")
    )  # ComfyUI accepted it
    finished_at = models.DateTimeField(null=True, blank=True, verbose_name=_("finished at"))

    objects = TaskQuerySet.as_manager()

    class Meta:
        verbose_name = _("task")
        verbose_name_plural = _("tasks")
        ordering = ["-queued_at"]
        indexes = [
            # The dispatcher's scan for the next task (services.dispatch.claim_next_task)
            # and every position count read only queued rows, in queue order.
            models.Index(
                fields=["queue_order", "queued_at"],
                condition=Q(status="queued"),
                name="task_queued_order_idx",
            ),
            # A student's active tasks; and, as it holds every column they read, the counts
            # and position of a new submission (services.queue._queue_counts) without
            # reading the rows: on SQLite, columns stored after a workflow's UI graph
            # (tens of KB in extra_data) are reached only through its overflow pages.
            models.Index(
                fields=["status", "owner", "queue_order", "queued_at", "id"],
                name="task_status_owner_order_idx",
            ),
            models.Index(fields=["queued_at"], name="task_queued_at_idx"),
            # The recently finished tasks the live queue shows, without reading the history.
            models.Index(fields=["finished_at"], name="task_finished_at_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=TaskStatus.values), name="task_status_valid"),
            # Invariant 2: one task at a time per ComfyUI instance. A second one would
            # only wait inside ComfyUI while holding one of the class's GPU slots.
            models.UniqueConstraint(
                fields=["instance"],
                condition=Q(status="processing"),
                name="task_one_processing_per_instance",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["queued", "processing"], finished_at__isnull=True)
                | Q(status__in=["completed", "failed", "cancelled"], finished_at__isnull=False),
                name="task_finished_at_iff_terminal",
            ),
            models.CheckConstraint(
                condition=~Q(status="processing") | Q(started_at__isnull=False),
                name="task_processing_has_started_at",
            ),
        ]

    def __str__(self):
        return f"{self.id} ({self.status})"

    @property
    def prompt_id(self) -> str:
        return str(self.id)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class InstanceState(models.TextChoices):
    STARTING = "starting", _("starting")
    RUNNING = "running", _("running")
    STOPPING = "stopping", _("stopping")
    STOPPED = "stopped", _("stopped")
    FAILED = "failed", _("failed")


INSTANCE_LIVE_STATES = (InstanceState.STARTING, InstanceState.RUNNING, InstanceState.STOPPING)


class ComfyInstanceQuerySet(models.QuerySet):
    def running(self):
        return self.filter(state=InstanceState.RUNNING)

    def live(self):
        return self.filter(state__in=INSTANCE_LIVE_STATES)


class ComfyInstance(models.Model):
    """A student's own ComfyUI process on the GPU server (one per student)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        verbose_name=_("student"),
        on_delete=models.CASCADE,
        related_name="comfy_instance",
    )
    host = models.CharField(max_length=255, verbose_name=_("host"))
    port = models.PositiveIntegerField(null=True, blank=True, verbose_name=_("port"))
    state = models.CharField(
        max_length=16, choices=InstanceState.choices, default=InstanceState.STOPPED, verbose_name=_("state")
    )
    # "ssh", "local" or "external" (registered by an operator, started elsewhere).
    launcher = models.CharField(max_length=16, default="external", verbose_name=_("launcher"))
    # What the launcher needs to stop it again (e.g. the remote pid).
    launcher_handle = models.JSONField(default=dict, blank=True, verbose_name=_("launcher handle"))
    state_message = models.TextField(blank=True, default="", verbose_name=_("state message"))

    started_at = models.DateTimeField(null=True, blank=True, verbose_name=_("started at"))
    stopped_at = models.DateTimeField(null=True, blank=True, verbose_name=_("stopped at"))
    last_activity_at = models.DateTimeField(null=True, blank=True, verbose_name=_("last activity"))
    last_health_check_at = models.DateTimeField(null=True, blank=True, verbose_name=_("last health check"))
    healthy = models.BooleanField(null=True, blank=True, verbose_name=_("healthy"))

    objects = ComfyInstanceQuerySet.as_manager()

    class Meta:
        verbose_name = _("ComfyUI instance")
        verbose_name_plural = _("ComfyUI instances")
        ordering = ["port"]
        constraints = [
            # Two students never share a port, even when they press start at once.
            models.UniqueConstraint(
                fields=["host", "port"],
                condition=Q(state__in=["starting", "running", "stopping"]),
                name="instance_one_live_per_port",
            ),
            models.CheckConstraint(condition=Q(state__in=InstanceState.values), name="instance_state_valid"),
            models.CheckConstraint(
                condition=~Q(state__in=["starting", "running", "stopping"]) | Q(port__isnull=False),
                name="instance_live_has_port",
            ),
        ]

    def __str__(self):
        return f"{self.user} @ {self.host}:{self.port} ({self.state})"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def proxy_path(self) -> str:
        return f"/comfyui/{self.user.get_username()}/{self.port}/"


class QueueSettings(models.Model):
    """Live settings a teacher changes while the class runs (a single row, pk=1)."""

    max_concurrent_override = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        verbose_name=_("max concurrent runs"),
        help_text=_("Leave empty to use the configured default."),
    )
    paused = models.BooleanField(default=False, verbose_name=_("paused"))
    max_queued_per_student = models.PositiveSmallIntegerField(
        null=True, blank=True, verbose_name=_("max queued tasks per student")
    )
    run_timeout_seconds = models.PositiveIntegerField(
        null=True, blank=True, verbose_name=_("run timeout (seconds)")
    )
    idle_stop_minutes = models.PositiveIntegerField(
        default=0,
        verbose_name=_("stop idle instances after (minutes)"),
        help_text=_("0 never stops idle instances."),
    )
    free_memory_after_task = models.BooleanField(
        default=False, verbose_name=_("ask ComfyUI to free memory after each task")
    )
    updated_at = models.DateTimeField(auto_now=True, verbose_name=_("updated at"))
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        verbose_name = _("queue settings")
        verbose_name_plural = _("queue settings")
        constraints = [
            models.CheckConstraint(condition=Q(pk=1), name="queue_settings_singleton"),
            models.CheckConstraint(
                condition=Q(max_concurrent_override__isnull=True) | Q(max_concurrent_override__gte=1),
                name="queue_settings_cap_positive",
            ),
        ]

    def __str__(self):
        return str(_("queue settings"))

    @classmethod
    def load(cls) -> "QueueSettings":
        obj, _created = cls.objects.get_or_create(pk=1)
        return obj

    @property
    def max_concurrent(self) -> int:
        return self.max_concurrent_override or settings.COMFY_DEFAULT_MAX_CONCURRENT

    @property
    def effective_run_timeout_seconds(self) -> int:
        return self.run_timeout_seconds or settings.COMFY_RUN_TIMEOUT_SECONDS

    @property
    def effective_max_queued_per_student(self) -> int:
        return self.max_queued_per_student or settings.COMFY_MAX_QUEUED_PER_STUDENT


class DispatcherLease(models.Model):
    """Who may dispatch. Held by one dispatcher; its epoch fences a stale holder's writes."""

    holder = models.CharField(max_length=128, blank=True, default="", verbose_name=_("holder"))
    epoch = models.PositiveBigIntegerField(default=0)
    acquired_at = models.DateTimeField(null=True, blank=True, verbose_name=_("acquired at"))
    renewed_at = models.DateTimeField(null=True, blank=True, verbose_name=_("renewed at"))
    expires_at = models.DateTimeField(null=True, blank=True, verbose_name=_("expires at"))

    class Meta:
        verbose_name = _("dispatcher lease")
        constraints = [models.CheckConstraint(condition=Q(pk=1), name="dispatcher_lease_singleton")]

    def __str__(self):
        return f"{self.holder or '-'} (epoch {self.epoch})"


class AuditEvent(models.Model):
    """What a teacher or operator did to the queue: who, when, what, how many."""

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # Who it was, kept when the account is deleted; for manage.py, the operator's login.
    actor_name = models.CharField(max_length=150, blank=True, default="", verbose_name=_("actor"))
    action = models.CharField(max_length=64, verbose_name=_("action"))
    summary = models.TextField(verbose_name=_("summary"))
    affected = models.PositiveIntegerField(default=0, verbose_name=_("affected"))
    created_at = models.DateTimeField(default=timezone.now, db_index=True, verbose_name=_("time"))

    class Meta:
        verbose_name = _("audit event")
        verbose_name_plural = _("audit events")
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.action}"
