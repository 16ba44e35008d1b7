"""Real Flower processes on loopback for the deployment tests: a federation of a TLS
SuperLink with SuperNode authentication and site SuperNodes, started with the README's
``fedadapt`` commands, each process by PID with its own log, its own ports and its own
``FLWR_HOME``. A test stops (or kills) only the processes it started and their children.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "hospitals"  # the name of the SuperLink connection in $FLWR_HOME/config.toml


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, text: str, timeout: float, count: int = 1) -> bool:
    """Whether ``text`` shows up ``count`` times in the file ``path`` within ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return True
        time.sleep(0.2)
    return False


def _tree(p: subprocess.Popen) -> list[Any]:
    """``p``'s children (recursively), as psutil processes, listed before ``p`` stops."""
    import psutil

    try:
        return psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill(*procs: subprocess.Popen) -> None:
    """SIGKILL ``procs`` and their children (a crash: no handler, no clean shutdown)."""
    import psutil

    kids = [k for p in procs for k in _tree(p)]
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        p.wait(timeout=30)


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop the processes a test started (by PID, newest first) and their children."""
    import psutil

    for p in reversed(procs):
        if p.poll() is not None:
            continue
        kids = _tree(p)
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for k in kids:
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass


def cli(module: Any, argv: list[str]) -> None:
    """Run a ``fedadapt`` subcommand module in-process (the same code as the CLI)."""
    parser = argparse.ArgumentParser(prog="fedadapt")
    module.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0


class Federation:
    """Certificates, site folders and the processes of one test's federation.

    Args:
        root: The test's own folder (``tmp_path``): certs, sites, logs, state, FLWR_HOME.
        sites: Site names; site ``i`` has partition ``i`` of ``len(sites)``.
        epsilon_cap: Each site's policy cap.
    """

    def __init__(self, root: Path, sites: tuple[str, ...], epsilon_cap: float = 50.0) -> None:
        from fedadapt import cmd_certs, cmd_site

        self.root, self.sites = root, sites
        self.certs, self.home = root / "certs", root / "home"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        cli(cmd_certs, ["certs", str(self.certs), "--sites", ",".join(sites)])
        for i, s in enumerate(sites):
            cli(cmd_site, ["site", "init", str(self.site_dir(s)), "--name", s,
                           "--data", "synthetic", "--device", "cpu", "--partition-id",
                           str(i), "--num-sites", str(len(sites)), "--epsilon-cap",
                           str(epsilon_cap), "--delta", "1e-5"])  # the run config's δ
        self.home.mkdir()
        (self.home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.pem"}"\n')
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        FLWR_HOME=str(self.home))

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def start(self, args: list[str], log: str) -> subprocess.Popen:
        """Start ``args`` with stdout and stderr to ``root/log``; keep it for :meth:`stop`."""
        self.procs.append(subprocess.Popen(args, cwd=self.root, env=self.env,
                                           stdout=open(self.root / log, "a"),
                                           stderr=subprocess.STDOUT))
        return self.procs[-1]

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``flwr ARGS`` in the project root (the app's pyproject.toml) with this FLWR_HOME."""
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def logs(self, tail: int = 2500) -> str:
        """The end of every log of this federation, for an assertion message."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.root.glob("*.log")))

    def start_server(self, log: str = "superlink.log", *,
                     via_cli: bool = True) -> list[subprocess.Popen]:
        """``fedadapt server start`` (process isolation, as in docker-compose.yml) and the
        ``flower-superexec`` that runs the ServerApp; returns both.

        ``via_cli=False`` starts the ``flower-superlink`` command line that ``fedadapt
        server start`` would exec (``deploy.commands``), without the CLI's start-up.
        """
        args = ["server", "start", "--certs", str(self.certs), "--port", str(self.port),
                "--database", str(self.root / "state.db"), "--isolation", "process"]
        if not via_cli:
            from fedadapt.deploy.commands import SuperLinkOptions, superlink_command

            args = superlink_command(SuperLinkOptions(
                certs=self.certs, port=self.port, database=str(self.root / "state.db"),
                isolation="process"))
        link = self.start([str(BIN / "fedadapt"), *args] if via_cli else args, log)
        executor = self.start(
            [str(BIN / "flower-superexec"), "--runtime-api-address",
             f"127.0.0.1:{self.port}", "--root-certificates", str(self.certs / "ca.pem"),
             "--superexec-auth-secret-file", str(self.certs / "superexec.secret")],
            log.replace("superlink", "serverapp-executor"))
        return [link, executor]

    def register_sites(self, timeout: float = 90) -> None:
        """``flwr supernode register`` every site's public key, once the SuperLink answers."""
        for s in self.sites:
            end, reg = time.monotonic() + timeout, None
            while time.monotonic() < end:
                reg = self.flwr("supernode", "register",
                                str(self.certs / "sites" / s / "auth.pub"), CONNECTION)
                if "registered successfully" in reg.stdout:
                    break
                time.sleep(1)
            assert reg is not None and "registered successfully" in reg.stdout, \
                (reg.stdout + reg.stderr if reg else "") + self.logs()

    def start_site(self, site: str, log: str, isolation: str = "subprocess",
                   node_port: int | None = None, *, via_cli: bool = True) -> subprocess.Popen:
        """``fedadapt site start`` for ``site``: its SuperNode over TLS with its auth key.

        ``via_cli=False`` checks the site folder and starts the ``flower-supernode``
        command line as ``fedadapt site start`` does (``deploy.commands``), in-process.
        """
        superlink, ca = f"127.0.0.1:{self.port}", self.certs / "ca.pem"
        key, port = self.certs / "sites" / site / "auth.key", node_port or free_port()
        if not via_cli:
            from fedadapt.deploy.commands import SuperNodeOptions, supernode_command
            from fedadapt.deploy.site_folder import check_site

            cfg = check_site(self.site_dir(site))
            return self.start(supernode_command(self.site_dir(site), cfg, SuperNodeOptions(
                superlink=superlink, root_certificates=ca, auth_key=key, port=port,
                isolation=isolation)), log)
        return self.start([str(BIN / "fedadapt"), "site", "start", str(self.site_dir(site)),
                           "--superlink", superlink, "--root-certificates", str(ca),
                           "--auth-key", str(key), "--port", str(port), "--isolation",
                           isolation], log)

    def wait_joined(self, logs: list[str], timeout: float = 120) -> None:
        for log in logs:
            assert wait_for(self.root / log, "SuperNode ID:", timeout), self.logs()

    def ledger(self, site: str) -> list[dict[str, Any]]:
        """Every entry of ``site``'s ledger files, in order."""
        import json

        return [json.loads(line) for f in sorted((self.site_dir(site) / "ledger")
                                                 .glob("*.jsonl"))
                for line in f.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        stop(self.procs)
