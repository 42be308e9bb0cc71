"""The choices of one request to the HTTP server while they run: the engine's events for each, and the
client's connection, whose loss cancels them."""

from __future__ import annotations

import asyncio


class Choices:
    """The choices of one HTTP request in flight: their handles, their events (put on ``queue`` from the
    engine's thread) and the client's connection. A task waits for the client's disconnect, independently of
    the events: a client that leaves while tokens keep arriving is noticed at once, streaming or not."""

    def __init__(self, http_request):
        self.http_request = http_request
        self.handles: list = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.watcher: asyncio.Task | None = None

    def watch(self) -> None:
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        # the body has been read: the next message the server sends the app is the disconnect (uvicorn, and
        # starlette's test client, send it also once the response is complete: every choice is finished then)
        while (await self.http_request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0)
        self.cancel()
        self.queue.put_nowait(None)

    async def events(self):
        """(choice index, Output) until every choice finished or the client left."""
        open_ = len(self.handles)
        while open_:
            item = await self.queue.get()
            if item is None:
                return
            if item[1].finish_reason is not None:
                open_ -= 1
            yield item

    def cancel(self) -> None:
        for h in self.handles:
            if h.request.finish_reason is None:
                h.cancel()

    def close(self) -> None:
        """The response is done or abandoned: stop what still runs, and the watcher."""
        self.cancel()
        if self.watcher is not None:
            self.watcher.cancel()

    def completion_tokens(self) -> int:
        return sum(h.request.completion_tokens for h in self.handles)
