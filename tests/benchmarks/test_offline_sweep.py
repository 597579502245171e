"""benchmarks.offline sweeps: batch sizes are timed in interleaved rounds, so drift is shared."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks import offline
from server.model_config import ModelConfig
from tests.conftest import TINY, TinyRepo


def test_rounds_visit_every_step_in_turn() -> None:
    calls: list[int] = []
    steps = {b: (lambda b=b: calls.append(b)) for b in (1, 8, 32)}
    medians = offline._interleaved(steps, min_seconds=0.0)
    assert calls[:3] == [1, 8, 32]  # one warm-up each
    assert calls[3:] == [1, 8, 32] * offline.SWEEP_ROUNDS
    assert set(medians) == {1, 8, 32}


def test_a_host_that_slows_down_midway_does_not_pick_the_first_size(monkeypatch) -> None:
    """Two sizes of equal cost on a host that turns 2x slower a third of the way in (a simulated
    clock). Timed one size after the other, the first size would look 2x faster; in rounds, the
    slowdown is shared."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(offline.time, "perf_counter", lambda: clock.now)

    def step() -> None:
        clock.now += 1.0 if clock.now < 40 else 2.0

    medians = offline._interleaved({1: step, 8: step}, min_seconds=60)
    assert max(medians.values()) / min(medians.values()) < 1.5, medians


def test_the_cpu_lanes_of_the_limit_are_single_threaded(tiny_repo: TinyRepo) -> None:
    """As the server's lanes (`server.runtime.Session`); the whole-machine session uses every core."""
    version = tiny_repo.path / TINY / "1"
    config = ModelConfig.load(version.parent)
    lanes = offline.OrtModel.lanes(version / "model.onnx", config, 2)
    single = offline.OrtModel(version / "model.onnx", config, threads=2)
    threads = [m.session.get_session_options().intra_op_num_threads for m in (lanes, single)]
    assert threads == [1, 2]
