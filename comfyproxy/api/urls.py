from django.urls import path

from comfyproxy.api import views

app_name = "comfy_proxy"

urlpatterns = [
    path("execute/<str:username>", views.ExecuteView.as_view(), name="execute"),
    path("status/<str:task_id>", views.TaskStatusView.as_view(), name="status"),
    path("cancel/<str:task_id>", views.CancelView.as_view(), name="cancel"),
    path("queue/status", views.QueueStatusView.as_view(), name="queue-status"),
]
