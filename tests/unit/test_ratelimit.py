"""The sliding-window rate limiter, on the autojump clock: every time is exact."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from kied.kie._ratelimit import RateLimiter


async def acquire_all(limiter: RateLimiter, n: int, *, stagger_s: float = 0.0) -> list[float]:
    """Start ``n`` acquirers, the i-th at ``i * stagger_s``; the time each one got through."""
    t0 = trio.current_time()
    times = [math.nan] * n

    async def one(i: int) -> None:
        await trio.sleep_until(t0 + i * stagger_s)
        await limiter.acquire()
        times[i] = trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return times


async def test_25_creates_at_once_the_21st_waits_exactly_10_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(20, 10.0)
    t0 = trio.current_time()
    done = []
    for _ in range(25):
        await limiter.acquire()
        done.append(trio.current_time() - t0)
    assert done == [0.0] * 20 + [10.0] * 5


async def test_concurrent_acquirers_at_one_instant(autojump_clock: trio.testing.MockClock) -> None:
    times = await acquire_all(RateLimiter(20, 10.0), 45)
    assert sorted(times) == [0.0] * 20 + [10.0] * 20 + [20.0] * 5


async def test_status_limit_10_per_second(autojump_clock: trio.testing.MockClock) -> None:
    times = await acquire_all(RateLimiter(10, 1.0), 35)
    assert sorted(times) == [0.0] * 10 + [1.0] * 10 + [2.0] * 10 + [3.0] * 5


async def test_the_window_slides(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(2, 10.0)
    t0 = trio.current_time()

    async def acquire_at(at: float) -> float:
        await trio.sleep_until(t0 + at)
        await limiter.acquire()
        return trio.current_time() - t0

    assert await acquire_at(0.0) == 0.0
    assert await acquire_at(6.0) == 6.0
    # A fixed window would reset at 10 for everyone; this one frees each slot 10 s after
    # its own grant.
    assert await acquire_at(7.0) == 10.0
    assert await acquire_at(10.0) == 16.0
    assert await acquire_at(16.5) == 20.0
    assert await acquire_at(45.0) == 45.0  # long idle: free at once
    assert await acquire_at(45.0) == 45.0
    assert await acquire_at(45.0) == 55.0


async def test_waiters_are_served_first_come_first_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(2, 10.0)
    t0 = trio.current_time()
    await limiter.acquire()
    await limiter.acquire()
    order: list[tuple[int, float]] = []

    async def waiter(i: int, arrive_at: float) -> None:
        await trio.sleep_until(t0 + arrive_at)
        await limiter.acquire()
        order.append((i, trio.current_time() - t0))

    async with trio.open_nursery() as nursery:
        # Arriving at 0.1, 0.2, ...: each later arrival queues behind the earlier ones, even
        # the one that arrives at 9.5, just before slots free up.
        for i, arrive_at in enumerate((0.1, 0.2, 0.3, 0.4, 9.5)):
            nursery.start_soon(waiter, i, arrive_at)
    assert order == [(0, 10.0), (1, 10.0), (2, 20.0), (3, 20.0), (4, 30.0)]


async def test_a_cancelled_waiter_takes_no_slot(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1, 10.0)
    t0 = trio.current_time()
    await limiter.acquire()
    got: dict[str, float] = {}

    async def impatient() -> None:
        with trio.move_on_after(4.0):
            await limiter.acquire()
            got["impatient"] = trio.current_time() - t0
        got["gave up"] = trio.current_time() - t0

    async def patient() -> None:
        await trio.sleep(1.0)  # queues behind the impatient one
        await limiter.acquire()
        got["patient"] = trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(impatient)
        nursery.start_soon(patient)
    assert got == {"gave up": 4.0, "patient": 10.0}
    # the patient one's slot is the only one taken since t0 + 10
    await limiter.acquire()
    assert trio.current_time() - t0 == 20.0


async def test_a_free_slot_is_still_a_checkpoint() -> None:
    limiter = RateLimiter(5, 1.0)
    with trio.testing.assert_checkpoints():
        await limiter.acquire()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await limiter.acquire()
    # the cancelled call took nothing: four more fit in this window
    for _ in range(4):
        with trio.testing.assert_checkpoints():
            await limiter.acquire()


async def test_memory_holds_one_stamp_per_slot(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(3, 1.0)
    for _ in range(100):
        await limiter.acquire()
        assert len(limiter._grants) <= 3


@pytest.mark.parametrize(
    ("limit", "window_s"),
    [
        (0, 1.0),
        (-1, 1.0),
        (True, 1.0),
        (2.5, 1.0),
        (1, 0.0),
        (1, -1.0),
        (1, math.inf),
        (1, math.nan),
    ],
)
def test_nonsense_limits_are_refused(limit: int, window_s: float) -> None:
    with pytest.raises(ValueError, match=r"limit|window_s"):
        RateLimiter(limit, window_s)


async def test_every_window_must_have_room(autojump_clock: trio.testing.MockClock) -> None:
    # KIE's 10 a second, and a budget of 15 in any 10 s: 15 at once (ten, then five a
    # second later), then nothing until the first grants leave the 10-s window.
    times = await acquire_all(RateLimiter(10, 1.0, also=((15, 10.0),)), 30)
    assert sorted(times) == [0.0] * 10 + [1.0] * 5 + [10.0] * 10 + [11.0] * 5


@pytest.mark.parametrize("window", [(0, 10.0), (5, 0.0), (5, math.inf), (True, 1.0)])
def test_a_bad_extra_window_is_refused(window: tuple[int, float]) -> None:
    with pytest.raises(ValueError, match=r"limit|window_s"):
        RateLimiter(10, 1.0, also=(window,))
