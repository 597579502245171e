"""ONNX Runtime sessions: providers, graph variants, warm-up, and ``run(NCHW) -> Outputs``.

One dynamic graph per model version serves every resolution: besides the pixels it takes the two
position-embedding resampling matrices for the requested token grid (`server.pos_resample`), built
once per grid and cached, so the weights are held once however many resolutions are served.

On a CPU with `instances` > 1 a version holds a second ORT session of the same graph, its *lanes*:
`instances` batches run on it at once, each single-threaded on its caller's thread (ORT has one
intra-op pool per session, which concurrent runs would share, so a lane never gets more). On
OpenVINO, which runs a session's calls on its own pool of inference requests, the lanes session
gets `instances` streams sharing the intra-op threads (`num_streams`), so its calls run at once.
Concurrent single-threaded runs beat one run split across the cores whenever anything else wants a
core (decoding, HTTP): a preempted worker stalls a split run at every operator, and costs a lane
only its own time slice. The first session, on every core, stays for lone batches: a request on an
idle server gets the lowest latency. The weights are then held twice.

With OpenVINOExecutionProvider (the `onnxruntime-openvino` build of ORT, extra `openvino`) the
`bf16` variant runs the fp32 graph with bf16 matrix arithmetic: on a CPU with AMX or AVX512-BF16
that is 2-3x the fp32 rate (`variant=auto` picks it there, as it picks fp16 on CUDA). OpenVINO
compiles initializers into the graph as constants, even the two resampling matrices a request
overrides, so for OpenVINO they are dropped from the initializers at load and stay plain inputs
(this needs the `onnx` package, which the extra brings).

This is the only module that imports onnxruntime; nothing above it knows about ORT.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.errors import ModelLoadError, StartupError
from server.model_config import VARIANT_FILES, ModelConfig, graph_file
from server.pos_resample import resample_matrix
from server.postprocess import Outputs, ranking_matches

logger = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
OPENVINO = "OpenVINOExecutionProvider"


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built; derived once from the server settings."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    variant: str = "auto"  # auto | fp32 | fp16 | int8
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    instances: int = 1  # lanes on CPU (see the module docstring); GPU sessions always have one
    worker_niceness: int = 0  # added to the inference threads' nice value (server.niceness)
    max_batch_size: int = 32
    openvino_streams: int = 1  # OpenVINO: inference requests run at once, threads split among them
    trt_cache_dir: Path | None = None


def resolve_providers(requested: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The requested providers that this onnxruntime build offers, in the requested order.

    Raises:
        StartupError: None of them is available.
    """
    available = set(ort.get_available_providers())
    chosen = tuple(p for p in requested if p in available)
    skipped = [p for p in requested if p not in available]
    if skipped:
        logger.info("execution providers not available here, skipped: %s", ", ".join(skipped))
    if not chosen:
        raise StartupError(
            f"none of the providers {', '.join(requested)} is available in this onnxruntime build; "
            f"set --providers / VITSERVE_PROVIDERS to some of: {', '.join(sorted(available))}"
        )
    return chosen


def choose_variant(requested: str, version_dir: Path, provider: str, native_bf16: bool | None = None) -> str:
    """What to run on `provider`: for `auto`, fp16 on a GPU when the file is there, bf16 on OpenVINO
    when the CPU does bf16 natively, else fp32. A file variant that is missing falls back to fp32,
    and so do bf16 anywhere but on OpenVINO and fp16 anywhere but on a GPU."""
    if requested == "auto":
        if provider in GPU_PROVIDERS:
            wanted = "fp16"
        elif provider == OPENVINO and (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
            wanted = "bf16"
        else:
            wanted = "fp32"
    else:
        wanted = requested
    if wanted == "bf16":
        if provider != OPENVINO:
            logger.warning("bf16 runs on %s only (the openvino extra); using fp32 on %s", OPENVINO, provider)
            return "fp32"
        return wanted
    if wanted == "fp16" and provider not in GPU_PROVIDERS:  # a CPU would run it slower than fp32
        logger.warning("the fp16 graph is for GPUs; using fp32 on %s", provider)
        return "fp32"
    if wanted != "fp32" and not (version_dir / VARIANT_FILES[wanted]).is_file():
        if requested != "auto":
            logger.warning("%s has no %s variant; using fp32", version_dir, wanted)
        wanted = "fp32"
    return wanted


def _without_openvino(options: RuntimeOptions) -> RuntimeOptions:
    """The int8 graph's providers on the OpenVINO build: the CPU provider of the same build. OpenVINO runs
    ORT's dynamic quantisation (DynamicQuantizeLinear, MatMulInteger) about 3x slower than the CPU
    provider's VNNI kernels (ViT-S/16 at batch 1 on 2 cores: 72 against 26 ms, AMD EPYC, 2026-12-04)."""
    rest = tuple(p for p in options.providers if p != OPENVINO) or ("CPUExecutionProvider",)
    logger.info("the int8 graph runs on %s, not %s (faster there)", rest[0], OPENVINO)
    return replace(options, providers=rest)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16), from the kernel's CPU flags."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    lines = (line for line in text.splitlines() if line.startswith("flags"))
    flags = next(lines, ":").split(":", 1)[1].split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


