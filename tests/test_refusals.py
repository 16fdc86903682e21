"""Refused requests are answered at `max_refusals_per_s` per client address (server/limits.py's
`Refusals`): a flood of cheap bad requests waits for its answers instead of taking the CPU (and
the GIL) from other clients' streams; a client that is refused nothing is never held back."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_harness import LiveServer

from fastcsm.server.limits import REFUSED, Refusals


class Clock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def __call__(self):
        return self.now

    async def sleep(self, s):
        self.slept.append(round(s, 6))


def test_a_clients_refusals_pass_in_a_burst_then_at_the_rate_queued():
    clock = Clock()
    refusals = Refusals(10, clock=clock, sleep=clock.sleep)  # a burst of 2 (a fifth of a second's)

    async def run():
        for _ in range(4):
            await refusals.wait("10.0.0.1")
        await refusals.wait("10.0.0.2")  # another address has its own bucket
        clock.now += 1.0  # a second later the bucket is full again
        await refusals.wait("10.0.0.1")

    asyncio.run(run())
    assert clock.slept == [0.1, 0.2]  # the third waits a tenth, the fourth (queued) two tenths


def test_only_refusals_are_held_back():
    clock = Clock()
    refusals = Refusals(1, clock=clock, sleep=clock.sleep)  # a burst of one
    sent = []

    async def send(message):
        sent.append(message["type"])

    async def run():
        http = refusals.paced({"type": "http", "client": ("10.0.0.1", 5000)}, send)
        for status in (200, 201, 204, 429, 408, 409, 503, 500, 200):  # never refusals
            await http({"type": "http.response.start", "status": status})
        assert clock.slept == []
        for status in (400, 404):
            await http({"type": "http.response.start", "status": status})
        socket = refusals.paced({"type": "websocket", "client": ("10.0.0.2", 5000)}, send)
        await socket({"type": "websocket.accept"})
        await socket({"type": "websocket.close", "code": 1000})  # a conversation's end: no refusal
        refused = refusals.paced({"type": "websocket", "client": ("10.0.0.2", 5001)}, send)
        await refused({"type": "websocket.close", "code": 1008})  # a handshake refused
        await refused({"type": "websocket.close", "code": 1008})

    asyncio.run(run())
    assert clock.slept == [1.0, 1.0]  # the second 4xx of 10.0.0.1, the second refused handshake of 10.0.0.2
    assert len(sent) == 15
    assert {400, 401, 403, 404, 405, 413, 422} <= REFUSED and not {408, 409, 429} & REFUSED


def test_a_few_addresses_are_remembered_at_most():
    clock = Clock()
    refusals = Refusals(5, clock=clock, sleep=clock.sleep, max_clients=3)

    async def run():
        for i in range(10):
            await refusals.wait(f"10.0.0.{i}")

    asyncio.run(run())
    assert list(refusals.buckets) == ["10.0.0.7", "10.0.0.8", "10.0.0.9"]


@pytest.fixture(scope="module")
def server():
    with LiveServer(max_refusals_per_s=2) as s:
        yield s


def test_a_flood_of_bad_requests_waits_for_its_answers_and_good_ones_pass(server):
    evil = {"Host": f"evil.example:{server.port}"}
    with httpx.Client(timeout=30) as client:
        t = time.monotonic()
        answers = [client.get(server.url + "/healthz", headers=evil) for _ in range(5)]
        took = time.monotonic() - t
        assert [r.status_code for r in answers] == [400] * 5
        assert "--allowed-hosts" in answers[-1].text  # the same words, only later
        assert took >= 1.5  # a burst of one, then one each half second: at least 2 s of waits
        assert all(client.get(server.url + "/healthz").status_code == 200 for _ in range(20))
