"""Model exports: write one (:func:`write_export`), load it with no Ray (:func:`load_model`), evaluate and predict.

Never imports Ray: an export is used at inference time on machines without a cluster.
"""
from mmray.export.compare import compare_with_source
from mmray.export.evaluate import evaluate, format_evaluation, plot_confusion, predict_dataset
from mmray.export.loader import Predictor, load_model
from mmray.export.quantize import quantize_export
from mmray.export.writer import collect_versions, export_files, write_export

__all__ = [
    "Predictor", "collect_versions", "compare_with_source", "evaluate", "export_files", "format_evaluation",
    "load_model", "plot_confusion", "predict_dataset", "quantize_export", "write_export",
]
