"""benchmarks.ort_vs_torch in quick mode: the tiny model, real export, real ORT and PyTorch, seconds."""

import json

import numpy as np
import pytest

from benchmarks import ort_vs_torch
from benchmarks.ort_vs_torch import Options, measure, summarise


def test_quick_run_times_both_on_the_same_model(tmp_path, capsys):
    out = tmp_path / "result.json"
    args = ["--model", "tiny", "--batches", "1,2", "--threads", "1", "--rounds", "2"]
    args += ["--images-per-cell", "2"]
    assert ort_vs_torch.main([*args, "--work", str(tmp_path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["max_abs_diff"] <= 1e-4
    assert result["resolution"] == [32, 32]
    for name in ("onnxruntime", "pytorch eager"):
        calls = result["ms_per_image"][name]
        assert [len(calls[b]) for b in ("1", "2")] == [4, 2]  # 2 rounds x (2 // batch) calls
        assert all(ms > 0 for v in calls.values() for ms in v)
    table = capsys.readouterr().out
    assert "| 1 |" in table and "| 2 |" in table and "ORT / eager" in table


def test_interpolated_resolution_runs_through_the_resampling_inputs(tmp_path):
    opts = Options(model="tiny", batch_sizes=(1,), threads=1, resolution=48, rounds=1, images_per_cell=1)
    run, hw = ort_vs_torch.runners(tmp_path, opts)
    assert hw == (48, 48)
    assert measure(run, hw, opts)["max_abs_diff"] <= 1e-4


def test_disagreeing_contenders_are_refused_before_timing():
    opts = Options(batch_sizes=(1,), rounds=1, images_per_cell=1)
    run = {"onnxruntime": lambda x: np.zeros((len(x), 3)), "pytorch eager": lambda x: np.ones((len(x), 3))}
    with pytest.raises(RuntimeError, match="disagree"):
        measure(run, (8, 8), opts)


def test_summary_uses_medians_and_compares_best_with_eager_at_batch_1():
    ms = {
        "onnxruntime": {1: [10.0, 50.0, 12.0], 4: [8.0, 8.0]},  # medians 12 and 8 ms/image
        "pytorch eager": {1: [20.0], 4: [10.0]},
    }
    s = summarise(ms)
    assert s["images_per_s"]["onnxruntime"] == pytest.approx({1: 1e3 / 12, 4: 125.0})
    assert s["ratio_per_batch"] == pytest.approx({1: 20 / 12, 4: 10 / 8})
    assert s["best_ratio"] == pytest.approx(125.0 / 100.0)
    assert s["ratio_vs_eager_batch1"] == pytest.approx(125.0 / 50.0)
