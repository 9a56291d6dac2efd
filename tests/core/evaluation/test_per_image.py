"""Per-image numbers: every task's columns in the run folder, and each index recomputed from them equals the run's."""

import csv

import numpy as np
import pytest

from core.evaluation.per_image import PerImage, merge, read_per_image, write_per_image
from optim.metrics.classification import auroc
from optim.metrics.distribution import FeatureRows, GaussianStats
from optim.metrics.normative import ahi_equal_n, ahi_equal_n_rows
from optim.metrics.resampled import auroc_from_counts


@pytest.fixture(scope="module")
def tables(evaluated):
    _, run, *_ = evaluated
    return read_per_image(run.run_dir / "per_image")


def test_every_evaluated_set_has_a_table_with_its_images(tables, evaluated):
    _, _, data, _, _ = evaluated
    assert set(tables) == {"train", "healthy_test", "lesions", "boxes"}
    for name, table in tables.items():
        assert table.path == tuple(s.path for s in data.sets[name])
    assert set(tables["healthy_test"].columns) == {"detection/score", "rqi/ssim", "rqi/lpips", "rqi/mae", "rqi/rqi",
                                                   "ahi/input_features"}
    assert {"detection/score", "segmentation/hist_anomaly", "segmentation/hist_healthy", "segmentation/dice",
            "caci/caci", "caci/conservation", "caci/correction", "ahi/input_features",
            "ahi/restored_features"} <= set(tables["lesions"].columns)
    assert set(tables["lesions"].constants) == {"segmentation/hist_edges", "segmentation/hist_bound",
                                                "detection/healthy"}
    assert str(tables["boxes"].constants["detection/healthy"]) == "healthy_test"
    assert tables["lesions"].label.tolist() == [1] * 6 and tables["healthy_test"].label.tolist() == [0] * 6


def test_image_auroc_from_the_stored_scores_is_the_runs(tables, evaluated):
    results = evaluated[0]
    healthy = tables["healthy_test"]
    for name in ("lesions", "boxes"):
        s = np.r_[healthy.columns["detection/score"], tables[name].columns["detection/score"]]
        y = np.r_[healthy.label, tables[name].label]
        assert auroc(s, y) == results["detection"][name]["auroc"]


def test_pooled_pixel_auroc_from_the_histograms_is_the_runs_within_the_stored_bound(tables, evaluated):
    results = evaluated[0]
    for name in ("lesions", "boxes"):
        table = tables[name]
        pos, neg = table.columns["segmentation/hist_anomaly"], table.columns["segmentation/hist_healthy"]
        bound = float(table.constants["segmentation/hist_bound"])
        assert pos.shape == neg.shape == (len(table.path), table.constants["segmentation/hist_edges"].size + 1)
        binned = float(auroc_from_counts(pos.sum(0), neg.sum(0)))
        assert abs(binned - results["segmentation"][name]["auroc_pooled"]) <= bound < 5e-3


def test_rqi_and_caci_are_the_means_of_the_stored_terms(tables, evaluated):
    results = evaluated[0]
    assert tables["healthy_test"].columns["rqi/rqi"].mean() == pytest.approx(results["rqi"]["healthy_test"]["rqi"])
    for name in ("lesions", "boxes"):
        assert np.nanmean(tables[name].columns["caci/caci"]) == pytest.approx(results["caci"][name]["caci"])
    pooled = np.r_[tables["lesions"].columns["caci/caci"], tables["boxes"].columns["caci/caci"]]
    assert np.nanmean(pooled) == pytest.approx(results["caci"]["all_annotated"]["caci"])


def test_the_pooled_ahi_recomputed_from_the_stored_features_is_the_runs(tables, evaluated):
    results = evaluated[0]
    ref = tables["train"]
    names = ref.constants["ahi/pathological"].tolist()
    draws, seed = int(ref.constants["ahi/draws"]), int(ref.constants["ahi/seed"])
    assert names == ["lesions", "boxes"] and str(ref.constants["ahi/healthy"]) == "healthy_test" and seed == 3
    n_feat, u_feat = ref.columns["ahi/input_features"], tables["healthy_test"].columns["ahi/input_features"]
    p_feat = np.concatenate([tables[n].columns["ahi/input_features"] for n in names])
    r_feat = np.concatenate([tables[n].columns["ahi/restored_features"] for n in names])
    expected = results["ahi"]["all_pathological"]
    direct = ahi_equal_n(n_feat, u_feat, p_feat, r_feat, draws=draws, seed=seed)
    rows = FeatureRows(GaussianStats.from_features(n_feat), np.concatenate([u_feat, p_feat, r_feat]))
    n_u, n_p = len(u_feat), len(p_feat)
    via_rows = ahi_equal_n_rows(rows, np.arange(n_u), n_u + np.arange(n_p), n_u + n_p + np.arange(n_p), draws=draws,
                                seed=seed)
    for key in ("ahi", "fid_u", "fid_p", "fid_rp"):  # float32 storage: ~1e-7 relative
        assert direct[key] == pytest.approx(expected[key], rel=1e-5, nan_ok=True)
        assert via_rows[key] == pytest.approx(expected[key], rel=1e-5, nan_ok=True)


def test_tables_are_checked_and_merged_by_path(tmp_path):
    a = PerImage.of(["x", "y"], [0, 1], {"score": [0.1, 0.2]})
    b = PerImage.of(["x", "y"], [0, 1], {"hist": np.ones((2, 3), dtype=np.int32)}, {"edges": [0.5, 1.0]})
    merged = merge({"detection": {"s": a}, "segmentation": {"s": b}})["s"]
    assert set(merged.columns) == {"detection/score", "segmentation/hist"}
    assert set(merged.constants) == {"segmentation/edges"}
    with pytest.raises(ValueError, match="blocks 'detection' and 'other' list different images"):
        merge({"detection": {"s": a}, "other": {"s": PerImage.of(["y", "x"], [0, 1])}})
    with pytest.raises(ValueError, match="column 'score' has shape"):
        PerImage.of(["x"], [0], {"score": [0.1, 0.2]})
    with pytest.raises(ValueError, match="blocks 'detection' and 'other' list different images, subjects"):
        merge({"detection": {"s": a}, "other": {"s": PerImage.of(["x", "y"], [0, 1], subject=["v", "v"])}})
    volume = PerImage.of(["x", "y"], [0, 1], subject=["v", "v"])
    write_per_image(tmp_path / "v", {"detection": {"s": volume}})
    assert read_per_image(tmp_path / "v")["s"].subject == ("v", "v")
    written = write_per_image(tmp_path, {"detection": {"s": a}, "segmentation": {"s": b}})
    assert written == [tmp_path / "s.npz"]
    back = read_per_image(tmp_path)["s"]
    assert back.path == ("x", "y") and back.label.tolist() == [0, 1]
    np.testing.assert_array_equal(back.columns["segmentation/hist"], b.columns["hist"])
    np.testing.assert_array_equal(back.constants["segmentation/edges"], [0.5, 1.0])
    rows = list(csv.reader((tmp_path / "s.csv").open()))
    assert rows == [["path", "subject", "label", "detection/score"], ["x", "x", "0", "0.1"],
                    ["y", "y", "1", "0.2"]]  # 1-D columns only; each image its own subject by default
    assert write_per_image(tmp_path / "none", {"rqi": {}}) == [] and not (tmp_path / "none").exists()
