from django.urls import path

from comfyproxy import consumers

websocket_urlpatterns = [
    path("ws/comfy_proxy/queue/", consumers.QueueConsumer.as_asgi()),
]
