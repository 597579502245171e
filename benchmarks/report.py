"""Results dict → Markdown: machine, peak, in-process limit, servers, and the issue's targets."""

from __future__ import annotations

from benchmarks.targets import evaluate, limit_decode_images_per_s


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def machine_section(meta: dict) -> list[str]:
    flags = ", ".join(meta.get("cpu_flags") or []) or "none of note"
    pkgs = ", ".join(f"{k} {v}" for k, v in (meta.get("packages") or {}).items() if v)
    return [
        "## Machine",
        "",
        f"- CPU: {meta.get('cpu_model')} ({meta.get('cores')} cores, {meta.get('threads_per_core')} thread(s)"
        f" per core, hypervisor: {meta.get('hypervisor') or 'none'}); features: {flags}",
        f"- Date: {meta.get('date')}; commit {meta.get('commit')}; Python {meta.get('python')}; {pkgs}",
        f"- Command: `{meta.get('command')}`",
    ]


def peak_section(peak: dict) -> list[str]:
    if not peak:
        return []
    n = peak["gemm_n"]
    rows = [
        [f"NumPy fp32 GEMM {n}³", f"{peak['numpy_fp32_flops'] / 1e9:.0f} GFLOP/s"],
        [f"ONNX Runtime fp32 MatMul {n}³", f"{peak['ort_fp32_flops'] / 1e9:.0f} GFLOP/s"],
        [f"ONNX Runtime int8 MatMulInteger {n}³", f"{peak['ort_int8_ops'] / 1e9:.0f} GOP/s"],
    ]
    return ["## The machine's matrix-multiply rate (peak)", "", *_table(["what", "rate"], rows)]


def _peak_for(peak: dict, variant: str) -> float | None:
    if not peak:
        return None
    if variant == "int8":
        return peak["ort_int8_ops"]
    if variant == "bf16":  # no bf16 GEMM rate is measured (OpenVINO's build runs in its own process)
        return None
    return max(peak["numpy_fp32_flops"], peak["ort_fp32_flops"])


def offline_section(results: dict) -> list[str]:
    rows = []
    for r in results["offline"]:
        peak = _peak_for(results["peak"], r["variant"])
        achieved = r["flops_per_image"] * r["images_per_s"]
        one, lanes = r["single_image"], r.get("lanes")
        lanes_cells = ["–", "–", "–"]
        if lanes:
            lanes_cells = [f"{lanes['lanes']} × {lanes['best_batch']}", _f(lanes["images_per_s"])]
            lanes_cells.append(_f(lanes["decode_images_per_s"]))
        rows.append([
            r["model"], r["variant"], "×".join(map(str, r["resolution"])), _f(r["flops_per_image"] / 1e9, 2),
            str(r["best_batch"]), _f(r["images_per_s"]), _f(100 * achieved / peak if peak else None),
            _f(r["decode_images_per_s"]), *lanes_cells, f"**{_f(limit_decode_images_per_s(r))}**",
            f"{_f(one['decode_ms'])} / {_f(one['infer_ms'])} / {_f(one['total_ms'])}",
            _f(100 * r["top1_agreement"]) + " %" if "top1_agreement" in r else "–",
        ])  # fmt: skip
    header = ["model", "variant", "resolution", "GFLOP/image", "best batch", "images/s (tensors)",
              "% of peak", "images/s (decode incl.)", "lanes × batch", "lanes: images/s (tensors)",
              "lanes: images/s (decode incl.)", "limit (decode incl.)", "1 image ms: decode / infer / total",
              "top-1 = fp32"]  # fmt: skip
    kind = results["offline"][0]["image_kind"] if results["offline"] else "?"
    return [
        "## The limit: ONNX Runtime in-process, no HTTP",
        "",
        f"Decode-included figures decode `{kind}` uploads with `server.preprocess.prepare` (the server's"
        " code) on a thread pool as wide as the machine, the next batch while one runs. % of peak:"
        " model FLOPs × images/s over the GEMM rate above (int8 against the int8 rate), for one"
        " session on every core."
        " Lanes: one session called from one thread per core at once, each thread decoding its own"
        " batch (how vitserve runs a busy model on a CPU): single-threaded on the CPU provider, one"
        " stream per lane on OpenVINO. The limit is the better of the two.",
        "",
        *_table(header, rows),
    ]


def _split_cell(split: dict, key: str, scale: float) -> str:
    mean = split.get(key, {}).get("mean")
    return _f(mean * scale if mean is not None else None, 2 if scale == 1 else 1)


