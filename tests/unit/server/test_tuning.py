"""server.tuning: the start-up batch-size sweep and choice, on a stub runtime with a fake clock."""

from __future__ import annotations

import pytest

from server.tuning import (
    BUDGET_S,
    REPASS_BUDGET_S,
    BatchChoice,
    BatchTiming,
    batch_choice,
    candidate_sizes,
    choose_batch_size,
    measure,
)


class StubRuntime:
    """`run(n)` advances a fake clock by `seconds(n)`; records the batch sizes it was given."""

    def __init__(self, seconds) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.calls: list[int] = []

    def clock(self) -> float:
        return self.now

    def run(self, n: int) -> None:
        self.calls.append(n)
        self.now += self.seconds(n)


def _cpu_like(n: int) -> float:
    """Per image 3 ms alone, 2 ms from batch 8 on (the cores are busy): time grows linearly after."""
    per_image = {1: 0.0030, 2: 0.0026, 4: 0.0022, 8: 0.00201}.get(n, 0.0020)
    return n * per_image


def test_candidate_sizes_double_up_to_the_limit() -> None:
    assert candidate_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert candidate_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert candidate_sizes(1) == [1]


def test_choose_takes_the_smallest_size_within_5_percent_of_the_best() -> None:
    timings = [BatchTiming(1, 0.030), BatchTiming(2, 0.052), BatchTiming(4, 0.084), BatchTiming(8, 0.160)]
    # per image: 30, 26, 21, 20 ms; 21 is within 5% of 20
    assert choose_batch_size(timings) == 4
    assert choose_batch_size(timings, tolerance=0.0) == 8
    assert choose_batch_size([BatchTiming(1, 0.01)]) == 1


def test_the_sweep_stops_once_time_grows_linearly() -> None:
    rt = StubRuntime(_cpu_like)
    timings = measure(rt.run, candidate_sizes(128), clock=rt.clock)
    # 16 and 32 did not beat 8 by 5%: two in a row, so 64 and 128 are skipped
    assert [t.batch_size for t in timings] == [1, 2, 4, 8, 16, 32]
    assert 64 not in rt.calls and 128 not in rt.calls
    assert choose_batch_size(timings) == 8
    assert timings[0].per_image_s == pytest.approx(0.0030)


def test_one_noisy_size_does_not_end_the_sweep() -> None:
    rt = StubRuntime(lambda n: n * {4: 0.0040}.get(n, 0.0030 / n**0.5))  # batch 4 hit by a hiccup
    timings = measure(rt.run, candidate_sizes(16), clock=rt.clock)
    assert [t.batch_size for t in timings] == [1, 2, 4, 8, 16]
    assert choose_batch_size(timings) == 16


class BusyHost(StubRuntime):
    """`_cpu_like`, but 1.6x slower for `spell_s` from the first call of batch 4 on."""

    def __init__(self, spell_s: float) -> None:
        super().__init__(_cpu_like)
        self.spell_s, self.busy_from = spell_s, None

    def run(self, n: int) -> None:
        if n == 4 and self.busy_from is None:
            self.busy_from = self.now
        busy = self.busy_from is not None and self.now < self.busy_from + self.spell_s
        self.calls.append(n)
        self.now += _cpu_like(n) * (1.6 if busy else 1.0)


def test_a_slow_spell_of_the_host_does_not_end_the_sweep_early() -> None:
    # Slowed down, 4 and 8 look no better than 2 (3.5 and 3.2 ms per image against 2.6), which would
    # end the sweep there; timed again right after them, 2 is slow too, so the sweep goes on.
    host = BusyHost(spell_s=0.2)
    timings = measure(host.run, candidate_sizes(32), clock=host.clock, repasses=0)
    assert [t.batch_size for t in timings] == [1, 2, 4, 8, 16, 32]
    assert [round(t.per_image_s * 1e3, 2) for t in timings[2:4]] == [3.52, 3.22]  # slowed down


def test_sizes_timed_again_in_turns_outlast_a_slow_spell_of_the_host() -> None:
    one_pass = BusyHost(spell_s=0.2)
    assert (
        choose_batch_size(measure(one_pass.run, candidate_sizes(32), clock=one_pass.clock, repasses=0)) == 16
    )
    host = BusyHost(spell_s=0.2)
    timings = measure(host.run, candidate_sizes(32), clock=host.clock)
    assert [round(t.per_image_s * 1e3, 2) for t in timings[2:4]] == [2.2, 2.01]  # their real speed
    assert choose_batch_size(timings) == 8
    again = host.calls[len(one_pass.calls) :]
    assert again[0] == 32 and again[-1] == 32  # the largest first, then the smallest first


