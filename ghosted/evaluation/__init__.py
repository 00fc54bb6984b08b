"""Evaluation of dense and pruned models: perplexity, zero-shot accuracy (lm-eval) and efficiency.

run.py is `ghosted eval` (one model); harness.py the timing/memory harness of efficiency.py and bench."""

from ghosted.evaluation.efficiency import efficiency_ratios, measure_efficiency
from ghosted.evaluation.zeroshot import DEFAULT_TASKS, SUPPORTED_TASKS, evaluate_zeroshot, task_configs

__all__ = [
    "DEFAULT_TASKS",
    "SUPPORTED_TASKS",
    "efficiency_ratios",
    "evaluate_zeroshot",
    "measure_efficiency",
    "task_configs",
]
