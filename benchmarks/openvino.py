"""OpenVINO bf16 measured in a process of its own.

ONNX Runtime's OpenVINO build and its CPU build are both the `onnxruntime` module, so the suite (on
the CPU build) cannot load the other. `make bench` installs the OpenVINO build into `.venv/openvino`;
this module runs ``python -m benchmarks.openvino TASK ARGS`` with that folder first on PYTHONPATH,
where the suite's own code (`Suite.offline_case`, `Suite.limit_check`) measures the bf16 variant
exactly as it measures the others, and prints the result as JSON on its last line.

Tasks: ``offline`` (the offline row: batch sweep, decode included, one image, top-1 against fp32
on the CPU provider of the same build), ``limit`` (the decode-included limit now, for the run
of the OpenVINO server it brackets) and ``paired`` (concurrency 1 against bf16 in-process, in
alternating blocks, `Suite.paired_result`). Every failure of the child, a timeout included, is an
`OpenVinoUnavailableError` with its reason.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.models import BuiltModel
from benchmarks.plan import Plan

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERLAY = Path(os.environ.get("VITSERVE_BENCH_ORT_OPENVINO", REPO_ROOT / ".venv" / "openvino"))
OPENVINO = "OpenVINOExecutionProvider"


class OpenVinoUnavailableError(RuntimeError):
    """The OpenVINO build is not installed, or its provider does not come up here."""


def env() -> dict[str, str]:
    """The environment of a process that imports the OpenVINO build (the server's too)."""
    return {"PYTHONPATH": str(OVERLAY)}


def check() -> None:
    """Raise `OpenVinoUnavailableError` (with the reason) unless the OpenVINO build's provider is there."""
    from server.runtime import cpu_has_native_bf16

    probe = "import onnxruntime as o; print(' '.join(o.get_available_providers()))"
    if not cpu_has_native_bf16():
        raise OpenVinoUnavailableError(
            "this CPU does not multiply bf16 in hardware (no amx_bf16, avx512_bf16)"
        )
    if not OVERLAY.is_dir():
        raise OpenVinoUnavailableError(
            f"ONNX Runtime's OpenVINO build is not in {OVERLAY} (make bench installs it)"
        )
    found = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if OPENVINO not in found.stdout:
        raise OpenVinoUnavailableError(f"{OPENVINO} is not available: {found.stderr.strip()[-300:]}")


def run(task: str, plan: Plan, built: BuiltModel, hw: tuple[int, int], row: dict | None = None) -> Any:
    """`task` in a child process on the OpenVINO build; its JSON answer."""
    with tempfile.TemporaryDirectory() as tmp:
        args, answer = Path(tmp) / "args.pickle", Path(tmp) / "answer.json"
        args.write_bytes(pickle.dumps((plan, built, hw, row)))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.openvino", task, str(args), str(answer)],
                env={**os.environ, **env()}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise OpenVinoUnavailableError(
                f"benchmarks.openvino {task} ran past {exc.timeout:.0f} s"
            ) from exc
        if done.returncode != 0 or not answer.is_file():
            tail = done.stderr.strip()[-600:]
            raise OpenVinoUnavailableError(f"benchmarks.openvino {task} failed ({done.returncode}): {tail}")
        return json.loads(answer.read_text())


def _main(task: str, args: Path) -> Any:
    from benchmarks.images import image_set
    from benchmarks.loadgen import multipart
    from benchmarks.suite import Suite

    plan, built, hw, row = pickle.loads(args.read_bytes())
    suite = Suite(plan)
    kind = plan.main_kind
    suite.images[kind] = image_set(kind, plan.images_per_kind)  # as Suite.run makes them
    suite.payloads[kind] = [multipart([im]) for im in suite.images[kind]]
    if task == "paired":
        return suite.paired_result(row["url"], built, "bf16")
    if task == "offline":
        return suite.offline_case(built, "bf16", hw)
    if task == "limit":
        suite.results["offline"] = [row]
        measure = suite.limit_check(built, "bf16", own_process=True)
        return measure() if measure else None
    raise SystemExit(f"unknown task {task!r}")


if __name__ == "__main__":
    Path(sys.argv[3]).write_text(json.dumps(_main(sys.argv[1], Path(sys.argv[2])), default=str))
