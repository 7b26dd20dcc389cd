"""The benchmark harness (bench/, issue #4): a smoke run end to end, and its pure parsing and formatting.

Asserts that the harness works and reports every path and field; it asserts no performance figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import grpcwire, h2load, procstat, report, run

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"

PATH_FIELDS = {
    "saturation": {"calls", "rps", "elapsed_s", "response_bytes", "proxy_cpu_s", "cpu_us_per_call"},
    "rate": {"target_rps", "calls", "p50_us", "p99_us", "mean_us"},
    "pingpong": {"calls", "p50_us", "p99_us", "mean_us"},
    "stream": {"messages", "elapsed_s", "msgs_per_s", "cpu_us_per_msg"},
}
PROXY_FIELDS = {"pid", "startup_s", "rss_idle_kib", "rss_load_kib"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-smoke")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, f"no results JSON; stderr:\n{done.stderr[-3000:]}"
    return done, json.loads(files[0].read_text()), out


def test_smoke_run_measures_every_path_or_skips_it_for_a_missing_tool(smoke: Any) -> None:
    done, results, _ = smoke
    assert set(results["paths"]) == set(run.PATHS)
    failed = {name: e.get("reason") for name, e in results["paths"].items() if e["status"] == "failed"}
    assert not failed, f"paths failed: {json.dumps(failed, indent=1)}"
    assert done.returncode == 0, done.stderr[-3000:]


def test_smoke_run_skips_no_path_in_ci(smoke: Any) -> None:
    _, results, _ = smoke
    skipped = {name: e["reason"] for name, e in results["paths"].items() if e["status"] == "skipped"}
    if not IN_CI:
        pytest.skip(f"outside CI a missing tool may skip a path (skipped here: {skipped or 'none'})")
    assert not skipped


def test_every_measured_path_reports_every_figure_and_a_verified_grpc_status(smoke: Any) -> None:
    _, results, _ = smoke
    measured = {name: e for name, e in results["paths"].items() if e["status"] == "ok"}
    if not measured:
        pytest.skip("no path could be measured on this machine (h2load or nginx missing)")
    for name, entry in measured.items():
        assert entry["verified"] == {"Add": "OK", "Accumulate": "OK"}, name
        for section, fields in PATH_FIELDS.items():
            assert fields <= set(entry[section]), (name, section)
        assert entry["saturation"]["response_bytes"] == entry["saturation"]["calls"] * 7, name
        expected_proxies = 0 if name == "direct" else entry["hops"]
        assert len(entry["proxies"]) == expected_proxies, name
        for proxy in entry["proxies"].values():
            assert PROXY_FIELDS <= set(proxy), name


def test_smoke_run_writes_a_markdown_table_with_a_column_per_path(smoke: Any) -> None:
    _, results, out = smoke
    table = (out / "latest.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| figure |"))
    assert [c.strip() for c in header.strip("|").split("|")[1:]] == [c for c in report.COLUMNS if c in results["paths"]]


H2LOAD_OUTPUT = """\
finished in 2.43s, 82380.94 req/s, 13.12MB/s
requests: 200000 total, 200000 started, 200000 done, 199998 succeeded, 2 failed, 0 errored, 0 timeout
status codes: 199998 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 31.85MB (33400170) total, 20.60MB (21600000) headers (space savings 40.00%), 1.34MB (1399986) data
"""


def test_h2load_summary_is_parsed_into_counts_and_rate() -> None:
    r = h2load.parse(H2LOAD_OUTPUT)
    assert (r.total, r.succeeded, r.failed, r.status_2xx, r.data_bytes) == (200000, 199998, 2, 199998, 1399986)
    assert (r.elapsed_s, r.rps) == (2.43, 82380.94)


def test_h2load_check_rejects_a_run_with_failed_calls_or_missing_reply_bytes() -> None:
    with pytest.raises(h2load.LoadCheckError, match="2 failed"):
        h2load.check(h2load.parse(H2LOAD_OUTPUT), 200000, 7)


def test_h2load_check_accepts_a_run_where_every_call_returned_one_reply() -> None:
    complete = H2LOAD_OUTPUT.replace("199998", "200000").replace("2 failed", "0 failed").replace("1399986", "1400000")
    h2load.check(h2load.parse(complete), 200000, 7)


def test_nearest_rank_percentile_picks_a_measured_value() -> None:
    values = list(range(1, 101))
    assert (h2load.percentile(values, 50), h2load.percentile(values, 99), h2load.percentile([7], 99)) == (50, 99, 7)


@pytest.mark.parametrize(("a", "b"), [(1, 2), (0, 0), (-5, 2**40), (2**63 - 1, -(2**63))])
def test_args_encoding_round_trips_through_protobuf_varints(a: int, b: int) -> None:
    assert grpcwire.decode_args(grpcwire.encode_args(a, b)) == (a, b)


def test_reply_for_add_1_2_is_the_seven_bytes_the_backend_serves() -> None:
    assert grpcwire.frame(grpcwire.encode_reply(3)) == b"\x00\x00\x00\x00\x02\x08\x03"


def test_proc_stat_fields_are_counted_after_a_command_name_with_spaces_and_parens() -> None:
    line = "42 (a (b) c) S 7 42 42 0 -1 4194560 1 0 0 0 150 25 0 0 20 0 1 0 100 1000 50"
    assert procstat.parse_stat(line) == (7, 150, 25)


def test_ratio_cells_compare_each_path_with_its_envoy_counterpart() -> None:
    def path(rps: float, hops: int) -> dict[str, Any]:
        return {"status": "ok", "hops": hops, "saturation": {"rps": rps}}

    results = {"paths": {"kuberpc-pair": path(500, 2), "envoy-pair": path(1000, 2)}}
    line = next(row for row in report.table(results).splitlines() if row.startswith("| saturation"))
    assert "500 (0.50\u00d7)" in line
