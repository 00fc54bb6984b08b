"""Tracking, gate and registry: a real checkpoint (`ghosted prune` on a tiny model), real MLflow on SQLite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from ghosted.cli import main  # noqa: E402
from ghosted.config import GateConfig, RegistryConfig  # noqa: E402
from ghosted.errors import GhostedError  # noqa: E402
from ghosted.evaluation.gate import apply_gate, beats  # noqa: E402
from ghosted.mlops.registry import registered_name  # noqa: E402
from tests.mlops.metrics_docs import stamp  # noqa: E402
from tests.tiny_models import make_tiny  # noqa: E402

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog; pruning removes layers. " * 3
                   for i in range(40))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A tiny dense folder, its pruned checkpoint and its score table, all made by the real CLI."""
    root = tmp_path_factory.mktemp("tracking")
    model, tok = make_tiny("llama", num_layers=6)
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    (root / "calib.txt").write_text(TEXT)
    common = ["--calib-source", str(root / "calib.txt"), "--n-seqs", "6", "--seq-len", "16", "--quiet"]
    assert main(["prune", str(root / "tiny-llama"), "--remove", "2", *common, "--out", str(root / "pruned")]) == 0
    assert main(["score", str(root / "tiny-llama"), "--remove", "2", *common, "--out", str(root / "scores.json")]) == 0
    return {"dense": root / "tiny-llama", "ckpt": root / "pruned", "scores": root / "scores.json"}


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def params(tmp_path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text("gate:\n  max_ppl_ratio: 1.5\n  min_retained_acc: 0.9\n  rank_by: wiki\n")
    return p


def results(path: Path, wiki: float, ptb: float, acc: float | None, **provenance) -> Path:
    """A `ghosted eval` results file with the given numbers; with `checkpoint=` or `base_of=` (and `protocol=`), with
    the provenance block of that evaluation (tests/mlops/metrics_docs.py), else as an older `ghosted eval` wrote it."""
    doc = {"model": "x", "ppl": {"wiki": {"ppl": wiki, "nll": 0.0}, "ptb": {"ppl": ptb, "nll": 0.0}},
           "zeroshot": None if acc is None else {"tasks": {"piqa": {"acc": acc, "acc_norm": acc}},
                                                 "average": {"acc": acc, "acc_norm": acc}}}
    path.write_text(json.dumps(stamp(doc, **provenance) if provenance else doc))
    return path


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _variant(ckpt: Path, out: Path) -> Path:
    """The checkpoint with one extra file: different content, so a new version (registering is idempotent)."""
    if not out.exists():
        shutil.copytree(ckpt, out)
        (out / "NOTES.txt").write_text(out.name)
    return out


def _register(capsys, built, uri, params, tmp_path, name: str, wiki: float, acc: float = 0.5,
              protocol: str | None = "p1", **kw) -> dict:
    """Register a new variant of the checkpoint with these numbers, evaluated on `protocol` (None: metrics files
    without provenance)."""
    tag = f"{wiki}-{acc}-{protocol}"
    ckpt = _variant(built["ckpt"], tmp_path / f"ckpt-{name}-{tag}")
    dense_of = {} if protocol is None else {"base_of": ckpt, "protocol": protocol}
    pruned_of = {} if protocol is None else {"checkpoint": ckpt, "protocol": protocol}
    dense = results(tmp_path / f"dense-{name}-{tag}.json", 10.0, 20.0, 0.5, **dense_of)
    pruned = results(tmp_path / f"pruned-{name}-{tag}.json", 10.0 * wiki, 20.0 * wiki, acc, **pruned_of)
    extra = [x for k, v in kw.items() for x in (f"--{k}", v)]
    code, out, err = _cli(capsys, "register", ckpt, "--metrics", pruned, "--dense-metrics", dense,
                          "--config", params, "--tracking-uri", uri, "--name", name, "--quiet", *extra)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(uri: str, name: str) -> str | None:
    v = _client(uri).get_registered_model(name).aliases.get("champion")
    return None if v is None else str(v)


# --------------------------------------------------------------------------- the gate, pure


def test_gate_verdicts():
    cfg = GateConfig(max_ppl_ratio=1.5, min_retained_acc=0.9)
    dense = {"ppl": {"wiki": {"ppl": 10.0}, "ptb": {"ppl": 20.0}}, "zeroshot": {"average": {"acc_norm": 0.5}}}

    def pruned(w: float, p: float, a: float | None) -> dict:
        return {"ppl": {"wiki": {"ppl": w}, "ptb": {"ppl": p}},
                "zeroshot": None if a is None else {"average": {"acc_norm": a}}}

    ok = apply_gate(dense, pruned(12.0, 25.0, 0.48), cfg)
    assert ok.passed and ok.reasons == () and ok.rank_value == pytest.approx(1.2)
    assert ok.ppl_ratio == pytest.approx({"wiki": 1.2, "ptb": 1.25}) and ok.retained_acc == pytest.approx(0.96)
    bad_ppl = apply_gate(dense, pruned(12.0, 31.0, 0.48), cfg)
    assert not bad_ppl.passed and bad_ppl.reasons == ("ptb perplexity ratio 1.550 > max_ppl_ratio 1.5",)
    bad_acc = apply_gate(dense, pruned(12.0, 25.0, 0.40), cfg)
    assert not bad_acc.passed and "retained accuracy 0.800 < min_retained_acc 0.9" in bad_acc.reason
    assert "no zero-shot average" in apply_gate(dense, pruned(12.0, 25.0, None), cfg).reason
    assert apply_gate(dense, pruned(12.0, 25.0, None), GateConfig(min_retained_acc=None)).passed
    assert not apply_gate(dense, pruned(float("nan"), 25.0, 0.5), cfg).passed
    with pytest.raises(GhostedError, match="unknown gate option"):
        GateConfig.from_dict({"max_ppl": 2})


def test_better_than_champion_rule():
    champ = {"base_fingerprint": "sha256:a", "rank_by": "wiki", "rank_value": "1.3", "retained_acc": "0.9"}
    assert beats({**champ, "rank_value": "1.2"}, champ)[0]
    assert not beats({**champ, "rank_value": "1.4"}, champ)[0]
    assert not beats(dict(champ), champ)[0]
    assert beats({**champ, "retained_acc": "0.95"}, champ)[0]
    assert beats({**champ, "base_fingerprint": "sha256:b", "rank_value": "1.9"}, champ)[0]
    assert beats(champ, None)[0]


def test_registered_names():
    assert registered_name("smollm2-135m") == "ghosted-smollm2-135m"
    assert registered_name("HuggingFaceTB/SmolLM2-135M") == "ghosted-HuggingFaceTB--SmolLM2-135M"
    assert registered_name("/some/where/tiny-llama/") == "ghosted-tiny-llama"


# --------------------------------------------------------------------------- register + gate + champion


def test_gate_pass_registers_champion_with_lineage(built, uri, params, tmp_path, capsys):
    reports = tmp_path / "reports"
    res = _register(capsys, built, uri, params, tmp_path, "m-pass", 1.2, scores=built["scores"], reports=reports)
    assert res["gate"] == "pass" and res["champion_moved"] and res["champion"] == res["version"] == "1"
    client = _client(uri)
    assert _champion(uri, "m-pass") == "1"
    meta = json.loads((built["ckpt"] / "config.json").read_text())["ghosted"]
    v = client.get_model_version("m-pass", "1")
    assert v.tags["base_fingerprint"] == meta["base_fingerprint"]
    assert v.tags["removed_layers"] == ",".join(map(str, meta["removed_layers"]))
    assert v.tags["method"] == "ghost" and v.tags["calibration_sha256"] == meta["calibration_sha256"]
    assert v.tags["gate"] == "pass" and float(v.tags["rank_value"]) == pytest.approx(1.2)
    assert v.tags["healed"] == "false" and "heal_reason" not in v.tags  # never healed
    run = client.get_run(res["run_id"])
    assert len(run.data.tags.get("mlflow.source.git.commit", "x" * 40)) == 40  # MLflow's tag, inside a git checkout
    assert run.data.params["base_model"] == str(built["dense"]) and run.data.params["recovery"] == "ghost"
    assert run.data.metrics["gate/ppl_ratio/wiki"] == pytest.approx(1.2)
    assert run.data.metrics["pruned/ppl/wiki/ppl"] == pytest.approx(12.0)
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"model", "metrics", "reports"} <= arts
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(res["run_id"], "model")}
    [ckpt_dir] = client.list_artifacts(res["run_id"], "model/artifacts")
    assert f"{ckpt_dir.path}/config.json" in {a.path for a in client.list_artifacts(res["run_id"], ckpt_dir.path)}
    gate = json.loads((reports / "gate.json").read_text())
    assert gate["passed"] and gate["ppl_ratio"]["wiki"] == pytest.approx(1.2)
    rows = json.loads((reports / "layer_scores.json").read_text())
    assert len(rows) == 6 and sum(r["removed"] for r in rows) == 2
    assert (reports / "layer_scores.png").stat().st_size > 1000
    assert "version 1" in (reports / "summary.md").read_text()
    # The registered model remembers the base fingerprint (what flows/recompress.py compares against).
    assert client.get_registered_model("m-pass").tags["base_fingerprint"] == meta["base_fingerprint"]


