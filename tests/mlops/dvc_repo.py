"""A throwaway git + DVC repository holding the project's real dvc.yaml and code, with a tiny model and tiny params."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[2]
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; pruning removes layers. " * 3
                   for i in range(40))
HEAL_WORDS = "cat dog sun sea hill road tree lake river stone cloud field house bird fish wind rain snow".split()
# Healing text: other words than TEXT (the evaluation text), which no healing window may overlap.
HEAL_TEXT = "\n\n".join(" ".join(random.Random(i).choices(HEAL_WORDS, k=40)) + "." for i in range(40))
STAGES = ("fingerprint", "calibrate", "score", "solve", "fuse", "heal", "evaluate_dense", "evaluate_pruned",
          "register")
# heal.enabled stays false (the pass-through); `-S heal.enabled=true` heals with this tiny recipe in seconds.
TINY_HEAL = {"source": "base/heal.txt", "eval_sources": "base/text.txt", "n": 12, "seq_len": 16, "batch_size": 2,
             "steps": 4, "lr": 0.003, "eval_every": 2, "patience": 2, "holdout": 0.25, "lora_rank": 4, "top_k": 8,
             "max_minutes": None}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"  # the `ghosted` command
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
             TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
             GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return e


def run(repo: Path, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=repo, env=env(), capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def dvc(repo: Path, *args: str) -> str:
    proc = run(repo, sys.executable, "-m", "dvc", *args)
    return proc.stdout + proc.stderr


def save_tiny(folder: Path, seed: int = 0) -> Path:
    model, tok = make_tiny("llama", seed=seed, num_layers=6)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def set_params(repo: Path, **sections) -> None:
    """Update sections of the repo's params.yaml (a mapping is merged into the section, other values replace it)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(params.get(name), dict):
            params[name].update(value)
        else:
            params[name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(repo: Path) -> Path:
    """The project's dvc.yaml, .dvcignore, .gitignore, .dvc/config (no remote) and code, committed."""
    repo.mkdir(parents=True)
    shutil.copytree(ROOT / "ghosted", repo / "ghosted", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    save_tiny(repo / "base" / "tiny-llama")
    (repo / "base" / "text.txt").write_text(TEXT)
    (repo / "base" / "heal.txt").write_text(HEAL_TEXT)
    set_params(repo, model="base/tiny-llama",
               calibration={"source": "base/text.txt", "n": 6, "seq_len": 16, "seed": 0},
               eval={"ppl": "base/text.txt", "ppl_windows": 2, "seq_len": 16, "tasks": "none", "batch_size": 4,
                     "limit": None},
               prune={"remove": 2},
               gate={"min_retained_acc": None, "rank_by": "base/text.txt", "max_ppl_ratio": 1000.0},
               heal=TINY_HEAL)
    run(repo, "git", "init", "-q")
    run(repo, sys.executable, "-m", "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "pipeline")
    return repo
