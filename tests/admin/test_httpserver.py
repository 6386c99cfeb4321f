"""The small HTTP/1.1 server under /metrics and the xapsd API, over real loopback sockets."""

from __future__ import annotations

import httpx
import trio

from dovenotify.admin.httpserver import MAX_BODY, Request, Response, open_listeners, serve_http


async def handler(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("the database is away")
    return Response(200, f"{request.method} {request.path} {len(request.body)}".encode())


async def test_errors_answers_and_keep_alive(nursery):
    listeners = await open_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(serve_http, listeners, handler)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.post("/x?q=1", content=b"abc")).text == "POST /x 3"
        # A handler that fails answers 500 and leaves the server serving.
        assert (await http.get("/boom")).status_code == 500
        assert (await http.get("/again")).text == "GET /again 0"
        too_big = await http.post("/x", content=b"x" * (MAX_BODY + 1))
        assert too_big.status_code == 413
    # Not HTTP at all: a 400, and the connection is closed.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\x16\x03\x01 not http\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    nursery.cancel_scope.cancel()
