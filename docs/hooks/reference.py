"""MkDocs hook: the Reference section generated from the code, at build time.

Registered under ``hooks:`` in ``mkdocs.yml``. It

* generates ``reference/run-config.md`` from :class:`fedadapt.config.RunConfig`
  (dataclass fields + the ``Attributes:`` section of its docstring); a field without a
  documented meaning, or a documented name that is no field, fails the build;
* generates ``reference/cli.md`` from the argparse parser of :mod:`fedadapt.cli` (the
  ``--help`` of every command, subcommand and sub-subcommand);
* renders ``fedadapt.server.summary.summary_schema()`` (``(dotted field, type, doc)``
  rows) as a Markdown table into ``reference/summary-json.md``, at the page's
  ``<!-- summary-schema -->`` marker (the hand-written detail around it stays);
* adds the repository's root documents (``ARCHITECTURE.md``, ``CONTRIBUTING.md``,
  ``BENCHMARKS.md`` with its figures) to the site, with their links rewritten;
* warns (so ``mkdocs build --strict`` fails) on a stale code reference in a hand-written
  page: an inline-code repository path that does not exist, or a dotted ``fedadapt.*``
  name that does not import.

Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("mkdocs.hooks.reference")

RUN_CONFIG_PAGE = "reference/run-config.md"
CLI_PAGE = "reference/cli.md"
SUMMARY_PAGE = "reference/summary-json.md"
HELP_COLUMNS = "88"

# Root documents shown in the site: repository file -> page in the site.
ROOT_DOCS = {"ARCHITECTURE.md": "architecture.md", "CONTRIBUTING.md": "contributing.md",
             "BENCHMARKS.md": "benchmarks.md"}
ROOT_FIGURES = "benchmarks/results/*.png"
# Pages whose code references are checked: every hand-written page plus these.
CHECKED_ROOT_DOCS = {"architecture.md", "contributing.md", "benchmarks.md"}

# `fedadapt simulate` flags whose name differs from the run-config key they set.
SIMULATE_ALIASES = {"rounds": "num-server-rounds", "sites": "num-sites", "out": "out-dir",
                    "train-size": "site-train-size", "test-size": "site-test-size",
                    "no-dp": "dp", "no-amp": "amp", "resume": "resume-from"}

# Top-level folders of the repository: an inline-code path starting with one of them
# must exist.
REPO_DIRS = ("fedadapt", "server", "client", "strategies", "privacy", "simulations",
             "continual", "imaging", "report", "deploy", "tests", "benchmarks", "docs")
REPO_FILES = ("pyproject.toml", "README.md", "BENCHMARKS.md", "ARCHITECTURE.md",
              "CONTRIBUTING.md", "Dockerfile", "docker-compose.yml", "mkdocs.yml", ".ci/run")
_PATH_RE = re.compile(r"^(?:%s)(?:/[A-Za-z0-9_.*-]+)*/?$" % "|".join(
    re.escape(d) for d in REPO_DIRS))
_DOTTED_RE = re.compile(r"^fedadapt(?:\.[A-Za-z_][A-Za-z0-9_]*)+(?::[A-Za-z_]\w*)?(?:\(\))?$")
# An old-style module name (`client.train.train`, `server.app:app`): package, module and
# an attribute (two parts alone read like a file name: `report.html`).
_SHORT_RE = re.compile(r"^(server|client|strategies|privacy|simulations|continual|imaging|"
                       r"report|deploy)\.([a-z_]+)(?:(?:\.[A-Za-z_]\w*)+(?::\w+)?|:\w+)(?:\(\))?$")
# Names of packages that no longer exist (now fedadapt.imaging, fedadapt.report).
RETIRED = ("fedimaging", "fedreport")
_CODE_RE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_FENCE_RE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)


def on_config(config: Any) -> Any:
    """Import ``fedadapt`` from this checkout."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return config


