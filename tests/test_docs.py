"""The documentation: the MkDocs site builds with ``--strict`` (no broken link, anchor or
stale code reference), README stays short and starts with CI's own commands, every page
is in the nav, and every command's ``--help`` is in the built reference."""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedadapt.cli import build_parser
from fedadapt.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 160


def _hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook",
                                                  DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ci_commands() -> tuple[list[str], str]:
    """``.ci/run``'s install commands (without pip's ``-q``) and its test command."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    installs = [" ".join(w for w in shlex.split(ln) if w != "-q") for ln in lines
                if ln.startswith("pip install")]
    tests = [ln for ln in lines if ln.startswith("python -m pytest")]
    assert installs and len(tests) == 1, ".ci/run lost its install or test line"
    return [i.replace(".[test]", '".[test]"') for i in installs], tests[0]


def _readme_commands(path: Path = ROOT / "README.md", opens: bool = True) -> list[str]:
    text = path.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, f"{path.name} has no bash block"
    assert not opens or text.index(block.group(0)) < 40, "README must open with its commands"
    return block.group(1).strip().splitlines()


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_readme_commands_are_what_ci_runs():
    installs, test = _ci_commands()
    setup = " && ".join(["python3 -m venv .venv", ". .venv/bin/activate", *installs])
    assert _readme_commands() == [f"{setup} && fedadapt simulate", f"{setup} && {test}"]
    assert _readme_commands(DOCS / "index.md", opens=False) == _readme_commands()  # the site's home page


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out += _nav_files(value) if isinstance(value, list) else [value]
    return out


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
             if "hooks" not in p.relative_to(DOCS).parts}
    assert pages - set(nav) == set(), f"pages missing from mkdocs.yml nav: {pages - set(nav)}"
    hook = _hook()
    generated = {hook.RUN_CONFIG_PAGE, hook.CLI_PAGE, *hook.ROOT_DOCS.values()}
    assert set(nav) - pages - generated == set(), "nav names pages that do not exist"
    assert config["theme"]["font"] is False  # the build and the site never fetch fonts


def test_stale_references_are_caught():
    problems = _hook().stale_references(
        "`tests/test_deployment.py` `server.app:app` `fedimaging/datalist.py` "
        "`fedadapt.client.no_such_module` `client.train.train` "
        "`fedadapt.imaging.run_spec.run_model_spec` `server/app.py` `simulations/scenarios/*.toml` "
        "`report.html` `privacy.site_level.unit`")
    flagged = {p.split("`")[1] for p in problems}
    assert flagged == {"tests/test_deployment.py", "server.app:app", "fedimaging/datalist.py",
                       "fedadapt.client.no_such_module", "client.train.train"}, problems


def test_undocumented_run_config_key_fails_the_build(monkeypatch):
    hook = _hook()
    doc = RunConfig.__doc__
    monkeypatch.setattr(RunConfig, "__doc__", re.sub(r"\n\s+lr: [^\n]*", "", doc))
    with pytest.raises(hook.PluginError, match=r"Undocumented: \['lr'\]"):
        hook.run_config_page()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def _text(page: Path) -> str:
    body = re.sub(r"<[^>]+>", "", page.read_text())
    return " ".join(html.unescape(body).split())


def _helps(parser: argparse.ArgumentParser, path: str):
    yield path, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _helps(sub, f"{path} {name}")


def test_site_builds_strict_with_every_cli_help(site, monkeypatch):
    monkeypatch.setenv("COLUMNS", _hook().HELP_COLUMNS)  # argparse wraps at this width
    text = _text(site / "reference" / "cli.html")
    helps = dict(_helps(build_parser(), "fedadapt"))
    assert {"fedadapt site init", "fedadapt server start", "fedadapt audit"} <= set(helps)
    for name, help_text in helps.items():
        assert " ".join(help_text.split()) in text, f"`{name} --help` is not in the reference"


def test_every_run_config_key_in_the_reference(site):
    page = (site / "reference" / "run-config.html").read_text()
    for key in RunConfig().to_mapping():
        assert f'id="{key}"' in page, f"run-config key {key} is not in the reference"
    for root_doc in ("architecture.html", "contributing.html", "benchmarks.html"):
        assert (site / root_doc).is_file()