def test_a_healed_checkpoint_is_registered_with_its_recipe(built, uri, params, tmp_path, capsys):
    """`ghosted heal` (a few steps on the tiny model): the run logs the recipe as heal.* params and what healing did
    as heal/ metrics; the run and the version are tagged healed as the checkpoint's lineage says."""
    import ghosted
    from ghosted.config.heal import HealConfig

    (tmp_path / "heal.txt").write_text("\n\n".join(f"Note {i}: rain falls on the green hill by the river. " * 3
                                                    for i in range(40)))
    (tmp_path / "calib.txt").write_text(TEXT)  # the evaluation text here: no healing window may overlap it
    recipe = HealConfig(source=str(tmp_path / "heal.txt"), eval_sources=str(tmp_path / "calib.txt"), n=12,
                        seq_len=16, steps=4, lr=3e-3, eval_every=2, patience=2, holdout=0.25, lora_rank=4, top_k=8,
                        max_minutes=None)
    ckpt = tmp_path / "healed"
    res = ghosted.heal(built["ckpt"], recipe, ckpt, progress=False)
    assert res.healed and res.heldout_nll_after < res.heldout_nll_before and res.steps > 0  # 5.142 -> 5.111
    dense = results(tmp_path / "dense.json", 10.0, 20.0, 0.5, base_of=ckpt, protocol="p1")
    pruned = results(tmp_path / "pruned.json", 12.0, 24.0, 0.5, checkpoint=ckpt, protocol="p1")
    code, out, err = _cli(capsys, "register", ckpt, "--metrics", pruned, "--dense-metrics", dense, "--config", params,
                          "--tracking-uri", uri, "--name", "m-healed", "--quiet")
    assert code == 0, err
    reg = json.loads(out.strip().splitlines()[-1])
    client = _client(uri)
    v, run = client.get_model_version("m-healed", reg["version"]), client.get_run(reg["run_id"])
    assert v.tags["healed"] == run.data.tags["healed"] == str(res.healed).lower()
    assert ("heal_reason" in v.tags) == (not res.healed)
    assert run.data.params["heal.steps"] == "4" and run.data.params["heal.lr"] == "0.003"
    assert run.data.params["heal.train"] == '["lora", "adjacent", "ghosts"]'
    assert not any(k.startswith("heal.curve") or k == "healed" for k in run.data.params)  # the recipe, not the record
    assert run.data.metrics["heal/steps"] == res.steps
    assert run.data.metrics["heal/heldout_nll_before"] == pytest.approx(res.heldout_nll_before)
    assert run.data.metrics["heal/heldout_nll_after"] == pytest.approx(res.heldout_nll_after)
    code, out, _ = _cli(capsys, "registry", "list", "--name", "m-healed", "--tracking-uri", uri)
    assert code == 0 and ("ghost healed" in out) == res.healed


