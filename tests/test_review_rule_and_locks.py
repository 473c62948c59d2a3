"""Review of the torn-tail rule's revision, of saves that put a DEK rotation off while another key
operation holds the keys, and of a full re-key racing saves.  Each test pins a break the review
found; real files, real LMDB, real threads, the child store writer a real subprocess.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time

import pytest
import wctest
from wctest import FlakyService

import walcrypt
from walcrypt import ConfState, CorruptionError, HardState, SnapshotMeta
from walcrypt import format as fmt
from walcrypt import rotation as rotation_mod
from walcrypt.rotation import Rotation

HERE_TESTS = os.path.dirname(os.path.abspath(__file__))
KEYS_HELD = Rotation.holding_keys.__code__      # where key_lock is taken for a DEK rotation
SEG = 1 << 22
CS = ConfState(voters=(1,))

# ---------------------------------------------------------------------------------------------
# 1, 2. Torn-tail rule (FORMAT.md 11.4 rule 3): damage in an acknowledged last unit cut off as a
#       torn tail, with no zeros forced anywhere -- the tag's last byte is genuinely zero (found by
#       saving units until it is: 1 in 256).
# ---------------------------------------------------------------------------------------------

# Saves one-entry units (sync="always", each save returns = acknowledged) until the last unit has
# the wanted shape, then leaves through os._exit so the segment stays unsealed (as test_torn_tail).
#   commit : the unit's COMMIT frame ends in a zero byte (its tag's last byte)
#   sector1: the unit's ENTRIES frame ends one byte past a 512-byte boundary, in a zero byte
CHILD = r'''
import os, sys
import walcrypt, wctest
from walcrypt import Entry, HardState
path, mode, target = sys.argv[1], sys.argv[2], sys.argv[3]
s = wctest.open_store(path, encrypted=(mode == "enc"), segment_size=1 << 22, sync="always")
s.save(hard_state=HardState(1, 1, 1), entries=[Entry(1, 1, b"first")])
nxt = 2
for t in range(4000):                       # bounded: P(no hit) = (255/256)**4000 < 1e-6
    u = s.wal.active.write_offset
    if target == "sector1":
        n = (1 - u - (88 + 20 + 16)) % 512  # one entry: header, count/term/length, tag
        n = n + 512 if n < 8 else n
    else:
        n = 8 + t % 200
    s.save(hard_state=None, entries=[Entry(nxt, 1, wctest.entry_data(nxt, n))])
    nxt += 1
    seg = s.wal.active
    with open(seg.path, "rb") as f:
        f.seek(u)
        data = f.read(seg.write_offset - u)
    frames, off = [], 0
    while off < len(data):
        length = int.from_bytes(data[off + 4:off + 8], "little")
        frames.append((u + off, data[off], u + off + 88 + length, data[off + 88 + length - 1]))
        off = (off + 88 + length + 7) & ~7
    if target == "commit":
        hit = frames[-1][1] == 3 and frames[-1][3] == 0
        f = frames[-1]
    else:
        hit = frames[0][1] == 1 and frames[0][2] % 512 == 1 and frames[0][3] == 0
        f = frames[0]
    if hit:
        print(f"FOUND {nxt - 1} {f[0]} {f[2]} {u} {seg.write_offset} {seg.path}", flush=True)
        os._exit(0)
print("NONE", flush=True)
os._exit(0)
'''


def _make(tmp_path, mode: str, target: str):
    root = str(tmp_path / f"{mode}-{target}")
    proc = subprocess.run([sys.executable, "-c", CHILD, root, mode, target], capture_output=True, text=True,
                          env=wctest.child_env(), cwd=HERE_TESTS, timeout=600)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words and words[0] == "FOUND", proc.stdout
    last, fo, fe, unit_lo, unit_hi = map(int, words[1:6])
    return root, words[6], last, fo, fe, unit_lo, unit_hi


def _damaged_last_unit_must_not_be_cut(tmp_path, mode, target, where):
    root, seg, last, fo, fe, unit_lo, unit_hi = _make(tmp_path, mode, target)
    data = bytearray(wctest.read(seg))
    assert data[fe - 1] == 0 and any(data[unit_lo:unit_hi]) and not any(data[unit_hi:])
    # The store as acknowledged: every entry up to `last` is there.
    ref = wctest.copy_store(root, str(tmp_path / "ref"))
    ents, _ = wctest.open_and_read_all(ref, encrypted=mode == "enc", segment_size=SEG)
    assert ents[-1].index == last
    # One bit of the acknowledged last unit flips (bit rot); nothing is zeroed.
    data[where(fo, fe)] ^= 0x10
    wctest.write(seg, bytes(data))
    before = wctest.tree_hashes(root)
    try:
        ents, _ = wctest.open_and_read_all(root, encrypted=mode == "enc", segment_size=SEG)
    except CorruptionError as exc:
        assert exc.offset == fo
    else:
        pytest.fail(f"a bit flip at {where(fo, fe)} in the {target} frame [{fo}, {fe}) of the acknowledged "
                    f"last unit [{unit_lo}, {unit_hi}) was taken for a torn write: the store opened with "
                    f"{ents[-1].index} of {last} acknowledged entries (.broken kept: "
                    f"{os.path.exists(seg + '.broken')})")
    assert wctest.tree_hashes(root) == before
    assert not os.path.exists(seg + ".broken")


@pytest.mark.parametrize("mode", ["enc", "plain"])
@pytest.mark.parametrize("where", ["payload", "header-index"])
def test_bit_flip_in_the_commit_frame_of_the_acknowledged_last_unit_is_not_cut_as_torn(tmp_path, mode, where):
    """Rule 3's second alternative ("its last byte and the 31 bytes after it are zero") holds for
    every COMMIT frame of a last unit whose tag ends in 0 (1 in 256): it is followed by the
    preallocated zeros.  Any damage to that frame is then cut as a torn tail, an acknowledged unit
    lost silently -- the case the commit says it fixed (its test skips the COMMIT frame).  No crash
    of the model gives these bytes: a cut at E-1 keeps [X, E-1) intact, and exactly one value of
    byte E-1 would then make the CRC match."""
    pos = {"payload": lambda fo, fe: fo + fmt.FRAME_HEADER_SIZE + 2,
           "header-index": lambda fo, fe: fo + 20}[where]
    _damaged_last_unit_must_not_be_cut(tmp_path, mode, "commit", pos)


@pytest.mark.parametrize("mode", ["enc", "plain"])
def test_bit_flip_in_a_frame_ending_one_byte_past_a_sector_boundary_is_not_cut_as_torn(tmp_path, mode):
    """Rule 3's first alternative looks only at the frame's own part of its last sector:
    t = min(32, E - B) bytes.  For a frame ending at 512k + 1 that is its one last byte -- exactly
    the rule the commit replaced -- though the rest of that sector (padding, then the next frame's
    header, intact) shows the sector was written.  An ENTRIES frame so placed whose tag ends in 0
    (1 in 256), damaged anywhere: the acknowledged last unit is cut off."""
    _damaged_last_unit_must_not_be_cut(tmp_path, mode, "sector1",
                                       lambda fo, fe: fo + fmt.FRAME_HEADER_SIZE + 40)


# ---------------------------------------------------------------------------------------------
# 3, 4. Store._rotate_dek: `acquired = lock.acquire(...)` inside try/finally replaced
#       `with key_lock:`.  An asynchronous exception (KeyboardInterrupt from a signal handler,
#       PyThreadState_SetAsyncExc) is delivered when the acquire() call returns, before `acquired`
#       is assigned: the finally does not release, and key_lock stays held by a thread that has
#       left the engine.  (A `with` statement has no such point.)
# ---------------------------------------------------------------------------------------------

class GatedService(FlakyService):
    """A key service whose wrap() waits (bounded) for ``gate`` once armed: a slow KMS."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def wrap(self, plaintext, context):
        if self.armed:
            self.armed = False
            self.entered.set()
            self.gate.wait(30)
        return super().wrap(plaintext, context)


