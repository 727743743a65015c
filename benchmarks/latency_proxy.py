"""A TCP proxy that adds network latency: what a loopback server lacks to stand in for S3.

Every chunk of bytes is held for ``delay`` milliseconds in each direction before it is passed
on (a request's round trip gains twice that), in order, with no bandwidth limit: a link of
long latency and ample bandwidth, as between an instance and its region's S3 (first byte of
a GET ~10-30 ms). The proxy runs in its own process; the delay can be changed while it runs.
Usage from a benchmark::

    proxy = LatencyProxy("127.0.0.1", 8333)  # -> proxy.port
    proxy.set_delay_ms(10)                    # 20 ms round trips
    ...
    proxy.close()
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket


def _serve(host: str, port: int, listen: socket.socket, delay) -> None:
    async def pipe(reader, writer) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            try:
                while True:
                    due, data = await queue.get()
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if not data:
                        break
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(1 << 16)
                queue.put_nowait((loop.time() + delay.value / 1000, data))
                if not data:
                    break
        except (ConnectionError, OSError):
            queue.put_nowait((loop.time(), b""))
        await sender

    async def handle(client_r, client_w) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=listen)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class LatencyProxy:
    """``127.0.0.1:self.port`` -> ``host:port``, ``set_delay_ms`` each way (0 at the start)."""

    def __init__(self, host: str, port: int):
        ctx = multiprocessing.get_context("spawn")
        self._delay = ctx.Value("d", 0.0, lock=False)
        listen = socket.socket()
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind(("127.0.0.1", 0))
        listen.listen(512)
        self.port = listen.getsockname()[1]
        self._proc = ctx.Process(target=_serve, args=(host, port, listen, self._delay), daemon=True)
        self._proc.start()
        listen.close()

    def set_delay_ms(self, ms: float) -> None:
        self._delay.value = float(ms)

    def close(self) -> None:
        self._proc.terminate()
        self._proc.join(5)
