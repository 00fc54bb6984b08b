"""The registry as a product and under faults: real MLflow on SQLite, real `ghosted register` processes.

- the gate refuses impossible metrics (pure);
- a registered version is an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/NAME@champion")`
  generates the same text as `ghosted.load` + generate, and `mlflow models serve` answers /invocations;
- registering is idempotent (by checkpoint content);
- kill -9 at several points of a register, 8 concurrent registers, a locked database, read-only commands on
  missing stores, a bogus URI.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from ghosted.cli import main  # noqa: E402
from ghosted.config import GateConfig  # noqa: E402
from ghosted.evaluation.gate import apply_gate  # noqa: E402
from tests.mlops.metrics_docs import stamp  # noqa: E402
from tests.tiny_models import make_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; pruning removes layers. " * 3
                   for i in range(40))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
       "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- the gate refuses impossible metrics


def _doc(wiki: float, ptb: float = 20.0, acc: float | None = 0.5) -> dict:
    return {"ppl": {"wiki": {"ppl": wiki}, "ptb": {"ppl": ptb}},
            "zeroshot": None if acc is None else {"average": {"acc_norm": acc}}}


@pytest.mark.parametrize("wiki", [-1.0, 0.0, math.inf, -math.inf, math.nan])
def test_gate_fails_impossible_pruned_perplexity(wiki):
    v = apply_gate(_doc(10.0), _doc(wiki), GateConfig(max_ppl_ratio=2.0, min_retained_acc=0.9))
    assert not v.passed and "pruned wiki perplexity" in v.reason and "not a finite positive number" in v.reason
    assert v.rank_value is None and "wiki" not in v.ppl_ratio
    # Even with the ratio check off, an impossible number is a broken evaluation, not a champion.
    assert not apply_gate(_doc(10.0), _doc(wiki), GateConfig(max_ppl_ratio=None, min_retained_acc=None)).passed


@pytest.mark.parametrize("dense, pruned, message", [
    (_doc(0.0), _doc(12.0), "dense wiki perplexity is 0.0"),
    (_doc(10.0, ptb=-5.0), _doc(12.0), "dense ptb perplexity is -5.0"),
    (_doc(10.0), _doc(12.0, acc=0.0), "pruned zero-shot average acc_norm is 0.0"),
    (_doc(10.0), _doc(12.0, acc=1.5), "pruned zero-shot average acc_norm is 1.5"),
    (_doc(10.0, acc=math.nan), _doc(12.0), "dense zero-shot average acc_norm is nan"),
    (_doc(10.0), _doc(12.0, acc=None), "no zero-shot average acc_norm in both metrics files"),
    ({"ppl": {}}, _doc(12.0), "no wiki perplexity in both metrics files"),
])
def test_gate_fails_impossible_or_missing_numbers(dense, pruned, message):
    v = apply_gate(dense, pruned, GateConfig(max_ppl_ratio=2.0, min_retained_acc=0.9))
    assert not v.passed and message in v.reason, v.reason


def test_gate_passes_sane_numbers():
    v = apply_gate(_doc(10.0), _doc(12.0, ptb=24.0, acc=0.48), GateConfig(max_ppl_ratio=2.0, min_retained_acc=0.9))
    assert v.passed and v.rank_value == pytest.approx(1.2) and v.retained_acc == pytest.approx(0.96)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny pruned checkpoint WITH a ghost (guard off), written by the real CLI."""
    root = tmp_path_factory.mktemp("registry")
    model, tok = make_tiny("llama", num_layers=6)
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    (root / "calib.txt").write_text(TEXT)
    assert main(["prune", str(root / "tiny-llama"), "--remove", "2", "--calib-source", str(root / "calib.txt"),
                 "--n-seqs", "6", "--seq-len", "16", "--guard", "off", "--quiet", "--out", str(root / "ghost")]) == 0
    assert json.loads((root / "ghost" / "config.json").read_text())["ghosted"]["ghosts"]
    return root / "ghost"


def variant(ckpt: Path, where: Path, i: int) -> Path:
    """A copy of the checkpoint with different content (an extra file), so it is a different version."""
    out = where / f"ckpt-{i}"
    shutil.copytree(ckpt, out)
    (out / "NOTES.txt").write_text(f"variant {i}\n")
    return out


