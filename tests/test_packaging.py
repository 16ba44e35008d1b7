"""Packaging: everything installs under the one package ``fedadapt``.

The repository keeps ``server/``, ``client/``, ... as top-level folders; the wheel maps
them onto ``fedadapt.server``, ``fedadapt.client``, ... so that installing fedadapt
never shadows another project's ``server`` or ``client`` module.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fedadapt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the venv's setuptools builds it, nothing is downloaded.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (whl,) = out.glob("fedadapt-*.whl")
    return whl


def test_wheel_top_level_is_only_fedadapt(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (top,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top).decode().split() == ["fedadapt"]
        entry = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "fedadapt = fedadapt.cli:main" in zf.read(entry[0]).decode()
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"fedadapt"}
    for sub in fedadapt.SUBPACKAGES:
        assert f"fedadapt/{sub}/__init__.py" in names, sub
    # Package data travels with its subpackage.
    assert "fedadapt/imaging/pretrained/vit-default-mae.safetensors" in names
    assert any(n.startswith("fedadapt/simulations/scenarios/") and n.endswith(".toml")
               for n in names)


def test_flower_components_name_the_namespace():
    import tomllib

    comps = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"]
    assert comps == {"serverapp": "fedadapt.server.app:app",
                     "clientapp": "fedadapt.client.app:app"}


def test_imports_beside_a_user_server_py(tmp_path):
    """A folder with a Flower-tutorial-style ``server.py`` does not break fedadapt."""
    (tmp_path / "server.py").write_text("RAISE = 1\n")
    (tmp_path / "client.py").write_text("RAISE = 1\n")
    code = ("import fedadapt.server.app, fedadapt.client.app, server, client; "
            "assert server.RAISE == client.RAISE == 1; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
