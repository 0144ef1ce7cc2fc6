"""Gateway: the HTTP/WebSocket front of captionstream (FastAPI)."""