def metrics(where: Path, tag: str, wiki_ratio: float, acc: float = 0.5, ckpt: Path | None = None,
            protocol: str = "p1") -> tuple[Path, Path]:
    """(pruned, dense) `ghosted eval`-shaped results files; with `ckpt`, with the provenance blocks of an evaluation
    of that checkpoint and of its base model on `protocol` (without, as an older `ghosted eval` wrote them)."""
    def doc(wiki: float, ptb: float, a: float) -> dict:
        return {"model": "x", "ppl": {"wiki": {"ppl": wiki, "nll": 0.0}, "ptb": {"ppl": ptb, "nll": 0.0}},
                "zeroshot": {"tasks": {"piqa": {"acc": a, "acc_norm": a}}, "average": {"acc": a, "acc_norm": a}}}

    where.mkdir(parents=True, exist_ok=True)
    dense, pruned = where / f"dense-{tag}.json", where / f"pruned-{tag}.json"
    d, p = doc(10.0, 20.0, 0.5), doc(10.0 * wiki_ratio, 20.0 * min(wiki_ratio, 1.2), acc)
    if ckpt is not None:
        d, p = stamp(d, base_of=ckpt, protocol=protocol), stamp(p, checkpoint=ckpt, protocol=protocol)
    dense.write_text(json.dumps(d))
    pruned.write_text(json.dumps(p))
    return pruned, dense


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _register_cmd(ck: Path, pruned: Path, dense: Path, uri: str, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ghosted.cli", "register", str(ck), "--metrics", str(pruned), "--dense-metrics",
            str(dense), "--tracking-uri", uri, "--name", name, *extra]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _register(capsys, ck: Path, uri: str, name: str, ratio: float, where: Path, acc: float = 0.5,
              protocol: str = "p1") -> tuple[dict, str]:
    pruned, dense = metrics(where, f"{ck.name}-{ratio}-{acc}-{protocol}", ratio, acc, ck, protocol)
    code, out, err = _cli(capsys, "register", ck, "--metrics", pruned, "--dense-metrics", dense,
                          "--tracking-uri", uri, "--name", name)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def _consistent(uri: str, name: str) -> dict:
    """Registry invariants after any sequence of (possibly killed) registers; returns the model's state."""
    c = _client(uri)
    model = c.get_registered_model(name)
    versions = {str(v.version): v for v in c.search_model_versions(f"name='{name}'")}
    for v in versions.values():
        assert v.tags.get("champion_decision"), f"version {v.version} has no decision"
        assert v.tags.get("registration") == "done", f"version {v.version} left {v.tags.get('registration')}"
        assert c.get_run(v.run_id).info.status in ("FINISHED", "FAILED")
    champ = model.aliases.get("champion")
    hist = [h for h in model.tags.get("champion_history", "").split(",") if h]
    if champ is not None:
        assert hist and hist[-1] == str(champ)
    for h in hist:  # every version that held the alias (by the gate) passed the gate
        assert versions[h].tags["gate"] == "pass"
    ranks = [float(versions[h].tags["rank_value"]) for h in hist]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) == len(ranks), hist  # each move was better
    return {"champion": None if champ is None else str(champ), "history": hist, "versions": versions}


# --------------------------------------------------------------------------- the version is an MLflow model


