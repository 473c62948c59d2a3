"""A real 3-node pysyncobj cluster on 127.0.0.1, one subprocess per node, each on its own
encrypted walcrypt store with its own KEK (walcrypt.cluster).  Every process is stopped by PID
in teardown; every wait is bounded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("pysyncobj")

from walcrypt.cluster import Cluster  # noqa: E402

import wctest  # noqa: E402

MARKER = "cluster-secret-value"


def kv(i: int) -> tuple[str, str]:
    return f"k{i:06d}", f"{MARKER}-{i}"


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path / "cluster"), compaction_entries=300, segment_size=1 << 18)
    c.start_all()
    yield c
    c.teardown()


def write_range(c: Cluster, node, lo: int, hi: int, acked: dict) -> None:
    items = [kv(i) for i in range(lo, hi)]
    got = set(c.write(node, items))
    acked.update((k, v) for k, v in items if k in got)


def assert_all_nodes_have(c: Cluster, acked: dict) -> None:
    dumps = c.wait_converged(acked, timeout=60)
    assert len(dumps) == len(c.nodes)
    for name, d in dumps.items():
        missing = [k for k, v in acked.items() if d.get(k) != v]
        assert not missing, f"{name} lost {len(missing)} acknowledged writes, e.g. {missing[:3]}"


def test_leader_killed_during_writes_loses_nothing_acknowledged(cluster):
    acked: dict = {}
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    write_range(cluster, follower, 0, 1500, acked)
    assert len(acked) == 1500
    cluster.kill(leader)                                  # SIGKILL: no flush, no close
    write_range(cluster, follower, 1500, 2500, acked)      # during and after the election
    cluster.start(leader)
    new_leader = cluster.leader()
    write_range(cluster, new_leader, 2500, 3000, acked)
    assert len(acked) >= 2000
    assert_all_nodes_have(cluster, acked)
    cluster.stop_all()
    for n in cluster.nodes:
        assert not wctest.files_containing(n.data_dir, MARKER.encode()), f"plaintext on disk under {n.data_dir}"


def test_wiped_follower_catches_up_from_a_snapshot_reencrypted_under_its_own_key(cluster):
    acked: dict = {}
    leader = cluster.leader()
    write_range(cluster, leader, 0, 2000, acked)          # several compactions on every node
    victim = next(n for n in cluster.nodes if n is not leader)
    cluster.wipe(victim)                                  # SIGKILL + remove its data directory
    write_range(cluster, leader, 2000, 2500, acked)
    cluster.start(victim)
    assert cluster.wait_for(lambda st: st.get(victim.name, {}).get("snapshots_received", 0) >= 1, 60), \
        "the wiped follower never received a snapshot"
    assert_all_nodes_have(cluster, acked)
    st = cluster.statuses()[victim.name]
    assert st["snapshot_key"] is not None and st["snapshot_key"] == st["active_key"], \
        "the follower's snapshot is not under its own data key"
    others = {cluster.statuses()[n.name]["active_key"] for n in cluster.nodes if n is not victim}
    assert st["active_key"] not in others
    cluster.stop_all()
    assert not wctest.files_containing(victim.data_dir, MARKER.encode())


def test_rolling_dek_rotation_under_load(cluster):
    acked: dict = {}
    leader = cluster.leader()
    write_range(cluster, leader, 0, 800, acked)
    before = {name: s["active_key"] for name, s in cluster.statuses().items()}
    lo = 800
    for n in cluster.nodes:                               # one node at a time, writes continuing
        n.request({"op": "rotate"})
        for _ in range(6):                                # bounded
            write_range(cluster, leader, lo, lo + 300, acked)
            lo += 300
            if cluster.wait_for(lambda st, name=n.name: st[name]["rotation_done"], 5):
                break
        assert cluster.statuses()[n.name]["rotation_done"], f"{n.name} did not finish its rotation"
    after = {name: s["active_key"] for name, s in cluster.statuses().items()}
    assert all(after[k] != before[k] for k in before), (before, after)
    assert_all_nodes_have(cluster, acked)


def test_walcrypt_demo_exits_zero():
    """The main job, as a newcomer runs it (the installed console script)."""
    exe = os.path.join(os.path.dirname(sys.executable), "walcrypt")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "walcrypt.cli"]
    proc = subprocess.run(cmd + ["demo", "--json"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json
    report = json.loads(proc.stdout)
    assert report["ok"] and all(report["cluster"]["checks"].values())