def server_row(r: dict) -> list[str]:
    if "skipped" in r:
        return [r.get("label", r["server"]), r.get("point", ""), f"skipped: {r['skipped']}"] + [""] * 14
    lat, split, cores = r["latency"], r.get("split", {}), r.get("cores_used", {})
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
    resolution = r["query"].get("resolution", "native")
    load = r["point"] + (f" ({r['spec']['rate']:.1f}/s)" if r["spec"]["mode"] == "open" else "")
    return [
        r["label"], load, r["model"], r["variant"], resolution, r["image_kind"], _f(r["images_per_s"]),
        _f(lat["p50_ms"]), _f(lat["p90_ms"]), _f(lat["p99_ms"]), _f(lat["max_ms"]), errors,
        _split_cell(split, "batch_size", 1), _split_cell(split, "queue_wait_s", 1e3),
        _split_cell(split, "inference_s", 1e3),
        f"{_f(cores.get('server_cpu'))} / {_f(cores.get('client_cpu'))}",
        " / ".join(_f(x) for x in r["limit_around"]) if r.get("limit_around") else "–",
    ]  # fmt: skip


def servers_section(results: dict) -> list[str]:
    header = ["server", "load", "model", "variant", "resolution", "input", "images/s", "p50 ms", "p90 ms",
              "p99 ms", "max ms", "non-200", "mean batch", "queue wait ms", "inference ms/batch",
              "cores: server / client", "limit before / after"]  # fmt: skip
    return [
        "## Servers, same model file, same images, same machine",
        "",
        "Closed loop `c=N`: N requests in flight, one image each (multipart upload). Open loop: Poisson"
        " arrivals at a multiple of the server's own `c=32` throughput. Batch and time split from the"
        " server's `/metrics` (vitserve only), over the measured window. Cores: CPU time of the server's"
        " processes and of the load generator over the window's wall time (the client shares the machine)."
        " Limit before / after: the decode-included limit (images/s) measured in-process just before and"
        " just after a saturation run, the server's processes stopped meanwhile (SIGSTOP: an idle"
        " server is not always idle); the throughput targets use their mean.",
        "",
        *_table(header, [server_row(r) for r in results["servers"]]),
    ]


def paired_section(results: dict) -> list[str]:
    rows = [
        [r["label"], r["model"], r["variant"], r["image_kind"], f"{r['blocks']} × {r['block_size']}",
         _f(r["in_process_p50_ms"]), _f(r["server_p50_ms"]), _f(r["gap_p50_ms"], 2),
         " to ".join(_f(g, 1) for g in r["gap_range_ms"]) if r["gap_range_ms"] else "–",
         _overhead(r), ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"]
        for r in results.get("paired", [])
    ]  # fmt: skip
    if not rows:
        return []
    header = ["server", "model", "variant", "input", "blocks × calls", "in-process p50 ms",
              "server p50 ms", "gap ms (median of blocks)", "gap range ms",
              "overhead outside decode + inference ms: median (quartiles), blocks", "non-200"]  # fmt: skip
    return [
        "## Concurrency 1 against the in-process floor, paired",
        "",
        "One client alternates blocks: one image decoded and run in this process (the floor), then one"
        " request to the server, block after block; each block's first call is dropped. The gap is the"
        " median over blocks of (server block median − in-process block median), so the host's drift"
        " between blocks cancels. Overhead outside decode + inference: each server block's mean latency"
        " minus the decoding and inference time the server measured itself for those requests (its"
        " `/metrics`, read before and after the block; the dropped call included), median over the blocks"
        " where the counts added up: the inference time's swing between blocks cancels out of it, and so"
        " does any difference between the server's decoding and inference and the in-process ones.",
        "",
        *_table(header, rows),
    ]


def _overhead(row: dict) -> str:
    """The server-side overhead cell; "–" for a server without vitserve's histograms."""
    median, quartiles = row.get("overhead_p50_ms"), row.get("overhead_quartiles_ms")
    if median is None:
        return "–"
    spread = f" ({quartiles[0]:.2f} to {quartiles[1]:.2f})" if quartiles else ""
    return f"{median:.2f}{spread}, {row.get('overhead_blocks', '?')} of {row['blocks']}"


def start_up_section(results: dict) -> list[str]:
    rows = [
        [r["label"], r["model"], r["variant"], f"**{r['max_batch_size']}** ({r['source']})",
         str(r["lanes"]), ", ".join(f"{b}: {ms:.3g}" for b, ms in r["ms_per_image"].items()) or "–"]
        for r in results.get("start_up", [])
    ]  # fmt: skip
    if not rows:
        return []
    header = ["server", "model", "variant", "max batch size", "lanes", "ms per image by batch size"]
    return [
        "## vitserve's start-up batch sizes",
        "",
        "What each vitserve server chose for its model when it started (`GET /models/{name}`): tuned"
        " means its own sweep of ONNX Runtime at the native resolution chose the smallest batch size"
        " within 5% of the fastest time per image (`server.tuning`); configured means a setting fixed it.",
        "",
        *_table(header, rows),
    ]


def targets_section(results: dict) -> list[str]:
    rows = [[t["target"], t["figure"], t["verdict"]] for t in evaluate(results)]
    return ["## Targets (issue 6)", "", *_table(["target", "figures", "verdict"], rows)]


def markdown(results: dict) -> str:
    parts = [
        machine_section(results["meta"]),
        peak_section(results["peak"]),
        offline_section(results),
        servers_section(results),
        start_up_section(results),
        paired_section(results),
        targets_section(results),
    ]
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"