def _wait_blocked_in_acquire(thread: threading.Thread, timeout: float = 20) -> None:
    """Until ``thread`` sits in a C call made by Rotation.holding_keys itself (key_lock's acquire: the
    innermost Python frame is holding_keys, at the same instruction, 0.2 s apart)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:              # bounded by the deadline
        f = sys._current_frames().get(thread.ident)
        here = (f.f_lasti if f is not None and f.f_code is KEYS_HELD else None)
        if here is not None and here == last:
            return
        last = here
        time.sleep(0.2)
    raise AssertionError("the second rotate_dek never reached key_lock")


def test_an_interrupt_as_rotate_dek_gets_key_lock_never_leaves_it_held(tmp_path):
    """An operator's rotate_dek() waits for key_lock behind another rotate_dek() whose key service
    is slow; it is interrupted (KeyboardInterrupt delivered asynchronously, as a signal handler's
    exception or PyThreadState_SetAsyncExc is) just as it gets the lock.  The host then saves the
    snapshot that completes the rotation in flight: that takes key_lock, which the interrupted
    thread still holds -- the Raft thread blocks forever (and every later key operation too)."""
    svc = GatedService()
    path = str(tmp_path / "d")
    s = walcrypt.open(path, kek=wctest.flaky_kms(svc, attempts=1), segment_size=4096)
    try:
        s.save(HardState(1, 1, 10), wctest.term_entries(1, 11, 1))
        svc.armed = True
        first, first_out = wctest.in_thread(s.rotate_dek)        # holds key_lock, waits on the service
        assert svc.entered.wait(20)
        second, second_out = wctest.in_thread(s.rotate_dek)      # waits for key_lock
        _wait_blocked_in_acquire(second)
        n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(second.ident),
                                                       ctypes.py_object(KeyboardInterrupt))
        assert n == 1
        svc.gate.set()                                           # the first rotation goes on
        first.join(30)
        second.join(30)
        assert not first.is_alive() and "error" not in first_out, first_out
        assert not second.is_alive()
        assert isinstance(second_out.get("error"), KeyboardInterrupt), second_out  # never swallowed
        # The host's snapshot at the log's end completes the rotation in flight (step 4).
        assert s.needs_snapshot
        # The Raft thread is any thread other than the interrupted one.  (POSIX reuses a finished
        # thread's ident, and an RLock held by a finished thread counts as held by a new thread that
        # got its ident: such threads are parked, so the snapshot is saved from a distinct one.)
        park = threading.Event()
        parked = []
        snap = snap_out = None
        for _ in range(20):                                       # bounded
            go = threading.Event()
            t, o = wctest.in_thread(lambda go=go: (park.wait(60), go.is_set() and s.save_snapshot(
                SnapshotMeta(10, 1, CS), b"state at 10")))
            if t.ident != second.ident:
                go.set()
                snap, snap_out = t, o
                break
            parked.append(t)
        assert snap is not None
        park.set()
        snap.join(15)
        assert not snap.is_alive(), ("save_snapshot() is blocked on key_lock, held by a thread that got "
                                     "a KeyboardInterrupt as its rotate_dek() acquired it")
        assert "error" not in snap_out, snap_out
    finally:
        svc.gate.set()
        s.close()


def test_an_interrupt_as_a_budget_save_gets_key_lock_never_starves_the_rotation(tmp_path, monkeypatch):
    """A save on a Raft worker thread reaches the key budget; its DEK rotation gets key_lock
    (non-blocking) and a KeyboardInterrupt arrives as acquire() returns.  key_lock stays held by that
    thread: from then on every save elsewhere puts the rotation off ("another key operation was in
    progress" -- there is none), the key budget stays exceeded and the DEK is never rotated while
    saves go on; an explicit rotate_dek() blocks forever."""
    monkeypatch.setattr(rotation_mod, "DEFER_FIRST_WAIT_S", 0.0)      # retries due at once
    path = str(tmp_path / "d")
    s = walcrypt.open(path, kek=walcrypt.RawKey(wctest.KEK_BYTES), segment_size=4096, max_records_per_dek=40)
    try:
        s.save(HardState(1, 1, 10), wctest.term_entries(1, 11, 1))
        keys_before = set(s.keys)
        out: dict = {}

        def worker():
            i = 11
            with wctest.InterruptAfter(KEYS_HELD, "acquire") as inj:
                try:
                    for _ in range(2000):                 # bounded; the budget is reached within it
                        s.save(HardState(1, 1, i), wctest.term_entries(i, i + 1, 1, b"acknowledged " * 4))
                        i += 1
                        if inj.fired:
                            break
                except KeyboardInterrupt as exc:
                    out["interrupted"] = exc
            out["next"] = i + 1 if "interrupted" in out else i

        t = threading.Thread(target=worker)
        t.start()
        t.join(60)
        assert not t.is_alive() and "interrupted" in out, out
        i = out["next"]
        # The saves go on in this thread, far past the budget; each retries the rotation at once.
        for _ in range(300):
            s.save(HardState(1, 1, i), wctest.term_entries(i, i + 1, 1, b"acknowledged " * 4))
            i += 1
            if set(s.keys) != keys_before:
                break
        assert set(s.keys) != keys_before, (
            f"{i - 11} records under a DEK whose budget is 40, never rotated; deferred: {s.key_info()['deferred']}")
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# 5. (Pre-existing: fails on 9db5f2f too.)  A save on the Raft thread during a full re-key.
#    Rotation.rekey rewrites the log under the write lock (Store.rewrite_under), releases it, commits,
#    then install_staged loads `wal.segments + staged`: a segment a save created in between (ID past
#    the staging reservation) is put BEFORE the staged copies (lower IDs), so the in-memory log ends
#    where the copy ended.  The save's acknowledged entries disappear until a restart, the log end
#    moves backwards, and the host's next save fails ("a gap is not allowed").
# ---------------------------------------------------------------------------------------------

def test_entries_saved_during_a_full_rekey_stay_in_the_log(tmp_path):
    """The Raft thread saves while a re-key runs, at the point where the rewrite is done and the
    commit and install are still to come.  The save waits for the re-key (writers are held back
    from the rewrite to the install), then its entries are in the log, under the new key, and stay
    there after a restart; the host goes on saving."""
    path = str(tmp_path / "d")
    s = walcrypt.open(path, kek=walcrypt.RawKey(wctest.KEK_BYTES), segment_size=4096)
    try:
        s.save(HardState(1, 1, 20), wctest.term_entries(1, 21, 1, b"before " * 3))
        during = wctest.term_entries(21, 23, 1, b"saved during the re-key")
        orig = s.rewrite_under
        saver: list = []

        def rewrite_then_a_save(key_id):
            out = orig(key_id)
            saver.append(wctest.in_thread(lambda: s.save(HardState(1, 1, 22), during)))
            time.sleep(0.2)                       # the saving thread reaches the write lock
            return out

        s.rewrite_under = rewrite_then_a_save
        try:
            s.rekey()
        finally:
            del s.rewrite_under
        (t, res), = saver
        t.join(30)
        assert not t.is_alive() and "error" not in res, res                           # acknowledged
        assert s.last_index() == 22, (f"the re-key dropped acknowledged entries 21-22 from the log: it ends "
                                      f"at {s.last_index()}; segments in memory (id, base, last): "
                                      f"{[(g.seg_id, g.ident.base_index, g.last_index) for g in s.wal.segments]}")
        assert s.entries(21, 23) == during
        active = next(k["key_id"] for k in s.key_info()["keys"] if k["state"] == "active")
        assert {g.ident.key_id.hex() for g in s.wal.segments} == {active}
        s.save(HardState(1, 1, 23), wctest.term_entries(23, 24, 1))       # the host goes on
    finally:
        s.close()
    with walcrypt.open(path, kek=walcrypt.RawKey(wctest.KEK_BYTES)) as s:
        assert s.last_index() == 23 and s.entries(21, 23) == during


# ---------------------------------------------------------------------------------------------
# Second review.  (a) An interruption at any point of Rotation.holding_keys where CPython delivers
# one (after each call returns) never leaves key_lock held.  (b) A few zero bytes at the head of a
# later frame of the last unit are no lost sector: its first sector holds the unit's earlier frame.
# ---------------------------------------------------------------------------------------------

class _InterruptAsCallReturns:
    """KeyboardInterrupt as the ``n``-th call made from ``code`` returns (0: none; counts them).  That
    is where CPython delivers a signal handler's exception: at the end of a call, attributed to the
    call (raised from the profiler's return events, in the thread that enters)."""

    def __init__(self, code, n: int):
        self.code, self.n, self.count, self.fired = code, n, 0, False

    def _profile(self, frame, event, arg):
        if self.fired:
            return
        if (event == "c_return" and frame.f_code is self.code) or \
                (event == "return" and frame.f_back is not None and frame.f_back.f_code is self.code):
            self.count += 1
            if self.count == self.n:
                self.fired = True
                raise KeyboardInterrupt(f"injected as call {self.n} of {self.code.co_name} returned")

    def __enter__(self):
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        return False


def _budget_saves_interrupted(tmp_path, n: int) -> dict:
    """Saves on a worker thread until the key budget asks for a DEK rotation, interrupted as the n-th
    call in Rotation.holding_keys returns; then, from this thread: is key_lock free, and do the saves
    that follow rotate the DEK?"""
    path = str(tmp_path / f"d{n}")
    s = walcrypt.open(path, kek=walcrypt.RawKey(wctest.KEK_BYTES), segment_size=4096, max_records_per_dek=40)
    try:
        s.save(HardState(1, 1, 10), wctest.term_entries(1, 11, 1))
        keys = set(s.keys)
        out: dict = {"next": 11}

        def worker():
            with _InterruptAsCallReturns(KEYS_HELD, n) as inj:
                try:
                    for _ in range(200):                  # bounded; the budget is reached within it
                        i = out["next"]
                        s.save(HardState(1, 1, i), wctest.term_entries(i, i + 1, 1, b"acknowledged " * 4))
                        out["next"] = i + 1
                        if inj.count:
                            break
                except KeyboardInterrupt:
                    out["next"] += 1                     # the save was durable before its rotation
            out["calls"], out["fired"] = inj.count, inj.fired

        t = threading.Thread(target=worker)
        t.start()
        t.join(60)
        assert not t.is_alive()
        out["free"] = s.rotation.key_lock.acquire(timeout=5)
        if out["free"]:
            s.rotation.key_lock.release()
            i = out["next"]
            for _ in range(120):                         # bounded: the budget is 40 records
                if set(s.keys) != keys:
                    break
                s.save(HardState(1, 1, i), wctest.term_entries(i, i + 1, 1, b"after " * 4))
                i += 1
            out["rotated"] = set(s.keys) != keys
    finally:
        if out.get("free", True):
            s.close()
    return out


def test_an_interrupt_as_any_call_in_holding_keys_returns_never_leaves_key_lock_held(tmp_path, monkeypatch):
    """A budget save on a worker thread is interrupted as each call Rotation.holding_keys makes
    returns, in turn: afterwards another thread takes key_lock at once, and the saves that follow
    rotate the DEK (none is left put off by a lock nobody uses)."""
    monkeypatch.setattr(rotation_mod, "DEFER_FIRST_WAIT_S", 0.0)
    calls = _budget_saves_interrupted(tmp_path, 0)["calls"]
    assert calls >= 3                                   # the owner check, acquire, the body, release
    bad = []
    for n in range(1, calls + 1):
        out = _budget_saves_interrupted(tmp_path, n)
        if not (out["fired"] and out["free"] and out["rotated"]):
            bad.append((n, out))
    assert not bad, f"interrupted as call n of {calls} in holding_keys returned: {bad}"


CHILD_504 = r'''
import os, sys
import walcrypt, wctest
from walcrypt import Entry, HardState
path, mode = sys.argv[1], sys.argv[2]
s = wctest.open_store(path, encrypted=(mode == "enc"), segment_size=1 << 22, sync="always")
s.save(hard_state=HardState(1, 1, 1), entries=[Entry(1, 1, b"first")])
u = s.wal.active.write_offset
n = (504 - u - (88 + 20 + 16)) % 512          # the unit's ENTRIES frame ends at 512k + 504
n = n + 512 if n < 8 else n
s.save(hard_state=None, entries=[Entry(2, 1, wctest.entry_data(2, n))])    # acknowledged
seg = s.wal.active
print(f"UNIT {u} {seg.write_offset} {seg.path}", flush=True)
os._exit(0)                                   # no seal: the segment stays the newest, unsealed
'''


@pytest.mark.parametrize("mode", ["enc", "plain"])
@pytest.mark.parametrize("zeroed", [8, 16, 24])
def test_zero_bytes_at_the_head_of_the_acknowledged_commit_frame_are_not_cut_as_torn(tmp_path, mode, zeroed):
    """The last unit's COMMIT frame starts 8 bytes before a sector boundary, its ENTRIES frame ends
    in the same sector.  Its first 8-24 bytes zeroed (the rest of it, and the ENTRIES frame, intact):
    damage, a CorruptionError at the frame; the acknowledged entry is not cut off."""
    root = str(tmp_path / mode)
    proc = subprocess.run([sys.executable, "-c", CHILD_504, root, mode], capture_output=True, text=True,
                          env=wctest.child_env(), cwd=HERE_TESTS, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _, lo, hi, seg = proc.stdout.split()
    lo, hi = int(lo), int(hi)
    data = bytearray(wctest.read(seg))
    x = hi - 112                                  # the unit's COMMIT frame [x, hi)
    assert data[x] == fmt.FRAME_COMMIT and x % 512 == 504 and lo < x - 8, (lo, x, hi)
    data[x:x + zeroed] = bytes(zeroed)
    wctest.write(seg, bytes(data))
    before = wctest.tree_hashes(root)
    with pytest.raises(CorruptionError) as info:
        wctest.open_and_read_all(root, encrypted=mode == "enc", segment_size=1 << 22)
    assert info.value.offset == x
    assert wctest.tree_hashes(root) == before and not os.path.exists(seg + ".broken")
