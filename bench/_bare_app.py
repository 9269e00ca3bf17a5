"""The floor for this stack: Hypercorn's trio worker and a Quart-Trio app doing nothing else.

Same shape as kied's own start: signal receiver first, then ``serve`` in a nursery.
Usage: python bench/_bare_app.py PORT
"""

from __future__ import annotations

import json
import signal
import sys
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

app = QuartTrio(__name__)


@app.get("/healthz")
async def healthz() -> dict[str, object]:
    return {"status": "ok"}


@app.post("/callbacks/kie")
async def callbacks() -> tuple[dict[str, object], int]:
    body = await request.get_data()
    try:
        json.loads(body)
    except ValueError:
        pass
    return {"status": "received"}, 200


async def main(port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    stop.set()
                    return

            nursery.start_soon(watch)
            await serve(app, config, shutdown_trigger=stop.wait)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(partial(main, int(sys.argv[1])))
