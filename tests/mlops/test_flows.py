"""Prefect flows on a tiny model: real Prefect (test harness), real CLI stages, real MLflow on SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows import compress as compress_mod  # noqa: E402
from flows import recompress as recompress_mod  # noqa: E402
from ghosted.errors import GhostedError  # noqa: E402
from ghosted.reporting.compare_report import write_report  # noqa: E402
from tests.tiny_models import make_tiny  # noqa: E402

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; pruning removes layers. " * 3
                   for i in range(40))


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=600):  # a busy shared machine starts it slowly
        yield


def _tiny(folder: Path, seed: int = 0) -> Path:
    model, tok = make_tiny("llama", seed=seed, num_layers=6)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _params(root: Path, model: Path, name: str = "params.yaml", **prune) -> Path:
    """A params.yaml for the tiny model: .txt calibration and perplexity text, no zero-shot tasks."""
    import yaml

    text = root / "text.txt"
    if not text.exists():
        text.write_text(TEXT)
    doc = {"model": str(model),
           "calibration": {"source": str(text), "n": 6, "seq_len": 16, "seed": 0},
           "prune": {"remove": 2, "select": "angular", "recovery": "ghost", **prune},
           "eval": {"ppl": str(text), "ppl_windows": 2, "seq_len": 16, "tasks": "none", "batch_size": 4},
           "gate": {"max_ppl_ratio": 1000.0, "min_retained_acc": None, "rank_by": str(text)},
           "registry": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "flows-test"}}
    path = root / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, list[str]] = {}
    for r in runs:
        out.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    return out


def _flow_repo(tmp_path: Path) -> Path:
    from tests.mlops.dvc_repo import make_repo

    return make_repo(tmp_path / "repo")


def _versions(repo: Path) -> int:
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    if not (repo / "mlflow.db").exists():
        return 0
    return len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='ghosted-tiny-llama'"))


def _version(repo: Path, version: str):
    """(model version, its run) of ghosted-tiny-llama in the repo's registry."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v = client.get_model_version("ghosted-tiny-llama", version)
    return v, client.get_run(v.run_id)


