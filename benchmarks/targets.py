"""The issue's targets, judged from one run's results; a target whose rows are missing is "not measured"."""

from __future__ import annotations

from benchmarks.latency import REFUSED

CONTENDERS = ("naive-torch", "litserve", "rayserve")
# The rows the throughput, latency and overload targets judge, with the variant each runs: the
# defaults and the recommended settings as `make serve` and the default image install them on x86-64
# (ONNX Runtime's OpenVINO build), then the same two on the CPU build (fp32).
THROUGHPUT_ROWS = (
    ("vitserve-openvino", "defaults (OpenVINO build, bf16)", "bf16"),
    ("vitserve-openvino-tuned", "recommended (OpenVINO build, bf16)", "bf16"),
    ("vitserve", "CPU build, defaults", "fp32"),
    ("vitserve-tuned", "CPU build, recommended", "fp32"),
)


def _server_row(results: dict, server: str, point: str, variant: str = "fp32") -> dict | None:
    """The row for a server at a load point, on the main model, main input, native resolution."""
    model = results["meta"].get("model")
    for r in results["servers"]:
        if "skipped" in r or r["server"] != server or r["point"] != point or r["variant"] != variant:
            continue
        if r["query"].get("resolution") or r["image_kind"] != results["meta"].get("main_kind"):
            continue
        if model is None or r["model"] == model:
            return r
    return None


def _limit(results: dict, variant: str = "fp32") -> dict | None:
    meta = results["meta"]
    for r in results["offline"]:
        if (
            r["model"] == meta.get("model")
            and r["variant"] == variant
            and r["resolution"] == meta.get("native")
        ):
            return r
    return None


def limit_decode_images_per_s(row: dict) -> float:
    """The decode-included limit: the better of one session on every core and lanes (if measured)."""
    return max(row["decode_images_per_s"], row.get("lanes", {}).get("decode_images_per_s", 0.0))


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**missed**")


def _near_limit(row: dict) -> float | None:
    """The decode-included limit measured just before and after this row's run (their mean)."""
    around = [x for x in row.get("limit_around") or () if x]
    return sum(around) / len(around) if around else None


def _share(row: dict) -> float | None:
    """The row's images/s over the fp32 limit measured around it: every server on one scale (bf16's
    row has its own limit, `limit_around`, and the fp32 one beside it, `fp32_limit_around`)."""
    scale = row.get("fp32_limit_around") if row.get("variant", "fp32") != "fp32" else row.get("limit_around")
    near = _near_limit({"limit_around": scale})
    return row["images_per_s"] / near if near else None


def throughput_targets(results: dict, sat: str) -> list[dict]:
    """Saturated throughput against the limit and against the best contender. Where the limit was
    measured around each run (`limit_around`), the ratios use it: each server's share of the limit
    at the time it ran, so the host's drift between runs minutes apart cancels."""
    contenders = [(c, _server_row(results, c, sat)) for c in CONTENDERS]
    contenders = [(c, r) for c, r in contenders if r]
    shared = all(_share(r) for _, r in contenders)
    rank = (lambda cr: _share(cr[1])) if shared else (lambda cr: cr[1]["images_per_s"])
    best = max(contenders, key=rank, default=None)
    out = []
    for key, label, variant in THROUGHPUT_ROWS:
        row, limit = _server_row(results, key, sat, variant), _limit(results, variant)
        if row is None:
            continue
        ips, near = row["images_per_s"], _near_limit(row)
        own = label if variant == "fp32" else f"{label}, against its own ({variant}) limit"
        if near:
            low, high = sorted(row["limit_around"])
            fig = (
                f"{ips:.1f} vs limit {near:.1f} images/s measured around the run ({low:.1f}-{high:.1f})"
                f" = {ips / near:.0%}"
            )
            if limit:
                fig += (
                    f"; the offline section's limit, minutes earlier: {limit_decode_images_per_s(limit):.1f}"
                )
            out.append({"target": f"{own}: saturated ≥ 90% of decode-included limit", "figure": fig,
                        "verdict": _verdict(ips / near >= 0.9)})  # fmt: skip
        elif limit:
            best_limit = limit_decode_images_per_s(limit)
            fig = f"{ips:.1f} vs limit {best_limit:.1f} images/s = {ips / best_limit:.0%}"
            out.append({"target": f"{own}: saturated ≥ 90% of decode-included limit", "figure": fig,
                        "verdict": _verdict(ips / best_limit >= 0.9)})  # fmt: skip
        if best is None:
            continue
        name, other = best
        raw = ips / other["images_per_s"]
        fig = f"{ips:.1f} vs {name} {other['images_per_s']:.1f} images/s = {raw:.2f}×"
        ratio = raw
        if shared and _share(row):
            ratio = _share(row) / _share(other)
            mine, theirs = _share(row), _share(other)
            fig += f"; as shares of the fp32 limit measured around each run: {mine:.0%} vs {theirs:.0%}"
            fig += f" = {ratio:.2f}×"
        out.append({"target": f"{label}: ≥ 1.3× best contender", "figure": fig,
                    "verdict": _verdict(ratio >= 1.3)})  # fmt: skip
    return out


def _paired_row(results: dict, server: str, variant: str = "fp32") -> dict | None:
    model = results["meta"].get("model")
    for r in results.get("paired", []):
        if r["server"] == server and r["variant"] == variant and (model is None or r["model"] == model):
            return r
    return None


