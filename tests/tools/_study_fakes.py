"""Run folders as core/Main.py writes them (manifest, metrics.json, per_image/), from a fixed per-image design.

Two methods on three healthy and three lesion images, their numbers chosen so that every bootstrap quantity of
the acceptance test can be computed by hand (see tests/tools/test_study_end_to_end.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.evaluation.per_image import PerImage, write_per_image
from optim.metrics.classification import auroc
from optim.metrics.normative import ahi_equal_n

HEALTHY = ("h/0.png", "h/1.png", "h/2.png")
LESION = ("l/0.png", "l/1.png", "l/2.png")
TRAIN = tuple(f"t/{i}.png" for i in range(6))
# AHI features (d = 2): N near the origin, U shifted by 10, P by 20 -> FID(U,N) ~ 100, FID(P,N) ~ 400
N_FEAT = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.2], [0.2, 0.5]], dtype=np.float32)
U_FEAT = N_FEAT[:3] + np.array([10.0, 0.0], dtype=np.float32)
P_FEAT = N_FEAT[:3] + np.array([20.0, 0.0], dtype=np.float32)

# Per method: detection scores (healthy, lesion), lesion histograms (anomaly, healthy pixels; 2 bins), RQI terms per
# seed, CACI terms, restored features. "good": a perfect detector and segmenter whose restorations land on N
# (AHI 1); "flat": one score for everything, identical histograms (AUROC 0.5), restorations = inputs (AHI 0).
DESIGN = {
    "good": {"healthy": [0.1, 0.2, 0.3], "lesion": [0.7, 0.8, 0.9], "anomaly": [0, 5], "normal": [20, 0],
             "rqi": {1: [0.8, 0.8, 0.8], 2: [0.6, 0.6, 0.6]}, "caci": [0.5, 0.5, 0.5], "restored": N_FEAT[:3]},
    "flat": {"healthy": [0.5, 0.5, 0.5], "lesion": [0.5, 0.5, 0.5], "anomaly": [1, 1], "normal": [1, 1],
             "rqi": {1: [0.2, 0.4, 0.6], 2: [0.2, 0.4, 0.6]}, "caci": [0.1, 0.1, 0.1], "restored": P_FEAT},
}


def write_run(run_dir: Path, kind: str, seed: int, overrides: list[str] | None = None) -> Path:
    """A finished, evaluated run folder of design ``kind`` with ``seed``; metrics are what its tables give;
    ``overrides``: the --set values recorded in its config.yaml (default: the seed's)."""
    d = DESIGN[kind]
    rqi = np.asarray(d["rqi"][seed], dtype=np.float64)
    caci = np.asarray(d["caci"], dtype=np.float64)
    hist_a = np.tile(np.asarray(d["anomaly"], dtype=np.int32), (3, 1))
    hist_h = np.tile(np.asarray(d["normal"], dtype=np.int32), (3, 1))
    pos, neg = hist_a.sum(0), hist_h.sum(0)
    pixel = float((pos * (np.cumsum(neg) - neg + neg / 2)).sum() / (pos.sum() * neg.sum()))
    image = auroc(np.r_[d["healthy"], d["lesion"]], np.r_[np.zeros(3), np.ones(3)])
    ahi = ahi_equal_n(N_FEAT, U_FEAT, P_FEAT, d["restored"], draws=2, seed=seed)  # what the ahi task logs
    metrics = {"eval/detection/lesion/auroc": image, "eval/detection/all_pathological/auroc": image,
               "eval/segmentation/lesion/auroc_pooled": pixel, "eval/rqi/healthy_test/rqi": float(rqi.mean()),
               "eval/caci/all_annotated/caci": float(caci.mean()),
               **{f"eval/ahi/all_pathological/{k}": ahi[k] for k in ("ahi", "fid_u", "fid_p", "fid_rp")},
               "train/wall_s": 3.0, "eval/cost/all_datasets/s_per_image": 0.002}
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "manifest.json").write_text(json.dumps({"status": "finished", "seed": seed}))
    (run_dir / "config.yaml").write_text(json.dumps({"overrides": overrides or [f"experiment.seed={seed}"]}))
    write_per_image(run_dir / "per_image", {
        "detection": {"healthy_test": PerImage.of(HEALTHY, [0, 0, 0], {"score": d["healthy"]}),
                      "lesion": PerImage.of(LESION, [1, 1, 1], {"score": d["lesion"]}, {"healthy": "healthy_test"})},
        "segmentation": {"lesion": PerImage.of(LESION, [1, 1, 1], {"hist_anomaly": hist_a, "hist_healthy": hist_h},
                                               {"hist_edges": [0.5], "hist_bound": 0.0})},
        "rqi": {"healthy_test": PerImage.of(HEALTHY, [0, 0, 0], {"rqi": rqi})},
        "caci": {"lesion": PerImage.of(LESION, [1, 1, 1], {"caci": caci})},
        "ahi": {"train": PerImage.of(TRAIN, [0] * 6, {"input_features": N_FEAT},
                                     {"healthy": "healthy_test", "pathological": np.asarray(["lesion"]),
                                      "draws": 2, "seed": seed}),
                "healthy_test": PerImage.of(HEALTHY, [0, 0, 0], {"input_features": U_FEAT}),
                "lesion": PerImage.of(LESION, [1, 1, 1], {"input_features": P_FEAT,
                                                          "restored_features": d["restored"]})},
    })
    return run_dir
