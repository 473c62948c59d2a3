"""demo and bench."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import click

from ..errors import (
    UsageError,
)
from .app import command, main
from .errors import EXIT_FINDINGS, EXIT_OK
from .output import emit_json

# ---------------------------------------------------------------------------
# demo, bench
# ---------------------------------------------------------------------------

@command(short_help="The main job: a 3-node pysyncobj cluster on encrypted stores, then one store up close.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--entries", "n_entries", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Writes through the cluster, and entries written to the single store.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to create the cluster's and the store's directories (default: a new temporary "
                   "directory, removed afterwards).")
def demo(as_json, n_entries, workdir) -> None:
    """Run walcrypt under a real Raft cluster, then take one store apart; print what was seen.

    \b
    Part 1: a 3-node pysyncobj cluster on 127.0.0.1, one subprocess per node,
    each on its own encrypted store with its own KEK: a replicated key/value
    workload, the leader killed with SIGKILL and restarted, a rolling DEK
    rotation under load, a full-cluster restart; then every acknowledged write
    is checked on every node, and every file searched for plaintext.
    Part 2: one store up close: written, reopened and read back byte for
    byte, searched for plaintext, a wrong key refused, verified, a flipped bit
    detected, a crashed writer's torn tail repaired.

    Every step checks what it claims; exits 1 if any check fails.
    """
    # lazy: start-up time (walcrypt.demo with the verify walk it runs, walcrypt.check)
    from ..demo import run_demo
    report = run_demo(n_entries=n_entries, workdir=workdir, echo=None if as_json else click.echo)
    if as_json:
        emit_json(report)
    sys.exit(EXIT_OK if report["ok"] else EXIT_FINDINGS)


def find_checkout() -> str | None:
    """A source checkout holding benchmarks/: the current directory, or the one above the package."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above walcrypt/cli/
    for root in (os.getcwd(), here):
        if os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
            return root
    return None


@command(short_help="Run the quick benchmark suite (source checkout); results to a file of your own.",
         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the results (JSON) here; default: walcrypt-bench-<date>-<time>.json in the current "
                   "directory.  Never overwrites.")
@click.option("--update-repo", is_flag=True,
              help="Also rewrite the checkout's committed results (benchmarks/RESULTS.md, benchmarks/results/ "
                   "and the chart), as a release does; off by default.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(out, update_repo, args) -> None:
    """Run the quick benchmark suite (python -m benchmarks --quick [ARGS]).

    Needs a source checkout with benchmarks/ (in the current directory or next
    to the installed package); extra ARGS go to the suite, e.g. 'walcrypt bench
    -- --list'.  The results go to --out (default: a new dated file in the
    current directory); the checkout's committed benchmarks/RESULTS.md is left
    alone unless --update-repo is given.
    """
    root = find_checkout()
    if root is None:
        raise UsageError("'walcrypt bench' needs a source checkout: no benchmarks/ in the current directory or "
                         "next to the package; run it from a clone of the walcrypt repository")
    if out is None:
        out = time.strftime("walcrypt-bench-%Y%m%d-%H%M%S.json")
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise UsageError(f"{out} already exists; refusing to overwrite it (choose another --out)")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"the directory of {out} does not exist")
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    mine = ["--json", out] + ([] if update_repo else ["--no-save"])
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", *mine, *args], cwd=root, env=env)
    if os.path.exists(out):
        click.echo(f"results written to {out}" + ("" if update_repo else
                   " (benchmarks/RESULTS.md left alone; --update-repo rewrites it)"))
    sys.exit(proc.returncode)


if __name__ == "__main__":  # pragma: no cover
    main()
