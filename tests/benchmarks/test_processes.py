import os
import sys
import textwrap
import time

import httpx
import pytest

from benchmarks.processes import ServerStartError, free_port, paused, serving, session_members

# A "server" that forks a worker into its own process group (as Ray does) and answers HTTP.
SERVER = textwrap.dedent(
    """
    import http.server, os, subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], process_group=0)
    print("worker", worker.pid, flush=True)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_serving_waits_for_ready_and_ends_every_process_it_started(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with serving([sys.executable, "-c", SERVER, str(port)], f"http://127.0.0.1:{port}/", log) as proc:
        members = session_members(proc.pid)
        worker = int(log.read_text().split()[1])
        assert proc.pid in members and worker in members
        assert os.getpgid(worker) != os.getpgid(proc.pid)  # a group of its own: killpg would miss it
    assert not _alive(proc.pid)
    assert not _alive(worker)


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('bad model file'); sys.exit(3)"]
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(ServerStartError, match="bad model file"), serving(cmd, url, tmp_path / "log"):
        pass


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _stopped(pid: int) -> bool:
    """Whether `pid` is stopped, allowing a signal a moment to land."""
    deadline = time.monotonic() + 2.0
    while _state(pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    return _state(pid) == "T"


def test_paused_stops_every_process_of_the_server_and_resumes_them(tmp_path):
    # The worker spins, in a process group of its own: paused must stop it too, then let it go on.
    spinner = SERVER.replace('"import time; time.sleep(600)"', '"while True: pass"')
    port = free_port()
    log = tmp_path / "server.log"
    with serving([sys.executable, "-c", spinner, str(port)], f"http://127.0.0.1:{port}/", log) as proc:
        worker = int(log.read_text().split()[1])
        with paused(proc.pid):
            assert _stopped(proc.pid) and _stopped(worker)
            ticks = _cpu_ticks(worker)
            time.sleep(0.3)
            assert _cpu_ticks(worker) == ticks
        assert _state(proc.pid) != "T" and _state(worker) != "T"
        time.sleep(0.3)
        assert _cpu_ticks(worker) > ticks
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5, trust_env=False).status_code == 200


def test_paused_resumes_the_server_when_the_block_raises(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-c", SERVER, str(port)]
    with serving(cmd, f"http://127.0.0.1:{port}/", tmp_path / "log") as proc:
        with pytest.raises(RuntimeError), paused(proc.pid):
            raise RuntimeError("measurement failed")
        assert _state(proc.pid) != "T"
