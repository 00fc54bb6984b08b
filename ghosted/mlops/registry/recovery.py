"""Crash recovery: who owns a run, and repairing what a `ghosted register` that died left behind.

A version is created with its gate and decision tags and `registration=pending`, the alias moves, then
`registration=done`. The next register (under the lock) marks runs whose register process died as FAILED and
completes pending versions, so no version is left without a decision.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ghosted.mlops.registry.champion import champion, decide, description, set_champion
from ghosted.mlops.registry.connection import Client, find_model, model_versions
from ghosted.mlops.registry.names import DECISION_TAG, FINGERPRINT_TAG, OWNER_TAG, STATE_TAG, Log, nolog


def _proc_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc, or None where /proc has no entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], fields[19]


def owner() -> str:
    """host:pid:process-start of this process: the OWNER_TAG of the runs it creates."""
    info = _proc_start(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}:{info[1] if info else ''}"


def owner_dead(owner: str) -> bool:
    """Whether the process that owns a run is gone (only decidable on the same host)."""
    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, another user's
    info = _proc_start(pid)
    if info is None:  # no /proc here: the pid exists, assume it is the owner
        return False
    state, now_start = info
    return state == "Z" or (bool(start) and now_start != start)  # a zombie, or the pid was reused


def _complete(client: Client, name: str, v, log: Log) -> None:
    """Apply the champion decision of a version a dead register left pending (under registry_lock)."""
    version, tags = str(v.version), dict(v.tags)
    current = champion(client, name)
    if current == version:  # the alias had moved; the history may lag
        decision = tags.get(DECISION_TAG) or "new champion (completed by a later register)"
        set_champion(client, name, version, "gate, completed by a later register")
    else:
        moved, decision = decide(client, name, tags, current)
        if moved:
            set_champion(client, name, version, "gate, completed by a later register")
    client.set_model_version_tag(name, version, DECISION_TAG, decision[:4000])
    client.update_model_version(name, version, description=description(tags, decision))
    if tags.get(FINGERPRINT_TAG) and int(version) == max(int(x.version) for x in model_versions(client, name)):
        client.set_registered_model_tag(name, FINGERPRINT_TAG, tags[FINGERPRINT_TAG])  # it died before this
    client.set_model_version_tag(name, version, STATE_TAG, "done")
    log(f"completed version {version} of {name}, left pending by a register that died: {decision}")


def recover(client: Client, exp_id: str, name: str, log: Log = nolog) -> dict[str, list[str]]:
    """Mark runs whose `ghosted register` died as FAILED; complete versions it left pending (under registry_lock)."""
    failed: list[str] = []
    dead: set[str] = set()
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        run_owner = run.data.tags.get(OWNER_TAG)
        if run_owner and owner_dead(run_owner):
            rid = run.info.run_id
            client.set_tag(rid, "ghosted_failure", f"the register process ({run_owner}) died; marked by a later register")
            client.set_terminated(rid, status="FAILED")
            failed.append(rid)
            dead.add(rid)
            log(f"run {rid} of a register that died ({run_owner}) marked FAILED")
    completed: list[str] = []
    if find_model(client, name) is not None:
        for v in model_versions(client, name):
            if v.tags.get(STATE_TAG) == "done" or (STATE_TAG not in v.tags and DECISION_TAG in v.tags):
                continue
            if v.run_id and v.run_id not in dead:
                run = client.get_run(v.run_id)
                run_owner = run.data.tags.get(OWNER_TAG, "")
                if run.info.status == "RUNNING" and not (run_owner and owner_dead(run_owner)):
                    continue  # its register is still alive (e.g. on another host)
            _complete(client, name, v, log)
            completed.append(str(v.version))
    return {"failed_runs": failed, "completed_versions": completed}
