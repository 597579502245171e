"""ONNX export of a ViT into a model-repository entry, checked against PyTorch before it is published.

One graph serves every resolution: besides `pixel_values` [N, 3, H, W] it takes the two position-
embedding resampling matrices [gh, gh0] and [gw, gw0] (see `server.pos_resample`), which default to
the identity at the native grid. The graph is written with PyTorch's TorchScript exporter, traced at a
non-native, non-square size so that nothing about the native grid is baked in.

`python -m training export CHECKPOINT --name NAME --repo DIR [--version N] [--fp16] [--int8]`
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from pydantic import ValidationError
from torch import nn

from server.model_config import VARIANT_FILES, Architecture, Batching, ModelConfig, Preprocess, Resolutions
from training import onnx_graph, repository
from training.errors import UserError
from training.model import VisionTransformer
from training.onnx_check import (
    AGREEMENT_SAMPLES,
    ParityCheck,
    VariantCheck,
    check_parity,
    check_variant,
    feeds_for,
    open_session,
)

log = logging.getLogger(__name__)

MAX_GRAPH_BYTES = 2_000_000_000  # protobuf's 2 GiB limit, with some room for the graph itself


@dataclass(frozen=True)
class ExportReport:
    """What `export_to_repository` wrote and measured."""

    config: ModelConfig
    version: int
    version_dir: Path
    files: dict[str, Path]
    parity: tuple[ParityCheck, ...]
    variants: tuple[VariantCheck, ...]

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.parity)

    def summary_lines(self) -> list[str]:
        lines = [f"exported {self.config.name} version {self.version} -> {self.version_dir}"]
        for c in self.parity:
            h, w = c.size
            what = f"{h}x{w} batch {c.batch} ({c.feed})"
            lines.append(f"  fp32 vs PyTorch {what}: max abs logit diff {c.max_abs_diff:.2e}")
        for v in self.variants:
            if v.top1_agreement is None:
                lines.append(f"  {v.variant}: not checked: {v.note}")
                continue
            lines.append(
                f"  {v.variant} on {v.provider}: top-1 agreement with fp32 {v.top1_agreement:.1%} "
                f"of {AGREEMENT_SAMPLES} images, max abs logit diff {v.max_abs_diff:.2e}"
            )
        return lines


class OnnxExportWrapper(nn.Module):
    """The exported signature: (pixel_values, pos_embed_rows, pos_embed_cols) -> logits."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pos_embed_rows: torch.Tensor, pos_embed_cols: torch.Tensor):
        return self.model(pixel_values, pos_embed_rows, pos_embed_cols)  # (N, K)