class Session:
    """One loaded model version on ONNX Runtime.

    `run(pixels)` is called from one thread at a time; `run(pixels, lane=True)` from up to `lanes`
    threads at once (only when `lanes` > 1).
    """

    def __init__(self, version_dir: Path, config: ModelConfig, options: RuntimeOptions) -> None:
        self.config = config
        self.variant = choose_variant(options.variant, version_dir, options.providers[0])
        if self.variant == "int8" and options.providers[0] == OPENVINO:
            options = _without_openvino(options)
        self._session = open_session(version_dir / graph_file(self.variant), config, options, self.variant)
        self.providers: list[str] = self._session.get_providers()
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        if self.variant == "fp16" and not self.on_gpu:  # the GPU provider failed to initialise
            logger.warning("%s: no GPU provider came up; using the fp32 graph", version_dir)
            self.variant = "fp32"
            self._session = open_session(version_dir / VARIANT_FILES["fp32"], config, options, self.variant)
            self.providers = self._session.get_providers()
        if self.variant == "bf16" and self.providers[0] != OPENVINO:  # same graph, now on the CPU provider
            logger.warning("%s: %s did not come up; running fp32", version_dir, OPENVINO)
            self.variant = "fp32"
        self._names = _check_io(self._session, config)
        self._lanes: ort.InferenceSession | None = None
        if options.instances > 1 and not self.on_gpu:
            # OpenVINO runs a session's concurrent calls on its own pool of inference requests, one
            # per stream: a single-threaded session there ran them one at a time (24 against 82
            # images/s with decoding, ViT-S/16 bf16 on 2 cores), so its lanes are streams instead.
            providers = tuple(self.providers)
            if providers[0] == OPENVINO:
                lanes = replace(options, providers=providers, openvino_streams=options.instances)
            else:
                lanes = RuntimeOptions(providers=providers, intra_op_threads=1, inter_op_threads=1)
            self._lanes = open_session(version_dir / graph_file(self.variant), config, lanes, self.variant)
        self.lanes = options.instances if self._lanes is not None else 1
        self._pixel_dtype = _input_dtype(self._session, self._names.input)
        self._matrix_dtype = _input_dtype(self._session, self._names.pos_rows)
        self._matrices: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def run(self, pixels: np.ndarray, lane: bool = False) -> Outputs:
        """Logits (N, K) float32, and the graph's ranking if it has one, for pixels (N, 3, H, W) float32
        at any allowed resolution.

        Args:
            pixels: The batch.
            lane: Run on the lanes session (one of `lanes` concurrent runs) rather than on all cores.
        """
        rows, cols = self._pos_inputs((pixels.shape[2], pixels.shape[3]))
        pixels = pixels.astype(self._pixel_dtype, copy=False)
        if self.on_gpu:
            out = self._run_bound(pixels, rows, cols)
        else:
            names = self._names
            feeds = {names.input: pixels, names.pos_rows: rows, names.pos_cols: cols}
            session = self._lanes if lane and self._lanes is not None else self._session
            out = session.run(names.outputs, feeds)
        if len(out) == 1:
            return Outputs(np.asarray(out[0], dtype=np.float32))
        return Outputs(np.asarray(out[0], dtype=np.float32), np.asarray(out[1], dtype=np.float32), out[2])

    def _run_bound(self, pixels: np.ndarray, rows: Any, cols: Any) -> list[np.ndarray]:
        # I/O binding: the batch is copied to the device once, the cached resampling matrices
        # already live there, and the outputs come straight back to host memory.
        names = self._names
        binding = self._session.io_binding()
        binding.bind_cpu_input(names.input, np.ascontiguousarray(pixels))
        binding.bind_ortvalue_input(names.pos_rows, rows)
        binding.bind_ortvalue_input(names.pos_cols, cols)
        for name in names.outputs:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _pos_inputs(self, hw: tuple[int, int]) -> tuple[Any, Any]:
        grid = self.config.grid_for(hw)
        cached = self._matrices.get(grid)
        if cached is None:
            native, method = self.config.native_grid, self.config.pos_embed_interpolation
            mats = [
                np.ascontiguousarray(resample_matrix(old, new, method), dtype=self._matrix_dtype)
                for old, new in zip(native, grid, strict=True)
            ]
            if self.on_gpu:
                mats = [ort.OrtValue.ortvalue_from_numpy(m, "cuda", 0) for m in mats]
            with self._lock:
                cached = self._matrices.setdefault(grid, (mats[0], mats[1]))
        return cached

    def warm_up(self, resolutions: list[tuple[int, int]], batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run each resolution once so the first user request does not pay for first-run set-up;
        first, check the graph's ranking on this provider (`check_ranking`)."""
        if resolutions:
            self.check_ranking(resolutions[0])
        for hw in dict.fromkeys(resolutions):
            for n in batch_sizes:
                for lane in (False, True) if self._lanes is not None else (False,):
                    self.run(np.zeros((n, 3, *hw), dtype=np.float32), lane)

    def check_ranking(self, hw: tuple[int, int]) -> bool:
        """Whether the graph's ranking of two random images at `hw` is what NumPy makes of the same
        run's logits (`server.postprocess.ranking_matches`); if not, it is not used. A provider
        may run the ranking nodes in lower precision (OpenVINO's bf16, TensorRT's fp16) or order
        ties otherwise; the CPU and CUDA providers run them in float32, as the exporter checked."""
        if len(self._names.outputs) == 1:
            return False
        pixels = np.random.default_rng(0).standard_normal((2, 3, *hw), dtype=np.float32)
        if ranking_matches(self.run(pixels)):
            return True
        logger.warning(
            "%s on %s: the graph's ranking differs from its logits' (precision or order of ties); "
            "ranking in NumPy", self.config.name, self.providers[0],
        )  # fmt: skip
        self._names = replace(self._names, outputs=self._names.outputs[:1])
        return False

    def close(self) -> None:
        self._matrices.clear()
        self._lanes = None
        del self._session


@dataclass(frozen=True)
class _Names:
    input: str
    pos_rows: str
    pos_cols: str
    outputs: list[str]  # the logits, then the ranking's probabilities and classes where there is one


def _check_io(session: ort.InferenceSession, config: ModelConfig) -> _Names:
    io = config.onnx
    # Inputs with a default (the identity matrices at the native grid) are overridable initializers.
    inputs = {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}
    outputs = {o.name for o in session.get_outputs()}
    missing = [n for n in (io.input, io.pos_rows, io.pos_cols) if n not in inputs]
    if missing or io.output not in outputs:
        raise ModelLoadError(
            f"graph inputs {sorted(inputs)} / outputs {sorted(outputs)} do not match config.json onnx names "
            f"({io.input}, {io.pos_rows}, {io.pos_cols} -> {io.output})"
        )
    wanted = [io.output]
    if io.ranked_probabilities is not None and io.ranked_classes is not None:
        ranking = [io.ranked_probabilities, io.ranked_classes]
        if outputs.issuperset(ranking):
            wanted += ranking
        else:  # a version exported before the graphs ranked, under a config.json written since
            logger.info("%s: this graph has no ranking outputs %s; ranking in NumPy", config.name, ranking)
    return _Names(io.input, io.pos_rows, io.pos_cols, wanted)


def _input_dtype(session: ort.InferenceSession, name: str) -> type[np.floating]:
    """float16 when the graph takes `name` in half precision (an fp16 graph converted with fp16 I/O)."""
    args = [*session.get_inputs(), *session.get_overridable_initializers()]
    kind = next(a.type for a in args if a.name == name)
    return np.float16 if kind == "tensor(float16)" else np.float32


def open_session(
    path: Path, config: ModelConfig, options: RuntimeOptions, variant: str
) -> ort.InferenceSession:
    """An ORT session for the graph at `path` as the server opens it (also the benchmark's limit)."""
    if not path.is_file():
        raise ModelLoadError(f"{path.name} is missing")
    graph: str | bytes = str(path)
    if options.providers[0] == OPENVINO:
        graph = _matrices_as_inputs(path, config)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    # Decode threads share the cores: idle ORT workers should sleep, not spin.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    providers = [(p, _provider_options(p, config, options, variant)) for p in options.providers]
    try:
        return ort.InferenceSession(graph, sess_options=so, providers=providers)
    except Exception as exc:  # ORT raises several types (Fail, InvalidGraph, NoSuchFile, ...)
        reason = _first_line(exc).replace(str(path), path.name)  # no server paths in /models
        raise ModelLoadError(f"onnxruntime could not load {path.name}: {reason}") from exc


def _matrices_as_inputs(path: Path, config: ModelConfig) -> bytes:
    """The graph at `path` with the resampling matrices' default values removed (see the module docstring)."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelLoadError(f"{OPENVINO} needs the onnx package: pip install -e '.[openvino]'") from exc
    try:
        model = onnx.load(str(path))
        names = {config.onnx.pos_rows, config.onnx.pos_cols}
        kept = [t for t in model.graph.initializer if t.name not in names]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        return model.SerializeToString()
    except Exception as exc:  # a malformed file (DecodeError), a graph over protobuf's 2 GiB (ValueError)
        reason = _first_line(exc).replace(str(path.parent), path.parent.name)  # no server paths in /models
        raise ModelLoadError(f"{path.name} could not be prepared for {OPENVINO}: {reason}") from exc


def _provider_options(
    provider: str, config: ModelConfig, options: RuntimeOptions, variant: str
) -> dict[str, Any]:
    if provider == "CUDAExecutionProvider":
        # HEURISTIC: a new input shape (resolution, batch size) must not trigger an exhaustive
        # cuDNN benchmark that stalls every request queued behind it.
        return {  # values as strings: what every onnxruntime build's option parser accepts
            "device_id": "0",
            "cudnn_conv_algo_search": "HEURISTIC",
            "arena_extend_strategy": "kSameAsRequested",
            "do_copy_in_default_stream": "1",
        }
    if provider == "TensorrtExecutionProvider":
        return _tensorrt_options(config, options)
    if provider == OPENVINO:
        precision = "bf16" if variant == "bf16" else "f32"  # its CPU default would be bf16 on AMX
        return {
            "device_type": "CPU",
            "num_of_threads": str(options.intra_op_threads),
            "num_streams": str(options.openvino_streams),
            "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": precision}}),
        }
    return {}


def _tensorrt_options(config: ModelConfig, options: RuntimeOptions) -> dict[str, Any]:
    # One optimisation profile covering every allowed resolution and batch size, so a new
    # resolution does not rebuild the engine.
    io, r, p = config.onnx, config.resolutions, config.patch_size
    g0h, g0w = config.native_grid
    gmin, gmax, n = r.min // p, r.max // p, options.max_batch_size
    h0, w0 = config.image_size

    def shapes(batch: int, h: int, w: int) -> str:
        return f"{io.input}:{batch}x3x{h}x{w},{io.pos_rows}:{h // p}x{g0h},{io.pos_cols}:{w // p}x{g0w}"

    opts: dict[str, Any] = {
        "device_id": "0",
        "trt_fp16_enable": str(options.variant in ("auto", "fp16")),
        "trt_profile_min_shapes": shapes(1, gmin * p, gmin * p),
        "trt_profile_opt_shapes": shapes(n, h0, w0),
        "trt_profile_max_shapes": shapes(n, gmax * p, gmax * p),
    }
    if options.trt_cache_dir is not None:
        opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(options.trt_cache_dir))
    return opts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
