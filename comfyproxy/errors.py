"""Domain errors: each has a stable code, an HTTP status and a message students understand.

Services raise these; the API layers render them (DRF's shape for /api/v1, ComfyUI's
error shape for the ComfyUI-compatible submit endpoint). Messages are translated
(Chinese by default).
"""

from django.utils.translation import gettext_lazy as _


class QueueError(Exception):
    status_code = 400
    code = "bad_request"
    message = _("The request could not be processed.")

    def __init__(self, message=None, *, details: str = "", extra: dict | None = None):
        self.message = message if message is not None else type(self).message
        self.details = details
        self.extra = extra or {}
        super().__init__(str(self.message))


class MalformedJSON(QueueError):
    status_code = 400
    code = "malformed_json"
    message = _("The request body is not valid JSON.")


class NoPrompt(QueueError):
    status_code = 400
    code = "no_prompt"
    message = _("No prompt provided.")


class InvalidPrompt(QueueError):
    status_code = 400
    code = "invalid_prompt"
    message = _("The workflow is not in ComfyUI's API format.")


class NotAuthenticated(QueueError):
    status_code = 401
    code = "not_authenticated"
    message = _("Please log in to the teaching system first.")


class NotYourInstance(QueueError):
    status_code = 403
    code = "forbidden"
    message = _("This ComfyUI belongs to another student.")


class CrossSiteRequest(QueueError):
    status_code = 403
    code = "cross_site_request"
    message = _("This request came from another site and was refused.")


class UserNotFound(QueueError):
    status_code = 404
    code = "user_not_found"
    message = _("No such student.")


class TaskNotFound(QueueError):
    status_code = 404
    code = "task_not_found"
    message = _("No such task.")


class InstanceNotRunning(QueueError):
    status_code = 409
    code = "instance_not_running"
    message = _('Your ComfyUI is not running. Press "Start ComfyUI" on the practice page first.')


class InstanceBusy(QueueError):
    status_code = 409
    code = "instance_busy"
    message = _("Your ComfyUI is starting or stopping. Please wait a moment and try again.")


class TaskAlreadyFinished(QueueError):
    status_code = 409
    code = "task_finished"
    message = _("This task has already finished.")


class TaskNotRetryable(QueueError):
    status_code = 409
    code = "task_not_retryable"
    message = _("Only failed or cancelled tasks can be retried.")


class BodyTooLarge(QueueError):
    status_code = 413
    code = "body_too_large"
    message = _("The workflow is too large.")


class TooManyTasks(QueueError):
    status_code = 429
    code = "too_many_tasks"
    message = _("You already have %(count)d tasks waiting or running; wait for one to finish.")


class QueueUnavailable(QueueError):
    status_code = 503
    code = "queue_unavailable"
    message = _("The queue service is temporarily unavailable. Please try again shortly.")


class InstanceStartFailed(QueueError):
    status_code = 502
    code = "gpu_server_unreachable"
    message = _("Cannot connect to the GPU server.")


class NoFreePort(QueueError):
    status_code = 503
    code = "no_free_port"
    message = _("All ComfyUI places on the GPU server are taken. Please ask your teacher.")