def test_champion_is_a_pyfunc_model_that_generates(ckpt, tmp_path, capsys):
    import mlflow.pyfunc
    import pandas as pd
    import torch
    from transformers import AutoTokenizer

    import ghosted

    uri, name = _uri(tmp_path), "m-pyfunc"
    res, _ = _register(capsys, ckpt, uri, name, 1.2, tmp_path)
    assert res["registered"] and res["champion"] == res["version"] == "1"
    c = _client(uri)
    v = c.get_model_version(name, "1")
    assert v.source.endswith("/model") and v.tags["checkpoint_sha256"] == res["checkpoint_sha256"]
    local = Path(c.download_artifacts(res["run_id"], "model", str(tmp_path / "dl")))
    mlmodel = (local / "MLmodel").read_text()
    assert "python_function" in mlmodel and "signature:" in mlmodel and "max_new_tokens" in mlmodel
    assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()
    reqs = (local / "requirements.txt").read_text().splitlines()
    names = {r.split("==")[0].split("[")[0] for r in reqs}
    assert {"mlflow", "torch", "transformers", "safetensors"} <= names
    assert not names & {"dvc", "prefect", "pytest", "uvicorn"}, reqs  # the project's needs, not the whole env
    assert not (local / "code").exists() and "ghosted" in names  # runs the installed ghosted (pinned), no stored copy
    assert not list(local.rglob("*.pkl")), "the model must not be a pickle"

    old = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        m = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(old[0])
        mlflow.set_registry_uri(old[1])
    prompts = ["the quick brown", "pruning removes"]
    out = m.predict(prompts, params={"max_new_tokens": 6})
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) and t for t in out)
    assert m.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 6}) == out
    # The same text as the checkpoint itself, ghost included (greedy decoding, left padding).
    model, tok = ghosted.load(str(ckpt)), AutoTokenizer.from_pretrained(str(ckpt))
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out == tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_mlflow_models_serve_answers_invocations(ckpt, tmp_path, capsys):
    uri, name = _uri(tmp_path), "m-serve"
    _register(capsys, ckpt, uri, name, 1.2, tmp_path)
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**ENV, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
                                 # MLflow execs `uvicorn` from PATH: this interpreter's environment first.
                                 "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "server did not start: " + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        a = _post(f"{url}/invocations", {"inputs": ["the quick brown", "hello"], "params": {"max_new_tokens": 5}})
        assert len(a["predictions"]) == 2 and all(isinstance(t, str) and t for t in a["predictions"]), a
        b = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["prompt"], "data": [["the quick brown"]]},
                                         "params": {"max_new_tokens": 5}})
        assert b["predictions"] == a["predictions"][:1]  # greedy: same prompt, same text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


# --------------------------------------------------------------------------- what a run records


