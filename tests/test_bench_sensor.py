"""The sensor benchmark runs every case on a tiny frame (rotating stages included) and reports each one."""

from __future__ import annotations

from pipeline.bench import sensor as bench

CASES = ["memcpy", "adc_kernel", "adc_numpy_baseline"] + [
    f"{kind}/{scheme}" for scheme in ("pixel", "quad", "plane")
    for kind in ("readout_static", "tables_static", "readout_rotating", "stage_static", "stage_rotating")]


def test_every_case_is_measured_on_a_small_frame():
    report = bench.run([(16, 24)], 1)
    (size,) = report["sizes"]
    rows = {r["name"]: r for r in size["results"]}
    assert set(CASES) <= set(rows), sorted(set(CASES) - set(rows))
    assert all(rows[name]["ms"] > 0 and rows[name]["frames_per_s"] > 0 for name in CASES)
    assert rows["memcpy"]["ratio_to_memcpy"] == 1.0
    assert size["adc_kernel_vs_numpy_baseline"] > 0 and report["machine"]["cpus"] >= 1
