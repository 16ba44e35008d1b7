"""``docker-compose.yml``, ``deploy/compose.gpu.yml``, ``Dockerfile``: checked statically
(no Docker engine here). The files ``deploy/compose-init.sh`` documents are generated for
real in a scratch project folder, and every service's command is parsed by the real
``fedadapt`` and Flower 1.41 argument parsers."""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from fedadapt import cmd_certs, cmd_server, cmd_site

ROOT = Path(__file__).resolve().parents[2]
HOSPITALS = ("a", "b", "c")
_VAR = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedadapt")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (cmd_certs, cmd_site, cmd_server):
        module.register(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{what}: {shlex.join(argv)} is not a valid command line")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A scratch project folder after running ``deploy/compose-init.sh`` line by line."""
    import os

    tmp = tmp_path_factory.mktemp("project")
    parser, cwd = _parser(), os.getcwd()
    os.chdir(tmp)
    try:
        for line in (ROOT / "deploy/compose-init.sh").read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or line == "set -eu":
                continue
            argv = shlex.split(line)
            if argv[0] == "fedadapt":
                args = _parse(parser, argv[1:], "compose-init.sh")
                assert args.func(args) == 0, line
            elif argv[:2] == ["mkdir", "-p"]:
                for d in argv[2:]:
                    Path(d).mkdir(parents=True, exist_ok=True)
            elif argv[0] == "printf" and line.endswith("> .env"):
                Path(".env").write_text("FEDADAPT_UID=1000\nFEDADAPT_GID=1000\n")
            else:
                pytest.fail(f"compose-init.sh: unexpected line {line!r}")
    finally:
        os.chdir(cwd)
    return tmp


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    """``(host path with defaults filled in, container path, read-only)`` per bind mount."""
    out = []
    for v in service.get("volumes", []):
        parts = _VAR.sub(lambda m: m.group(2), v).split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and parts[2] == "ro"))
    return out


def _container_to_host(service: dict, project: Path, path: str) -> Path:
    for host, target, _ in sorted(_mounts(service), key=lambda m: -len(m[1])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return project / host / Path(path).relative_to(target)
    pytest.fail(f"{path} is not mounted into the service ({_mounts(service)})")


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_services_networks_and_images(compose):
    s = compose["services"]
    expected = {"superlink", "serverapp"} | {f"{k}-{h}" for h in HOSPITALS
                                             for k in ("supernode", "clientapp")}
    assert set(s) == expected
    declared = set(compose["networks"])
    used = {n for svc in s.values() for n in svc["networks"]}
    assert used == declared
    for name, svc in s.items():
        assert svc["image"] == "fedadapt:latest" and svc["build"]["dockerfile"] == "Dockerfile"
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc.get("depends_on", []) == [] or set(svc["depends_on"]) <= set(s), name
    assert "9092:9092" in s["superlink"]["ports"]
    assert all("ports" not in svc for n, svc in s.items() if n != "superlink")


def test_every_mounted_file_is_generated_by_the_documented_commands(compose, project):
    for name, svc in compose["services"].items():
        for host, target, _ in _mounts(svc):
            assert host.startswith("./"), f"{name}: bind {host} should be a project path"
            assert (project / host).exists(), \
                f"{name}: {host} is not created by deploy/compose-init.sh"
            assert not host.endswith("ca.key"), f"{name}: the CA key must stay offline"


def test_fedadapt_and_flower_commands_parse_and_resolve(compose, project, capsys):
    s, parser = compose["services"], _parser()
    # SuperLink: `fedadapt server start` → its real flower-superlink command line
    link = s["superlink"]
    args = _parse(parser, link["command"][1:], "superlink")
    args.certs = _container_to_host(link, project, str(args.certs) + "/ca.pem").parent
    args.database = str(project / "state" / "superlink.db")
    args.dry_run = True
    assert args.func(args) == 0
    flower = shlex.split(capsys.readouterr().out)
    _parse(_parse_args_run_superlink(), flower[1:], "flower-superlink")
    assert "--enable-supernode-auth" in flower and "--insecure" not in flower
    port = args.port
    # ServerApp executor: connects to the SuperLink's port over TLS, with its secret
    exe = s["serverapp"]["command"]
    assert exe[0] == "flower-superexec"
    sx = _parse(superexec_parser(), exe[1:], "serverapp")
    assert sx.runtime_api_address == f"superlink:{port}" and not sx.insecure
    assert _container_to_host(s["serverapp"], project, sx.superexec_auth_secret_file) == \
        _container_to_host(link, project, "/app/certs/superexec.secret")
    sans = (ROOT / "deploy/compose-init.sh").read_text()
    assert "--san superlink" in sans  # the name the SuperNodes and executor dial

    for h in HOSPITALS:
        node, client = s[f"supernode-{h}"], s[f"clientapp-{h}"]
        args = _parse(parser, node["command"][1:], f"supernode-{h}")
        assert args.superlink == f"superlink:{port}"
        # Resolve container paths through the mounts, then build the real command.
        site_host = _container_to_host(node, project, args.dir + "/site.toml").parent
        key_host = _container_to_host(node, project, str(args.auth_key))
        assert key_host == project / "certs" / "sites" / f"hospital-{h}" / "auth.key"
        args.dir, args.auth_key, args.dry_run = str(site_host), key_host, True
        args.root_certificates = _container_to_host(node, project, str(args.root_certificates))
        assert args.func(args) == 0
        flower = shlex.split(capsys.readouterr().out)
        sn = _parse(_parse_args_run_supernode(), flower[1:], f"flower-supernode {h}")
        assert f"partition-id={HOSPITALS.index(h)} num-partitions=3" in sn.node_config
        # Its ClientApp executor dials this SuperNode's Runtime API on their private net.
        cx = _parse(superexec_parser(), client["command"][1:], f"clientapp-{h}")
        assert cx.runtime_api_address == f"supernode-{h}:{args.port}"
        assert set(client["networks"]) == {f"hospital-{h}"}
        assert compose["networks"][f"hospital-{h}"]["internal"] is True
        assert set(node["networks"]) == {"federation", f"hospital-{h}"}
        # Both see the same site folder at /site; only the executor writes the ledger.
        node_m = {t: (src, ro) for src, t, ro in _mounts(node)}
        client_m = {t: (src, ro) for src, t, ro in _mounts(client)}
        for t in ("/site/site.toml", "/site/policy.toml", "/site/superexec.secret",
                  "/site/data", "/site/ledger"):
            assert node_m[t][0] == client_m[t][0], (h, t)
            assert f"hospital-{h}" in client_m[t][0], f"{h} mounts another site's {t}"
        assert client_m["/site/ledger"][1] is False and node_m["/site/ledger"][1] is True
        assert all(ro for t, (_, ro) in client_m.items() if t != "/site/ledger")
        assert cx.superexec_auth_secret_file == "/site/superexec.secret"


def test_gpu_override_reserves_a_gpu_for_one_existing_service(compose):
    gpu = yaml.safe_load((ROOT / "deploy/compose.gpu.yml").read_text())
    (name, svc), = gpu["services"].items()
    assert name in compose["services"]
    dev = svc["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert "TORCH_INDEX_URL" in svc["build"]["args"]


def test_dockerfile_installs_cpu_torch_and_every_package():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "torch==2.13.0" in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]
    for folder in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        assert f"COPY {folder}/ {folder}/" in text, f"Dockerfile does not copy folder {folder}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for secret in ("certs/", "sites/", ".env", "**/*.key", "**/ledger/"):
        assert secret in ignored, f".dockerignore must keep {secret} out of the image"
