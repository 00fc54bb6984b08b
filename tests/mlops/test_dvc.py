"""The real dvc.yaml, run by real DVC in a temporary git repo on a tiny model with tiny limits."""

from __future__ import annotations

import shutil
import sys

import pytest
import yaml

from tests.mlops.dvc_repo import ROOT, dvc, make_repo, run

pytest.importorskip("dvc")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


# The whole pipeline (a Prefect flow run of the stages, then `dvc repro`, metrics, push, an experiment, the
# register switch and a changed base model) is one test in test_flows.py: one pipeline run serves both.


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
    with (repo / "ghosted" / "mlops" / "dvc.py").open("a") as f:
        f.write("\n# a code change\n")
    proc = run(repo, *script, ok=False)
    assert proc.returncode == 0, proc.stdout  # uncommitted edits do not count: HEAD is what is checked
    run(repo, "git", "commit", "-qam", "code")
    proc = run(repo, *script, ok=False)
    assert proc.returncode == 1 and "fingerprint: ghosted modified" in proc.stdout, proc.stdout


def test_register_switch_parses_and_decides(monkeypatch):
    from ghosted.config import RegistryConfig, build
    from ghosted.errors import GhostedError
    from ghosted.mlops.dvc import EXPERIMENT_ENV, registration_skipped

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
    from ghosted.evaluation.gate import apply_gate
    from ghosted.mlops.dvc import compact_metrics

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
