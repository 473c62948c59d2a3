"""I/O failures (through walcrypt.testing.FaultyVFS): the store fails closed and reopening recovers.

DESIGN.md, "Durability rules": after a failed write or fsync the store is failed -- it refuses
further writes with StoreFailedError until reopened -- and reopening runs recovery.  Every
acknowledged entry must survive; nothing beyond what was attempted may appear.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pytest

import walcrypt
from walcrypt import Entry, HardState, StoreFailedError

import wctest

from walcrypt.testing import CrashVFS, FaultyVFS, SimulatedCrash  # noqa: E402

SEG = 8192


@dataclass
class Run:
    acked: list[Entry] = field(default_factory=list)
    acked_hs: HardState = HardState()
    attempted: list[Entry] = field(default_factory=list)     # the batch whose save failed
    attempted_hs: HardState | None = None
    failure: BaseException | None = None
    saves: int = 0


def _exercise(data_dir, arm, *, pre: int = 0, max_saves: int = 80, seed: int = 0, sync: str = "always") -> Run:
    """Open with a FaultyVFS, save ``pre`` batches, arm the fault, save until StoreFailedError."""
    rng = random.Random(seed)
    vfs = FaultyVFS()
    run = Run()
    s = wctest.open_store(data_dir, segment_size=SEG, sync=sync, vfs=vfs)
    try:
        nxt = s.last_index() + 1
        run.acked = s.entries(s.first_index(), nxt) if nxt > s.first_index() else []
        run.acked_hs = s.initial_state()[0]
        for k in range(pre + max_saves):               # bounded
            if k == pre:
                arm(vfs)
            n = rng.randint(1, 8)
            ents = wctest.make_entries(nxt, nxt + n)
            hs = HardState(ents[-1].term, 1, ents[-1].index)
            try:
                s.save(hard_state=hs, entries=ents)
            except StoreFailedError as exc:
                run.failure, run.attempted, run.attempted_hs = exc, ents, hs
                break
            run.saves += 1
            run.acked += ents
            run.acked_hs = hs
            nxt += n
        if run.failure is None:
            return run
        # the store stays failed: every later write is refused, whatever it is
        later = [
            lambda: s.save(entries=wctest.make_entries(nxt, nxt + 1)),
            lambda: s.save(hard_state=HardState(50, 1, 1)),
            lambda: s.save(entries=[Entry(max(1, nxt - 1), 77, b"replace")]),
        ]
        for call in later:
            with pytest.raises(StoreFailedError):
                call()
    finally:
        s.close()                                      # must not raise on a failed store
    return run


def _verify_recovery(data_dir, run: Run) -> None:
    """Reopen with the real VFS: every acknowledged entry is there, nothing beyond the attempt."""
    s = wctest.open_store(data_dir, segment_size=SEG)
    try:
        ents, hs = wctest.read_everything(s)
        n_acked = len(run.acked)
        assert ents[:n_acked] == run.acked, "an acknowledged entry was lost or changed"
        extra = ents[n_acked:]
        assert extra in ([], run.attempted), f"entries beyond what was attempted: {extra[:3]}"
        assert hs in (run.acked_hs, run.attempted_hs)
        if extra:
            assert hs == run.attempted_hs, "entries and hard state of one save are atomic"
        # the store works again and the new write survives a reopen
        nxt = s.last_index() + 1
        new = wctest.make_entries(nxt, nxt + 3)
        s.save(hard_state=HardState(new[-1].term, 2, nxt + 2), entries=new)
    finally:
        s.close()
    s = wctest.open_store(data_dir, segment_size=SEG)
    try:
        ents2, hs2 = wctest.read_everything(s)
        assert ents2 == ents + new
        assert hs2 == HardState(new[-1].term, 2, nxt + 2)
    finally:
        s.close()


def _prime(data_dir) -> None:
    """A store with a few sealed segments, written by an earlier lifetime."""
    with wctest.open_store(data_dir, segment_size=SEG) as s:
        for k in range(1, 241, 8):
            s.save(hard_state=HardState(1, 1, k + 7), entries=wctest.make_entries(k, k + 8))


@pytest.mark.parametrize("nth", list(range(1, 31)))
def test_failed_fdatasync(data_dir, nth):
    _prime(data_dir)
    run = _exercise(data_dir, lambda v: v.fail_nth("fdatasync", nth), seed=nth)
    assert run.failure is not None, "the injected fdatasync failure was never hit"
    assert isinstance(run.failure.__cause__, OSError) or "EIO" in str(run.failure) or "Input/output" in str(run.failure)
    _verify_recovery(data_dir, run)


@pytest.mark.parametrize("nth", list(range(1, 31)))
def test_failed_pwrite(data_dir, nth):
    _prime(data_dir)
    run = _exercise(data_dir, lambda v: v.fail_nth("pwrite", nth), seed=100 + nth)
    assert run.failure is not None
    _verify_recovery(data_dir, run)


@pytest.mark.parametrize("budget", [0, 100, 2000, 8192, 8192 + 3000, 20000, 40000])
def test_enospc(data_dir, budget):
    _prime(data_dir)
    run = _exercise(data_dir, lambda v: v.enospc_after(budget), seed=budget, max_saves=200)
    assert run.failure is not None
    assert "ENOSPC" in repr(run.failure.__cause__) or "No space" in str(run.failure)
    _verify_recovery(data_dir, run)


@pytest.mark.parametrize("pre", [0, 1, 5, 13])
@pytest.mark.parametrize("nbytes", [0, 1, 87, 88, 200, 511, 513])
def test_short_write(data_dir, pre, nbytes):
    _prime(data_dir)
    run = _exercise(data_dir, lambda v: v.short_write_next(nbytes), pre=pre, seed=pre * 1000 + nbytes)
    assert run.failure is not None
    assert run.saves == pre
    _verify_recovery(data_dir, run)


@pytest.mark.parametrize("op", ["fsync_dir", "ftruncate", "open", "preallocate"])
@pytest.mark.parametrize("nth", [1, 2, 3])
def test_other_failed_operations(data_dir, op, nth):
    _prime(data_dir)
    run = _exercise(data_dir, lambda v: v.fail_nth(op, nth), seed=nth, max_saves=120)
    assert run.failure is not None, f"{op} #{nth} was never hit"
    _verify_recovery(data_dir, run)


@pytest.mark.parametrize("sync", ["always", "batch"])
def test_failure_while_sealing_on_close(data_dir, sync):
    """close() seals the active segment; a failed fsync there loses nothing acknowledged."""
    _prime(data_dir)
    vfs = FaultyVFS()
    s = wctest.open_store(data_dir, segment_size=SEG, sync=sync, vfs=vfs)
    acked = s.entries(1, s.last_index() + 1)
    ents = wctest.make_entries(s.last_index() + 1, s.last_index() + 6)
    s.save(hard_state=HardState(9, 9, 9), entries=ents)
    acked += ents
    vfs.fail_nth("fdatasync", 1)
    s.close()
    run = Run(acked=acked, acked_hs=HardState(9, 9, 9))
    _verify_recovery(data_dir, run)


def test_failed_fdatasync_with_group_commit_fails_every_waiter(data_dir):
    """sync="batch": every save sharing the failed fdatasync gets StoreFailedError."""
    import threading

    _prime(data_dir)
    vfs = FaultyVFS()
    s = wctest.open_store(data_dir, segment_size=SEG, sync="batch", vfs=vfs)
    results: dict[int, object] = {}
    try:
        vfs.fail_nth("fdatasync", 3)

        def run(tid: int) -> None:
            out = []
            for r in range(20):
                try:
                    s.save(hard_state=HardState(1, tid, r))
                    out.append("ok")
                except StoreFailedError:
                    out.append("failed")
                except BaseException as exc:  # noqa: BLE001
                    out.append(repr(exc))
            results[tid] = out

        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    finally:
        s.close()
    flat = [x for out in results.values() for x in out]
    assert set(flat) <= {"ok", "failed"}, flat
    assert "failed" in flat
    for out in results.values():
        # once a thread saw the failure, it never sees success again
        if "failed" in out:
            assert "ok" not in out[out.index("failed"):]
    with wctest.open_store(data_dir, segment_size=SEG) as s2:
        assert s2.last_index() == 240


def _compact_with_fault(data_dir, op, nth):
    _prime(data_dir)
    vfs = FaultyVFS()
    s = wctest.open_store(data_dir, segment_size=SEG, vfs=vfs)
    try:
        vfs.fail_nth(op, nth)
        try:
            s.compact(200)
        except (walcrypt.WalcryptError, OSError) as exc:
            return exc
        return None
    finally:
        s.close()


@pytest.mark.parametrize("op,nth", [("unlink", 1), ("fsync_dir", 1)])
def test_failed_file_removal_during_compaction_is_a_walcrypt_error(data_dir, op, nth):
    """A failed unlink/fsync while compact() removes segments surfaces as a walcrypt error (the
    typed hierarchy of DESIGN.md), never as a bare OSError; nothing retained is lost."""
    exc = _compact_with_fault(data_dir, op, nth)
    assert exc is None or isinstance(exc, walcrypt.WalcryptError), f"compact() let a bare {exc!r} escape"
    with wctest.open_store(data_dir, segment_size=SEG) as s:
        assert s.first_index() == 201
        assert wctest.read_everything(s)[0] == wctest.make_entries(201, 241)


@pytest.mark.parametrize("op,nth", [("unlink", 1), ("unlink", 2), ("fsync_dir", 1)])
def test_failed_file_removal_during_compaction_leaks_no_segment(data_dir, op, nth):
    """Segment files dropped from the manifest by compact() but not unlinked (failed unlink, or a
    crash between the manifest commit and the unlink) must be removed by a later open or
    compaction, not leaked on disk forever."""
    _compact_with_fault(data_dir, op, nth)
    s = wctest.open_store(data_dir, segment_size=SEG)
    try:
        assert s.first_index() == 201
        ents, _hs = wctest.read_everything(s)
        assert ents == wctest.make_entries(201, 241)
        s.save(entries=wctest.make_entries(241, 250))
        s.compact(205)
    finally:
        s.close()
    names = [os.path.basename(p) for p in wctest.segment_files(data_dir)]
    bases = [int(n[17:33], 16) for n in names]
    for name, base, next_base in zip(names, bases, bases[1:] + [None]):
        if next_base is not None and next_base - 1 <= 205:
            pytest.fail(f"segment {name} (indexes {base}..{next_base - 1}, all compacted) was leaked on disk")


# ---------------------------------------------------------------------------
# Power loss (walcrypt.testing.CrashVFS): unsynced writes dropped, or torn into random sectors
# ---------------------------------------------------------------------------



def _power_loss_case(data_dir, op: str, n: int, when: str, torn: bool, seed: int) -> str | None:
    """Crash at the n-th ``op`` (before/after it); return a description of what went wrong, or None."""
    rng = random.Random(seed)
    acked = attempted = 240
    vfs = CrashVFS()
    s = wctest.open_store(data_dir, segment_size=SEG, vfs=vfs)
    vfs.arm_crash(op, n, when)
    try:
        nxt = s.last_index() + 1
        for _ in range(40):                                   # bounded
            k = rng.randint(1, 8)
            attempted = nxt + k - 1
            try:
                s.save(hard_state=HardState(wctest.entry_term(attempted), 1, attempted),
                       entries=wctest.make_entries(nxt, nxt + k))
            except SimulatedCrash:
                break
            except StoreFailedError as exc:                   # a wrapped SimulatedCrash is fine too
                assert isinstance(exc.__cause__, SimulatedCrash) or vfs.crashed, exc
                break
            acked, nxt = attempted, nxt + k
    finally:
        try:
            s.close()
        except SimulatedCrash:
            pass
    if not vfs.crashed:
        vfs.shutdown()
        return "no crash"
    vfs.crash(torn=torn, rng=rng)
    try:
        with wctest.open_store(data_dir, segment_size=SEG) as s2:
            ents, hs = wctest.read_everything(s2)
            last = s2.last_index()
    except walcrypt.WalcryptError as exc:
        return f"{op} #{n} {when} torn={torn}: reopen failed: {exc!r}"
    if not acked <= last <= attempted:
        return f"{op} #{n} {when} torn={torn}: last index {last}, acknowledged {acked}, attempted {attempted}"
    if ents != wctest.make_entries(1, last + 1):
        return f"{op} #{n} {when} torn={torn}: recovered entries differ"
    if hs != HardState(wctest.entry_term(last), 1, last):
        return f"{op} #{n} {when} torn={torn}: hard state {hs} does not match the last batch {last}"
    return None


@pytest.mark.skipif(CrashVFS is None, reason="walcrypt.testing.CrashVFS is not there yet")
@pytest.mark.parametrize("op", ["pwrite", "fdatasync", "fsync_dir", "ftruncate", "preallocate"])
def test_power_loss_at_every_io_point(tmp_path, op):
    """Every acknowledged save survives a power loss at any of the first I/O calls of ``op``, with
    unsynced writes either dropped or torn into random 512-byte sectors; nothing is invented."""
    import shutil

    pristine = str(tmp_path / "pristine")
    _prime(pristine)
    failures = []
    cases = 0
    for n in range(1, 25):                                    # bounded; stops once op #n is never reached
        reached = False
        for when in ("before", "after"):
            for torn in (False, True):
                root = str(tmp_path / f"{n}-{when}-{torn}")
                shutil.copytree(pristine, root)
                problem = _power_loss_case(root, op, n, when, torn, seed=n * 4 + (when == "after") * 2 + torn)
                shutil.rmtree(root)
                if problem == "no crash":
                    continue
                reached = True
                cases += 1
                if problem:
                    failures.append(problem)
        if not reached:
            break
    assert cases >= 4, f"the crash points of {op} were hardly reached ({cases})"
    assert not failures, f"{len(failures)} of {cases} power losses not recovered:\n" + "\n".join(failures[:8])