def _overhead_note(pair: dict) -> str:
    overhead = pair.get("overhead_p50_ms")
    if overhead is None:
        return ""
    return (
        f"; overhead outside decode + inference (the server's own /metrics) {overhead:+.2f} ms,"
        f" {pair.get('overhead_blocks', '?')} of {pair['blocks']} blocks"
    )


def latency_targets(results: dict) -> list[dict]:
    """c=1 p50 against the in-process floor + 2 ms: judged on the paired measurement when there is
    one (server and in-process in alternating blocks, so the host's drift cancels), and then also on
    the server-side overhead it measured, when the server publishes it; else on the c=1 row against
    the offline single-image time."""
    http = _server_row(results, "http-floor", "c=1", variant="–")
    http_note = ""
    if http and http["latency"]["p50_ms"] is not None:
        http_note = f" (HTTP alone, no model: p50 {http['latency']['p50_ms']:.1f} ms)"
    floor = _paired_row(results, "model-floor")
    if floor and floor.get("overhead_p50_ms") is not None:
        http_note += (
            f"; a bare server decoding and running the same model on a thread and answering a constant:"
            f" overhead {floor['overhead_p50_ms']:.2f} ms"
        )
    out = []
    for key, label, variant in THROUGHPUT_ROWS:
        target = f"{label}: c=1 p50 ≤ in-process + 2 ms"
        pair, limit = _paired_row(results, key, variant), _limit(results, variant)
        if pair and pair["gap_p50_ms"] is not None:
            low, high = pair["gap_range_ms"]
            fig = (
                f"paired, {pair['blocks']} blocks: server p50 {pair['server_p50_ms']:.1f} ms vs in-process"
                f" {pair['in_process_p50_ms']:.1f} ms; gap median {pair['gap_p50_ms']:+.1f} ms"
                f" (blocks {low:+.1f} to {high:+.1f}){_overhead_note(pair)}{http_note}"
            )
            # Both must be within 2 ms: the gap is good to about 1.5 ms, and the overhead outside decode
            # + inference, where measured, to about 0.1 but blind to a slower decode or inference in
            # the server. A gap under 2 ms by noise alone is not a met target.
            overhead = pair.get("overhead_p50_ms")
            met = pair["gap_p50_ms"] <= 2.0 and (overhead is None or overhead <= 2.0)
            out.append({"target": target, "figure": fig, "verdict": _verdict(met)})
            continue
        row = _server_row(results, key, "c=1", variant)
        if not (row and limit and row["latency"]["p50_ms"] is not None):
            continue
        floor = limit["single_image"]["total_ms"]
        p50 = row["latency"]["p50_ms"]
        fig = f"p50 {p50:.1f} ms vs in-process {floor:.1f} ms + 2 ms, measured minutes apart{http_note}"
        out.append({"target": target, "figure": fig, "verdict": _verdict(p50 <= floor + 2.0)})
    return out


def overload_targets(results: dict, sat: str) -> list[dict]:
    out = []
    for key, label, variant in THROUGHPUT_ROWS:
        base, over = _server_row(results, key, sat, variant), _server_row(results, key, "open 2x", variant)
        if not (base and over and over["latency"]["p99_ms"] is not None):
            continue
        p99, p99_sat = over["latency"]["p99_ms"], base["latency"]["p99_ms"]
        refused = over["refused_latency"]["max_ms"]
        # 503 and 504 are answers; anything else (timeouts, resets, other codes) is a failure.
        failures = {k: v for k, v in over["errors"].items() if k not in (REFUSED, "504")}
        ok = p99 <= 2 * p99_sat and (refused is None or refused < 50.0) and not failures
        slowest = f"{refused:.1f} ms" if refused is not None else "–"
        fig = (
            f"accepted p99 {p99:.0f} ms vs 2 × {p99_sat:.0f} ms; 503s: {over['errors'].get(REFUSED, 0)},"
            f" slowest {slowest}; 504s: {over['errors'].get('504', 0)}; failures: {failures or 'none'}"
        )
        out.append({"target": f"{label}: at 2× saturation rate", "figure": fig, "verdict": _verdict(ok)})
    return out


def int8_targets(results: dict) -> list[dict]:
    rows = [r for r in results["offline"] if r["variant"] == "int8"]
    if not rows:
        return [
            {"target": "int8 and fp32 both reported", "figure": "no int8 rows", "verdict": _verdict(None)}
        ]
    figs = "; ".join(
        f"{r['model']} {'×'.join(map(str, r['resolution']))}: top-1 = fp32 on {r['top1_agreement']:.0%}"
        for r in rows
    )
    bf16 = [r for r in results["offline"] if r["variant"] == "bf16"]
    figs += "".join(f"; OpenVINO bf16: top-1 = fp32 on {r['top1_agreement']:.0%}" for r in bf16)
    vitserve = [r for r in results["servers"] if r["server"].startswith("vitserve") and "skipped" not in r]
    served = any(r["variant"] == "int8" for r in vitserve) if vitserve else None
    if served is False:
        figs += "; vitserve was not measured with the int8 graph"
    return [{"target": "int8 (VNNI) and fp32 both reported, with top-1 agreement", "figure": figs,
             "verdict": _verdict(served)}]  # fmt: skip


def evaluate(results: dict) -> list[dict]:
    """Every target with its figures and verdict, in the issue's order."""
    sat = f"c={results['meta'].get('saturation', 32)}"
    return (
        throughput_targets(results, sat)
        + latency_targets(results)
        + overload_targets(results, sat)
        + int8_targets(results)
    )
