"""Efficiency measurement on a tiny random Llama: positive numbers, sizes, ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ghosted.errors import GhostedError
from ghosted.evaluation.efficiency import efficiency_ratios, measure_efficiency

VOCAB = 512


def _tiny(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny4() -> LlamaForCausalLM:
    return _tiny(4)


@pytest.fixture(scope="module")
def measured(tiny4: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    tiny4.save_pretrained(folder)
    stats = measure_efficiency(tiny4, batch_sizes=(1, 3), prompt_len=16, new_tokens=4, repeats=2, checkpoint_dir=folder)
    return stats, folder


def test_measure_returns_positive_numbers(measured: tuple[dict, Path], tiny4: LlamaForCausalLM) -> None:
    stats, folder = measured
    params = sum(p.numel() for p in tiny4.parameters())
    assert stats["params"] == params
    # input embedding and (untied) output head are left out of the non-embedding count
    assert stats["params_non_embedding"] == params - 2 * VOCAB * 64
    assert stats["weights_bytes"] >= 4 * params
    assert stats["checkpoint_bytes"] == sum(f.stat().st_size for f in folder.glob("*.safetensors")) > 4 * params * 0.9
    assert stats["device"] == "cpu" and stats["dtype"] == "float32" and stats["num_layers"] == 4
    assert set(stats["batches"]) == {"1", "3"}
    for key, row in stats["batches"].items():
        assert row["batch_size"] == int(key)
        assert len(row["prefill_ms_all"]) == len(row["generate_ms_all"]) == 2
        for name in ("prefill_ms", "generate_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token"):
            assert row[name] > 0, name
        assert row["generate_tokens_per_s"] == pytest.approx(int(key) * 4 / (row["generate_ms"] / 1e3))
        if stats["memory_method"] != "unavailable":
            assert row["peak_memory_bytes"] > 0 and row["peak_memory_delta_bytes"] >= 0


def test_measure_keeps_training_flag_and_needs_no_tokenizer() -> None:
    model = _tiny(2).train()
    stats = measure_efficiency(model, batch_sizes=(2,), prompt_len=8, new_tokens=2, repeats=1)
    assert model.training
    assert stats["checkpoint_bytes"] is None and stats["batches"]["2"]["decode_tokens_per_s"] > 0


def test_measure_rejects_bad_arguments(tiny4: LlamaForCausalLM, tmp_path: Path) -> None:
    with pytest.raises(GhostedError, match="batch_sizes"):
        measure_efficiency(tiny4, batch_sizes=(0,))
    with pytest.raises(GhostedError, match="new_tokens must be"):
        measure_efficiency(tiny4, new_tokens=1)
    with pytest.raises(GhostedError, match="max_position_embeddings"):
        measure_efficiency(tiny4, prompt_len=250, new_tokens=32)
    with pytest.raises(GhostedError, match="no \\*.safetensors"):
        measure_efficiency(tiny4, batch_sizes=(1,), prompt_len=4, new_tokens=2, repeats=1, checkpoint_dir=tmp_path)
    with pytest.raises(GhostedError, match="move it first"):
        measure_efficiency(tiny4, device="meta")


def test_ratios_are_pruned_over_dense() -> None:
    dense = {
        "params": 1000,
        "params_non_embedding": 600,
        "weights_bytes": 4000,
        "checkpoint_bytes": 4100,
        "batches": {
            "1": {"prefill_ms": 10.0, "generate_ms": 50.0, "decode_tokens_per_s": 100.0,
                  "peak_memory_bytes": 800, "peak_memory_delta_bytes": 200},
            "8": {"prefill_ms": 40.0, "generate_ms": 90.0, "decode_tokens_per_s": 400.0,
                  "peak_memory_bytes": None, "peak_memory_delta_bytes": None},
        },
    }  # fmt: skip
    pruned = {
        "params": 750,
        "params_non_embedding": 450,
        "weights_bytes": 3000,
        "checkpoint_bytes": None,
        "batches": {
            "1": {"prefill_ms": 8.0, "generate_ms": 40.0, "decode_tokens_per_s": 125.0,
                  "peak_memory_bytes": 600, "peak_memory_delta_bytes": 100},
            "2": {"prefill_ms": 1.0, "generate_ms": 1.0, "decode_tokens_per_s": 1.0},
        },
    }  # fmt: skip
    ratios = efficiency_ratios(dense, pruned)
    assert ratios["params_ratio"] == 0.75
    assert ratios["params_non_embedding_ratio"] == 0.75
    assert ratios["weights_bytes_ratio"] == 0.75
    assert ratios["checkpoint_bytes_ratio"] is None  # unknown on one side
    assert set(ratios["batches"]) == {"1"}  # only batch sizes measured on both
    row = ratios["batches"]["1"]
    assert row["prefill_speedup"] == 1.25
    assert row["generate_speedup"] == 1.25
    assert row["decode_speedup"] == 1.25
    assert row["peak_memory_ratio"] == 0.75
    assert row["peak_memory_delta_ratio"] == 0.5


def test_ratios_on_measured_models(measured: tuple[dict, Path]) -> None:
    dense, _ = measured
    pruned = measure_efficiency(_tiny(2), batch_sizes=(1,), prompt_len=16, new_tokens=4, repeats=2)
    ratios = efficiency_ratios(dense, pruned)
    assert ratios["params_non_embedding_ratio"] == pytest.approx(0.5, rel=1e-3)  # 2 of 4 layers (+ final norm)
    assert ratios["batches"]["1"]["prefill_speedup"] > 0


def test_harness_timing_and_peak_memory() -> None:
    """The harness `ghosted bench` and `eval --efficiency` share: every run timed, the median kept; the peak
    over a block sees memory touched and freed inside it."""
    import statistics
    import time

    from ghosted.evaluation import harness

    cpu = torch.device("cpu")
    calls: list[int] = []
    median, runs = harness.timed(lambda: (calls.append(1), time.sleep(0.002)), cpu, 3)
    assert len(runs) == len(calls) == 3 and median == statistics.median(runs) and min(runs) >= 2.0
    # In a fresh process: in this one, memory freed by earlier tests (a worker runs many) can be reused without
    # a new page, so the high-water mark need not move.
    probe = ("import json, torch\nfrom ghosted.evaluation import harness\ncpu = torch.device('cpu')\n"
             "method = harness.memory_method(cpu)\nwith harness.peak_memory(cpu, method) as memory:\n"
             "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written\n    del block\n"
             "print(json.dumps([method, memory]))")
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": root})
    method, memory = json.loads(done.stdout.strip().splitlines()[-1])
    if method == harness.LINUX_RSS:
        assert memory["peak_memory_delta_bytes"] >= 48 * 2**20
        assert memory["peak_memory_bytes"] >= memory["peak_memory_delta_bytes"]
    else:
        assert memory == {"peak_memory_bytes": None, "peak_memory_delta_bytes": None}