def test_gate_fail_records_reason_and_moves_nothing(built, uri, params, tmp_path, capsys):
    assert _register(capsys, built, uri, params, tmp_path, "m-fail", 1.2)["champion"] == "1"
    res = _register(capsys, built, uri, params, tmp_path, "m-fail", 2.0, acc=0.3)
    assert res["gate"] == "fail" and not res["champion_moved"] and res["champion"] == "1"
    assert _champion(uri, "m-fail") == "1"
    v = _client(uri).get_model_version("m-fail", res["version"])
    assert v.tags["gate"] == "fail"
    assert "wiki perplexity ratio 2.000 > max_ppl_ratio 1.5" in v.tags["gate_reason"]
    assert "retained accuracy 0.600 < min_retained_acc 0.9" in v.tags["gate_reason"]
    assert v.description.startswith("gate FAILED")
    code, out, _ = _cli(capsys, "registry", "list", "--name", "m-fail", "--tracking-uri", uri)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["m-fail", "1"] and lines[1].endswith("*") and "fail" in lines[2]
    assert "gate failures:" in out and "perplexity ratio 2.000" in out


def test_champion_moves_only_when_gate_passes_and_better(built, uri, params, tmp_path, capsys):
    name = "m-better"
    assert _register(capsys, built, uri, params, tmp_path, name, 1.3)["champion"] == "1"
    worse = _register(capsys, built, uri, params, tmp_path, name, 1.4)
    assert worse["gate"] == "pass" and not worse["champion_moved"] and _champion(uri, name) == "1"
    failing_but_best = _register(capsys, built, uri, params, tmp_path, name, 1.0, acc=0.1)
    assert failing_but_best["gate"] == "fail" and _champion(uri, name) == "1"
    better = _register(capsys, built, uri, params, tmp_path, name, 1.1)
    assert better["champion_moved"] and _champion(uri, name) == better["version"] == "4"
    assert "lower wiki PPL ratio" in better["decision"]