@pytest.fixture(scope="module")
def evaluated(tiny_folder, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, pruned, dense): a pruned tiny model (its context fits PIQA) and the real `ghosted eval` of it
    and of its base model."""
    root = tmp_path_factory.mktemp("evaluated")
    (root / "calib.txt").write_text(TEXT)
    ckpt = root / "ckpt"
    assert main(["prune", str(tiny_folder), "--remove", "2", "--calib-source", str(root / "calib.txt"), "--n-seqs",
                 "6", "--seq-len", "16", "--quiet", "--out", str(ckpt)]) == 0
    out = {}
    for which, model in (("pruned", ckpt), ("dense", tiny_folder)):
        out[which] = root / f"eval-{which}.json"
        assert main(["eval", str(model), "--tasks", "piqa", "--limit", "3", "--ppl", "wiki", "--ppl-windows", "2",
                     "--seq-len", "16", "--quiet", "--out", str(out[which])]) == 0
    return ckpt, out["pruned"], out["dense"]


def _head() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_run_has_measurements_as_metrics_configuration_as_params_and_its_datasets(evaluated, tmp_path, capsys):
    from ghosted.evaluation.zeroshot import default_cache_dir
    from ghosted.mlops.registry import CONFIG_KEYS, is_configuration

    ckpt, pruned, dense = evaluated
    uri = _uri(tmp_path)
    code, out, err = _cli(capsys, "register", ckpt, "--metrics", pruned, "--dense-metrics", dense,
                          "--tracking-uri", uri, "--name", "m-run")
    assert code == 0, err
    run = _client(uri).get_run(json.loads(out.strip().splitlines()[-1])["run_id"])
    # The commit under MLflow's standard tag (the UI links it); no home-made commit tag.
    if _head() is not None:
        assert run.data.tags["mlflow.source.git.commit"] == _head() and run.data.tags["git_dirty"] in ("true", "false")
    assert "git_commit" not in run.data.tags
    # Metrics: the measurements, nothing else.
    metrics = run.data.metrics
    expected = {f"{w}/{m}" for w in ("dense", "pruned") for m in
                ("ppl/wiki/ppl", "ppl/wiki/nll", "zeroshot/average/acc", "zeroshot/average/acc_norm", "seconds",
                 *(f"zeroshot/tasks/piqa/{a}" for a in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")))}
    expected |= {"gate/pass", "gate/ppl_ratio/wiki", "gate/retained_acc"}
    assert set(metrics) == expected, sorted(set(metrics) ^ expected)
    for key, value in metrics.items():
        path = tuple(key.split("/")[1:])
        assert path[-1] not in CONFIG_KEYS and "settings" not in path and not is_configuration(path, value), key
    # Configuration: params, once where both evaluations agree, per side where they differ.
    params = run.data.params
    assert params["eval.ppl.wiki.windows"] == "2" and params["eval.ppl.wiki.seq_len"] == "16"
    assert params["eval.settings.seq_len"] == "16" and params["eval.settings.tasks"] == '["piqa"]'
    assert params["eval.zeroshot.tasks.piqa.n"] == "3" and params["eval.zeroshot.limit"] == "3"
    assert params["eval.pruned.model"] != params["eval.dense.model"]
    assert params["calibration.n"] == "6" and params["calibration.seq_len"] == "16"
    # Dataset inputs: the calibration set and each evaluation set, with their sha256 and role.
    meta = json.loads((ckpt / "config.json").read_text())["ghosted"]
    doc = json.loads(pruned.read_text())
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    role = {n: {t.key: t.value for t in i.tags}["mlflow.data.context"] for n, i in inputs.items()}
    calib = f"calibration:{meta['calibration']['source']}"
    assert role == {calib: "calibration", "ppl:wiki": "evaluation", "zeroshot:piqa": "evaluation"}
    cal = inputs[calib].dataset
    assert cal.digest == meta["calibration_sha256"][:32] and cal.source_type == "local"
    assert json.loads(cal.profile) == {"n": 6, "seq_len": 16, "seed": 0, "sha256": meta["calibration_sha256"]}
    wiki = inputs["ppl:wiki"].dataset
    assert wiki.digest == doc["ppl"]["wiki"]["sha256"][:32] and wiki.source_type == "ghosted"
    assert json.loads(wiki.profile) == {"windows": 2, "seq_len": 16, "tokens_scored": 30,
                                        "sha256": doc["ppl"]["wiki"]["sha256"]}
    piqa, task = inputs["zeroshot:piqa"].dataset, doc["zeroshot"]["tasks"]["piqa"]
    with open(default_cache_dir() / task["data_file"], "rb") as f:  # the items scored: the file's first 3 lines
        first3 = hashlib.sha256(b"".join(next(f) for _ in range(3))).hexdigest()
    assert task["sha256"] == first3 and piqa.digest == first3[:32]
    assert json.loads(piqa.profile)["n"] == 3 and json.loads(piqa.profile)["data_file"] == task["data_file"]


def test_real_evaluations_of_another_checkpoint_or_protocol_are_refused_in_one_line(evaluated, tiny_folder, tmp_path,
                                                                                      capsys):
    """`ghosted eval` JSONs: another checkpoint's metrics and a dense evaluation on other windows are refused before
    MLflow is touched (no database); the checkpoint's own pair on one protocol registers."""
    ckpt, pruned, dense = evaluated
    uri, db = _uri(tmp_path), tmp_path / "db"
    other = variant(ckpt, tmp_path, 1)
    wider = tmp_path / "dense-3-windows.json"
    assert main(["eval", str(tiny_folder), "--tasks", "piqa", "--limit", "3", "--ppl", "wiki", "--ppl-windows", "3",
                 "--seq-len", "16", "--quiet", "--out", str(wider)]) == 0
    capsys.readouterr()
    for ck, p, d, expect in (
            (other, pruned, dense, f"{pruned} is not the evaluation of {other}: it evaluated {ckpt} (checkpoint "),
            (ckpt, pruned, wider, f"{wider} and {pruned} were measured on different protocols (ppl 'wiki': sha256 ")):
        code, out, err = _cli(capsys, "register", ck, "--metrics", p, "--dense-metrics", d, "--tracking-uri", uri,
                              "--name", "m-own", "--quiet")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expect in lines[0] and not out, err
        assert not db.exists()
    assert "windows 3 (dense) vs 2 (pruned)" in lines[0] and "zero-shot" not in lines[0]
    assert f"`ghosted eval {tiny_folder} " in lines[0] and "--ppl-windows 2" in lines[0]  # the dense, as the pruned
    code, out, err = _cli(capsys, "register", ckpt, "--metrics", pruned, "--dense-metrics", dense,
                          "--tracking-uri", uri, "--name", "m-own", "--quiet")
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["registered"], err
    assert res["protocol_sha256"] == json.loads(pruned.read_text())["provenance"]["protocol_sha256"]
    assert _client(uri).get_model_version("m-own", res["version"]).tags["protocol_sha256"] == res["protocol_sha256"]