def default_resolutions(image_size: tuple[int, int], patch: int) -> Resolutions:
    """Half the shorter native side to twice the longer one, in whole patches (tokens grow 16x at 2x)."""
    low = max(patch, min(image_size) // 2 // patch * patch)
    return Resolutions(min=low, max=2 * max(image_size) // patch * patch)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def build_model_config(
    model: VisionTransformer,
    *,
    name: str,
    labels: list[str],
    preprocess: Preprocess,
    resolutions: Resolutions | None = None,
    batching: Batching | None = None,
    source: str | None = None,
) -> ModelConfig:
    """The entry's `config.json`, every field filled from the model's ViTConfig and the arguments."""
    cfg = model.cfg
    if cfg.in_chans != 3:
        raise UserError(f"the server feeds RGB images; this model has {cfg.in_chans} input channels")
    if len(labels) != cfg.num_classes:
        raise UserError(f"{len(labels)} labels given for a model with {cfg.num_classes} classes")
    arch = Architecture(
        family="vit-hybrid" if cfg.hybrid else "vit",
        patch_size=cfg.token_stride,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        in_chans=cfg.in_chans,
        preset=cfg.preset,
    )
    try:
        return ModelConfig(
            name=name,
            labels=[str(label) for label in labels],
            image_size=cfg.image_size,
            architecture=arch,
            pos_embed_interpolation=cfg.pos_embed_interpolation,
            resolutions=resolutions or default_resolutions(cfg.image_size, cfg.token_stride),
            preprocess=preprocess,
            batching=batching or Batching(),
            onnx=onnx_graph.RANKED,
            source=source,
        )
    except ValidationError as exc:
        raise UserError(f"model config for {name!r}: {_first_error(exc)}") from exc


def trace_to_onnx(model: VisionTransformer, config: ModelConfig, path: Path) -> onnx.ModelProto:
    """Write the graph (no defaults yet) to `path` with dynamic batch, H, W and matrix sizes."""
    gh0, gw0 = config.native_grid
    gh, gw = gh0 + 1, gw0 + 2  # non-native and non-square: nothing of the native grid can be baked in
    p, io = config.patch_size, config.onnx
    x = torch.randn(2, 3, gh * p, gw * p, generator=torch.Generator().manual_seed(0))
    feeds = feeds_for(config, x.numpy())
    rows, cols = (torch.from_numpy(feeds[k].copy()) for k in (io.pos_rows, io.pos_cols))
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated, not gone; see model_repo/README.md for why we use it.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tracer warnings flag Python-side shape checks (GroupNorm's batch check in the hybrid stem);
        # whatever the trace froze is caught by the parity check at several sizes, so they are noise.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            OnnxExportWrapper(model),
            (x, rows, cols),
            str(path),
            dynamo=False,
            opset_version=io.opset,
            input_names=[io.input, io.pos_rows, io.pos_cols],
            output_names=[io.output],
            dynamic_axes={
                io.input: {0: "batch", 2: "height", 3: "width"},
                io.pos_rows: {0: "grid_h"},
                io.pos_cols: {0: "grid_w"},
                io.output: {0: "batch"},
            },
        )
    return onnx.load(str(path))


def _cpu_fp32(model: VisionTransformer) -> VisionTransformer:
    params = list(model.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return model
    return copy.deepcopy(model).float().cpu()


def _write_graphs(
    model: VisionTransformer, config: ModelConfig, out: Path, fp16: bool, int8: bool
) -> list[str]:
    """Write model.onnx (+ variants) into `out`; returns the variants written, fp32 first."""
    io, grid = config.onnx, config.native_grid
    base = trace_to_onnx(model, config, out / "traced.onnx")
    (out / "traced.onnx").unlink()
    graphs = {"fp32": base}
    if fp16:
        graphs["fp16"] = onnx_graph.to_fp16(base, io)
    if int8:
        onnx_graph.write_int8(base, out / VARIANT_FILES["int8"], io)
        graphs["int8"] = onnx.load(str(out / VARIANT_FILES["int8"]))
    for variant, graph in graphs.items():
        onnx_graph.add_ranking(graph, io, config.num_classes)
        onnx_graph.add_identity_defaults(graph, grid, io)
        onnx.save(graph, str(out / VARIANT_FILES[variant]))
    return list(graphs)


def export_to_repository(
    model: VisionTransformer,
    *,
    repo: Path,
    name: str,
    version: int | None,
    labels: list[str],
    preprocess: Preprocess,
    resolutions: Resolutions | None = None,
    batching: Batching | None = None,
    fp16: bool = False,
    int8: bool = False,
    source: str | None = None,
    force: bool = False,
) -> ExportReport:
    """Export `model` to ONNX, check it, and publish it as `repo/name/VERSION` (all or nothing).

    Args:
        model: The ViT (any device/dtype; exported as a float32 CPU copy).
        repo: The model repository folder (created if missing).
        name: Entry name (folder name and the name clients use).
        version: Version number; None for the latest existing + 1.
        labels: One label per output class.
        preprocess: How images are turned into the model's input.
        resolutions: Allowed serving sizes; default `default_resolutions`.
        batching: Per-model batching overrides; default all server-wide.
        fp16: Also write `model.fp16.onnx` (CUDA provider).
        int8: Also write `model.int8.onnx` (dynamic int8, CPUs with VNNI).
        source: Provenance recorded in config.json.
        force: Replace an existing version, or an entry whose labels/architecture differ.

    Raises:
        UserError: bad arguments, a conflicting entry, an unwritable repository, or (ParityError) a
            graph that does not match PyTorch to PARITY_TOL. Nothing is left in `repo` on failure.
    """
    config = build_model_config(
        model,
        name=name,
        labels=labels,
        preprocess=preprocess,
        resolutions=resolutions,
        batching=batching,
        source=source,
    )
    if sum(p.numel() for p in model.parameters()) * 4 > MAX_GRAPH_BYTES:
        raise UserError(
            "models over 2 GB in float32 need ONNX external data, which the exporter does not write yet"
        )
    plan = repository.plan_entry(Path(repo), config, version, force=force)
    was_training = model.training
    model.eval()
    try:
        with repository.staged_entry(plan, config) as out:
            ref = _cpu_fp32(model)
            variants = _write_graphs(ref, config, out, fp16, int8)
            parity = check_parity(ref, config, out / VARIANT_FILES["fp32"])
            fp32 = open_session(out / VARIANT_FILES["fp32"])
            checks = [check_variant(v, out / VARIANT_FILES[v], fp32, config) for v in variants[1:]]
    finally:
        model.train(was_training)
    files = {v: plan.version_dir / VARIANT_FILES[v] for v in variants}
    return ExportReport(config, plan.version, plan.version_dir, files, tuple(parity), tuple(checks))


def add_repository_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `export` and `import`: where the entry goes and which variants it gets."""
    parser.add_argument("--name", required=True, help="entry name in the repository")
    parser.add_argument("--repo", required=True, type=Path, help="model repository folder")
    parser.add_argument("--version", type=int, default=None, help="version number (default: latest + 1)")
    parser.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (CUDA provider)")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic int8, CPU)")
    parser.add_argument("--min-res", type=int, default=None, help="smallest side served, px")
    parser.add_argument("--max-res", type=int, default=None, help="largest side served, px")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing version, or an entry with other labels/architecture",
    )


def resolutions_from_args(args: argparse.Namespace, model: VisionTransformer) -> Resolutions | None:
    if args.min_res is None and args.max_res is None:
        return None
    default = default_resolutions(model.cfg.image_size, model.cfg.token_stride)
    low = default.min if args.min_res is None else args.min_res
    high = default.max if args.max_res is None else args.max_res
    try:
        return Resolutions(min=low, max=high)
    except ValidationError as exc:
        raise UserError(f"--min-res/--max-res: {_first_error(exc)}") from exc


def print_report(report: ExportReport) -> None:
    for line in report.summary_lines():
        print(line)  # noqa: T201 - CLI output


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a vitserve training checkpoint (.pt)")
    add_repository_args(parser)


def run(args: argparse.Namespace) -> int:
    from training.model_io import load_model

    model, labels, preprocess, _ = load_model(args.checkpoint)
    report = export_to_repository(
        model,
        repo=args.repo,
        name=args.name,
        version=args.version,
        labels=labels,
        preprocess=preprocess,
        resolutions=resolutions_from_args(args, model),
        fp16=args.fp16,
        int8=args.int8,
        source=f"vitserve checkpoint {args.checkpoint.resolve()}",
        force=args.force,
    )
    print_report(report)
    return 0