def test_promote_and_rollback(built, uri, params, tmp_path, capsys):
    name = "m-hand"
    _register(capsys, built, uri, params, tmp_path, name, 1.3)
    _register(capsys, built, uri, params, tmp_path, name, 1.2)
    assert _champion(uri, name) == "2"
    code, out, _ = _cli(capsys, "registry", "promote", name, "1", "--tracking-uri", uri)
    assert code == 0 and "champion is now version 1 (was 2" in out and _champion(uri, name) == "1"
    assert "promoted" in _client(uri).get_model_version(name, "1").tags
    code, out, _ = _cli(capsys, "registry", "rollback", name, "--tracking-uri", uri)
    assert code == 0 and "from version 1 to version 2" in out and _champion(uri, name) == "2"
    code, out, _ = _cli(capsys, "registry", "rollback", name, "--tracking-uri", uri)
    assert code == 0 and _champion(uri, name) == "1"
    code, _, err = _cli(capsys, "registry", "rollback", name, "--tracking-uri", uri)
    assert code == 2 and "no earlier champion than version 1" in err
    rows = json.loads(_cli(capsys, "registry", "list", "--name", name, "--json", "--tracking-uri", uri)[1])
    assert [r["champion"] for r in rows] == [True, False]


@pytest.mark.parametrize("argv, message", [
    (["registry", "promote", "no-such-model", "1"], "no registered model 'no-such-model'; known:"),
    (["registry", "promote", "m-pass", "9"], "model 'm-pass' has no version 9; versions: 1"),
    (["registry", "rollback", "m-pass"], "no earlier champion"),
    (["registry", "list", "--name", "nope"], "no registered model 'nope'"),
])
def test_registry_errors_are_one_line(argv, message, uri, built, params, tmp_path, capsys):
    from mlflow import MlflowClient

    if not MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models(filter_string="name='m-pass'"):
        _register(capsys, built, uri, params, tmp_path, "m-pass", 1.2)
    code, _, err = _cli(capsys, *argv, "--tracking-uri", uri)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ghosted: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_register_rejects_bad_inputs(built, uri, params, tmp_path, capsys):
    dense = results(tmp_path / "d.json", 10.0, 20.0, 0.5)
    code, _, err = _cli(capsys, "register", built["dense"], "--metrics", dense, "--dense-metrics", dense,
                        "--tracking-uri", uri)
    assert code == 2 and "has no `ghosted` block" in err
    code, _, err = _cli(capsys, "register", built["ckpt"], "--metrics", tmp_path / "missing.json",
                        "--dense-metrics", dense, "--tracking-uri", uri)
    assert code == 2 and "pruned metrics file not found" in err
    (tmp_path / "bad.yaml").write_text("gate:\n  max_ratio: 2\n")
    code, _, err = _cli(capsys, "register", built["ckpt"], "--metrics", dense, "--dense-metrics", dense,
                        "--config", tmp_path / "bad.yaml", "--tracking-uri", uri)
    assert code == 2 and "unknown gate option 'max_ratio'" in err