def test_shipped_pipeline_metrics_are_few_and_measurements(tmp_path):
    """The committed shipped-model evaluations (reports/pipeline) give a short list of metrics, none a setting."""
    from ghosted.mlops.registry import evaluation_params, split_evaluation

    dense, pruned = (json.loads((ROOT / "reports" / "pipeline" / f"{w}.json").read_text()) for w in ("dense", "pruned"))
    metrics = {**split_evaluation(dense, "dense")[0], **split_evaluation(pruned, "pruned")[0]}
    sources, tasks = len(pruned["ppl"]), len(pruned["zeroshot"]["tasks"])
    # per evaluation: ppl and nll per source, 4 per task, the average's acc and acc_norm, seconds
    assert len(metrics) == 2 * (2 * sources + 4 * tasks + 2 + 1), sorted(metrics)
    assert not any(k.rsplit("/", 1)[-1] in ("windows", "seq_len", "tokens_scored", "n", "limit", "batch_size")
                   for k in metrics)
    params = evaluation_params(dense, pruned)
    assert "eval.ppl.wiki.windows" in params
    limit = pruned["settings"]["limit"]  # an unset limit (every item) is not a param; the items scored always are
    assert params.get("eval.settings.limit") == (None if limit is None else str(limit))
    for task, res in pruned["zeroshot"]["tasks"].items():
        assert params[f"eval.zeroshot.tasks.{task}.n"] == str(res["n"])


# --------------------------------------------------------------------------- idempotent registration


def test_registering_the_same_checkpoint_again_is_a_no_op(ckpt, tmp_path, capsys):
    uri, name = _uri(tmp_path), "m-idem"
    first, _ = _register(capsys, ckpt, uri, name, 1.2, tmp_path)
    # The same content under another path, with worse metrics: not registered, the gate still reported.
    again, err = _register(capsys, shutil.copytree(ckpt, tmp_path / "copy"), uri, name, 3.0, tmp_path)
    assert not again["registered"] and again["version"] == again["duplicate_of"] == first["version"]
    assert again["gate"] == "fail" and "wiki perplexity ratio 3.000 > max_ppl_ratio" in again["reasons"][0]
    assert again["recorded_gate"] == "pass" and again["champion"] == "1" and not again["champion_moved"]
    assert f"is already version {first['version']}; not registered again" in err
    assert "gate fail" in err and "registered with gate pass" in err
    c = _client(uri)
    assert [str(v.version) for v in c.search_model_versions(f"name='{name}'")] == ["1"]
    exp = c.get_experiment_by_name("ghosted")
    assert len(c.search_runs([exp.experiment_id])) == 1  # no new run, no second copy of the checkpoint
    # Different content is a new version.
    new, _ = _register(capsys, variant(ckpt, tmp_path, 1), uri, name, 1.1, tmp_path)
    assert new["registered"] and new["version"] == "2" and new["champion"] == "2"


def test_impossible_metric_never_becomes_champion(ckpt, tmp_path, capsys):
    uri, name = _uri(tmp_path), "m-impossible"
    _register(capsys, ckpt, uri, name, 1.3, tmp_path)
    res, _ = _register(capsys, variant(ckpt, tmp_path, 1), uri, name, -0.1, tmp_path)
    assert res["gate"] == "fail" and "not a finite positive number" in res["reasons"][0]
    assert res["champion"] == "1" and _consistent(uri, name)["champion"] == "1"


# --------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("point", ["run-created", "version-created", "alias-moved"])
def test_register_killed_at_a_point_is_recovered_by_the_next(point, ckpt, tmp_path, capsys):
    uri, name = _uri(tmp_path), f"m-kill-{point}"
    _register(capsys, ckpt, uri, name, 1.3, tmp_path)  # version 1, champion
    killed = variant(ckpt, tmp_path, 1)
    pruned, dense = metrics(tmp_path, "killed", 1.1, ckpt=killed)
    cmd = _register_cmd(killed, pruned, dense, uri, name, "--quiet")
    cmd[1:3] = ["-m", "tests.mlops.faults", point, "--"]  # the same `ghosted register`, killed at `point`
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    c = _client(uri)
    exp = c.get_experiment_by_name("ghosted").experiment_id
    running = [r for r in c.search_runs([exp]) if r.info.status == "RUNNING"]
    assert len(running) == 1  # what the killed process left behind
    # The next register (another checkpoint) marks the run FAILED and completes the version.
    nxt, _ = _register(capsys, variant(ckpt, tmp_path, 2), uri, name, 1.2, tmp_path)
    assert c.get_run(running[0].info.run_id).info.status == "FAILED"
    state = _consistent(uri, name)
    if point == "run-created":  # died before a version existed
        assert sorted(state["versions"]) == ["1", "2"] and state["champion"] == nxt["version"] == "2"
    else:  # the killed version (1.1) is complete and, being the best, the champion
        assert sorted(state["versions"]) == ["1", "2", "3"] and state["champion"] == "2"
        assert state["history"] == ["1", "2"] and nxt["version"] == "3" and not nxt["champion_moved"]
        # Registering the killed checkpoint again is a no-op that names its version.
        again, _ = _register(capsys, killed, uri, name, 1.1, tmp_path)
        assert not again["registered"] and again["version"] == "2"


