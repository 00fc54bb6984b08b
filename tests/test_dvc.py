"""The real dvc.yaml, run by real DVC in a temporary git repo on a tiny model with tiny limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[1]
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; pruning removes layers. " * 3
                   for i in range(40))
STAGES = ("calibrate", "score", "solve", "fuse", "evaluate_dense", "evaluate_pruned", "register")

pytest.importorskip("dvc")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `ghosted` command
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def _run(repo: Path, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=repo, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _dvc(repo: Path, *args: str) -> str:
    return _run(repo, sys.executable, "-m", "dvc", *args)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repo holding the project's dvc.yaml, .dvcignore and code, with params for a tiny model."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "ghosted", repo / "ghosted", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    model, tok = make_tiny("llama", num_layers=6)
    model.save_pretrained(repo / "base" / "tiny-llama")
    tok.save_pretrained(repo / "base" / "tiny-llama")
    (repo / "base" / "text.txt").write_text(TEXT)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(model="base/tiny-llama",
                  calibration={"source": "base/text.txt", "n": 6, "seq_len": 16, "seed": 0},
                  eval={"ppl": "base/text.txt", "ppl_windows": 2, "seq_len": 16, "tasks": "none", "batch_size": 4})
    params["prune"]["remove"] = 2
    params["gate"].update(min_retained_acc=None, rank_by="base/text.txt", max_ppl_ratio=1000.0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(repo, "git", "init", "-q")
    _dvc(repo, "init", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "pipeline")
    return repo


def test_repro_end_to_end_then_noop_then_only_dependent_stages(repo):
    out = _dvc(repo, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out[-3000:]
    assert (repo / "models" / "pruned" / "config.json").is_file()
    assert (repo / "data" / "calibration" / "calibration.json").is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert lock["stages"]["calibrate"]["params"]["params.yaml"]["calibration"]["n"] == 6
    assert set(lock["stages"]["evaluate_pruned"]["params"]["params.yaml"]) == {"eval"}  # only its own section

    assert "Data and pipelines are up to date." in _dvc(repo, "repro")
    assert _dvc(repo, "status").strip().endswith("Data and pipelines are up to date.")

    metrics = json.loads(_dvc(repo, "metrics", "show", "--json"))
    files = next(iter(metrics.values()))["data"]
    gate = files["reports/pipeline/gate.json"]["data"]
    assert gate["passed"] is True and gate["ppl_ratio"]["base/text.txt"] > 0
    assert files["reports/pipeline/pruned.json"]["data"]["ppl"]["base/text.txt"]["ppl"] > 0
    _dvc(repo, "plots", "show", "-o", "plots_html")
    assert (repo / "plots_html" / "index.html").is_file()
    rows = json.loads((repo / "reports" / "pipeline" / "layer_scores.json").read_text())
    assert len(rows) == 6 and sum(r["removed"] for r in rows) == 2

    # A gate change reruns register only (the same checkpoint is not registered again; the gate reports the fail).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gate"]["max_ppl_ratio"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "register" in json.loads(_dvc(repo, "status", "--json"))
    out = _dvc(repo, "repro")
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == ["register"]
    assert json.loads((repo / "reports" / "pipeline" / "gate.json").read_text())["passed"] is False
    listed = json.loads(_run(repo, "ghosted", "registry", "list", "--json", "--config", "params.yaml"))
    assert [(r["version"], r["gate"], r["champion"]) for r in listed] == [("1", "pass", True)]
    # An eval change makes exactly the two evaluations stale (register follows once their outputs change).
    params["eval"]["ppl_windows"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(_dvc(repo, "status", "--json"))) == {"evaluate_dense", "evaluate_pruned"}