def on_files(files: Files, config: Any) -> Files:
    """Add the generated reference pages and the root documents."""
    for name, dest in ROOT_DOCS.items():
        text = (REPO / name).read_text(encoding="utf-8")
        files.append(File.generated(config, dest, content=_root_links(text)))
    for fig in sorted(glob.glob(str(REPO / ROOT_FIGURES))):
        rel = Path(fig).relative_to(REPO).as_posix()
        files.append(File.generated(config, rel, abs_src_path=fig))
    files.append(File.generated(config, RUN_CONFIG_PAGE, content=run_config_page()))
    files.append(File.generated(config, CLI_PAGE, content=cli_page()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Render the summary schema if the code has one; check code references."""
    uri = page.file.src_uri
    if uri == SUMMARY_PAGE:
        markdown = _summary_page(markdown)
    if not page.file.generated_by or uri in CHECKED_ROOT_DOCS:
        for problem in stale_references(markdown):
            log.warning("%s: %s", uri, problem)
    return markdown


# --------------------------------------------------------------------- run config


def attribute_docs(doc: str) -> dict[str, str]:
    """The ``Attributes:`` section of a Google-style docstring, name -> text.

    Raises:
        PluginError: If the docstring has no ``Attributes:`` section.
    """
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        raise PluginError("RunConfig's docstring has no 'Attributes:' section") from None
    entries: dict[str, list[str]] = {}
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        m = re.match(r"(\w+):\s*(.*)$", line.strip())
        if depth == indent and m:
            entries[m.group(1)] = [m.group(2)]
        elif entries:
            entries[next(reversed(entries))].append(line.strip())
    return {k: _rst_to_md(" ".join(v).strip()) for k, v in entries.items()}


def _rst_to_md(text: str) -> str:
    text = re.sub(r":(?:meth|func):`~?([^`]+)`", r"`\1()`", text)
    text = re.sub(r":(?:class|data|mod|attr):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def simulate_flags() -> dict[str, str]:
    """Run-config key -> the ``fedadapt simulate`` flag that sets it.

    Raises:
        PluginError: If an alias names a flag or key that no longer exists.
    """
    from fedadapt.config import RunConfig

    keys = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    parser = dict(_commands())[("fedadapt", "simulate")]
    flags = {s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")}
    out = {}
    for flag in sorted(flags - {"help"}):
        key = SIMULATE_ALIASES.get(flag, flag)
        if key in keys:
            out[key] = f"--{flag}"
    stale = [f"--{f} -> {k}" for f, k in SIMULATE_ALIASES.items() if f not in flags or k not in keys]
    if stale:
        raise PluginError(f"docs/hooks/reference.py SIMULATE_ALIASES is stale: {stale}")
    return out


def run_config_page() -> str:
    """The run-config reference page.

    Raises:
        PluginError: If a field has no documented meaning or a documented name is no field.
    """
    from fedadapt.config import RunConfig

    docs = attribute_docs(RunConfig.__doc__ or "")
    fields = dataclasses.fields(RunConfig)
    names = [f.name for f in fields]
    missing = [n for n in names if not docs.get(n)]
    extra = [n for n in docs if n not in names]
    if missing or extra:
        raise PluginError(
            "fedadapt.config.RunConfig: every field needs a meaning in the 'Attributes:' "
            f"section of its docstring. Undocumented: {missing}; documented but no field: "
            f"{extra}. Fix the docstring in fedadapt/config.py.")
    flags = simulate_flags()
    out = ["# Run configuration", "",
           "Generated at build time from `fedadapt.config.RunConfig` (the single source of "
           "defaults; `pyproject.toml`'s `[tool.flwr.app.config]` mirrors it and "
           "`tests/test_config.py` keeps the two equal).", "",
           "Set a key in `[tool.flwr.app.config]`, with `flwr run . CONNECTION -c 'key=value'`, "
           "or through the `fedadapt simulate` flag named below. Unknown keys, values of "
           "the wrong type and bad values are refused with a message naming the key.", "",
           "| key | type | default | `fedadapt simulate` |", "| --- | --- | --- | --- |"]
    for f in fields:
        key = f.name.replace("_", "-")
        flag = f"`{flags[key]}`" if key in flags else "—"
        out.append(f"| [`{key}`](#{key}) | `{f.type}` | `{_toml(f.default)}` | {flag} |")
    out.append("")
    for f in fields:
        key = f.name.replace("_", "-")
        out += [f"## `{key}` {{ #{key} }}", "",
                f"`{f.type}`, default `{_toml(f.default)}`"
                + (f"; `fedadapt simulate {flags[key]}`" if key in flags else "")
                + f" (field `RunConfig.{f.name}`)", "", docs[f.name], ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def _help_width() -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]
          ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def _commands() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    from fedadapt.cli import build_parser

    return list(_walk(build_parser(), ("fedadapt",)))


def cli_help() -> dict[str, str]:
    """``"fedadapt site init"`` -> its ``--help`` text, for every command of the CLI."""
    with _help_width():
        return {" ".join(path): parser.format_help() for path, parser in _commands()}


def cli_page() -> str:
    """The CLI reference page: every command's ``--help``."""
    helps = cli_help()
    out = ["# Command line", "",
           "Generated at build time from the argparse parser of `fedadapt.cli` "
           "(`fedadapt.cli.build_parser`): the `--help` of every command. Bad input exits "
           "with status 2 and a message naming the option and what it expects.", ""]
    for name in helps:
        out.append(f"- [`{name}`](#{_slug(name)})")
    out.append("")
    for name, text in helps.items():
        out += [f"## `{name}` {{ #{_slug(name)} }}", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(out)


def _slug(name: str) -> str:
    return name.replace(" ", "-")


# ------------------------------------------------------------------ summary.json


SUMMARY_MARKER = "<!-- summary-schema -->"


def _md_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _md_code(text: str) -> str:
    """``text`` as inline code inside a Markdown table cell (a ``|`` would end the cell)."""
    return " \\| ".join(f"`{part.strip()}`" for part in text.split("|"))


def summary_table(rows: list[tuple[str, str, str]]) -> str:
    """The ``summary.json`` schema, ``(dotted field, type, doc)`` rows, as a Markdown table.

    Raises:
        PluginError: If a row is not a ``(field, type, doc)`` triple of strings or a field
            has no doc.
    """
    out = ["| field | type | meaning |", "| --- | --- | --- |"]
    for row in rows:
        if not (isinstance(row, (tuple, list)) and len(row) == 3
                and all(isinstance(x, str) for x in row)):
            raise PluginError("fedadapt.server.summary.summary_schema() must return "
                              f"(field, type, doc) string triples; found {row!r}")
        name, typ, doc = row
        if not doc.strip():
            raise PluginError(f"summary.json field {name!r} has no doc: give it one "
                              "(metadata['doc']) in server/summary.py")
        out.append(f"| `{name}` | {_md_code(typ)} | {_md_cell(doc)} |")
    return "\n".join(out)


def _summary_page(markdown: str) -> str:
    """The hand page with the generated schema table at its marker (or after its title)."""
    try:
        mod = importlib.import_module("fedadapt.server.summary")
    except ModuleNotFoundError as e:
        if e.name not in ("fedadapt.server.summary",):
            raise
        return markdown
    schema = getattr(mod, "summary_schema", None)
    if schema is None:
        return markdown
    value = schema() if callable(schema) else schema
    if isinstance(value, str):
        body = value
    else:
        body = ("Generated at build time from "
                "`fedadapt.server.summary.summary_schema()` (the fields of "
                "`fedadapt.server.summary.Summary` and its sections, with their docs):\n\n"
                + summary_table(list(value)))
    if SUMMARY_MARKER in markdown:
        return markdown.replace(SUMMARY_MARKER, body, 1)
    title, sep, rest = markdown.partition("\n")
    if not title.startswith("# "):
        title, rest = "# summary.json", markdown
    return f"{title}\n\n{body}\n\n{rest.lstrip()}"


# ------------------------------------------------------------ root documents, links


def _root_links(text: str) -> str:
    """Links of a root document, rewritten for its place in the site."""
    def fix(m: re.Match[str]) -> str:
        target = m.group(2)
        if target.startswith("docs/"):
            target = target[len("docs/"):]
        else:
            head, sep, anchor = target.partition("#")
            target = ROOT_DOCS.get(head, "index.md" if head == "README.md" else head) + sep + anchor
        return f"{m.group(1)}({target})"
    return re.sub(r"(\]\s*)\(((?:docs/|[A-Z]+\.md)[^)\s]*)\)", fix, text)


def stale_references(markdown: str) -> list[str]:
    """Inline-code repository paths that do not exist and ``fedadapt.*`` names that do
    not resolve, in ``markdown`` (fenced blocks are skipped)."""
    problems = []
    for code in sorted(set(_CODE_RE.findall(_FENCE_RE.sub("", markdown)))):
        code = code.strip()
        if code.split("/")[0].split(".")[0] in RETIRED:
            problems.append(f"`{code}`: {code.split('/')[0].split('.')[0]} is retired; "
                            "it is fedadapt.imaging / fedadapt.report now")
        elif code in REPO_FILES:
            if not (REPO / code).exists():
                problems.append(f"`{code}` does not exist in the repository")
        elif "..." in code:
            continue
        elif _PATH_RE.match(code):
            if not glob.glob(str(REPO / code)):
                problems.append(f"`{code}` does not exist in the repository")
        elif _DOTTED_RE.match(code):
            why = _unresolved(code)
            if why:
                problems.append(f"`{code}`: {why}")
        elif (m := _SHORT_RE.match(code)) and (REPO / m.group(1) / f"{m.group(2)}.py").is_file():
            problems.append(f"`{code}`: write the installed name `fedadapt.{code}`")
    return problems


def _unresolved(name: str) -> str | None:
    name = name.removesuffix("()")
    module, _, attr = name.partition(":")
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        rest = parts[i:] + ([attr] if attr else [])
        for part in rest:
            if hasattr(obj, part):
                obj = getattr(obj, part)
            elif dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
                obj = None
            else:
                return f"{'.'.join(parts[:i])} has no {'.'.join(rest)}"
        return None
    return "no such module"
