"""``walcrypt demo``: the main job.

Part 1 runs a 3-node pysyncobj cluster on 127.0.0.1 (one subprocess per node, each
on its own encrypted store with its own key, transport encrypted with pysyncobj's
``password``): a replicated key/value workload, the leader killed with SIGKILL and
restarted, a rolling DEK rotation under load, a full-cluster restart, then checks
that every acknowledged write survived on every node and that no plaintext is
anywhere on disk.  Part 2 is a tour of one store: reopen and verify byte for byte,
a wrong key, a flipped bit, a torn tail after a crash.  Every step checks what it
claims; the report says what was seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import check as checkmod
from . import keys as K
from .cluster import Cluster
from .errors import CorruptionError, WalcryptError, WrongKeyError
from .storage import Store
from .types import Entry, HardState

MARKER = b"demo-secret-value"


def _value(i: int) -> bytes:
    return b"set user:%d=%s-%d" % (i, MARKER, i)


def _files_containing(root: str, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                if needle in f.read():
                    hits.append(p)
    return hits


_CRASH_WRITER = r"""
import os, sys
import walcrypt
from walcrypt import Entry, HardState, KeyFile
s = walcrypt.open(sys.argv[1], kek=KeyFile(sys.argv[2]), sync="always", segment_size=1 << 20)
last = s.last_index()
for k in range(5):
    s.save(hard_state=HardState(2, 1, last),
           entries=[Entry(last + 1 + j, 2, b"after-restart-%d" % (last + 1 + j)) for j in range(10)])
    last += 10
