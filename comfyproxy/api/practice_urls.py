from django.urls import path

from comfyproxy.api import practice

app_name = "practice"

urlpatterns = [
    path("start-practice", practice.StartPracticeView.as_view(), name="start"),
    path("stop-practice", practice.StopPracticeView.as_view(), name="stop"),
    path("status", practice.PracticeStatusView.as_view(), name="status"),
    path("presence", practice.PresenceView.as_view(), name="presence"),
]
