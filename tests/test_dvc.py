"""The real dvc.yaml, run by real DVC in a temporary git repo on a tiny model with tiny limits."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml

from .dvc_repo import ROOT, STAGES, dvc, make_repo, run, save_tiny, set_params

pytest.importorskip("dvc")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _ran(out: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in out]


def _versions(repo) -> list[tuple[str, str, bool]]:
    listed = json.loads(run(repo, "ghosted", "registry", "list", "--json", "--config", "params.yaml").stdout)
    return [(r["version"], r["gate"], r["champion"]) for r in listed]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("dvc") / "repo")


def test_repro_noop_compact_metrics_experiments_and_base_model_changes(repo):
    out = dvc(repo, "repro")
    assert _ran(out) == list(STAGES), out[-3000:]
    assert "--quiet" not in (ROOT / "dvc.yaml").read_text()
    assert "ppl text.txt" in out or "ppl base/text.txt" in out  # progress of the evaluation reaches the log
    base = json.loads((repo / "data" / "base_model.json").read_text())
    assert base["model"] == "base/tiny-llama" and base["fingerprint"].startswith("sha256:")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert set(lock["stages"]["evaluate_pruned"]["params"]["params.yaml"]) == {"eval"}  # only its own section
    assert _versions(repo) == [("1", "pass", True)]

    assert "Data and pipelines are up to date." in dvc(repo, "repro")
    assert dvc(repo, "status").strip().endswith("Data and pipelines are up to date.")
    run(repo, "git", "add", "-A")  # dvc.lock and the small outputs: what an experiment starts from
    run(repo, "git", "commit", "-q", "-m", "repro")

    # `dvc metrics show`: one small file with the decisive numbers, nothing else.
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    files = next(iter(metrics.values()))["data"]
    assert list(files) == ["reports/pipeline/metrics.json"]
    m = files["reports/pipeline/metrics.json"]["data"]
    assert set(m) == {"gate_passed", "ppl"} and m["gate_passed"] is True
    assert set(m["ppl"]["text"]) == {"pruned", "dense", "ratio"}
    assert m["ppl"]["text"]["ratio"] == pytest.approx(m["ppl"]["text"]["pruned"] / m["ppl"]["text"]["dense"])
    dvc(repo, "plots", "show", "-o", "plots_html")
    assert (repo / "plots_html" / "index.html").is_file()

    # The remote beside the repository takes the cached outputs.
    assert "pushed" in dvc(repo, "push")
    assert any((repo.parent / "ghosted-dvc-remote").rglob("*"))

    # An experiment reruns only what prune.remove feeds, and registers nothing (registry.experiments: false).
    out = dvc(repo, "exp", "run", "-S", "prune.remove=3")
    assert _ran(out) == ["score", "solve", "fuse", "evaluate_pruned", "register"], out[-3000:]
    assert _versions(repo) == [("1", "pass", True)]
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    ws = shown[0]["data"]
    assert set(ws["metrics"]) == {"reports/pipeline/metrics.json"}

    # registry.register: false on a plain repro: the register stage writes its reports, no version.
    set_params(repo, registry={"register": False})
    out = dvc(repo, "repro")
    assert _ran(out) == ["register"]
    assert _versions(repo) == [("1", "pass", True)]
    assert "not registered: registry.register: false" in (repo / "reports" / "pipeline" / "summary.md").read_text()

    # A changed base model: refreshing the fingerprint makes every stage that reads the model stale.
    save_tiny(repo / "base" / "tiny-llama", seed=1)
    assert "Data and pipelines are up to date." in dvc(repo, "status")  # DVC cannot see the model by itself
    out = dvc(repo, "repro", "--force", "--single-item", "fingerprint")
    assert json.loads((repo / "data" / "base_model.json").read_text())["fingerprint"] != base["fingerprint"]
    assert set(json.loads(dvc(repo, "status", "--json"))) == {"calibrate", "score", "solve", "fuse",
                                                               "evaluate_dense"}


def test_check_dvc_lock_tells_a_stale_lock_from_a_fresh_one(tmp_path):
    repo = make_repo(tmp_path / "repo")
    script = [sys.executable, str(ROOT / "scripts" / "check_dvc_lock.py"), "--repo", str(repo)]
    proc = run(repo, *script, ok=False)
    assert proc.returncode == 1 and "not committed" in proc.stdout
    # The first stage alone keeps this quick; the check compares hashes and runs nothing.
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fingerprint": doc["stages"]["fingerprint"]}}))
    dvc(repo, "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "lock")
    proc = run(repo, *script, ok=False)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stdout
    with (repo / "ghosted" / "pipeline.py").open("a") as f:
        f.write("\n# a code change\n")
    proc = run(repo, *script, ok=False)
    assert proc.returncode == 0, proc.stdout  # uncommitted edits do not count: HEAD is what is checked
    run(repo, "git", "commit", "-qam", "code")
    proc = run(repo, *script, ok=False)
    assert proc.returncode == 1 and "fingerprint: ghosted/pipeline.py modified" in proc.stdout, proc.stdout


def test_register_switch_parses_and_decides(monkeypatch):
    from ghosted.config import RegistryConfig, build
    from ghosted.errors import GhostedError
    from ghosted.pipeline import EXPERIMENT_ENV, registration_skipped

    monkeypatch.delenv(EXPERIMENT_ENV, raising=False)
    assert build(RegistryConfig, {}, "registry").register == "true"  # a plain `dvc repro` registers
    assert build(RegistryConfig, {"register": False}, "registry").register == "false"
    on_pass = build(RegistryConfig, {"register": "on_pass"}, "registry")
    with pytest.raises(GhostedError, match="registry.register = 'maybe': expected true, false or on_pass"):
        build(RegistryConfig, {"register": "maybe"}, "registry")
    assert registration_skipped(on_pass, passed=True) is None
    assert "gate failed" in registration_skipped(on_pass, passed=False)
    assert registration_skipped(RegistryConfig(), passed=False) is None
    assert "register: false" in registration_skipped(RegistryConfig(), passed=True, mode="false")
    monkeypatch.setenv(EXPERIMENT_ENV, "abc123")  # inside `dvc exp run`
    assert "experiment" in registration_skipped(RegistryConfig(), passed=True)
    assert registration_skipped(RegistryConfig(experiments=True), passed=True) is None


def test_compact_metrics_keep_the_decisive_numbers_only():
    from ghosted.config import GateConfig
    from ghosted.pipeline import compact_metrics
    from ghosted.gate import apply_gate

    def doc(wiki: float, piqa: float, arc: float, params: int, gen_ms: float) -> dict:
        return {"ppl": {"wiki": {"ppl": wiki, "nll": 3.0, "windows": 8}, "data/t.txt": {"ppl": wiki * 2}},
                "zeroshot": {"tasks": {"piqa": {"acc": piqa, "acc_norm": piqa, "acc_norm_stderr": 0.03, "n": 200},
                                       "arc_easy": {"acc": arc}},  # no acc_norm: acc stands in
                             "average": {"acc_norm": (piqa + arc) / 2}},
                "efficiency": {"model": {"params": params, "batches": {"1": {
                    "prefill_ms": 1.0, "generate_ms": gen_ms, "decode_tokens_per_s": 10.0}}}},
                "seconds": 95.0, "command": "ghosted eval", "device": "cpu"}

    dense, pruned = doc(20.0, 0.7, 0.5, 100, 10.0), doc(30.0, 0.6, 0.5, 80, 8.0)
    gate = GateConfig()
    m = compact_metrics(dense, pruned, apply_gate(dense, pruned, gate), gate.acc_metric)
    assert m == {"gate_passed": True,
                 "ppl": {"t": {"pruned": 60.0, "dense": 40.0, "ratio": 1.5},
                         "wiki": {"pruned": 30.0, "dense": 20.0, "ratio": 1.5}},
                 "acc_norm": {"arc_easy": 0.5, "piqa": 0.6,
                              "average": {"pruned": 0.55, "dense": 0.6, "retained": pytest.approx(0.55 / 0.6)}},
                 "params": {"pruned": 80, "dense": 100, "ratio": 0.8},
                 "generate_speedup": {"batch_1": 1.25}}