def _ghosted_block(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["ghosted"]


def _ran(out: str) -> list[str]:
    from tests.mlops.dvc_repo import STAGES

    return [s for s in STAGES if f"Running stage '{s}'" in out]


def _registry(repo: Path) -> list[tuple[str, str, bool]]:
    from tests.mlops.dvc_repo import run

    listed = json.loads(run(repo, "ghosted", "registry", "list", "--json", "--config", "params.yaml").stdout)
    return [(r["version"], r["gate"], r["champion"]) for r in listed]


def test_compress_runs_the_dvc_stages_then_dvc_owns_the_rest(tmp_path):
    """The project's real dvc.yaml in a throwaway git repo, one pipeline run for all of it: the flow runs one task
    per DVC stage; afterwards DVC is clean, `dvc repro` is a no-op and a flow rerun registers nothing; `dvc metrics
    show` holds the decisive numbers only; the remote takes the cache; `dvc exp run -S prune.remove=3` reruns only
    what prune.remove feeds (with progress in its log) and registers nothing; the heal stage passes the checkpoint
    through (healed: false) until `-S heal.enabled=true`, which reruns heal and the stages after it and registers a
    version that records the recipe; registry.register: false reruns register alone without a version; a changed
    base model makes every stage that reads it stale."""
    import yaml

    from tests.mlops.dvc_repo import ROOT, STAGES, dvc, run, save_tiny, set_params

    repo = _flow_repo(tmp_path)
    state = compress_mod.compress(repo=str(repo), return_state=True)
    first = state.result()
    assert first["ran"] == list(STAGES) and first["registered"]["version"] == "1"
    states = _task_states(state.state_details.flow_run_id)
    assert {s: states[s] for s in STAGES} == {s: ["Completed"] for s in STAGES}
    assert not (repo / "out").exists()  # no second cache beside DVC's
    assert dvc(repo, "status").strip().endswith("Data and pipelines are up to date.")
    assert "Data and pipelines are up to date." in dvc(repo, "repro")
    assert "--quiet" not in (ROOT / "dvc.yaml").read_text()
    base = json.loads((repo / "data" / "base_model.json").read_text())
    assert base["model"] == "base/tiny-llama" and base["fingerprint"].startswith("sha256:")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert set(lock["stages"]["evaluate_pruned"]["params"]["params.yaml"]) == {"eval"}  # only its own section
    # heal.enabled false: the checkpoint passes through unhealed, with the same weights (one object in DVC's
    # content-addressed cache), and the version says healed: false and logs no recipe.
    healed = _ghosted_block(repo / "models" / "healed")
    assert healed["healed"] is False and "heal.enabled is false" in healed["heal"]["reason"]
    assert "recipe" not in healed["heal"]
    pruned, passed = repo / "models" / "pruned", repo / "models" / "healed"
    weights = sorted(p.name for p in pruned.glob("*.safetensors"))
    assert weights and all((pruned / w).read_bytes() == (passed / w).read_bytes() for w in weights)
    v1, run1 = _version(repo, "1")
    assert v1.tags["healed"] == run1.data.tags["healed"] == "false"
    assert not [k for k in [*run1.data.params, *run1.data.metrics] if k.startswith("heal")]
    summary = (repo / "reports" / "pipeline" / "summary.md").read_text()
    assert "- Healed: no (heal.enabled is false: not healed)" in summary

    state = compress_mod.compress(repo=str(repo), return_state=True)
    second = state.result()
    assert second["ran"] == [] and second["registered"] is None
    assert set(_task_states(state.state_details.flow_run_id)) == {"status"}  # one `dvc status`, no stage
    assert _versions(repo) == 1
    # recompress with the same base model: the fingerprint file is rewritten identically, nothing else runs.
    again = recompress_mod.recompress(repo=str(repo))
    assert again["ran"] == [] and not again["changed"] and again["fingerprint"] == first["fingerprint"]
    assert _registry(repo) == [("1", "pass", True)]

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
    # No remote is configured (a fresh clone builds with `dvc repro`); one a team adds takes the cached outputs.
    dvc(repo, "remote", "add", "-d", "store", "../ghosted-dvc-remote")
    assert "pushed" in dvc(repo, "push")
    assert any((repo.parent / "ghosted-dvc-remote").rglob("*"))

    # An experiment reruns only what prune.remove feeds, and registers nothing (registry.experiments: false).
    out = dvc(repo, "exp", "run", "-S", "prune.remove=3")
    assert _ran(out) == ["score", "solve", "fuse", "heal", "evaluate_pruned", "register"], out[-3000:]
    assert "ppl base/text.txt" in out or "ppl text.txt" in out  # progress of the evaluation reaches the log
    assert _registry(repo) == [("1", "pass", True)]
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    assert set(shown[0]["data"]["metrics"]) == {"reports/pipeline/metrics.json"}
    # the code is one dependency (one column), not a column per module
    assert [d for d in shown[0]["data"]["deps"] if d.startswith("ghosted")] == ["ghosted"]

    # Healing on (params.yaml's tiny recipe, 3 steps), registered: heal and the stages after it rerun.
    out = dvc(repo, "exp", "run", "-S", "heal.enabled=true", "-S", "heal.steps=3", "-S", "registry.experiments=true")
    assert _ran(out) == ["heal", "evaluate_pruned", "register"], out[-3000:]
    assert "teacher: top-8 log-probs" in out  # the heal stage's log reaches the output
    rec = _ghosted_block(repo / "models" / "healed")
    heal = rec["heal"]
    assert rec["healed"] is True and heal["heldout_nll_after"] < heal["heldout_nll_before"] and heal["steps_run"] == 3
    assert [r[0] for r in _registry(repo)] == ["1", "2"]
    v2, run2 = _version(repo, "2")
    assert v2.tags["healed"] == run2.data.tags["healed"] == str(rec["healed"]).lower()
    assert run2.data.params["heal.enabled"] == "True" and run2.data.params["heal.steps"] == "3"
    assert run2.data.params["heal.source"] == "base/heal.txt" and run2.data.params["heal.lr"] == "0.003"
    assert run2.data.metrics["heal/steps"] == heal["steps_run"]
    assert run2.data.metrics["heal/heldout_nll_before"] == pytest.approx(heal["heldout_nll_before"])
    assert run2.data.metrics["heal/heldout_nll_after"] == pytest.approx(heal["heldout_nll_after"])
    listed = json.loads(run(repo, "ghosted", "registry", "list", "--json", "--config", "params.yaml").stdout)
    assert [r["healed"] for r in listed] == [False, rec["healed"]]
    summary = (repo / "reports" / "pipeline" / "summary.md").read_text()
    assert f"- Healed: {'yes' if rec['healed'] else 'no'} (" in summary and "held-out loss" in summary

    # registry.register: false on a plain repro: the register stage writes its reports, no version.
    registered = _registry(repo)
    set_params(repo, registry={"register": False})
    assert _ran(dvc(repo, "repro")) == ["register"]
    assert _registry(repo) == registered
    assert "not registered: registry.register: false" in (repo / "reports" / "pipeline" / "summary.md").read_text()

    # A changed base model: refreshing the fingerprint makes every stage that reads the model stale.
    save_tiny(repo / "base" / "tiny-llama", seed=1)
    assert "Data and pipelines are up to date." in dvc(repo, "status")  # DVC cannot see the model by itself
    dvc(repo, "repro", "--force", "--single-item", "fingerprint")
    assert json.loads((repo / "data" / "base_model.json").read_text())["fingerprint"] != base["fingerprint"]
    assert set(json.loads(dvc(repo, "status", "--json"))) == {"calibrate", "score", "solve", "fuse", "heal",
                                                               "evaluate_dense"}


def test_a_bad_param_ends_the_flow_with_one_line_and_no_retry(tmp_path, capsys):
    from tests.mlops.dvc_repo import set_params

    repo = _flow_repo(tmp_path)
    set_params(repo, prune={"recovery": "ghots"})
    assert compress_mod.main(["--repo", str(repo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ghosted: error:") and "did you mean 'ghost'" in err[-1]
    assert not (repo / "dvc.lock").exists()  # checked before any stage ran

    # A mistake only the stage sees (a missing calibration file): its `ghosted: error:` line, one attempt.
    set_params(repo, prune={"recovery": "ghost"}, calibration={"source": "base/missing.txt"})
    state = compress_mod.compress(repo=str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(GhostedError, match="missing.txt"):
        state.result()
    states = _task_states(state.state_details.flow_run_id)
    assert states["fingerprint"] == ["Completed"] and states["calibrate"] == ["Failed"]  # no retry
    assert "score" not in states


def test_stage_order_follows_the_dag():
    order = compress_mod.stage_order(Path(__file__).resolve().parents[2] / "dvc.yaml")
    assert order[0] == "fingerprint" and order[-1] == "register"
    for before, after in [("calibrate", "score"), ("solve", "fuse"), ("fuse", "heal"), ("heal", "evaluate_pruned")]:
        assert order.index(before) < order.index(after)


def test_model_lock_serializes_runs_of_one_model(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("GHOSTED_CACHE", str(tmp_path / "cache"))
    with compress_mod.model_lock("smollm2-135m", tmp_path) as path:
        probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
                 "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n"
                 "    sys.exit(3)")
        assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 3  # held
        with compress_mod.model_lock("gemma3-270m", tmp_path) as other:
            assert other != path  # another model is not blocked
    assert subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0  # released


def test_serve_entry_point_schedules_the_flow(monkeypatch, tmp_path):
    """--serve (against the harness's server) serves the deployment ghosted-recompress/scheduled, one run at a
    time; tests/mlops/test_schedule.py runs it against `prefect server start`."""
    seen = {}
    monkeypatch.setattr(recompress_mod.recompress, "serve", lambda **kw: seen.update(kw))
    assert recompress_mod.main(["--serve", "--cron", "0 3 * * *", "--repo", str(tmp_path)]) == 0
    assert seen["schedule"].cron == "0 3 * * *" and seen["schedule"].active and seen["name"] == "scheduled"
    assert seen["parameters"] == {"repo": str(tmp_path.resolve())}
    assert seen["global_limit"].limit == 1 and seen["global_limit"].collision_strategy.value == "CANCEL_NEW"
    assert recompress_mod.main(["--serve", "--interval", "60", "--repo", str(tmp_path)]) == 0
    assert seen["schedule"].interval.total_seconds() == 60 and seen["schedule"].cron is None
    for bad in (["--cron", "0 3 * * *"], ["--serve", "--interval", "0"], ["--serve", "--cron", "3am"]):
        with pytest.raises(SystemExit):
            recompress_mod.main(bad)


def test_sweep_on_a_dask_cluster_equals_the_sequential_run(tmp_path):
    """The grid runs as Prefect tasks on a local Dask cluster (worker processes), from one shared capture,
    and gives exactly the numbers of the one-task-at-a-time run."""
    import os

    import yaml

    from flows import sweep as sweep_mod

    model = _tiny(tmp_path / "tiny-llama")
    params = _params(tmp_path, model)
    doc = yaml.safe_load(params.read_text())
    doc["sweep"] = {"remove": [1, 2], "recovery": ["none", "ghost"], "workers": 2, "threads_per_worker": 1,
                    "eval": doc["eval"]}
    params.write_text(yaml.safe_dump(doc))

    dask = sweep_mod.run(str(params), str(tmp_path / "work-dask"))
    seq = sweep_mod.run(str(params), str(tmp_path / "work-seq"), sequential=True)
    assert dask["runner"].startswith("dask local cluster, 2 workers")
    assert len(dask["cells"]) == 4 and dask["dense"]["method"] == "dense"  # dense + 2 x 2
    assert {c["worker"]["pid"] for c in [dask["dense"], *dask["cells"]]}.isdisjoint({os.getpid()})  # in the workers
    assert {c["worker"]["pid"] for c in [seq["dense"], *seq["cells"]]} == {os.getpid()}
    assert dask["shared"]["reused"] == "no"
    work = tmp_path / "work-dask"
    assert [p.name for p in work.rglob("stats.*")] == ["stats.safetensors"]  # no pickle on the shared disk
    assert dask["dense"]["ppl"] == seq["dense"]["ppl"]
    for a, b in zip(dask["cells"], seq["cells"]):
        assert (a["k"], a["method"], a.get("removed")) == (b["k"], b["method"], b.get("removed"))
        assert a["ppl"] == b["ppl"]
    by = {(c["k"], c["method"]): c for c in dask["cells"]}
    src = next(iter(dask["dense"]["ppl"]))
    for k in (1, 2):  # a ghost the guard kept changes the model; a fallback is plain removal
        ghost, none = by[(k, "ghost")], by[(k, "none")]
        assert ghost["removed"] == none["removed"]
        assert (ghost["ppl"][src]["ppl"] == none["ppl"][src]["ppl"]) == ghost["guard"]["fallback"]
    assert not by[(1, "ghost")]["guard"]["fallback"]

    write_report(dask, tmp_path / "report", name="sweep")
    md = (tmp_path / "report" / "sweep.md").read_text()
    assert md.startswith("# Sweep: ") and "| 2 | ghost |" in md and "- Runner: dask local cluster" in md
    again = sweep_mod.run(str(params), str(work), sequential=True)
    assert again["shared"]["reused"] == "yes"  # the shared statistics are computed once per input set
    assert [c["ppl"] for c in again["cells"]] == [c["ppl"] for c in seq["cells"]]

    # A capture file changed after it was written: the cache refuses it and computes the statistics again.
    stats = next(work.rglob("stats.safetensors"))
    stats.write_bytes(stats.read_bytes()[:-8] + bytes(8))
    redo = sweep_mod.run(str(params), str(work), sequential=True)
    assert redo["shared"]["reused"] == "no"
    assert [c["ppl"] for c in redo["cells"]] == [c["ppl"] for c in seq["cells"]]


def test_sweep_cell_refuses_a_capture_changed_since_written(tmp_path):
    """A worker checks the file against the sha256 the shared-statistics task recorded before loading it."""
    import yaml

    from flows import sweep as sweep_mod

    params = _params(tmp_path, _tiny(tmp_path / "tiny-llama"))
    doc = yaml.safe_load(params.read_text())
    doc["sweep"] = {"remove": [1], "recovery": ["ghost"], "eval": doc["eval"]}
    params.write_text(yaml.safe_dump(doc))
    res = sweep_mod.run(str(params), str(tmp_path / "w"), sequential=True)
    shared = {**res["shared"], "calib": str(Path(res["shared"]["stats"]).parent / "calibration")}
    Path(shared["stats"]).write_bytes(Path(shared["stats"]).read_bytes()[:-8] + bytes(8))
    with pytest.raises(GhostedError, match="sha256 does not match"):
        sweep_mod.sweep_cell.fn(str(tmp_path / "tiny-llama"), shared, 1, "ghost", {"select": "angular"},
                                doc["eval"], 1)


def test_no_pickle_anywhere():
    """Nothing in the project unpickles: shared statistics, checkpoints and calibration are safetensors/JSON."""
    root = Path(__file__).resolve().parents[2]
    banned = ("import pickle", "torch.load(", "weights_only", "cloudpickle", "joblib.load(")
    hits = [f"{path.relative_to(root)}: {word}" for folder in ("ghosted", "flows", "scripts")
            for path in (root / folder).rglob("*.py") for word in banned if word in path.read_text()]
    assert hits == []


def test_sweep_rejects_bad_settings(tmp_path):
    import yaml

    from flows import sweep as sweep_mod

    params = _params(tmp_path, _tiny(tmp_path / "tiny-llama"))
    doc = yaml.safe_load(params.read_text())
    doc["sweep"] = {"recovery": ["ghots"]}
    params.write_text(yaml.safe_dump(doc))
    with pytest.raises(GhostedError, match="ghots"):
        sweep_mod.run(str(params), str(tmp_path / "w"))
