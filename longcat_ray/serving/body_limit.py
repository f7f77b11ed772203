"""A request body over the limit is refused while it arrives, whatever its framing.

A Content-Length over the limit is answered 413 before anything is read. A body without one
(`Transfer-Encoding: chunked`) or with a lying one is counted as the app reads it: at the limit the app is told the
client went away, the client gets the 413, and nothing more is read (before, FastAPI's form parser read a 1.5 GB
chunked upload whole — into memory and its spool files — and only then checked the size). Ray Serve's proxy queues
what the client sends until the request ends; ending it at the limit is what stops that queue growing.
"""

from __future__ import annotations

import json
from collections.abc import Callable


class BodyLimit:
    """Pure ASGI middleware. limit(): the largest body in bytes (None: no limit); error(scope, length, limit) -> (status,
    JSON body) of the refusal, shaped as the route's other errors."""

    def __init__(self, app, limit: Callable[[], int | None], error: Callable[[dict, int | None, int], tuple[int, dict]]):
        self.app, self.limit, self.error = app, limit, error

    async def __call__(self, scope, receive, send) -> None:
        limit = self.limit() if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self.refuse(scope, send, int(length), limit)
        state = {"read": 0, "over": False, "started": False}

        async def counted_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    state["over"] = True
                    if not state["started"]:
                        await self.refuse(scope, send, None, limit)
                        state["started"] = True
                    return {"type": "http.disconnect"}  # the app stops reading; its own error is dropped below
            return message

        async def guarded_send(message):
            if state["over"]:
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise

    async def refuse(self, scope, send, length: int | None, limit: int) -> None:
        status, body = self.error(scope, length, limit)
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})
