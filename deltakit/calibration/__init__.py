"""Running a model on calibration tokens: the covariances of its layers' inputs and how far its outputs are.

transformers builds the model (an optional dependency, imported when a run starts); one model is
held at a time. Used by extraction (activation-aware factors, output errors) and by `check`.
"""

from deltakit.calibration.covariances import COVARIANCE_BYTES, Covariances
from deltakit.calibration.model_run import Edit, is_causal_lm
from deltakit.calibration.outputs import METRICS
from deltakit.calibration.runs import Calibration, calibrate, choose_metric, measure_fidelity
from deltakit.calibration.tokens import CalibrationTokens, read_calibration

__all__ = ["COVARIANCE_BYTES", "METRICS", "Calibration", "CalibrationTokens", "Covariances", "Edit", "calibrate",
           "choose_metric", "is_causal_lm", "measure_fidelity", "read_calibration"]
