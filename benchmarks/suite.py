"""Run a `Plan`: the machine's peak, the in-process limit, then every server under the same load.

Results accumulate in one dict (written to ``results.json`` after every section, so an interrupted
run still leaves what it measured); `benchmarks.report` turns it into Markdown.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import flops, machine, offline, openvino, paired, servers, venvs
from benchmarks.images import EncodedImage, image_set
from benchmarks.loadgen import LoadSpec, Payload, multipart, run_load_sync, run_sync
from benchmarks.models import SPECS, BuiltModel, build, existing
from benchmarks.plan import TUNED_SETTINGS, LoadPoint, Plan
from benchmarks.processes import ServerStartError, free_port, paused, serving, session_cpu_seconds
from benchmarks.prometheus import run_split, scrape
from server.runtime import GPU_PROVIDERS

log = logging.getLogger(__name__)


class Suite:
    """One run's state: the plan, the models and images built for it, and the results so far."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.results: dict = {
            "meta": machine.describe(plan), "peak": {}, "offline": [], "servers": [], "paired": [],
            "start_up": [],
        }  # fmt: skip
        self.images: dict[str, list[EncodedImage]] = {}
        self.payloads: dict[str, list[Payload]] = {}
        self._limit_models: dict[tuple[str, str], tuple[offline.OrtModel, offline.OrtModel | None]] = {}

    def save(self) -> Path:
        self.plan.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.plan.out_dir / "results.json"
        path.write_text(json.dumps(self.results, indent=1, default=str) + "\n", encoding="utf-8")
        return path

    def run(self) -> dict:
        plan = self.plan
        for kind in plan.image_kinds:
            self.images[kind] = image_set(kind, plan.images_per_kind)
            self.payloads[kind] = [multipart([im]) for im in self.images[kind]]
        model = build(SPECS[plan.model], plan.work_dir, fp16=plan.gpu)
        demo = existing(plan.demo_repo, plan.demo_name) if plan.demo_repo else None
        self.results["meta"].update(
            model=model.name, native=list(model.config.image_size), main_kind=plan.main_kind,
            saturation=plan.saturation, demo=demo.name if demo else None,
        )  # fmt: skip
        if "peak" in plan.sections:
            self.results["peak"] = measure_peak(plan)
            self.save()
        if "offline" in plan.sections:
            self.run_offline(model, demo)
        self.run_servers(model, demo)
        self.save()
        return self.results

    # -- in-process limit -------------------------------------------------------------------------

    def run_offline(self, model: BuiltModel, demo: BuiltModel | None) -> None:
        cfg = model.config
        cases = [(model, cfg.image_size), (model, (self.plan.hi_resolution,) * 2)]
        if demo:
            cases.append((demo, demo.config.image_size))
        for built, hw in cases:
            for variant in ("fp32", "int8"):
                if built.has(variant):
                    self.results["offline"].append(self.offline_case(built, variant, hw))
                    self.save()
        if "openvino" in self.plan.sections:
            try:
                openvino.check()
                row = openvino.run("offline", self.plan, model, cfg.image_size)
            except openvino.OpenVinoUnavailableError as exc:
                self.skip("openvino-offline", str(exc))
                return
            self.results["offline"].append(row)
            self.save()

    def offline_case(self, built: BuiltModel, variant: str, hw: tuple[int, int]) -> dict:
        plan, cfg = self.plan, built.config
        log.info("offline: %s %s at %dx%d", built.name, variant, *hw)
        decode = offline.decoder(cfg, hw)
        ort_model = offline.OrtModel(built.onnx_path(variant), cfg, variant=variant)
        images = self.images[plan.main_kind]
        tensors = np.stack([decode(im.data) for im in images])
        sweep = offline.batch_sweep(ort_model, tensors, list(plan.batch_sizes), plan.offline_seconds)
        row = {
            "model": built.name, "variant": variant, "resolution": list(hw), "image_kind": plan.main_kind,
            "flops_per_image": flops.vit_flops(flops.shape_of(cfg), hw), **sweep,
            "decode_images_per_s": offline.decode_included(
                ort_model, images, decode, sweep["best_batch"], plan.offline_seconds
            ),
            "single_image": offline.single_image(ort_model, images, decode, plan.single_image_calls),
        }  # fmt: skip
        cores = os.cpu_count() or 1
        if cores > 1:
            narrow = offline.OrtModel.lanes(built.onnx_path(variant), cfg, cores, variant)
            lanes = offline.lanes_sweep(narrow, tensors, list(plan.batch_sizes), plan.offline_seconds, cores)
            lanes["decode_images_per_s"] = offline.lanes_decode_included(
                narrow, images, decode, lanes["best_batch"], plan.offline_seconds, cores
            )
            row["lanes"] = lanes
        if variant != "fp32":
            reference = offline.OrtModel(built.onnx_path("fp32"), cfg)
            fresh = image_set(plan.main_kind, plan.agreement_images, seed=7)  # not the timed images
            agreement_set = np.stack([decode(im.data) for im in fresh])
            row["top1_agreement"] = offline.top1_agreement(reference, ort_model, agreement_set)
        return row

    # -- servers ----------------------------------------------------------------------------------

    def run_servers(self, model: BuiltModel, demo: BuiltModel | None) -> None:
        if "http-floor" in self.plan.sections:
            self.measure(servers.http_floor(), model, "–", self.plan.basic_points())
            self.measure(servers.model_floor(model), model, "fp32", [], paired=True)
        for name in ("naive-torch", "litserve", "rayserve"):
            if name in self.plan.sections:
                self.run_contender(name, model)
        if "vitserve" in self.plan.sections:
            self.run_vitserve(model, demo)

    def contender_batch(self) -> int:
        """ORT's best batch size measured here (16 when not measured): every batching server's limit."""
        for row in self.results["offline"]:
            if row["variant"] == "fp32":
                return int(min(row["best_batch"], 32))
        return 16

    def run_contender(self, name: str, model: BuiltModel) -> None:
        hw = model.config.image_size
        spec = servers.contender_spec(
            model, "fp32", hw, max_batch_size=self.contender_batch(), batch_timeout_s=0.005
        )
        spec_path = self.plan.work_dir / f"{name}.spec.json"
        spec.dump(spec_path)
        if name == "naive-torch":
            self.measure(servers.naive_torch(spec_path), model, "fp32", self.plan.basic_points())
            return
        try:
            python = venvs.python_for(name, install=self.plan.install)
        except venvs.VenvError as exc:
            self.skip(name, str(exc))
            return
        server = (
            servers.litserve(python, spec_path) if name == "litserve" else servers.rayserve(python, spec_path)
        )
        extra = {"batching": {"max_batch_size": spec.max_batch_size, "batch_timeout_s": spec.batch_timeout_s},
                 "packages": venvs.frozen(python)}  # fmt: skip
        self.measure(server, model, "fp32", self.plan.basic_points(), extra)

    def run_vitserve(self, model: BuiltModel, demo: BuiltModel | None) -> None:
        plan, repo, name = self.plan, model.repo, model.name
        if plan.gpu:  # the GPU end-to-end check: defaults, fp16 graph on CUDA
            server = servers.vitserve(repo, name, "auto", providers=plan.providers)
            self.measure(server, model, "auto", [*plan.basic_points(), plan.closed_point(256)])
            return
        settings = dict(TUNED_SETTINGS)
        tuned = {"settings": settings}
        # What `make serve` and the default image run on x86-64: ONNX Runtime's OpenVINO build (bf16 on
        # a CPU that multiplies bf16, `--variant auto`). Measured where that build runs here with bf16;
        # the other inputs and the high resolution then go to its recommended row.
        bf16 = any(r["variant"] == "bf16" for r in self.results["offline"])
        on_openvino = "openvino" in plan.sections and bf16
        overload = plan.basic_points() + plan.overload_points()
        if on_openvino:
            ov = {"providers": f"{openvino.OPENVINO},CPUExecutionProvider", "env": openvino.env()}
            defaults_ov = servers.vitserve(repo, name, "auto", key="vitserve-openvino",
                                           label="vitserve (defaults: OpenVINO build)", **ov)  # fmt: skip
            self.measure(defaults_ov, model, "bf16", overload, paired=True)
            tuned_ov = servers.vitserve(repo, name, "auto", settings, key="vitserve-openvino-tuned",
                                        label="vitserve (recommended: OpenVINO build)", **ov)  # fmt: skip
            self.measure(tuned_ov, model, "bf16", overload + plan.extra_points(), tuned, paired=True)
        # The CPU build (`.[cpu]`, and the only one off x86-64): fp32, the contenders' own runtime.
        cpu_defaults, cpu_tuned = "vitserve, CPU build (defaults)", "vitserve, CPU build (recommended)"
        defaults = servers.vitserve(repo, name, "fp32", label=cpu_defaults)
        self.measure(defaults, model, "fp32", overload, paired=True)
        ran = {r["server"] for r in self.results["servers"] if "skipped" not in r}
        points = overload if "vitserve-openvino-tuned" in ran else overload + plan.extra_points()
        tuned_server = servers.vitserve(repo, name, "fp32", settings, label=cpu_tuned)
        self.measure(tuned_server, model, "fp32", points, tuned, paired=True)
        if model.has("int8"):  # on the CPU provider in either build (server.runtime)
            int8 = servers.vitserve(repo, name, "int8", settings, label=cpu_tuned)
            self.measure(int8, model, "int8", plan.basic_points(), tuned)
        if demo:
            demo_server = servers.vitserve(demo.repo, demo.name, "fp32", label=cpu_defaults)
            self.measure(demo_server, demo, "fp32", plan.basic_points())

    def skip(self, key: str, reason: str) -> None:
        log.warning("%s skipped: %s", key, reason)
        self.results["servers"].append({"server": key, "skipped": reason})
        self.save()

    def measure(self, server: servers.ServerUnderTest, model: BuiltModel, variant: str,
                points: list[LoadPoint], extra: dict | None = None,
                paired: bool = False) -> None:  # fmt: skip
        """Start `server` once, run every point against it, stop it; one result row per point.

        With `paired`, the c=1 latency is then also measured against the in-process floor in
        alternating blocks (`benchmarks.paired`), into ``results["paired"]``.
        """
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = self.plan.out_dir / "logs" / f"{server.key}-{model.name}-{variant}.log"
        log.info("starting %s (%s, %s)", server.label, model.name, variant)
        try:
            with serving(servers.resolve(server, port), base + server.ready_path, log_path,
                         env=server.env, cwd=servers.REPO_ROOT) as proc:  # fmt: skip
                if server.key.startswith("vitserve"):  # what it serves, and the batch size it chose
                    served = _served_version(base, model.name)
                    if served is None:
                        raise ServerStartError(f"it reports no version of {model.name}")
                    self.results["start_up"].append(_start_up_row(server, model.name, served))
                    if variant not in ("auto", served["variant"]):
                        raise ServerStartError(
                            f"it serves {model.name} as {served['variant']}, not {variant}"
                        )
                    on = (served.get("providers") or ["no provider"])[0]
                    if self.plan.gpu and on not in GPU_PROVIDERS:  # CPU figures are not the GPU's
                        raise ServerStartError(f"it serves {model.name} on {on}, not on a GPU")
                saturated = None
                for point in points:
                    around = basis = None
                    if self.is_saturation(point):
                        around = self.limit_check(model, variant)
                        # bf16 is compared with the contenders on the fp32 limit's scale, too
                        basis = self.limit_check(model, "fp32") if variant == "bf16" else None
                    row = self.measure_point(server, port, proc.pid, point, saturated, around, basis)
                    row.update(model=model.name, variant=variant, **(extra or {}))
                    if point.name == f"c={self.plan.saturation}" and not point.query and saturated is None:
                        saturated = row["images_per_s"]
                    self.results["servers"].append(row)
                    self.save()
                if paired:
                    self.measure_paired(server, port, model, variant)
        except ServerStartError as exc:
            self.skip(server.key, f"{server.label} did not start: {exc}")

    def is_saturation(self, point: LoadPoint) -> bool:
        """The point the throughput targets judge: saturation, main input, native resolution."""
        plan = self.plan
        return point.name == f"c={plan.saturation}" and point.image_kind == plan.main_kind and not point.query

    def limit_check(
        self, built: BuiltModel, variant: str, own_process: bool = False
    ) -> Callable[[], float] | None:
        """The decode-included limit measured now (the better of one session and lanes, at the batch
        sizes the offline section found), for a ratio that the host's drift does not skew. bf16's
        runs in a child process on the OpenVINO build (`benchmarks.openvino`) unless `own_process`."""
        cfg, kind = built.config, self.plan.main_kind
        row = next((r for r in self.results["offline"] if r["model"] == built.name and r["variant"] == variant
                    and r["resolution"] == list(cfg.image_size)), None)  # fmt: skip
        if row is None:
            return None
        if variant == "bf16" and not own_process:
            plan = self.plan

            def in_child() -> float | None:  # a failed measurement leaves a gap, not a failed run
                try:
                    return openvino.run("limit", plan, built, cfg.image_size, row)
                except openvino.OpenVinoUnavailableError as exc:
                    log.warning("OpenVINO limit not measured: %s", exc)
                    return None

            return in_child
        key = (built.name, variant)
        if key not in self._limit_models:
            path = built.onnx_path(variant)
            lanes = row.get("lanes")
            narrow = offline.OrtModel.lanes(path, cfg, lanes["lanes"], variant) if lanes else None
            self._limit_models[key] = (offline.OrtModel(path, cfg, variant=variant), narrow)
        single, narrow = self._limit_models[key]
        decode, images, secs = (
            offline.decoder(cfg, cfg.image_size),
            self.images[kind],
            self.plan.limit_check_seconds,
        )

        def measure() -> float:
            rate = offline.decode_included(single, images, decode, row["best_batch"], secs)
            if narrow is not None:
                lanes = row["lanes"]
                rate = max(rate, offline.lanes_decode_included(
                    narrow, images, decode, lanes["best_batch"], secs, lanes["lanes"]
                ))  # fmt: skip
            return rate

        return measure

    def measure_point(self, server: servers.ServerUnderTest, port: int, pid: int, point: LoadPoint,
                      saturated: float | None, limit: Callable[[], float] | None = None,
                      basis: Callable[[], float] | None = None) -> dict:  # fmt: skip
        row = {"server": server.key, "label": server.label, "point": point.name,
               "image_kind": point.image_kind, "query": point.query}  # fmt: skip
        spec = point.spec
        if point.rate_factor is not None:
            if not saturated:
                return {**row, "skipped": "no saturation throughput to derive the rate from"}
            spec = _with_rate(spec, point.rate_factor * saturated)
        base = f"http://127.0.0.1:{port}"
        log.info("  %s %s %s %s", server.key, point.name, point.image_kind, point.query or "")
        before: dict = {}

        def snapshot() -> dict:
            return {
                "metrics": scrape(base),
                "server_cpu": session_cpu_seconds(pid),
                "client_cpu": time.process_time(),
            }

        url, payloads = server.classify_url(port, point.query), self.payloads[point.image_kind]

        def limits() -> list[float | None]:  # with the server's processes stopped (`paused`)
            if limit is None and basis is None:
                return []
            with paused(pid):
                return [limit() if limit else None, basis() if basis else None]

        limits_before = limits()
        result = run_load_sync(url, payloads, spec, after_warmup=lambda: before.update(snapshot()))
        after = snapshot()
        cores = {k: (after[k] - before[k]) / result["wall_s"] for k in ("server_cpu", "client_cpu")}
        split = run_split(before["metrics"], after["metrics"], server.metrics_match)
        row = {**row, **result, "split": split, "cores_used": cores}
        limits_after = limits()
        if limit is not None:
            row["limit_around"] = [limits_before[0], limits_after[0]]
        if basis is not None:
            row["fp32_limit_around"] = [limits_before[1], limits_after[1]]
        return row

    def measure_paired(
        self, server: servers.ServerUnderTest, port: int, model: BuiltModel, variant: str
    ) -> None:
        plan, kind = self.plan, self.plan.main_kind
        log.info("  %s c=1 paired with in-process, %d blocks", server.key, plan.paired_blocks)
        url = server.classify_url(port)
        if variant == "bf16":  # in-process bf16 needs the OpenVINO build: the child measures both sides
            try:
                result = openvino.run("paired", plan, model, model.config.image_size, {"url": url})
            except openvino.OpenVinoUnavailableError as exc:
                log.warning("OpenVINO paired c=1 not measured: %s", exc)
                return
        else:
            result = self.paired_result(url, model, variant)
        if result.get("overhead_blocks", 0) < result["blocks"] / 2:  # vitserve publishes the histograms
            log.warning(
                "  %s: overhead outside decode + inference read in only %s of %d blocks (see /metrics)",
                server.key, result.get("overhead_blocks", 0), result["blocks"],
            )  # fmt: skip
        self.results["paired"].append(
            {"server": server.key, "label": server.label, "model": model.name, "variant": variant,
             "image_kind": kind, **result}
        )  # fmt: skip
        self.save()

    def paired_result(self, url: str, model: BuiltModel, variant: str) -> dict:
        """c=1 at `url` against one image decoded and run in this process, in alternating blocks."""
        plan, cfg, kind = self.plan, model.config, self.plan.main_kind
        ort_model = offline.OrtModel(model.onnx_path(variant), cfg, variant=variant)
        decode = offline.decoder(cfg, cfg.image_size)
        return run_sync(paired.paired_latency(
            url, self.payloads[kind], self.images[kind], lambda im: ort_model.run(decode(im.data)[None]),
            plan.paired_blocks, plan.paired_block_size, plan.timeout_s, {"model": model.name},
        ))  # fmt: skip


