"""Child process for the engine tests (run by tests through wctest.run_child / spawn_child).

Modes:
  write PATH   write batches of deterministic entries, then close or leave without closing
               (``--end exit`` calls os._exit(0) after the last save, so the last segment stays unsealed)
  sigkill PATH write forever (bounded) with sync="always", printing "TRY <hi>" before each save and
               "ACK <hi>" after it returned; the parent kills the process with SIGKILL
  hold PATH    open the store, print READY, wait for a line on stdin (or EOF), close
  tryopen PATH try to open the store; print the exception class name, or OPENED
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import walcrypt  # noqa: E402
from walcrypt import HardState  # noqa: E402

import wctest  # noqa: E402


def _open(args):
    return wctest.open_store(args.path, encrypted=not args.plain, segment_size=args.seg_size, sync=args.sync)


def mode_write(args) -> None:
    s = _open(args)
    nxt = s.last_index() + 1
    for _ in range(args.batches):
        ents = wctest.make_entries(nxt, nxt + args.batch_size, length=args.length)
        hs = HardState(ents[-1].term, 1, ents[-1].index) if args.hs else None
        s.save(hard_state=hs, entries=ents)
        nxt += args.batch_size
    print(f"LAST {nxt - 1}", flush=True)
    if args.end == "exit":
        os._exit(0)
    s.close()


def mode_sigkill(args) -> None:
    rng = random.Random(args.seed)
    s = _open(args)
    nxt = s.last_index() + 1
    print(f"START {nxt - 1}", flush=True)
    for _ in range(1_000_000):               # bounded; the parent kills us long before
        n = rng.randint(1, 12)
        ents = wctest.make_entries(nxt, nxt + n, per_term=500)
        hi = nxt + n - 1
        print(f"TRY {hi}", flush=True)
        s.save(hard_state=HardState(ents[-1].term, 1, hi), entries=ents)
        print(f"ACK {hi}", flush=True)
        nxt = hi + 1
    s.close()


def mode_hold(args) -> None:
    s = _open(args)
    print("READY", flush=True)
    sys.stdin.readline()
    s.close()
    print("CLOSED", flush=True)


def mode_tryopen(args) -> None:
    try:
        s = _open(args)
    except walcrypt.WalcryptError as exc:
        print(type(exc).__name__, flush=True)
        print(str(exc), flush=True)
        return
    print("OPENED", flush=True)
    s.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "sigkill", "hold", "tryopen"])
    p.add_argument("path")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--seg-size", type=int, default=wctest.SEG_SIZE)
    p.add_argument("--sync", default="always")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--hs", action="store_true")
    p.add_argument("--end", choices=["exit", "close"], default="close")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    {"write": mode_write, "sigkill": mode_sigkill, "hold": mode_hold, "tryopen": mode_tryopen}[args.mode](args)


if __name__ == "__main__":
    main()
