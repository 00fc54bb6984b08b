"""Evaluation of dense and pruned models: zero-shot accuracy (lm-eval) and efficiency."""

from ghosted.evaluate.efficiency import efficiency_ratios, measure_efficiency
from ghosted.evaluate.zeroshot import DEFAULT_TASKS, SUPPORTED_TASKS, evaluate_zeroshot, task_configs

__all__ = [
    "DEFAULT_TASKS",
    "SUPPORTED_TASKS",
    "efficiency_ratios",
    "evaluate_zeroshot",
    "measure_efficiency",
    "task_configs",
]
