"""The teacher's console: the queue's rows as admin pages, actions that call the control services,
and the live board and usage pages mounted beside the task list.

Nothing here changes state itself: actions and forms hand over to `services.control`, which
records who did what and wakes the dispatcher.
"""

from datetime import date, timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.db.models import Count, Q
from django.http import HttpResponseRedirect
from django.urls import path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.translation import gettext_lazy as _

from comfyproxy import admin_views, errors
from comfyproxy.admin_views import format_duration
from comfyproxy.models import ACTIVE_STATUSES, AuditEvent, ComfyInstance, InstanceState, QueueSettings, Task
from comfyproxy.services import control, usage

# The admin index opens with links to the live board and the usage page.
admin.site.index_template = "admin/comfyproxy/index.html"


def _seconds_between(start, end) -> float | None:
    if start is None:
        return None
    return ((end or timezone.now()) - start).total_seconds()


def run_action(model_admin, request, service, **selection) -> None:
    """Call a control service as this teacher and show what it did (a warning if nothing changed)."""
    try:
        result = service(actor=request.user, **selection)
    except errors.QueueError as error:
        model_admin.message_user(request, error.message, messages.ERROR)
        return
    model_admin.message_user(
        request, result.message, messages.SUCCESS if result.affected else messages.WARNING
    )


class ReadOnlyRowsMixin:
    """Rows that only services write: their pages are read-only, and nobody adds or deletes them."""

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        # Actions on the list need the change permission; an object's own page stays read-only.
        return obj is None and super().has_change_permission(request)


class QueuedDayFilter(admin.SimpleListFilter):
    """Tasks queued on one local day: a class session.

    The last two weeks are offered without reading the table (a date hierarchy would truncate
    every row's timestamp, seconds on a year of tasks); `?day=` takes any other date.
    """

    title = _("day")
    parameter_name = "day"
    days_offered = 14

    def lookups(self, request, model_admin):
        today = timezone.localdate()
        named = {today: _("Today"), today - timedelta(days=1): _("Yesterday")}
        days = [today - timedelta(days=back) for back in range(self.days_offered)]
        return [(day.isoformat(), named.get(day) or date_format(day, "DATE_FORMAT")) for day in days]

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        try:
            day = date.fromisoformat(self.value())
        except ValueError:
            raise IncorrectLookupParameters(self.value()) from None
        since, until = usage.day_window(day)
        return queryset.filter(queued_at__gte=since, queued_at__lt=until)


@admin.register(Task)
class TaskAdmin(ReadOnlyRowsMixin, admin.ModelAdmin):
    list_display = (
        "short_id",
        "owner",
        "status",
        "reason",
        "port",
        "queued_at",
        "waited",
        "ran",
    )
    list_filter = ("status", "reason", ("owner", admin.RelatedOnlyFieldListFilter), QueuedDayFilter)
    search_fields = ("owner__username", "owner__first_name", "owner__last_name")
    list_select_related = ("owner",)
    list_per_page = 50
    actions = ("cancel_selected", "interrupt_selected", "retry_selected", "move_selected_to_front")
    fields = (
        "id",
        "owner",
        "submitted_by",
        "status",
        "reason",
        "error_message",
        "host",
        "port",
        "client_id",
        "queued_at",
        "started_at",
        "submitted_at",
        "finished_at",
        "cancel_requested_at",
        "dispatch_attempts",
        "comfy_error",
        "node_errors",
        "outputs",
        "prompt",
    )
    readonly_fields = fields

    def get_queryset(self, request):
        # The UI graph in extra_data is often hundreds of kB per row and shown nowhere here.
        return super().get_queryset(request).defer("extra_data")

    @admin.display(description=_("task"), ordering="queued_at")
    def short_id(self, task):
        return str(task.id)[:8]

    @admin.display(description=_("waited"))
    def waited(self, task):
        end = task.started_at or (task.finished_at if task.is_terminal else None)
        return format_duration(_seconds_between(task.queued_at, end))

    @admin.display(description=_("ran"))
    def ran(self, task):
        return format_duration(_seconds_between(task.submitted_at, task.finished_at))

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("board/", view(admin_views.BoardView.as_view(model_admin=self)), name="comfyproxy_board"),
            path(
                "board/act/",
                view(admin_views.BoardActionView.as_view(model_admin=self)),
                name="comfyproxy_board_act",
            ),
            path("usage/", view(admin_views.UsageView.as_view(model_admin=self)), name="comfyproxy_usage"),
            path(
                "usage.csv",
                view(admin_views.UsageCsvView.as_view(model_admin=self)),
                name="comfyproxy_usage_csv",
            ),
            *super().get_urls(),
        ]

    @admin.action(description=_("Cancel selected tasks"), permissions=["change"])
    def cancel_selected(self, request, queryset):
        run_action(self, request, control.cancel_tasks, tasks=queryset)

    @admin.action(description=_("Interrupt selected running tasks"), permissions=["change"])
    def interrupt_selected(self, request, queryset):
        run_action(self, request, control.interrupt_tasks, tasks=queryset)

    @admin.action(description=_("Retry selected failed or cancelled tasks"), permissions=["change"])
    def retry_selected(self, request, queryset):
        run_action(self, request, control.retry_tasks, tasks=queryset)

    @admin.action(description=_("Move selected tasks to the front of the queue"), permissions=["change"])
    def move_selected_to_front(self, request, queryset):
        run_action(self, request, control.move_to_front, tasks=queryset)


