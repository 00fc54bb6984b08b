"""Evaluation of dense and pruned models: perplexity, zero-shot accuracy (lm-eval), efficiency and the gate.

run.py is `ghosted eval` (one model); harness.py the timing/memory harness of efficiency.py and bench.py;
gate.py the pure pass/fail rule the registry and the search apply. Import the modules themselves: this package
imports nothing, so reading the gate does not load torch."""
