"""Command lines of the Flower 1.41 processes a deployment runs.

``fedadapt server start`` and ``fedadapt site start`` build them here and replace
themselves with them (so the PID a supervisor holds is Flower's); ``--dry-run``
prints them. ``docker-compose.yml`` runs the same commands.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from fedadapt.deploy.site_config import SiteConfig, SiteConfigError
from fedadapt.deploy.site_folder import SiteFolder
from fedadapt import keys
from fedadapt.layout import CA_CERT, SUPEREXEC_SECRET, SUPERLINK_CERT, SUPERLINK_KEY

ISOLATIONS = ("subprocess", "process")
SUPERLINK_PORT = 9092
SUPERNODE_PORT = 9094
_ADDRESS_RE = re.compile(r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class DeployError(ValueError):
    """A file a deployment command needs is missing; the message says how to make it."""


def flower_executable(name: str) -> str:
    """``name`` (e.g. ``flower-supernode``) next to this Python, else on ``PATH``.

    Raises:
        DeployError: If it is in neither place.
    """
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found next to {sys.executable} nor on PATH; "
                                "install the project (pip install -e .), which installs "
                                "flwr 1.41")
    return found


def check_address(address: str, what: str) -> str:
    """``HOST:PORT`` or raise a ``ValueError`` that says what was expected."""
    m = _ADDRESS_RE.match(address)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"{what}={address!r}: expected HOST:PORT, e.g. 127.0.0.1:"
                         f"{SUPERLINK_PORT} or superlink.example.org:{SUPERLINK_PORT}")
    return address


def _existing(path: str | Path, what: str, fix: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DeployError(f"{what} {p} not found; {fix}")
    return str(p.resolve())


@dataclass(frozen=True)
class SuperLinkOptions:
    """How ``fedadapt server start`` runs ``flower-superlink``.

    Attributes:
        certs: Folder written by ``fedadapt certs`` (``ca.pem``, ``superlink.pem``/``.key``).
        host: Interface to listen on (``0.0.0.0`` for all).
        port: One port serves the Fleet, Control and Runtime APIs in Flower 1.41.
        database: SQLite file of the SuperLink's state (runs, registered SuperNodes).
        isolation: ``subprocess`` (the SuperLink runs the ServerApp executor itself) or
            ``process`` (a separate ``flower-superexec`` connects, as in compose).
        supernode_auth: Only registered SuperNodes may join (``flwr supernode register``).
        health_server_address: gRPC health endpoint for probes, or empty.
    """

    certs: Path
    host: str = "127.0.0.1"
    port: int = SUPERLINK_PORT
    database: str = "superlink-state.db"
    isolation: str = "subprocess"
    supernode_auth: bool = True
    health_server_address: str = ""

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation={self.isolation!r}: use one of {list(ISOLATIONS)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port}: use a TCP port in 1..65535")
        if not self.database:
            raise ValueError("database: give a file path (':memory:' would forget "
                             "registered sites and runs on restart)")


def superlink_command(opts: SuperLinkOptions) -> list[str]:
    """``flower-superlink`` with TLS (and SuperNode authentication unless turned off).

    Raises:
        DeployError: If a certificate file is missing (says how to make it).
    """
    fix = f"run `fedadapt certs {opts.certs} --sites a,b,c` first"
    cmd = [flower_executable("flower-superlink"),
           "--ssl-ca-certfile", _existing(opts.certs / CA_CERT, "CA certificate", fix),
           "--ssl-certfile", _existing(opts.certs / SUPERLINK_CERT, "SuperLink certificate",
                                       fix),
           "--ssl-keyfile", _existing(opts.certs / SUPERLINK_KEY, "SuperLink key", fix)]
    if opts.supernode_auth:
        cmd.append("--enable-supernode-auth")
    # The app's dependencies are installed with the project; never `uv sync` at run time.
    cmd += ["--disable-runtime-dependency-installation", "--database", opts.database,
            "--isolation", opts.isolation, "--host", opts.host, "--port", str(opts.port)]
    if opts.isolation == "process":
        secret = opts.certs / SUPEREXEC_SECRET
        cmd += ["--superexec-auth-secret-file",
                _existing(secret, "SuperExec secret", f"re-run `fedadapt certs` into "
                          f"{opts.certs} (it writes superexec.secret)")]
    if opts.health_server_address:
        cmd += ["--health-server-address", opts.health_server_address]
    return cmd


@dataclass(frozen=True)
class SuperNodeOptions:
    """How ``fedadapt site start`` runs ``flower-supernode`` for a site folder.

    Attributes:
        superlink: The SuperLink's ``HOST:PORT``.
        root_certificates: CA certificate (``ca.pem``) the SuperLink's certificate chains to.
        auth_key: The site's private authentication key (``sites/NAME/auth.key``).
        host: Interface of this SuperNode's Runtime API (its ClientApp executor connects).
        port: Port of that Runtime API; one per SuperNode on a machine.
        isolation: ``subprocess`` (the SuperNode runs the ClientApp executor itself) or
            ``process`` (a separate ``flower-superexec`` connects, as in compose).
        partition_id: Overrides ``site.toml``'s ``partition_id`` when not None.
        num_partitions: Overrides ``site.toml``'s ``num_sites`` when not None.
        max_retries: Give up after this many failed connection attempts (None: never).
        health_server_address: gRPC health endpoint for probes, or empty.
    """

    superlink: str
    root_certificates: Path
    auth_key: Path
    host: str = "127.0.0.1"
    port: int = SUPERNODE_PORT
    isolation: str = "subprocess"
    partition_id: int | None = None
    num_partitions: int | None = None
    max_retries: int | None = None
    health_server_address: str = ""

    def __post_init__(self) -> None:
        check_address(self.superlink, "superlink")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation={self.isolation!r}: use one of {list(ISOLATIONS)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port}: use a TCP port in 1..65535")


def node_config(site_dir: Path, cfg: SiteConfig, opts: SuperNodeOptions) -> str:
    """The ``--node-config`` string: partition, federation size and the site folder.

    Raises:
        SiteConfigError: If the folder path cannot be passed in a node config.
    """
    path = str(site_dir.resolve())
    if any(c.isspace() for c in path) or "'" in path or '"' in path:
        raise SiteConfigError(f"site folder {path!r} has a space or a quote, which Flower's "
                              "--node-config cannot carry; move it to a plain path")
    pid = cfg.partition_id if opts.partition_id is None else opts.partition_id
    num = cfg.num_sites if opts.num_partitions is None else opts.num_partitions
    if not 0 <= pid < num:
        raise SiteConfigError(f"partition-id {pid} is outside 0..{num - 1} "
                              f"(num-partitions {num})")
    return (f"{keys.NODE_PARTITION_ID}={pid} {keys.NODE_NUM_PARTITIONS}={num} "
            f'{keys.NODE_SITE_DIR}="{path}"')


def supernode_command(site_dir: str | Path, cfg: SiteConfig, opts: SuperNodeOptions) -> list[str]:
    """``flower-supernode`` over TLS with the site's authentication key and folder.

    Raises:
        DeployError: If the CA certificate, the key or the SuperExec secret is missing.
        SiteConfigError: See :func:`node_config`.
    """
    folder = SiteFolder(Path(site_dir))
    cmd = [flower_executable("flower-supernode"), "--superlink", opts.superlink,
           "--root-certificates",
           _existing(opts.root_certificates, "CA certificate", "copy ca.pem from the "
                     "federation operator (`fedadapt certs` wrote it)"),
           "--auth-supernode-private-key",
           _existing(opts.auth_key, "authentication key", "copy sites/NAME/auth.key from "
                     "the federation operator (`fedadapt certs --sites NAME` wrote it)"),
           "--node-config", node_config(folder.root, cfg, opts),
           "--isolation", opts.isolation, "--host", opts.host, "--port", str(opts.port)]
    if opts.isolation == "process":
        cmd += ["--superexec-auth-secret-file",
                _existing(folder.superexec_secret, "SuperExec secret",
                          f"re-run `fedadapt site init {folder.root} ... --force`")]
    if opts.max_retries is not None:
        cmd += ["--max-retries", str(opts.max_retries)]
    if opts.health_server_address:
        cmd += ["--health-server-address", opts.health_server_address]
    return cmd


def shell_line(cmd: list[str]) -> str:
    """``cmd`` as one copy-pasteable shell line."""
    return shlex.join(cmd)
