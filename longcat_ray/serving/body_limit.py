"""A request body over the limit, or one that arrives too slowly, is refused while it arrives, whatever its framing.

A Content-Length over the limit is answered 413 before anything is read. A body without one
(`Transfer-Encoding: chunked`) or with a lying one is counted as the app reads it: at the limit the app is told the
client went away, the client gets the 413, and nothing more is read (before, FastAPI's form parser read a 1.5 GB
chunked upload whole — into memory and its spool files — and only then checked the size). Ray Serve's proxy queues
what the client sends until the request ends; ending it at the limit is what stops that queue growing.

A body not complete within the time allowed (`upload_timeout_s`) is answered 408: a slow-loris client trickling
bytes would otherwise hold the request, and the slot of the ingress replica serving it, for as long as it likes.
The clock stops when the body is complete (the edit itself may take as long as it takes).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable


class BodyLimit:
    """Pure ASGI middleware. limit(): the largest body in bytes (None: no limit); timeout(): seconds the whole body may
    take to arrive (None: no bound); error(scope, status, message) -> (status, JSON body) of the refusal, shaped as
    the route's other errors."""

    def __init__(self, app, limit: Callable[[], int | None], timeout: Callable[[], float | None],
                 error: Callable[[dict, int, str], tuple[int, dict]]):
        self.app, self.limit, self.timeout, self.error = app, limit, timeout, error

    async def __call__(self, scope, receive, send) -> None:
        http = scope["type"] == "http"
        limit, timeout = (self.limit(), self.timeout()) if http else (None, None)
        if limit is None and timeout is None:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if limit is not None and length.isdigit() and int(length) > limit:
            return await self.refuse(scope, send, 413, f"request body of {int(length)} bytes is over the limit of {limit} bytes")
        deadline = None if timeout is None else time.monotonic() + timeout
        state = {"read": 0, "over": False, "started": False, "complete": False}

        async def stop(status: int, message: str) -> dict:
            state["over"] = True
            if not state["started"]:
                await self.refuse(scope, send, status, message)
                state["started"] = True
            return {"type": "http.disconnect"}  # the app stops reading; its own error is dropped below

        async def counted_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            if deadline is None or state["complete"]:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    return await stop(408, f"request body not complete within {timeout:g} s (upload_timeout_s); "
                                           f"{state['read']} bytes arrived")
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["complete"] = not message.get("more_body", False)
                if limit is not None and state["read"] > limit:
                    return await stop(413, f"request body (sent without a Content-Length) is over the limit of {limit} bytes")
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

    async def refuse(self, scope, send, status: int, message: str) -> None:
        status, body = self.error(scope, status, message)
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})