@admin.register(ComfyInstance)
class ComfyInstanceAdmin(ReadOnlyRowsMixin, admin.ModelAdmin):
    list_display = ("user", "port", "state", "healthy", "last_activity_at", "idle_for", "active_tasks")
    list_filter = ("state", "healthy", "launcher")
    search_fields = ("user__username", "user__first_name", "user__last_name")
    list_select_related = ("user",)
    actions = ("start_selected", "stop_selected")
    fields = (
        "user",
        "host",
        "port",
        "state",
        "state_message",
        "launcher",
        "started_at",
        "stopped_at",
        "last_activity_at",
        "last_health_check_at",
        "healthy",
    )
    readonly_fields = fields

    def get_queryset(self, request):
        active = Count("tasks", filter=Q(tasks__status__in=ACTIVE_STATUSES))
        return super().get_queryset(request).annotate(active_task_count=active)

    def changelist_view(self, request, extra_context=None):
        context = {"can_stop_idle": self.has_change_permission(request), **(extra_context or {})}
        return super().changelist_view(request, context)

    def get_urls(self):
        stop_idle = self.admin_site.admin_view(admin_views.StopIdleInstancesView.as_view(model_admin=self))
        return [path("stop-idle/", stop_idle, name="comfyproxy_stop_idle_instances"), *super().get_urls()]

    @admin.display(description=_("idle for"))
    def idle_for(self, instance):
        if instance.state != InstanceState.RUNNING:
            return format_duration(None)
        return format_duration(_seconds_between(instance.last_activity_at or instance.started_at, None))

    @admin.display(description=_("waiting or running tasks"), ordering="active_task_count")
    def active_tasks(self, instance):
        return instance.active_task_count

    @admin.action(description=_("Start ComfyUI for the selected students"), permissions=["change"])
    def start_selected(self, request, queryset):
        run_action(self, request, control.start_instances, instances=queryset)

    @admin.action(description=_("Stop the selected ComfyUIs"), permissions=["change"])
    def stop_selected(self, request, queryset):
        run_action(self, request, control.stop_instances, instances=queryset)


class QueueSettingsForm(forms.ModelForm):
    """Runs each changed value through the service's rules, so errors appear beside the field."""

    class Meta:
        model = QueueSettings
        fields = control.EDITABLE_SETTINGS

    def clean(self):
        cleaned = super().clean()
        for field in self.changed_data:
            if field in cleaned:
                try:
                    control.validate_setting(field, cleaned[field])
                except errors.QueueError as error:
                    self.add_error(field, str(error.message))
        return cleaned


@admin.register(QueueSettings)
class QueueSettingsAdmin(admin.ModelAdmin):
    """The single settings row: the list page opens it directly; saving goes through the service."""

    form = QueueSettingsForm
    fields = (
        "paused",
        "max_concurrent_override",
        "max_queued_per_student",
        "run_timeout_seconds",
        "idle_stop_minutes",
        "free_memory_after_task",
        "updated_at",
        "updated_by",
    )
    readonly_fields = ("updated_at", "updated_by")

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        obj = QueueSettings.load()
        return HttpResponseRedirect(reverse("admin:comfyproxy_queuesettings_change", args=[obj.pk]))

    def save_model(self, request, obj, form, change):
        changes = {field: form.cleaned_data[field] for field in form.changed_data}
        result = control.update_settings(actor=request.user, **changes)
        self.message_user(request, result.message, messages.SUCCESS)

    def response_change(self, request, obj):
        # The service already reported what changed; skip Django's generic "changed" message.
        return HttpResponseRedirect(request.path)


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "actor_name", "action", "affected", "summary")
    list_filter = ("action", ("created_at", admin.DateFieldListFilter))
    search_fields = ("actor_name", "summary")
    date_hierarchy = "created_at"
    list_select_related = ("actor",)
    fields = ("created_at", "actor", "actor_name", "action", "affected", "summary")
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
