"""The model repository: what is on disk, what is loaded, and the one way in for inference.

Layout (Triton-like)::

    model_repo/NAME/config.json        server.model_config.ModelConfig
    model_repo/NAME/<version>/model.onnx   (+ model.fp16.onnx, model.int8.onnx), version = 1, 2, ...

Internal API used by the routes (classify, models, KServe V2)::

    repo = ModelRepository(...)            # built by the app's lifespan
    mv = repo.get("name", version=None)    # latest ready version; ModelNotFoundError / ModelNotReadyError
    hw = mv.check_resolution((h, w))       # InvalidResolutionError naming the rule
    logits = await mv.infer(pixels)        # (N, 3, H, W) float32 -> (N, K) float32, batched
    with mv.admit(hw, n) as admission:     # or per image, overlapping decoding with inference:
        out_i = await admission.infer(pixels_i)   # (3, H, W) -> image i's Outputs (postprocess)

Names are checked against a strict pattern and every path is resolved and must stay inside the
repository (symlinks included), so a request never makes the server touch other files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from server.admission import AdmissionControl, ServiceTime, WaitBound, relative_cost
from server.batcher import Batcher, BatchPolicy
from server.errors import ModelLoadError, ModelNotFoundError, ModelNotReadyError
from server.heap import freeze_long_lived
from server.metrics import Metrics
from server.model_config import CONFIG_FILE, ModelConfig
from server.model_version import ModelState, ModelVersion, gather_cancelling
from server.runtime import RuntimeOptions, Session
from server.settings import MODEL_NAME
from server.tuning import BatchChoice, batch_choice

__all__ = ["ModelEntry", "ModelRepository", "ModelState", "ModelVersion", "gather_cancelling"]

logger = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """A model directory: its config (or why it is invalid) and its versions."""

    name: str
    path: Path
    config: ModelConfig | None = None
    error: str | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def latest_ready(self) -> ModelVersion | None:
        ready = [v for n, v in sorted(self.versions.items()) if v.ready]
        return ready[-1] if ready else None


class ModelRepository:
    """Discovers models under `root`, loads and unloads them, and hands out ready versions."""

    def __init__(
        self,
        root: Path,
        options: RuntimeOptions,
        defaults: BatchPolicy,
        metrics: Metrics,
        default_model: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.options = options
        self.defaults = defaults
        self.metrics = metrics
        self._default = default_model
        self._entries: dict[str, ModelEntry] = {}
        self._stopping = False

    # -- lookup ------------------------------------------------------------------------------

    @property
    def default_model(self) -> str | None:
        """`--default-model`, else the first model name in sorted order."""
        if self._default is not None:
            return self._default
        return min(self._entries) if self._entries else None

    def entries(self) -> list[ModelEntry]:
        return [self._entries[n] for n in sorted(self._entries)]

    def entry(self, name: str) -> ModelEntry:
        found = self._entries.get(name)
        if found is None:
            raise ModelNotFoundError(_not_found(name))
        return found

    def known(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str | None = None, version: int | None = None) -> ModelVersion:
        """A ready model version: `version`, or the highest ready one.

        Raises:
            ModelNotFoundError: No such model or version.
            ModelNotReadyError: It exists but cannot serve now (the message says its state).
        """
        name = name or self.default_model
        if name is None:
            raise ModelNotFoundError(f"no models in the repository ({self.root})")
        entry = self.entry(name)
        if version is None:
            found = entry.latest_ready()
            if found is None:
                raise ModelNotReadyError(f"model {name} has no ready version ({_states(entry)})")
            return found
        mv = entry.versions.get(version)
        if mv is None:
            raise ModelNotFoundError(f"model {name} has no version {version}")
        if not mv.ready:
            detail = f": {mv.reason}" if mv.reason else ""
            raise ModelNotReadyError(f"model {name} version {version} is {mv.state.value}{detail}")
        return mv

    def readiness(self) -> tuple[bool, str]:
        """Whether the default model can serve, and a sentence saying so."""
        name = self.default_model
        if name is None:
            where = self.root if self.root.is_dir() else f"{self.root} (which does not exist)"
            return False, f"no models in the repository {where}"
        entry = self._entries.get(name)
        if entry is None:
            return False, f"default model {name} is not in the repository"
        if entry.latest_ready() is None:
            return False, f"default model {name} is not ready ({_states(entry)})"
        return True, f"default model {name} is ready"

    # -- discovery and loading ---------------------------------------------------------------

    def scan(self) -> None:
        """Find model directories (nothing is loaded); invalid names and escaping links are skipped."""
        if not self.root.is_dir():
            logger.warning("model repository %s does not exist: serving no models", self.root)
            return
        for child in sorted(self.root.iterdir()):
            if not child.is_dir():
                continue
            if self._model_dir(child.name) is None:
                logger.warning("skipping %s: not a valid model name or outside the repository", child)
                continue
            if (child / CONFIG_FILE).is_file():
                self._entries.setdefault(child.name, ModelEntry(child.name, child))

    async def load_all(self) -> None:
        """Load every discovered model, the default one first."""
        names = sorted(self._entries, key=lambda n: (n != self.default_model, n))
        changed = False
        for i, name in enumerate(names):
            if self._stopping:
                return
            changed |= await self._load(name)
            if changed and i in (0, len(names) - 1):  # the first model serves from here on
                freeze_long_lived()
                changed = False

    def stop_loading(self) -> None:
        """Make `load_all` stop after the model it is loading (shutdown)."""
        self._stopping = True

    async def load(self, name: str) -> ModelEntry:
        """Load (or pick up new versions of) a model from disk; ready versions keep serving.

        Raises:
            ModelNotFoundError: No valid model directory of that name in the repository.
        """
        if await self._load(name):
            freeze_long_lived()
        return self.entry(name)

    async def _load(self, name: str) -> bool:
        """`load` without the heap freeze; whether any version was loaded or unloaded."""
        path = self._model_dir(name)
        if path is None or not (path / CONFIG_FILE).is_file():
            raise ModelNotFoundError(_not_found(name))
        entry = self._entries.setdefault(name, ModelEntry(name, path))
        async with entry.lock:
            return await self._sync_versions(entry, path)

    async def _sync_versions(self, entry: ModelEntry, path: Path) -> bool:
        self._read_config(entry)
        on_disk = self._version_dirs(path)
        gone = [v for v in entry.versions if v not in on_disk]
        for number in gone:
            await self._unload_version(entry.versions.pop(number))
        if entry.config is None:
            for mv in entry.versions.values():
                if not mv.ready:
                    self._set_state(mv, ModelState.FAILED, entry.error)
            return bool(gone)
        loaded = 0
        for number, vdir in sorted(on_disk.items()):
            current = entry.versions.get(number)
            if current is not None and current.state in (ModelState.READY, ModelState.LOADING):
                continue
            mv = ModelVersion(entry.name, number, vdir, entry.config, self._policy(entry.config))
            entry.versions[number] = mv
            await self._load_version(mv)
            loaded += 1
        return bool(gone or loaded)

    async def unload(self, name: str) -> ModelEntry:
        """Stop serving every version of a model once what it has admitted has been answered."""
        entry = self.entry(name)
        async with entry.lock:
            for mv in entry.versions.values():
                await self._unload_version(mv)
        freeze_long_lived()
        return entry

    async def close(self, timeout_s: float | None = None) -> None:
        """Drain and unload everything (server shutdown)."""
        for entry in self.entries():
            for mv in entry.versions.values():
                await self._unload_version(mv, timeout_s)

    async def _load_version(self, mv: ModelVersion) -> None:
        self._set_state(mv, ModelState.LOADING)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            session, batcher = await asyncio.to_thread(self._open_version, mv, loop)
        except ModelLoadError as exc:
            logger.warning("model %s version %d failed to load: %s", mv.name, mv.version, exc)
            self._set_state(mv, ModelState.FAILED, str(exc))
            return
        except Exception as exc:
            logger.exception("model %s version %d failed to load", mv.name, mv.version)
            self._set_state(mv, ModelState.FAILED, f"unexpected error: {type(exc).__name__}")
            return
        mv.session, mv.batcher = session, batcher
        mv.load_seconds = time.perf_counter() - start
        self.metrics.queue_capacity.labels(mv.name).set(mv.policy.queue_capacity)
        self.metrics.model_load.labels(mv.name, str(mv.version)).set(mv.load_seconds)
        self._set_state(mv, ModelState.READY)
        logger.info(
            "model %s version %d ready in %.2fs (%s, %s)",
            mv.name, mv.version, mv.load_seconds, session.variant, ", ".join(session.providers),
        )  # fmt: skip

    def _open_version(self, mv: ModelVersion, loop: asyncio.AbstractEventLoop) -> tuple[Session, Batcher]:
        session = Session(mv.path, mv.config, self.options)
        resolutions = [tuple(mv.config.image_size), *(tuple(hw) for hw in mv.config.resolutions.validated)]
        batch_sizes = (1, mv.policy.max_batch_size) if session.on_gpu else (1,)
        session.warm_up(resolutions, batch_sizes)
        choice = self._choose_batch(session, mv)
        timings = tuple((t.batch_size, t.per_image_s) for t in choice.timings)
        mv.policy = replace(
            mv.policy,
            max_batch_size=choice.max_batch_size,
            auto_batch_size=choice.source == "tuned",
            batch_timings=timings,
        )
        admission = AdmissionControl(
            ServiceTime(choice.per_image_s or 1e-3),
            WaitBound(mv.policy.max_queue_wait_s, mv.policy.max_batch_size, mv.policy.timeout_s),
            partial(relative_cost, mv.config),
        )
        batcher = Batcher(
            mv.name, session.run, mv.policy, self.metrics, loop, admission,
            lanes=session.lanes, run_lane=partial(session.run, lane=True),
            niceness=self.options.worker_niceness,
        )  # fmt: skip
        batcher.start()
        return session, batcher

    def _choose_batch(self, session: Session, mv: ModelVersion) -> BatchChoice:
        """Time the native resolution at batch sizes up to the limit (CPU, unless configured).

        With lanes, every lane runs a batch of the size at once: what the server does when busy.
        """
        limit, lanes = mv.policy.max_batch_size, session.lanes
        pixels = np.zeros((limit, 3, *mv.config.image_size), dtype=np.float32)
        tuned = mv.policy.auto_batch_size and not session.on_gpu  # a GPU gains from every size
        name = f"{mv.name} v{mv.version}"
        if lanes == 1:
            return batch_choice(lambda n: session.run(pixels[:n]), limit, tuned, name)
        with ThreadPoolExecutor(lanes, thread_name_prefix="vitserve-tune") as pool:

            def on_every_lane(n: int) -> None:
                for done in [pool.submit(session.run, pixels[:n], True) for _ in range(lanes)]:
                    done.result()

            return batch_choice(on_every_lane, limit, tuned, name, lanes=lanes)

    async def _unload_version(self, mv: ModelVersion, timeout_s: float | None = None) -> None:
        if mv.state is not ModelState.READY:
            if mv.state is not ModelState.UNLOADING:
                self._set_state(mv, ModelState.UNLOADED, mv.reason if mv.state is ModelState.FAILED else None)
            return
        self._set_state(mv, ModelState.UNLOADING)
        if mv.batcher is not None:
            await mv.batcher.drain(timeout_s)
        if mv.session is not None:
            mv.session.close()
        mv.session, mv.batcher = None, None
        self._set_state(mv, ModelState.UNLOADED)
        logger.info("model %s version %d unloaded", mv.name, mv.version)

    def _set_state(self, mv: ModelVersion, state: ModelState, reason: str | None = None) -> None:
        mv.state, mv.reason = state, reason
        self.metrics.set_model_state(mv.name, mv.version, state.value)

    def _read_config(self, entry: ModelEntry) -> None:
        try:
            config = ModelConfig.load(entry.path)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            entry.error = f"invalid {CONFIG_FILE}: {where}: {first.get('msg')}"
        except (OSError, ValueError) as exc:
            entry.error = f"unreadable {CONFIG_FILE}: {type(exc).__name__}"
        else:
            entry.config, entry.error = config, None
            return
        logger.warning("model %s: %s", entry.name, entry.error)

    def _policy(self, config: ModelConfig) -> BatchPolicy:
        b, d = config.batching, self.defaults
        return BatchPolicy(
            max_batch_size=b.max_batch_size or d.max_batch_size,
            max_queue_delay_s=d.max_queue_delay_s
            if b.max_queue_delay_ms is None
            else b.max_queue_delay_ms / 1e3,
            queue_capacity=b.queue_capacity or d.queue_capacity,
            timeout_s=b.timeout_s or d.timeout_s,
            max_queue_wait_s=d.max_queue_wait_s if b.max_queue_wait_ms is None else b.max_queue_wait_ms / 1e3,
            auto_batch_size=d.auto_batch_size and b.max_batch_size is None,
        )

    def _model_dir(self, name: str) -> Path | None:
        if not MODEL_NAME.match(name) or name in (".", ".."):
            return None
        return _inside(self.root, self.root / name)

    def _version_dirs(self, model_dir: Path) -> dict[int, Path]:
        found = {}
        for child in model_dir.iterdir():
            numeric = child.name.isdecimal() and child.name.isascii() and int(child.name) > 0
            if numeric and child.is_dir() and _inside(self.root, child) is not None:
                found[int(child.name)] = child
        return found


def _inside(root: Path, path: Path) -> Path | None:
    """`path` if its real location is inside the real `root`, else None."""
    try:
        real_root, real = root.resolve(strict=True), path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return path if real.is_relative_to(real_root) and real != real_root else None


def _not_found(name: str) -> str:
    return f"model {name} not found" if MODEL_NAME.match(name) else "model not found (invalid model name)"


def _states(entry: ModelEntry) -> str:
    if entry.error and not entry.versions:
        return entry.error
    if not entry.versions:
        return "no versions loaded"
    return ", ".join(
        f"version {n}: {v.state.value}" + (f" ({v.reason})" if v.reason else "")
        for n, v in sorted(entry.versions.items())
    )
