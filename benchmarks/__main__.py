"""``python -m benchmarks``: run the suite; ``... load URL``: load-test one server; ``... report FILE``.

Examples::

    python -m benchmarks --quick                    # seconds: tiny model, a handful of requests
    python -m benchmarks --update-results           # the full suite; rewrites the table in RESULTS.md
    python -m benchmarks --sections offline,vitserve
    python -m benchmarks load 'http://127.0.0.1:8000/classify?top_k=1' --concurrency 32 --seconds 20
    python -m benchmarks report benchmarks/results/<run>/results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _suite_parser() -> argparse.ArgumentParser:
    from benchmarks.plan import SECTIONS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the benchmark suite.")
    p.add_argument("--quick", action="store_true", help="tiny model, a few requests: seconds (CI)")
    p.add_argument("--gpu", action="store_true", help="vitserve end to end on CUDA (see gpu.sh)")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<UTC time>)")
    p.add_argument("--work", type=Path, default=HERE / "results" / "models",
                   help="where benchmark models are built and reused (default: %(default)s)")  # fmt: skip
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--no-install", action="store_true", help="never build contender venvs (skip instead)")
    p.add_argument("--install", action="store_true", help="build contender venvs even with --quick")
    p.add_argument("--point-seconds", type=float, help="time limit of each load point")
    p.add_argument("--update-results", action="store_true", help=f"rewrite the table in {RESULTS_MD.name}")
    return p


def _plan(args: argparse.Namespace):
    from benchmarks.plan import SECTIONS, full_plan, gpu_plan, quick_plan

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    suffix = "-quick" if args.quick else "-gpu" if args.gpu else ""
    out = args.out or HERE / "results" / (stamp + suffix)
    plan = (quick_plan if args.quick else gpu_plan if args.gpu else full_plan)(out, args.work)
    if args.sections:
        chosen = tuple(s.strip() for s in args.sections.split(","))
        unknown = set(chosen) - set(SECTIONS)
        if unknown:
            raise SystemExit(
                f"unknown sections: {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}"
            )
        plan = replace(plan, sections=chosen)
    if args.no_install or args.install:
        plan = replace(plan, install=args.install and not args.no_install)
    if args.point_seconds:
        plan = replace(plan, point_seconds=args.point_seconds)
    return plan


def update_results_md(markdown: str, path: Path = RESULTS_MD) -> None:
    """Replace the generated block of RESULTS.md (between the markers), keeping the notes around it."""
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{markdown}{END}{tail}", encoding="utf-8")


def run_suite(argv: list[str]) -> int:
    from benchmarks.report import markdown
    from benchmarks.suite import Suite

    args = _suite_parser().parse_args(argv)
    plan = _plan(args)
    suite = Suite(plan)
    suite.results["meta"]["command"] = shlex.join(["python", "-m", "benchmarks", *argv])
    results = suite.run()
    text = markdown(results)
    (plan.out_dir / "results.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"raw results: {plan.out_dir / 'results.json'}")
    if args.update_results and plan.quick:
        print(f"not updating {RESULTS_MD.name}: quick-mode figures are a smoke test, not results")
    elif args.update_results:
        update_results_md(text)
        print(f"updated {RESULTS_MD}")
    return 0


def run_load(argv: list[str]) -> int:
    from benchmarks.images import KINDS, image_set
    from benchmarks.loadgen import LoadSpec, multipart, run_load_sync

    p = argparse.ArgumentParser(prog="python -m benchmarks load", description="Load-test one server.")
    p.add_argument("url", help="full /classify URL on a loopback address")
    p.add_argument("--image-kind", default="jpeg-640x480", choices=sorted(KINDS))
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second (instead of closed)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    images = image_set(args.image_kind, 16)
    n = args.images_per_request
    payloads = [multipart([images[(i + j) % len(images)] for j in range(n)]) for i in range(len(images))]
    mode = "open" if args.rate else "closed"
    spec = LoadSpec(mode, concurrency=args.concurrency, rate=args.rate or 0.0, max_requests=args.requests,
                    max_seconds=args.seconds, timeout_s=args.timeout)  # fmt: skip
    print(json.dumps(run_load_sync(args.url, payloads, spec), indent=1))
    return 0


def run_report(argv: list[str]) -> int:
    from benchmarks.report import markdown

    p = argparse.ArgumentParser(prog="python -m benchmarks report", description="Render results.json.")
    p.add_argument("results", type=Path)
    p.add_argument("--update-results", action="store_true")
    args = p.parse_args(argv)
    text = markdown(json.loads(args.results.read_text(encoding="utf-8")))
    print(text)
    if args.update_results:
        update_results_md(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    commands = {"load": run_load, "report": run_report}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return run_suite(argv)


if __name__ == "__main__":
    sys.exit(main())
