"""``privcam bench pipeline`` on its smallest case: every measurement is there, the pipeline's predictions
equal the serial ones, and the RSS runs report a peak (no timing is asserted)."""

from __future__ import annotations

from pipeline.bench.pipeline import main, per_round_ratio, rotated


def test_bench_pipeline_small_case_reports_every_measurement(tmp_path):
    out = tmp_path / "pipeline.json"
    result = main(["--cases", "28-pixel-compact", "--rotation", "rotating", "--frames", "64", "--rounds", "1",
                   "--rss-frames", "32", "--json", str(out)])
    (row,) = result["cases"]
    assert row["case"] == "28-pixel-compact" and row["rotation"] is True and row["frames"] == 64
    for key in ("sensor_alone", "model_alone", "serial", "pipeline"):
        assert row[f"{key}_frames_per_s"] > 0
    assert row["predictions_equal_serial"] is True
    assert row["pipeline_vs_serial_per_round_median"] > 0
    assert row["threads"]["source"] == "auto" and row["threads"]["mode"] in ("split", "overlap", "serial")
    if row["threads"]["mode"] != "split" and "workqueue" not in (row["threads"].get("note") or ""):
        # overlap or serial: the faster in auto's trial of both (never tried under workqueue)
        trial = row["threads"]["trial_frames_per_s"]
        assert (row["threads"]["mode"] == "overlap") == (trial["overlap"] >= trial["serial"])
    if "pipeline_split" in row:
        assert row["pipeline_split"]["threads"]["mode"] == "split"
    others = {"split", "serial", "turns", "overlap"} - {row["threads"]["mode"]}  # each mode auto turned down
    if row["threads"]["cores"] < 2:
        others.discard("split")  # no split of one core
    for mode in others:
        assert row[f"pipeline_{mode}"]["threads"]["mode"] == mode and row[f"pipeline_{mode}"]["frames_per_s"] > 0
        assert row[f"pipeline_{mode}"]["vs_serial_per_round_median"] > 0
    assert row["pipeline_turns"]["predictions_equal_serial"] is True  # every core for the model, as serially
    rss = row["peak_rss"]
    assert rss["32_frames"]["frames"] == 32 and rss["320_frames"]["frames"] == 320
    assert rss["32_frames"]["peak_rss_bytes"] > 0 and rss["ratio_10n_to_n"] > 0
    assert out.exists()


def test_rounds_rotate_the_order_and_ratios_pair_each_round():
    assert [rotated([1, 2, 3], r) for r in range(4)] == [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]]
    assert rotated([], 2) == []
    # each round's serial / other: 1.0, 1.0 and 1.5; the bests (0.5 and 1/3) alone would say 1.5
    assert per_round_ratio([1.0, 4.0, 0.5], [1.0, 4.0, 1 / 3]) == 1.0
