"""Apply a trained model to new scans: ``experiment.task: predict`` (anomaly maps, binary masks, scores).

::

    python core/Main.py --config_path <the training config> --set experiment.task=predict \
        --set experiment.weights=<run>/checkpoints/best.pt --set 'predict.inputs=[scans/]'

The model is built from the checkpoint's stored config and loaded strictly; every slice gets the training
run's preprocessing (``data.params.target_size`` and ``intensity`` of that config, :mod:`data.preprocess`);
inference goes through ``model.get_anomaly`` only, batched on the experiment's device. Thresholds are the
training run's ``checkpoints/thresholds.json`` next to the weights (or chosen FPRs of it, or explicit values).

Modules: :mod:`~core.prediction.settings` (the ``predict:`` block), :mod:`~core.prediction.thresholds`,
:mod:`~core.prediction.scans` (finding and reading inputs, geometry), :mod:`~core.prediction.inference`,
:mod:`~core.prediction.outputs` (files), :mod:`~core.prediction.runner` (the task).
"""

from core.prediction.runner import run_prediction
from core.prediction.settings import PredictSettings, parse_predict

__all__ = ["PredictSettings", "parse_predict", "run_prediction"]
