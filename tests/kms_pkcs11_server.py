"""A token outage, played in a process of its own (tests/test_kms_pkcs11.py runs it).

SoftHSM2 keeps a token it found unreadable marked as failed until the library is initialised
again, so the outage is staged in a child process and the test process's tokens stay healthy.

    python tests/kms_pkcs11_server.py outage DATA_DIR TOKEN_DIR OPTIONS_JSON FINE_OPTIONS_JSON

With SOFTHSM2_CONF set by the parent: create a store under the KMS key OPTIONS_JSON names, close
it, move TOKEN_DIR (that token's storage) away, open the store again with the same ``Kms`` object
(its session and key handle from before) and with a new one, check that another token
(FINE_OPTIONS_JSON) still answers, move the directory back, and print one JSON line: the error
type of each open and whether every file of the data directory kept its bytes.
"""

from __future__ import annotations

import json
import os
import sys

import walcrypt

import wctest

FAST = walcrypt.Retry(attempts=2, delay=0.05)


def _open_error(path: str, kek) -> str | None:
    try:
        walcrypt.open(path, kek=kek).close()
    except walcrypt.WalcryptError as exc:
        return type(exc).__name__
    return None


def outage(data_dir: str, token_dir: str, options: dict, fine: dict) -> dict:
    kms = walcrypt.Kms("pkcs11", retry=FAST, **options)
    with walcrypt.open(data_dir, kek=kms) as s:
        s.save(walcrypt.HardState(1, 1, 2), [walcrypt.Entry(i, 1, b"entry %d" % i) for i in (1, 2, 3)])
    before = wctest.tree_bytes(data_dir)
    away = token_dir + ".away"
    os.rename(token_dir, away)
    try:
        same = _open_error(data_dir, kms)
        fresh = _open_error(data_dir, walcrypt.Kms("pkcs11", retry=FAST, **options))
        other = _open_error(os.path.join(os.path.dirname(data_dir), "fine"), walcrypt.Kms("pkcs11", **fine))
        unchanged = wctest.tree_bytes(data_dir) == before
    finally:
        os.rename(away, token_dir)
    return {"same_kms": same, "new_kms": fresh, "other_token": other,
            "unchanged": unchanged and wctest.tree_bytes(data_dir) == before}


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "outage":
        sys.exit(__doc__)
    print(json.dumps(outage(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5]))))