def _served_version(base: str, model: str) -> dict | None:
    """What vitserve reports for the latest version of `model` (`/models/{name}`)."""
    import httpx

    entry = httpx.get(f"{base}/models/{model}", timeout=10, trust_env=False).json()
    return entry["versions"][-1] if entry.get("versions") else None


def _start_up_row(server: servers.ServerUnderTest, model: str, version: dict) -> dict:
    """The batch size a vitserve version chose at start-up, and the sweep behind it."""
    batching = version["batching"]
    return {
        "server": server.key, "label": server.label, "model": model, "variant": version["variant"],
        "max_batch_size": batching["max_batch_size"], "source": batching["max_batch_size_source"],
        "lanes": batching.get("lanes", 1),
        "ms_per_image": {str(t["batch_size"]): t["ms_per_image"] for t in batching["batch_timings"]},
    }  # fmt: skip


def _with_rate(spec: LoadSpec, rate: float) -> LoadSpec:
    return replace(spec, rate=rate, max_requests=max(spec.max_requests, int(rate * spec.max_seconds) + 1))


def measure_peak(plan: Plan) -> dict:
    n, seconds = plan.gemm_n, min(1.0, plan.offline_seconds * 2)
    log.info("peak: %d^3 GEMMs", n)
    return {
        "gemm_n": n,
        "threads": os.cpu_count(),
        "numpy_fp32_flops": flops.numpy_gemm_flops(n, seconds),
        "ort_fp32_flops": flops.ort_gemm_ops(n, int8=False, min_seconds=seconds),
        "ort_int8_ops": flops.ort_gemm_ops(n, int8=True, min_seconds=seconds),
    }