def test_register_stopped_in_process_at_a_crash_point_is_completed_by_the_next(ckpt, tmp_path, capsys, monkeypatch):
    """The same hook armed in-process: an exception right after the version exists leaves it pending (its run
    FAILED, the alias not moved); the next register completes it."""
    from ghosted.mlops.registry import faults

    class Stop(BaseException):
        pass

    def stop(point: str) -> None:
        if point == "version-created":
            raise Stop(point)

    uri, name = _uri(tmp_path), "m-fault-in-process"
    pruned, dense = metrics(tmp_path, "stopped", 1.1, ckpt=ckpt)
    monkeypatch.setattr(faults, "point", stop)
    with pytest.raises(Stop):
        main(["register", str(ckpt), "--metrics", str(pruned), "--dense-metrics", str(dense), "--tracking-uri", uri,
              "--name", name, "--quiet"])
    monkeypatch.undo()
    c = _client(uri)
    (pending,) = c.search_model_versions(f"name='{name}'")
    assert pending.tags["registration"] == "pending" and c.get_run(pending.run_id).info.status == "FAILED"
    assert c.get_registered_model(name).aliases.get("champion") is None
    capsys.readouterr()
    nxt, _ = _register(capsys, variant(ckpt, tmp_path, 1), uri, name, 1.2, tmp_path)
    state = _consistent(uri, name)
    assert sorted(state["versions"]) == ["1", "2"] and state["champion"] == "1" and state["history"] == ["1"]
    assert nxt["version"] == "2" and not nxt["champion_moved"]


