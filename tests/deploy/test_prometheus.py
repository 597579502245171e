"""docker/prometheus: promtool checks and rule unit tests, then a real Prometheus scraping a loaded server.

Prometheus and promtool are Debian's `prometheus` package (`.ci/run` installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import free_port, png, stop
from tests.deploy.dashboard import dashboard_queries, substitute

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "docker" / "prometheus"
REQUESTS = 48
# Panels that must show data once the server has had some traffic (GPU ones need a GPU; rejections
# need trouble).
MUST_HAVE_DATA = {
    "Inference requests/s", "Error ratio (5xx)", "p99 latency", "In flight", "Images/s",
    "Requests/s by status", "Latency p50 / p95 / p99", "Queue wait vs preprocessing vs inference (p95)",
    "Batch-size distribution", "Mean batch size", "Queue depth", "Model versions", "Versions not ready",
}  # fmt: skip


def tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package `prometheus`; .ci/run installs it)")
    return found


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    result = promtool("test", "rules", "tests/rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """Guards the test above: with the error-ratio objective moved to 3%, the rule tests must fail."""
    (tmp_path / "tests").mkdir()
    shutil.copy(PROM_DIR / "tests" / "rules_test.yml", tmp_path / "tests")
    rules = (PROM_DIR / "rules.yml").read_text()
    assert "ratio_rate5m > 0.01" in rules
    (tmp_path / "rules.yml").write_text(rules.replace("ratio_rate5m > 0.01", "ratio_rate5m > 0.03"))
    result = promtool("test", "rules", "tests/rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "VitserveHighErrorRatio" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    groups = yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    assert {"VitserveDown", "VitserveHighErrorRatio", "VitserveLatencyP99AboveObjective"} <= alerts
    assert "VitserveQueueNearCapacity" in alerts
    cases = [
        case
        for test in yaml.safe_load((PROM_DIR / "tests" / "rules_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == alerts and silent == alerts


# --- a real Prometheus -----------------------------------------------------------------------------


def loopback_config(server: str, prometheus_port: int, tmp_path: Path) -> Path:
    """The repository's prometheus.yml with its discovery replaced by the loopback server, 1 s intervals."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        job["scrape_timeout"] = "1s"
        if job["job_name"] == "vitserve":
            assert "dns_sd_configs" in job
            del job["dns_sd_configs"]
            job["static_configs"] = [{"targets": [server.removeprefix("http://")]}]
        else:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
    shutil.copy(PROM_DIR / "rules.yml", tmp_path / "rules.yml")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prometheus(live_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = loopback_config(live_server, port, work)
    command = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    log = work / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 30, log)
        yield url
    finally:
        stop(process)


def eventually(check, timeout_s: float, log: Path | None = None) -> Any:
    """Retries `check` (exceptions count as not yet) until it returns something truthy."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.TransportError, AssertionError, KeyError, IndexError) as exc:
            last = exc
        time.sleep(0.5)
    pytest.fail(f"not true after {timeout_s} s (last error: {last!r})\n{log.read_text() if log else ''}")


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


@pytest.fixture(scope="module")
def loaded(live_server: str, prometheus: str) -> str:
    """Prometheus after it has scraped the server before and after a burst of concurrent requests."""
    eventually(lambda: query(prometheus, 'up{job="vitserve"} == 1'), 20)

    def classify(i: int) -> str:
        files = [("image", (f"{i}-{j}.png", png(32, i + j), "image/png")) for j in range(1 + i % 3)]
        response = httpx.post(f"{live_server}/classify", files=files, timeout=30)
        return "ok" if response.status_code == 200 else f"{response.status_code} {response.text}"

    def scraped(requests: int) -> None:
        total = f'sum(vitserve_requests_total{{endpoint="/classify", status="200"}}) >= {requests}'
        eventually(lambda: query(prometheus, total), 20)

    # rate() needs the counter seen before the burst too: a series born at its final value has rate 0.
    assert classify(0) == "ok"
    scraped(1)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(classify, range(1, REQUESTS)))
    assert [a for a in answers if a != "ok"] == []
    scraped(REQUESTS)
    return prometheus


def test_target_is_up(loaded: str, live_server: str) -> None:
    targets = httpx.get(f"{loaded}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    (target,) = [t for t in targets if t["labels"]["job"] == "vitserve"]
    assert target["health"] == "up", target
    assert target["scrapeUrl"] == f"{live_server}/metrics"


@pytest.mark.parametrize(
    "expr",
    [
        'vitserve_request_duration_seconds_bucket{endpoint="/classify", model="tiny"}',
        'vitserve_batch_size_bucket{model="tiny"}',
        'vitserve_requests_total{endpoint="/classify", status="200", model="tiny"}',
        'vitserve_queue_wait_seconds_count{model="tiny"}',
        'vitserve_inference_seconds_count{model="tiny"}',
        'vitserve_model_state{model="tiny", state="ready"} == 1',
    ],
)
def test_series_exist(loaded: str, expr: str) -> None:
    assert query(loaded, expr), f"no series for {expr}"


def test_every_image_ran_in_exactly_one_batch(loaded: str) -> None:
    images = sum(1 + i % 3 for i in range(REQUESTS))
    (batched,) = query(loaded, 'sum(vitserve_batch_size_sum{model="tiny"})')
    (counted,) = query(loaded, 'sum(vitserve_images_total{model="tiny"})')
    assert float(batched["value"][1]) == float(counted["value"][1]) == images


def test_rules_load_and_evaluate_cleanly(loaded: str) -> None:
    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{loaded}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)
        return rules

    rules = eventually(evaluated, 20)
    assert [r for r in rules if r["health"] != "ok"] == []
    raised = {r["name"]: r for r in rules if r["type"] == "alerting" and r["state"] != "inactive"}
    # The repository's tiny-corrupt entry really fails to load: exactly that alert is raised, for it.
    assert set(raised) == {"VitserveModelFailed"}
    assert [a["labels"]["model"] for a in raised["VitserveModelFailed"]["alerts"]] == ["tiny-corrupt"]
    # Recording rules run every second: the first evaluation after the last scrape has the burst.
    rate = 'vitserve:inference_requests:rate5m{model="tiny", status="200"} > 0'
    eventually(lambda: query(loaded, rate), 10)
    assert query(loaded, 'vitserve:inference_errors:ratio_rate5m{model="tiny"} == 0')


def test_every_dashboard_query_runs(loaded: str) -> None:
    empty = []
    for title, expr in dashboard_queries():
        result = query(loaded, substitute(expr))
        if title in MUST_HAVE_DATA and not result:
            empty.append(f"{title}: {expr}")
    assert empty == []