def test_relative_sqlite_uri_resolves_against_the_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("registry:\n  tracking_uri: sqlite:///mlflow.db\n")
    from ghosted.mlops.registry.settings import load_config

    _, reg = load_config(tmp_path / "params.yaml")
    assert reg == RegistryConfig(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}", "ghosted", None)
    _, reg = load_config(tmp_path / "params.yaml", "http://127.0.0.1:5000")
    assert reg.tracking_uri == "http://127.0.0.1:5000"


# --------------------------------------------------------------------------- a tracking server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with its own SQLite store and artifact root (what a team would run)."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"url": url, "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_registry_works_against_a_tracking_server(built, mlflow_server, params, tmp_path, capsys):
    url = mlflow_server["url"]
    first = _register(capsys, built, url, params, tmp_path, "m-server", 1.3, reports=tmp_path / "r1")
    assert first["gate"] == "pass" and first["champion"] == "1"
    second = _register(capsys, built, url, params, tmp_path, "m-server", 1.2)
    assert second["champion"] == "2" and _champion(url, "m-server") == "2"
    assert _client(url).get_model_version("m-server", "2").tags["gate"] == "pass"
    # Artifacts went through the server to its artifact store, not to a local folder of this process.
    stored = list((mlflow_server["root"] / "artifacts").rglob("config.json"))
    assert stored, "the checkpoint was not uploaded to the server's artifact store"
    code, out, err = _cli(capsys, "registry", "list", "--tracking-uri", url, "--name", "m-server")
    rows = {ln.split()[1]: ln for ln in out.splitlines()[1:] if ln.strip()}
    assert code == 0 and rows["2"].rstrip().endswith("*") and not rows["1"].rstrip().endswith("*"), err
    assert not (tmp_path / "mlruns").exists()


# --------------------------------------------------------------------------- provenance: one protocol, own metrics


def test_champion_rule_ranks_only_the_same_protocol():
    p1, p2 = "1" * 64, "2" * 64
    champ = {"base_fingerprint": "sha256:a", "rank_by": "wiki", "rank_value": "1.3", "protocol_sha256": p1}
    assert beats({**champ, "rank_value": "1.2"}, champ)[0]
    moved, why = beats({**champ, "rank_value": "1.0", "protocol_sha256": p2}, champ)
    assert not moved and "another protocol" in why and p1[:12] in why and p2[:12] in why
    unrecorded = {k: v for k, v in champ.items() if k != "protocol_sha256"}
    moved, why = beats({**unrecorded, "rank_value": "1.0"}, champ)
    assert not moved and "no protocol recorded" in why
    assert not beats({**champ, "rank_value": "1.0"}, unrecorded)[0]
    assert beats({**unrecorded, "rank_value": "1.0"}, unrecorded)[0]  # neither recorded: ranked as before
    # A new base model supersedes the champion whatever protocol measured it (its ratios are against another dense).
    assert beats({**champ, "base_fingerprint": "sha256:b", "protocol_sha256": p2, "rank_value": "1.9"}, champ)[0]


def test_same_protocol_candidate_takes_the_alias_another_protocol_does_not(built, uri, params, tmp_path, capsys):
    name = "m-protocol"
    first = _register(capsys, built, uri, params, tmp_path, name, 1.3)
    assert first["champion"] == "1" and len(first["protocol_sha256"]) == 64 and first["provenance_warning"] is None
    other = _register(capsys, built, uri, params, tmp_path, name, 1.0, protocol="p2")  # better numbers, other protocol
    assert other["gate"] == "pass" and not other["champion_moved"] and _champion(uri, name) == "1"
    assert other["protocol_sha256"] != first["protocol_sha256"]
    assert other["decision"].startswith("champion stays version 1: version 1 was measured on another protocol ")
    assert f"promote by hand with `ghosted registry promote {name} VERSION`" in other["decision"]
    v = _client(uri).get_model_version(name, other["version"])
    assert v.tags["protocol_sha256"] == other["protocol_sha256"] and v.tags["provenance"] == "checked"
    assert "another protocol" in v.tags["champion_decision"] and "another protocol" in v.description
    same = _register(capsys, built, uri, params, tmp_path, name, 1.2)  # the champion's protocol, better
    assert same["champion_moved"] and _champion(uri, name) == same["version"] == "3"
    assert "lower wiki PPL ratio" in same["decision"]
    rows = json.loads(_cli(capsys, "registry", "list", "--name", name, "--json", "--tracking-uri", uri)[1])
    assert [r["protocol_sha256"] for r in rows] == [first["protocol_sha256"], other["protocol_sha256"],
                                                    first["protocol_sha256"]]


