"""`stepfleet soak` end to end, short: a real fleet under Poisson load, a worker killed, the restarted
one stopped (SIGSTOP), then the verdict. The 10-minute version is `make soak`; the verdict's rules
are tested in tests/operator/test_local_soak_rules.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stepfleet.operator.local.soak import rss_mb


@pytest.mark.slow  # about 70 s on two quiet cores: two model loads at the start, two restarts
def test_a_short_soak_with_both_faults_loses_nothing_and_leaks_nothing(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "stepfleet.cli", "soak", "--model", "tiny-sd", "--duration-s", "40",
           "--capacity-s", "8", "--steps", "8", "--sample-s", "1", "--deadline-s", "15", "--kill-at", "0.15",
           "--stop-at", "0.55", "--drain-timeout-s", "30", "--state-dir", str(tmp_path / "fleet"),
           "--json", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text())
    failed = {k: c["detail"] for k, c in report["criteria"].items() if not c["pass"]}
    assert done.returncode == (0 if report["pass"] else 1)
    assert done.returncode == 0, f"{failed}\n{done.stderr[-4000:]}"

    load = report["load"]
    assert report["capacity"]["rps"] > 0 and load["requests"] > 0.5 * report["target_rps"] * 40
    assert load["lost"] == 0 and load["outcomes"]["late"] == 0 and load["outcomes"]["ok"] > 0
    assert sum(sum(v for k, v in b.items() if k != "from_s") for b in load["timeline"]) == load["requests"]

    kill, stop = report["faults"]
    assert (kill["kind"], stop["kind"]) == ("kill", "stop")
    assert kill["recovered"] and kill["new_pid"] not in (None, kill["pid"])
    # The stopped worker was the restarted one, found hung by the fleet and replaced.
    assert stop["worker"] == kill["worker"] and stop["pid"] == kill["new_pid"]
    assert stop["recovered"] and stop["found_hung_after_s"] is not None and stop["new_pid"] != stop["pid"]
    for pid in (kill["pid"], stop["pid"]):
        assert rss_mb(pid) is None  # gone, not left stopped

    processes = {r["process"] for r in report["rss"]}
    assert "router" in processes and {"cpu-1", "cpu-2"} <= processes
    assert all(r["flat"] for r in report["rss"] if r["judged"])
    assert report["leaks"]["router"] == {"stepfleet_router_inflight_requests": 0.0}
    workers = {k: v for k, v in report["leaks"].items() if k != "router"}
    assert set(workers) == {"cpu-1", "cpu-2"}
    assert all(v == 0 for counters in workers.values() for v in counters.values())
    assert "soak passed" in done.stderr
