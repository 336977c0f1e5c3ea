"""The ASGI server: the signed API and the ops endpoints."""
