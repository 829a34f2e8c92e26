"""The controller: NanoGrid's HTTP API (ASGI)."""
