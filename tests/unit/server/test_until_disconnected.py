"""until_disconnected: the client going away cancels the work (499); other cancellations go on."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import ClientClosedError
from server.routes.deps import until_disconnected

pytestmark = pytest.mark.anyio


class Client:
    """A request whose next ASGI message is a disconnect once `leave()` is called."""

    def __init__(self) -> None:
        self._gone = asyncio.Event()

    def leave(self) -> None:
        self._gone.set()

    async def receive(self) -> dict:
        await self._gone.wait()
        return {"type": "http.disconnect"}


async def test_the_client_leaving_cancels_the_work_and_answers_499() -> None:
    client, cancelled = Client(), asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    asyncio.get_running_loop().call_later(0.02, client.leave)
    with pytest.raises(ClientClosedError):
        await until_disconnected(client, work())
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # our cancellation was taken back
    await asyncio.sleep(0)  # and nothing is left to cancel this task later


async def test_a_finished_answer_is_returned_and_not_cancelled_afterwards() -> None:
    client, loop = Client(), asyncio.get_running_loop()
    answer = loop.create_future()

    def both() -> None:  # the disconnect and the answer in the same turn, the disconnect first
        client.leave()
        answer.set_result(7)

    async def work() -> int:
        return await answer

    loop.call_later(0.01, both)
    assert await until_disconnected(client, work()) == 7
    await asyncio.sleep(0.02)  # a stray cancellation, scheduled before we returned, would land here
    assert asyncio.current_task().cancelling() == 0


async def test_a_cancellation_from_elsewhere_is_not_turned_into_a_499() -> None:
    client = Client()
    inner: list[asyncio.Task] = []

    async def handler() -> int:
        inner.append(asyncio.current_task())
        return await until_disconnected(client, asyncio.sleep(5, 3))

    task = asyncio.ensure_future(handler())
    await asyncio.sleep(0.01)
    client.leave()
    task.cancel()  # the server shutting down, in the same turn as the client leaving
    with pytest.raises(asyncio.CancelledError):
        await task