print(last, flush=True)
os._exit(0)   # crash: no close, the last segment stays unsealed
"""


def run_store_tour(*, n_entries: int = 20000, workdir: str | None = None, echo=None) -> dict:
    say = echo or (lambda *_a, **_k: None)
    own = workdir is None
    root = tempfile.mkdtemp(prefix="walcrypt-demo-") if workdir is None else os.path.abspath(workdir)
    os.makedirs(root, exist_ok=True)
    report: dict = {"directory": root, "checks": {}}
    checks = report["checks"]
    try:
        keydir = os.path.join(root, "keys")
        os.makedirs(keydir, mode=0o700, exist_ok=True)
        kek_path = K.generate_key_file(os.path.join(keydir, "kek"))
        data = os.path.join(root, "data")
        kek = K.KeyFile(kek_path)
        say(f"walcrypt demo in {root}")
        say(f"  key-encryption key: {kek_path} (outside the data directory)")

        # 1. write
        batch = 64
        t0 = time.perf_counter()
        with Store(data, kek=kek, sync="batch", segment_size=1 << 20) as s:
            for start in range(1, n_entries + 1, batch):
                stop = min(start + batch, n_entries + 1)
                s.save(hard_state=HardState(1, 1, start - 1),
                       entries=[Entry(i, 1, _value(i)) for i in range(start, stop)])
            fsyncs = s.fsync_count
        elapsed = time.perf_counter() - t0
        payload = sum(len(_value(i)) for i in range(1, n_entries + 1))
        report["write"] = {"entries": n_entries, "batch": batch, "seconds": round(elapsed, 3),
                           "entries_per_second": round(n_entries / elapsed), "fsyncs": fsyncs,
                           "mb_per_second": round(payload / elapsed / 1e6, 2)}
        say(f"[1] wrote {n_entries} entries in batches of {batch}: {n_entries / elapsed:,.0f} entries/s, "
            f"{fsyncs} fsyncs, each save durable on return")

        # 2. reopen and read back
        with Store(data, kek=kek) as s:
            got = s.entries(1, s.last_index() + 1)
            hs, _ = s.initial_state()
            segs = len(s.wal.segments)
        ok = [e.data for e in got] == [_value(i) for i in range(1, n_entries + 1)]
        checks["reopen_reads_back_every_entry"] = ok
        say(f"[2] reopened: {len(got)} entries in {segs} segments read back byte for byte: {ok}; "
            f"hard state {tuple(hs)}")

        # 3. no plaintext on disk
        hits = _files_containing(data, MARKER)
        checks["no_plaintext_on_disk"] = not hits
        say(f"[3] searched every file under the data directory (LMDB included) for the plaintext: "
            f"{'not found' if not hits else 'FOUND in ' + ', '.join(hits)}")

        # 4. wrong key
        other = K.generate_key_file(os.path.join(keydir, "other"))
        try:
            Store(data, kek=K.KeyFile(other)).close()
            checks["wrong_key_refused"] = False
            say("[4] a wrong key opened the store: UNEXPECTED")
        except WrongKeyError as exc:
            checks["wrong_key_refused"] = True
            say(f"[4] wrong key refused before anything was touched: {exc}")

        # 5. verify
        rep = checkmod.check(data, kek=kek)
        checks["verify_clean"] = rep.ok
        say(f"[5] verify: {rep.segments} segments, {rep.records} records authenticated, "
            f"{'no findings' if rep.ok else rep.findings}")

        # 6. tamper with a copy
        tampered = os.path.join(root, "tampered")
        shutil.copytree(data, tampered)
        wal_dir = os.path.join(tampered, "wal-v1-encrypted")
        victim = sorted(os.listdir(wal_dir))[0]
        vpath = os.path.join(wal_dir, victim)
        with open(vpath, "r+b") as f:
            f.seek(4000)
            b = f.read(1)
            f.seek(4000)
            f.write(bytes([b[0] ^ 0x01]))
        try:
            with Store(tampered, kek=kek) as s:
                s.entries(s.first_index(), s.last_index() + 1)
            checks["tamper_detected"] = False
            say("[6] a flipped bit went unnoticed: UNEXPECTED")
        except CorruptionError as exc:
            checks["tamper_detected"] = exc.path == vpath and exc.offset is not None
            say(f"[6] flipped one bit in {victim}: {type(exc).__name__}: {exc}")

        # 7. crash, torn tail, repair
        proc = subprocess.run([sys.executable, "-c", _CRASH_WRITER, data, kek_path],
                              capture_output=True, text=True, timeout=120)
        acked = int(proc.stdout.strip() or 0)
        with Store(data, kek=kek, read_only=True) as s:   # find the crashed writer's unsealed segment
            tail = [seg for seg in s.wal.segments if not seg.sealed][-1]
            end = tail.write_offset
        with open(tail.path, "r+b") as f:                   # a torn next batch: half written
            f.seek(end)
            f.write(os.urandom(300))
        with Store(data, kek=kek) as s:
            repaired = s.repairs
            last = s.last_index()
            tail_ok = all(e.data == b"after-restart-%d" % e.index for e in s.entries(n_entries + 1, last + 1))
        checks["torn_tail_repaired"] = bool(repaired) and last == acked and tail_ok
        say(f"[7] a writer crashed (no close) after index {acked}, then a torn half-batch was left behind: "
            f"reopen truncated it ({len(repaired)} repair, .broken copy kept) and kept all {last} acknowledged entries")

        report["ok"] = all(checks.values())
        say("all checks passed" if report["ok"] else "SOME CHECKS FAILED: " +
            ", ".join(k for k, v in checks.items() if not v))
        return report
    except WalcryptError:
        raise
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _kv(i: int) -> tuple[str, str]:
    return f"key-{i:06d}", f"{MARKER.decode()}-{i}"


def run_cluster_demo(*, n_ops: int = 6000, workdir: str, echo=None) -> dict:
    say = echo or (lambda *_a, **_k: None)
    checks: dict = {}
    report: dict = {"nodes": 3, "checks": checks}
    cluster = Cluster(os.path.join(workdir, "cluster"), compaction_entries=max(500, n_ops // 6))
    acked: dict[str, str] = {}
    batch = 1000
    next_key = 0
    t_start = time.monotonic()
    write_time = 0.0

    def write_batches(target, count: int) -> None:
        nonlocal next_key, write_time
        for _ in range(count):
            items = [_kv(i) for i in range(next_key, next_key + batch)]
            next_key += batch
            t0 = time.monotonic()
            got = cluster.write(target, items)
            write_time += time.monotonic() - t0
            acked.update((k, v) for k, v in items if k in set(got))

    try:
        cluster.start_all()
        leader = cluster.leader()
        say(f"[cluster 1/6] 3 nodes up on 127.0.0.1 (each its own store and KEK); leader {leader.name}")
        per_phase = max(1, n_ops // batch // 4)
        follower = next(n for n in cluster.nodes if n is not leader)
        write_batches(follower, per_phase)
        say(f"[cluster 2/6] {len(acked)} writes acknowledged through {follower.name}")

        cluster.kill(leader)
        killed = leader.name
        write_batches(follower, 1)            # during the election
        cluster.start(leader)
        leader = cluster.leader()
        write_batches(follower, per_phase)
        say(f"[cluster 3/6] {killed} killed with SIGKILL during writes and restarted; leader now {leader.name}; "
            f"{len(acked)} acknowledged")

        for n in cluster.nodes:
            n.request({"op": "rotate"})
        write_batches(follower, per_phase)
        rotated = cluster.wait_for(lambda st: len(st) == 3 and all(s["rotation_done"] for s in st.values()), 45)
        for _ in range(5):                    # bounded: keep load on until every node has rotated
            if rotated:
                break
            write_batches(follower, 1)
            rotated = cluster.wait_for(lambda st: len(st) == 3 and all(s["rotation_done"] for s in st.values()), 15)
        checks["dek_rotated_on_every_node"] = rotated
        say(f"[cluster 4/6] rolling DEK rotation under load on every node: {'done' if rotated else 'NOT DONE'}")

        fsyncs_before = sum(s["fsyncs"] for s in cluster.statuses().values())
        cluster.stop_all()
        cluster.start_all()
        leader = cluster.leader()
        write_batches(leader, per_phase)
        say(f"[cluster 5/6] full-cluster restart; {len(acked)} writes acknowledged in all")

        dumps = cluster.wait_converged(acked, timeout=45)
        missing = {name: sum(1 for k, v in acked.items() if d.get(k) != v) for name, d in dumps.items()}
        checks["every_acknowledged_write_on_every_node"] = len(dumps) == 3 and not any(missing.values())
        fsyncs = fsyncs_before + sum(s["fsyncs"] for s in cluster.statuses().values())
        cluster.stop_all()
        hits = _files_containing(cluster.root, MARKER)
        checks["no_plaintext_on_disk"] = not hits
        elapsed = time.monotonic() - t_start
        report["workload"] = {"acknowledged_writes": len(acked), "attempted_writes": next_key,
                              "ops_per_second": round(len(acked) / write_time) if write_time else None,
                              "fsyncs": fsyncs, "fsyncs_per_second": round(fsyncs / elapsed),
                              "seconds": round(elapsed, 1)}
        say(f"[cluster 6/6] every acknowledged write on every node: "
            f"{'yes' if checks['every_acknowledged_write_on_every_node'] else 'NO ' + str(missing)}; "
            f"plaintext on disk: {'none' if not hits else hits}")
        say(f"          {len(acked)} writes at {report['workload']['ops_per_second']} ops/s, "
            f"{fsyncs} fsyncs ({report['workload']['fsyncs_per_second']}/s) in {elapsed:.1f} s")
    finally:
        cluster.teardown()
    report["ok"] = all(checks.values())
    return report


def run_demo(*, n_entries: int = 6000, workdir: str | None = None, echo=None) -> dict:
    say = echo or (lambda *_a, **_k: None)
    own = workdir is None
    root = tempfile.mkdtemp(prefix="walcrypt-demo-") if workdir is None else os.path.abspath(workdir)
    try:
        say("walcrypt demo: part 1, a 3-node pysyncobj cluster on encrypted walcrypt stores")
        cluster = run_cluster_demo(n_ops=n_entries, workdir=root, echo=echo)
        say("walcrypt demo: part 2, one store up close")
        tour = run_store_tour(n_entries=n_entries, workdir=os.path.join(root, "store"), echo=echo)
        report = {"cluster": cluster, "store": tour, "ok": cluster["ok"] and tour["ok"]}
        if not report["ok"]:
            say("SOME CHECKS FAILED")
        return report
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
