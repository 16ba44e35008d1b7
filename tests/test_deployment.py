"""Real Flower 1.41 processes on loopback: SuperLink with TLS (certs from ``deploy.certs``)
and SuperNode authentication; a registered site joins, an unregistered one cannot."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.certs import generate

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                reason="flower-superlink not installed next to python")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, text: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def test_tls_superlink_registered_site_joins_unregistered_cannot(tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               FLWR_HOME=str(tmp_path / "home"))
    certs = generate(tmp_path / "certs", ("a", "b"))
    port = _port()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink.t]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs.ca_cert}"\n')
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=open(tmp_path / log, "w"),
                             stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs.ca_cert),
               "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile",
               str(certs.server_key), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation", "--database",
               str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(port)],
              "superlink.log")
        reg = None
        for _ in range(30):  # until the SuperLink answers
            reg = subprocess.run([str(BIN / "flwr"), "supernode", "register",
                                  str(certs.site_keys["a"][1]), "t"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
            if "registered successfully" in reg.stdout:
                break
            time.sleep(1)
        assert reg is not None and "registered successfully" in reg.stdout, reg.stdout
        for site, retries in (("a", []), ("b", ["--max-retries", "1"])):
            start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                   "--root-certificates", str(certs.ca_cert), "--auth-supernode-private-key",
                   str(certs.site_keys[site][0]), "--port", str(_port()), *retries],
                  f"supernode-{site}.log")
        assert _wait_for(tmp_path / "supernode-a.log", "SuperNode ID:", 60), \
            (tmp_path / "supernode-a.log").read_text()
        b = procs[-1]
        b.wait(timeout=60)  # the unregistered site gives up instead of joining
        assert "SuperNode ID:" not in (tmp_path / "supernode-b.log").read_text()
        ls = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "t"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert ls.stdout.count("online") == 1, ls.stdout
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
