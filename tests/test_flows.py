"""Prefect flows on a tiny model: real Prefect (test harness), real CLI stages, real MLflow on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("prefect")

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows import compress as compress_mod  # noqa: E402
from flows import recompress as recompress_mod  # noqa: E402
from ghosted.errors import GhostedError  # noqa: E402
from ghosted.report import write_report  # noqa: E402

from .tiny_models import make_tiny  # noqa: E402

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; pruning removes layers. " * 3
                   for i in range(40))


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
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


def test_compress_runs_caches_and_reruns_only_what_changed(tmp_path):
    model = _tiny(tmp_path / "tiny-llama")
    params = _params(tmp_path, model)
    work = tmp_path / "work"
    first = compress_mod.compress(params=str(params), workdir=str(work))
    assert first["gate"] == "pass" and first["version"] == "1" and first["champion"] == "1"
    assert (Path(first["checkpoint"]) / "config.json").is_file()
    assert (tmp_path / "mlflow.db").is_file()  # the relative SQLite URI lives beside params.yaml
    outputs = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and "reports" not in p.parts}

    state = compress_mod.compress(params=str(params), workdir=str(work), return_state=True)
    second = state.result()
    states = _task_states(state.state_details.flow_run_id)
    for stage in ("calibrate", "score", "solve", "fuse"):
        assert states[stage] == ["Cached"], states
    assert states["evaluate"] == ["Cached", "Cached"] and states["register"] == ["Completed"]
    assert second["checkpoint"] == first["checkpoint"] and second["version"] == "1" and not second["registered"]
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs  # nothing rewritten

    # A prune change reruns solve and what follows; calibration and scores stay cached.
    state = compress_mod.compress(params=str(_params(tmp_path, model, "ridge.yaml", ridge=0.01)), workdir=str(work),
                                  return_state=True)
    states = _task_states(state.state_details.flow_run_id)
    assert states["calibrate"] == ["Cached"] and states["score"] == ["Cached"]
    assert states["solve"] == ["Completed"] and states["fuse"] == ["Completed"]
    assert sorted(states["evaluate"]) == ["Cached", "Completed"]  # dense cached, pruned new
    assert len([d for d in (work / "solve").iterdir() if d.is_dir()]) == 2  # two content-addressed folders

    # An output deleted by hand is rebuilt, not served from a stale cache entry.
    import shutil

    shutil.rmtree(Path(first["checkpoint"]))
    again = compress_mod.compress(params=str(params), workdir=str(work))
    assert again["checkpoint"] == first["checkpoint"] and (Path(first["checkpoint"]) / "config.json").is_file()


def test_recompress_runs_only_when_the_fingerprint_changes(tmp_path):
    from mlflow import MlflowClient

    model = _tiny(tmp_path / "tiny-base")
    params = _params(tmp_path, model)
    work = str(tmp_path / "work")
    first = recompress_mod.recompress(params=str(params), workdir=work)
    assert first["ran"] and first["previous"] is None and first["version"] == "1"

    same = recompress_mod.recompress(params=str(params), workdir=work)
    assert not same["ran"] and same["fingerprint"] == first["fingerprint"]

    _tiny(model, seed=1)  # a new release of the base model: different weights, same folder
    changed = recompress_mod.recompress(params=str(params), workdir=work)
    assert changed["ran"] and changed["previous"] == first["fingerprint"] != changed["fingerprint"]
    assert changed["version"] == "2"
    # A new base that passes the gate takes the champion alias (ratios of different bases are not compared).
    assert changed["champion"] == "2"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_registered_model("ghosted-tiny-base").tags["base_fingerprint"] == changed["fingerprint"]
    assert len(client.search_model_versions("name='ghosted-tiny-base'")) == 2

    assert not recompress_mod.recompress(params=str(params), workdir=work)["ran"]
    assert recompress_mod.recompress(params=str(params), workdir=work, force=True)["ran"]


def test_bad_params_fail_before_any_work(tmp_path, capsys):
    model = tmp_path / "nowhere"
    params = _params(tmp_path, model)
    text = params.read_text().replace("recovery: ghost", "recovery: ghots")
    params.write_text(text)
    with pytest.raises(GhostedError, match="did you mean 'ghost'"):
        compress_mod.load_params(params)
    assert recompress_mod.main(["--params", str(params), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "ghosted: error:" in err and "did you mean 'ghost'" in err
    assert not (tmp_path / "w").exists()


def test_serve_entry_point_schedules_the_flow(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(recompress_mod.recompress, "serve", lambda **kw: seen.update(kw))
    params = tmp_path / "params.yaml"
    assert recompress_mod.main(["--serve", "--cron", "0 3 * * *", "--params", str(params)]) == 0
    assert seen["cron"] == "0 3 * * *" and seen["name"] == "nightly-recompress"
    assert seen["parameters"]["params"] == str(params.resolve()) and seen["parameters"]["force"] is False
    with pytest.raises(SystemExit):
        recompress_mod.main(["--cron", "0 3 * * *"])


def test_content_keys_follow_file_content(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "x.bin").write_bytes(b"1")
    k1 = compress_mod.stage_key("solve", {"calib": a, "prune": {"remove": 2}})
    assert k1 == compress_mod.stage_key("solve", {"calib": a, "prune": {"remove": 2}})
    assert k1 != compress_mod.stage_key("solve", {"calib": a, "prune": {"remove": 3}})
    (a / "x.bin").write_bytes(b"2")
    assert k1 != compress_mod.stage_key("solve", {"calib": a, "prune": {"remove": 2}})


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
    root = Path(__file__).resolve().parents[1]
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
