"""One POST (notify/http.py) against raw loopback servers: what is sent, and every way an
answer can fail (not HTTP, too long, none at all, nobody listening)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from atomizerd.config.notify import parse_webhooks
from atomizerd.notify.http import MAX_STATUS_LINE, DeliveryError, post


def hook(url: str):  # type: ignore[no-untyped-def]
    return parse_webhooks([{"url": url, "secret": "s"}])[0]


async def serve(answer: bytes | None, got: list[bytes]) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        got.append(head + await r.readexactly(length))
        if answer is None:
            await asyncio.sleep(3600)  # never answers
        w.write(answer)
        await w.drain()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_the_request_and_its_status() -> None:
    async def test() -> None:
        got: list[bytes] = []
        server = await serve(b"HTTP/1.1 204 No Content\r\n\r\n", got)
        port = server.sockets[0].getsockname()[1]
        async with server:
            url = f"http://user:pw@127.0.0.1:{port}/a/b?x=1#frag"
            code = await post(hook(url), b'{"k":1}', {"X-Atomizer-Event": "question"}, 10.0)
        assert code == 204
        head, _, body = got[0].partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /a/b?x=1 HTTP/1.1"
        assert f"Host: 127.0.0.1:{port}" in lines and "Content-Length: 7" in lines
        assert "X-Atomizer-Event: question" in lines and body == b'{"k":1}'
        assert hook(url).shown == f"http://127.0.0.1:{port}/a/b"  # no credentials shown

    asyncio.run(test())


@pytest.mark.parametrize(
    "answer", [b"SMTP ready\r\n", b"HTTP/1.1 abc\r\n", b"", b"HTTP/1.1 " + b"9" * MAX_STATUS_LINE]
)
def test_answers_that_are_not_http_are_delivery_errors(answer: bytes) -> None:
    async def test() -> None:
        server = await serve(answer, [])
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(DeliveryError):
                await post(hook(f"http://127.0.0.1:{port}/"), b"{}", {}, 10.0)

    asyncio.run(test())


def test_no_answer_is_bounded_and_nobody_listening_fails(tmp_path: Path) -> None:
    async def test() -> None:
        server = await serve(None, [])
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(DeliveryError, match=r"no answer within 0\.2 s"):
                await post(hook(f"http://127.0.0.1:{port}/"), b"{}", {}, 0.2)
        with pytest.raises(DeliveryError):
            await post(hook(str(tmp_path / "nobody.sock")), b"{}", {}, 5.0)

    asyncio.run(test())