def test_register_killed_from_outside_at_any_time(ckpt, tmp_path, capsys):
    """A real kill -9 from another process as soon as the run exists (no hook in the code)."""
    uri, name = _uri(tmp_path), "m-kill-outside"
    _register(capsys, ckpt, uri, name, 1.3, tmp_path)
    outside = variant(ckpt, tmp_path, 1)
    pruned, dense = metrics(tmp_path, "outside", 1.1, ckpt=outside)
    proc = subprocess.Popen(_register_cmd(outside, pruned, dense, uri, name, "--quiet"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    db = Path(uri[len("sqlite:///"):])
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        with sqlite3.connect(db, timeout=30) as con:
            if con.execute("select count(*) from runs where status='RUNNING'").fetchone()[0]:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _register(capsys, variant(ckpt, tmp_path, 2), uri, name, 1.2, tmp_path)
    state = _consistent(uri, name)
    best = min(state["versions"].values(), key=lambda v: float(v.tags["rank_value"]))
    assert state["champion"] == str(best.version)


# --------------------------------------------------------------------------- concurrency


def test_eight_concurrent_registers_keep_the_champion_consistent(ckpt, tmp_path):
    uri, name = _uri(tmp_path), "m-concurrent"
    ratios = [1.45, 1.3, 2.5, 1.15, 1.25, 3.0, 1.05, 1.35]  # 2.5 and 3.0 fail the default max_ppl_ratio
    procs = []
    for i, r in enumerate(ratios):
        ck = variant(ckpt, tmp_path, i)
        pruned, dense = metrics(tmp_path / "m", f"c{i}", r, ckpt=ck)
        procs.append(subprocess.Popen(_register_cmd(ck, pruned, dense, uri, name, "--quiet"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(int(r["version"]) for r in results) == list(range(1, 9)) and all(r["registered"] for r in results)
    state = _consistent(uri, name)
    best = min((v for v in state["versions"].values() if v.tags["gate"] == "pass"),
               key=lambda v: float(v.tags["rank_value"]))
    assert float(best.tags["rank_value"]) == pytest.approx(1.05) and state["champion"] == str(best.version)
    assert sum(r["champion_moved"] for r in results) == len(state["history"])


def test_a_concurrent_insert_of_the_same_dataset_is_retried_and_other_integrity_errors_are_not():
    """MLflow's log_inputs looks a dataset up and inserts it in one transaction: of two registers that both found
    it missing, one fails on the UNIQUE constraint (seen in the test above under load); its retry links the row."""
    from ghosted.errors import GhostedError
    from ghosted.mlops.registry.connection import retry

    calls = []

    def log_inputs():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                               "datasets.name, datasets.digest")
        return "linked"

    assert retry(log_inputs, "db", timeout=5.0) == "linked" and len(calls) == 2

    def other():
        raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: model_versions.name")

    with pytest.raises(RuntimeError, match="model_versions"):
        retry(other, "db", timeout=5.0)

    def always():  # a race that never clears ends in one line that names it, not a lock
        raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.digest")

    with pytest.raises(GhostedError, match="dataset row") as err:
        retry(always, "db", timeout=0.5)
    assert "locked" not in str(err.value)


# --------------------------------------------------------------------------- locked database, missing stores


def _lock_db(db: Path, seconds: float) -> subprocess.Popen:
    """Another process holding an EXCLUSIVE SQLite lock on db for `seconds`."""
    code = (f"import sqlite3, sys, time\nc = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            f"c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep({seconds})\nc.execute('ROLLBACK')\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_locked_database_is_retried_then_one_line(ckpt, tmp_path, capsys):
    uri, name = _uri(tmp_path), "m-locked"
    _register(capsys, ckpt, uri, name, 1.2, tmp_path)
    db = Path(uri[len("sqlite:///"):])
    holder = _lock_db(db, 60)
    try:
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "ghosted.cli", "registry", "list", "--tracking-uri", uri,
                               "--db-timeout", "2"], capture_output=True, text=True, env=ENV, timeout=300)
        took = time.monotonic() - t
    finally:
        holder.kill()
        holder.wait()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len([ln for ln in lines if ln.startswith("ghosted: error:")]) == 1 and "is locked by another process" in \
        proc.stderr and took < 120
    # Released while the command retries: it succeeds.
    holder = _lock_db(db, 3)
    try:
        code, out, err = _cli(capsys, "registry", "list", "--tracking-uri", uri, "--db-timeout", "120")
    finally:
        holder.wait()
    assert code == 0 and name in out, err


def test_read_only_commands_create_nothing(tmp_path, capsys, monkeypatch):
    from ghosted.config import RegistryConfig
    from ghosted.mlops.registry import recorded_fingerprint

    monkeypatch.chdir(tmp_path)  # so that anything created relative to the cwd shows up below

    missing = tmp_path / "no" / "such" / "dir" / "mlflow.db"
    code, _, err = _cli(capsys, "registry", "list", "--tracking-uri", f"sqlite:///{missing}")
    assert code == 2 and err.startswith("ghosted: error: no MLflow registry at") and len(err.splitlines()) == 1
    assert not (tmp_path / "no").exists()
    (tmp_path / "empty").mkdir()
    for argv in (["registry", "list"], ["registry", "rollback", "x"], ["registry", "promote", "x", "1"]):
        code, _, err = _cli(capsys, *argv, "--tracking-uri", f"sqlite:///{tmp_path / 'empty' / 'mlflow.db'}")
        assert code == 2 and "no MLflow registry" in err
    assert recorded_fingerprint(RegistryConfig(f"sqlite:///{missing}"), "ghosted-x") is None
    assert list((tmp_path / "empty").iterdir()) == [] and not (tmp_path / "no").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("argv", [["registry", "list"], ["registry", "rollback", "m"]])
def test_bogus_tracking_uri_is_one_line(argv, capsys):
    code, _, err = _cli(capsys, *argv, "--tracking-uri", "bogus://x")
    assert code == 2 and err.count("\n") == 1 and err.startswith("ghosted: error: MLflow at bogus://x:"), err


def test_bogus_tracking_uri_in_register_is_one_line(ckpt, tmp_path, capsys):
    pruned, dense = metrics(tmp_path, "bogus", 1.2, ckpt=ckpt)
    code, _, err = _cli(capsys, "register", ckpt, "--metrics", pruned, "--dense-metrics", dense,
                        "--tracking-uri", "bogus://x", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "unsupported URI 'bogus://x'" in err, err