def test_metrics_without_provenance_are_registered_with_a_warning_tag_and_ranked_apart(built, uri, params, tmp_path,
                                                                                        capsys):
    name = "m-legacy"
    old = _register(capsys, built, uri, params, tmp_path, name, 1.3, protocol=None)
    assert old["registered"] and old["champion"] == "1" and old["protocol_sha256"] is None
    assert "have no provenance block (written by an older `ghosted eval`)" in old["provenance_warning"]
    assert "regenerate them with `ghosted eval" in old["provenance_warning"]
    tags = _client(uri).get_model_version(name, "1").tags
    assert tags["provenance"] == "missing" and "protocol_sha256" not in tags
    assert _client(uri).get_run(old["run_id"]).data.tags["provenance"] == "missing"
    assert _register(capsys, built, uri, params, tmp_path, name, 1.2, protocol=None)["champion_moved"]  # as before
    new = _register(capsys, built, uri, params, tmp_path, name, 1.0)  # recorded protocol vs a champion without one
    assert not new["champion_moved"] and _champion(uri, name) == "2" and "no protocol recorded" in new["decision"]


def _refused(capsys, ckpt: Path, pruned: Path, dense: Path, db: Path) -> str:
    """The one error line of a register that must refuse, after checking that it registered nothing."""
    code, out, err = _cli(capsys, "register", ckpt, "--metrics", pruned, "--dense-metrics", dense,
                          "--tracking-uri", f"sqlite:///{db}", "--name", "m-refused", "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ghosted: error: ") and not out, err
    assert not db.parent.exists(), "a refused register must not touch the registry"
    return lines[0]


def test_register_refuses_a_pair_that_is_not_the_checkpoints_own(built, tmp_path, capsys):
    ckpt = _variant(built["ckpt"], tmp_path / "ckpt")
    other = _variant(built["ckpt"], tmp_path / "other")
    db = tmp_path / "db" / "mlflow.db"
    dense = results(tmp_path / "dense.json", 10.0, 20.0, 0.5, base_of=ckpt)
    pruned = results(tmp_path / "pruned.json", 12.0, 24.0, 0.5, checkpoint=ckpt)
    line = _refused(capsys, other, pruned, dense, db)  # another checkpoint's metrics
    assert f"{pruned} is not the evaluation of {other}: it evaluated {ckpt} (checkpoint sha256 " in line
    assert f"evaluate this checkpoint with `ghosted eval {other}" in line
    line = _refused(capsys, ckpt, pruned, pruned, db)  # the pruned evaluation given as the dense one
    assert f"{pruned} is not the evaluation of {ckpt}'s base model {built['dense']}" in line
    legacy = results(tmp_path / "legacy.json", 10.0, 20.0, 0.5)
    line = _refused(capsys, ckpt, pruned, legacy, db)  # one file from an older ghosted, one with provenance
    assert f"{legacy} has no provenance block (written by an older `ghosted eval`) while {pruned} has one" in line
    assert f"regenerate it with `ghosted eval {built['dense']} --config params.yaml --out {legacy}`" in line
    edited = json.loads(pruned.read_text())
    edited["ppl"]["wiki"]["sha256"] = "0" * 64  # results pasted from another evaluation
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    line = _refused(capsys, ckpt, tmp_path / "edited.json", dense, db)
    assert "edited.json: its provenance block does not match its results" in line
    p2 = results(tmp_path / "dense-p2.json", 10.0, 20.0, 0.5, base_of=ckpt, protocol="p2")
    line = _refused(capsys, ckpt, pruned, p2, db)
    assert f"{p2} and {pruned} were measured on different protocols (ppl 'ptb': sha256 " in line
    assert "; ppl 'wiki': sha256 " in line and "zero-shot" not in line
