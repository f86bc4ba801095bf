from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ComfyProxyConfig(AppConfig):
    name = "comfyproxy"
    verbose_name = _("ComfyUI classroom queue")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from comfyproxy import checks  # noqa: F401  (registers the system checks)
