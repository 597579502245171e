"""What one benchmark run measures: the full suite, or the seconds-long quick mode for CI."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.loadgen import LoadSpec

SECTIONS = ("peak", "offline", "http-floor", "naive-torch", "litserve", "rayserve", "vitserve", "openvino")

# vitserve settings this suite recommends for a small CPU machine, measured against the defaults.
# The batch size and lanes are left to the start-up sweep (a fixed batch size, ORT's best offline
# on one session, ran slower than the sweep's choice in the server: 15.3 vs 17.1 images/s on 2
# cores, 2026-12-01). 2 ms gathers a batch while one runs. A queue of 48 images bounds what an
# accepted request waits under overload to about 1.5x the wait of a 32-client closed loop, so the
# excess is refused at once with 503 instead.
TUNED_SETTINGS: dict[str, str] = {
    "max_queue_delay_ms": "2",
    "queue_capacity": "48",
}


@dataclass(frozen=True)
class LoadPoint:
    """One measured load on one server.

    `rate_factor` makes an open-loop point whose rate is that multiple of the images/s the same
    server reached in its saturation point (closed loop at `Plan.saturation`).
    """

    name: str
    image_kind: str
    spec: LoadSpec
    query: dict[str, str] = field(default_factory=dict)
    rate_factor: float | None = None


@dataclass(frozen=True)
class Plan:
    """Everything that decides how long a run takes and what it covers."""

    quick: bool
    out_dir: Path
    work_dir: Path
    gpu: bool = False
    providers: str = "CPUExecutionProvider"
    sections: tuple[str, ...] = SECTIONS
    install: bool = True
    model: str = "vit-s16"
    hi_resolution: int = 384
    demo_repo: Path | None = Path("model_repo")
    demo_name: str = "vit-demo"
    image_kinds: tuple[str, ...] = ("jpeg-640x480", "jpeg-1920x1080", "png-128x128")
    images_per_kind: int = 16
    agreement_images: int = 64
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    offline_seconds: float = 3.0
    limit_check_seconds: float = 3.0  # the limit again, just before and after each saturation point
    single_image_calls: int = 30
    paired_blocks: int = 120  # c=1 against the in-process floor, alternating blocks (benchmarks.paired)
    paired_block_size: int = 3
    saturation: int = 32
    point_seconds: float = 20.0
    point_requests: int = 3000
    warmup_requests: int = 16
    timeout_s: float = 30.0
    gemm_n: int = 1024

    @property
    def main_kind(self) -> str:
        return self.image_kinds[0]

    def closed(self, concurrency: int) -> LoadSpec:
        # A lone client's latency settles within seconds; throughput points get the full time.
        seconds = min(self.point_seconds, 10.0) if concurrency == 1 else self.point_seconds
        return LoadSpec(
            "closed", concurrency=concurrency, max_requests=self.point_requests,
            max_seconds=seconds, warmup_requests=self.warmup_requests, timeout_s=self.timeout_s,
        )  # fmt: skip

    def open_loop(self) -> LoadSpec:
        return LoadSpec(
            "open", max_requests=self.point_requests, max_seconds=self.point_seconds,
            warmup_requests=self.warmup_requests, timeout_s=self.timeout_s, max_in_flight=1024,
        )  # fmt: skip

    def closed_point(self, concurrency: int) -> LoadPoint:
        return LoadPoint(f"c={concurrency}", self.main_kind, self.closed(concurrency))

    def basic_points(self, kind: str | None = None) -> list[LoadPoint]:
        """Concurrency 1 (latency) and the saturation concurrency (throughput)."""
        kind = kind or self.main_kind
        return [
            LoadPoint("c=1", kind, self.closed(1)),
            LoadPoint(f"c={self.saturation}", kind, self.closed(self.saturation)),
        ]

    def overload_points(self) -> list[LoadPoint]:
        """Open loop at the saturation rate and at twice it."""
        return [
            LoadPoint("open 1x", self.main_kind, self.open_loop(), rate_factor=1.0),
            LoadPoint("open 2x", self.main_kind, self.open_loop(), rate_factor=2.0),
        ]

    def extra_points(self) -> list[LoadPoint]:
        """Other inputs on the tuned server: large photos, small PNGs, the high resolution."""
        sat = self.closed(self.saturation)
        points = [LoadPoint(f"c={self.saturation}", kind, sat) for kind in self.image_kinds[1:]]
        res = {"resolution": str(self.hi_resolution)}
        points += [LoadPoint(p.name, p.image_kind, p.spec, res) for p in self.basic_points()]
        return points


def full_plan(out_dir: Path, work_dir: Path, **changes) -> Plan:
    return replace(Plan(quick=False, out_dir=out_dir, work_dir=work_dir), **changes)


def gpu_plan(out_dir: Path, work_dir: Path, **changes) -> Plan:
    """vitserve end to end on a CUDA machine (gpu.sh): fp16 graph, many clients; offline is gpu_offline."""
    gpu = Plan(
        quick=False, out_dir=out_dir, work_dir=work_dir, gpu=True, sections=("vitserve",),
        providers="CUDAExecutionProvider,CPUExecutionProvider", demo_repo=None,
        image_kinds=("jpeg-640x480",), images_per_kind=32, saturation=64, point_seconds=15.0,
        point_requests=100_000, warmup_requests=64,
    )  # fmt: skip
    return replace(gpu, **changes)


def quick_plan(out_dir: Path, work_dir: Path, **changes) -> Plan:
    """A tiny model, a handful of requests, no contender venvs built: seconds, for CI."""
    quick = Plan(
        quick=True, out_dir=out_dir, work_dir=work_dir, install=False,
        sections=("peak", "offline", "http-floor", "naive-torch", "vitserve", "openvino"),
        model="tiny", hi_resolution=48, demo_repo=None, image_kinds=("jpeg-64x48", "png-128x128"),
        images_per_kind=4, agreement_images=8, batch_sizes=(1, 4), offline_seconds=0.05,
        limit_check_seconds=0.05,
        single_image_calls=3, paired_blocks=3, paired_block_size=2, saturation=4, point_seconds=1.0,
        point_requests=12, warmup_requests=2,
        timeout_s=10.0, gemm_n=256,
    )  # fmt: skip
    return replace(quick, **changes)
