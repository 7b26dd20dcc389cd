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

from bench import grpcwire, h2load, measure, procstat, report, run
from bench import summary as summary_mod

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"

SAMPLE_FIELDS = {"calls", "elapsed_s", "rate", "proxy_cpu_s", "us_per_call", "core_busy", "saturated", "rejected",
                 "round", "load"}
SUMMARY_FIELDS = {"us_per_call_median", "us_per_call_min", "us_per_call_max", "core_busy_min", "rate_median"}
PROXY_FIELDS = {"pid", "startup_s", "rss_idle_kib"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-smoke")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    files = sorted(out.glob("latest.json"))
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
        loads = {s["load"] for s in entry["rounds"]}
        assert loads == set(measure.LOADS), name
        for sample in entry["rounds"]:
            assert SAMPLE_FIELDS <= set(sample), (name, sample)
        expected_proxies = 0 if name == "direct" else entry["hops"]
        assert len(entry["proxies"]) == expected_proxies, name
        for proxy in entry["proxies"].values():
            assert PROXY_FIELDS <= set(proxy), name
        summary = results["summary"][name]
        for load in measure.LOADS:
            fields = SUMMARY_FIELDS if entry["hops"] else {"rate_median"}
            assert fields <= set(summary[load]), (name, load)
            if name in summary_mod.BASELINE and results["paths"][summary_mod.BASELINE[name]]["status"] == "ok":
                assert {"ratio_to_envoy_median", "ratio_to_envoy_min", "ratio_to_envoy_max"} <= set(summary[load])


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


def _sample(load: str, rnd: int, us: float, busy: float) -> dict[str, Any]:
    return {"load": load, "round": rnd, "us_per_call": us, "core_busy": busy, "rate": 1000.0, "rejected": 0,
            "saturated": busy >= 0.9}


def test_summary_takes_medians_and_ranges_and_pairs_ratios_by_round() -> None:
    ours = {"status": "ok", "hops": 2, "rounds": [_sample("unary_same", r, us, 0.95) for r, us in enumerate((50, 70, 60))]}
    envoy = {"status": "ok", "hops": 2, "rounds": [_sample("unary_same", r, us, b)
                                                   for r, (us, b) in enumerate(((100, 0.99), (100, 0.91), (50, 0.97)))]}
    s = summary_mod.summarise({"paths": {"kuberpc-pair": ours, "envoy-pair": envoy}})["kuberpc-pair"]["unary_same"]
    assert (s["us_per_call_median"], s["us_per_call_min"], s["us_per_call_max"]) == (60, 50, 70)
    assert s["ratio_to_envoy_median"] == 0.6
    assert (s["ratio_to_envoy_min"], s["ratio_to_envoy_max"]) == (0.5, 1.2)
    assert summary_mod.summarise({"paths": {"envoy-pair": envoy}})["envoy-pair"]["unary_same"]["core_busy_min"] == 0.91


def test_a_sample_under_the_busy_floor_is_taken_again_and_flagged_when_it_never_gets_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    busy = iter([0.5, 0.6, 0.95])

    def fake_run(load: str, target: Any, work: Any, settings: Any, calls: int) -> measure.Window:
        return measure.Window(calls, 1.0, next(busy) if calls != measure.FULL.probe_calls else 0.1)

    monkeypatch.setattr(measure, "_run_load", fake_run)
    monkeypatch.setattr(measure.procstat, "rss_kib", lambda pid: 0)
    proc = type("P", (), {"pid": 1, "name": "p"})()
    target = measure.Target(1, [proc])  # type: ignore[list-item]
    settings = measure.FULL
    kept = measure.saturation_sample("unary_same", target, Path("."), settings)
    assert (kept["core_busy"], kept["saturated"], kept["rejected"]) == (0.95, True, 2)
    busy = iter([0.5, 0.8, 0.7])
    kept = measure.saturation_sample("unary_same", target, Path("."), settings)
    assert (kept["core_busy"], kept["saturated"], kept["rejected"]) == (0.8, False, 3)
    assert kept["rejected_busy"] == [0.5, 0.8, 0.7]
