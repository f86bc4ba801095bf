"""Talking to ComfyUI: the HTTP client (`client`) and the WebSocket watcher (`watcher`)."""