def test_passes_in_turns_stay_within_their_budget() -> None:
    def calls_made(**kwargs: float) -> int:
        rt = StubRuntime(_cpu_like)
        measure(rt.run, candidate_sizes(32), clock=rt.clock, **kwargs)
        return len(rt.calls)

    # a pass over 1-32 is predicted at about 0.18 s here: 0.25 s leaves room for one pass, not two
    assert calls_made(repass_budget_s=0.25) == calls_made(repasses=1) < calls_made()
    assert calls_made(repass_budget_s=0.1) == calls_made(repasses=0)


def test_each_size_is_timed_three_times_and_the_fastest_counts() -> None:
    times = iter([0.5, 0.040, 0.030] + [0.030] * 10)  # first-run set-up, a noisy call, a clean one
    rt = StubRuntime(lambda n: next(times))
    timings = measure(rt.run, [1], clock=rt.clock)
    assert len(timings) == 1 and timings[0].seconds == pytest.approx(0.030)
    assert len(rt.calls) == 3


def test_short_calls_are_repeated_until_enough_was_timed() -> None:
    rt = StubRuntime(lambda n: 0.0001 * n)  # a tiny model: 0.1 ms per image
    measure(rt.run, [1], clock=rt.clock)
    assert len(rt.calls) > 100  # 20 ms of 0.1 ms calls, not 2 of them


def test_the_sweep_does_not_start_a_size_that_would_overrun_the_budget() -> None:
    rt = StubRuntime(lambda n: 0.3 * n)  # a ViT-L-like model: 300 ms per image whatever the batch
    rt.seconds = lambda n: 0.3 * n * (1.0 if n == 1 else 0.8)  # batching helps, once
    timings = measure(rt.run, candidate_sizes(32), clock=rt.clock, repasses=0)
    assert rt.now <= BUDGET_S
    assert [t.batch_size for t in timings] == [1, 2]
    rt.now = 0.0
    measure(rt.run, candidate_sizes(32), clock=rt.clock)
    assert BUDGET_S < rt.now <= BUDGET_S + REPASS_BUDGET_S  # the passes in turns have their own budget


def test_batch_choice_tunes_or_keeps_the_configured_size(caplog: pytest.LogCaptureFixture) -> None:
    rt = StubRuntime(_cpu_like)
    with caplog.at_level("INFO", logger="server.tuning"):
        tuned = batch_choice(rt.run, 32, tuned=True, model="m", clock=rt.clock)
    assert (tuned.max_batch_size, tuned.source) == (8, "tuned")
    assert (
        "m: ms per image by batch size {1: 3.00, 2: 2.60, 4: 2.20, 8: 2.01, 16: 2.00, 32: 2.00}"
        in caplog.text
    )
    rt.calls.clear()
    kept = batch_choice(rt.run, 16, tuned=False, model="m", clock=rt.clock)
    assert (kept.max_batch_size, kept.source) == (16, "configured")
    assert set(rt.calls) == {1}  # batch 1 timed only, to seed the service time
    assert kept.per_image_s == kept.timings[0].per_image_s


def test_per_image_seed_is_the_chosen_size_or_the_largest_below() -> None:
    choice = BatchChoice(8, "tuned", (BatchTiming(1, 0.03), BatchTiming(4, 0.08), BatchTiming(8, 0.16)))
    assert choice.per_image_s == pytest.approx(0.02)
    assert BatchChoice(16, "configured", (BatchTiming(1, 0.03),)).per_image_s == pytest.approx(0.03)
    assert BatchChoice(16, "configured").per_image_s is None


def test_with_lanes_each_call_counts_every_lanes_images() -> None:
    # Two lanes at once: a call of batch n runs 2n images, so per image is half the call's time per n.
    stub = StubRuntime(lambda n: 0.010 * n)
    timings = measure(stub.run, [1, 2, 4], clock=stub.clock, lanes=2)
    assert [t.lanes for t in timings] == [2, 2, 2]
    assert [t.per_image_s for t in timings] == pytest.approx([0.005, 0.005, 0.005])
    choice = batch_choice(stub.run, 4, True, "m", stub.clock, lanes=2)
    assert choice.max_batch_size == 1 and choice.per_image_s == pytest.approx(0.005)
