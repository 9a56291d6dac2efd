"""The repository's documentation stands alone: no pointer to the developers' private design notes, and every
reference into ``docs/`` (a file, and a heading anchor when given) resolves.

Checked in every text file of the checkout (tracked, or untracked and not ignored by git; ``.py``, ``.md``,
``.yaml``/``.yml``, ``.txt``, ``.cfg``, ``.toml``):

* no mention of the design documents that live only on the developers' machine (the names are assembled below, so
  this file does not mention them itself);
* every ``docs/<file>.md`` reference names an existing file, and its ``#anchor``, if any, a heading of that file
  under GitHub's anchor rule (lower case, punctuation other than ``-`` and ``_`` removed, spaces to ``-``, a
  repeated heading gets ``-1``, ``-2``, ...);
* in Markdown files, every relative link target ``[text](path)``/``[text](path#anchor)``/``[text](#anchor)``
  exists, with its anchor.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".txt", ".cfg", ".toml")
#: Folders never scanned when git cannot list the files (run outputs, caches, environments).
SKIPPED_DIRS = {".git", "runs", "cache", "wandb", "__pycache__", ".venv", "venv", ".pytest_cache", ".ruff_cache",
                "node_modules"}
#: Names of the private design documents (and the folder they live in), which the repository must not point to.
FORBIDDEN = ("METHOD" + "_ZOO", "METHODS" + ".md", "REFERENCE_RESULTS" + ".md", ".." + "/shared")

DOC_REFERENCE = re.compile(r"(?<![\w.-])docs/([\w./-]+?\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:id|name)\s*=\s*\"([^\"]+)\"", re.IGNORECASE)
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def text_files(root: Path = REPO) -> list[Path]:
    """The checkout's text files: ``git ls-files`` (tracked + untracked, not ignored), else a walk of ``root``."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        names = sorted({name for name in out.split("\0") if name})
        paths = [root / name for name in names]
    except (OSError, subprocess.SubprocessError):
        paths = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
            paths += [Path(folder) / f for f in sorted(files)]
    return [p for p in paths if p.suffix in TEXT_SUFFIXES and p.is_file()]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading text: lower case, punctuation except '-' and '_' dropped, ' ' -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def markdown_lines(text: str) -> Iterable[tuple[int, str]]:
    """(1-based line number, line) of a Markdown text, fenced code blocks left out."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            fence = match.group(1) if fence is None else (None if match.group(1) == fence else fence)
            continue
        if fence is None:
            yield number, line


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of a Markdown file (duplicates numbered), plus explicit <a id=...>."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in markdown_lines(read(path)):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_anchor(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def forbidden_mentions(paths: Iterable[Path], root: Path = REPO) -> list[str]:
    """``file:line: name`` for every mention of a private design document."""
    problems = []
    for path in paths:
        for number, line in enumerate(read(path).splitlines(), 1):
            problems += [f"{path.relative_to(root)}:{number}: mentions {name!r}" for name in FORBIDDEN if name in line]
    return problems


def _check_target(target: Path, anchor: str | None, where: str, cache: dict[Path, set[str]], root: Path) -> list[str]:
    if not target.is_file():
        return [f"{where}: {os.path.relpath(target, root)} does not exist"]
    if not anchor:
        return []
    if target not in cache:
        cache[target] = anchors(target) if target.suffix == ".md" else set()
    if anchor not in cache[target]:
        return [f"{where}: {target.name} has no heading with anchor #{anchor}"]
    return []


def broken_references(paths: Iterable[Path], root: Path = REPO) -> list[str]:
    """``file:line: why`` for every ``docs/<file>.md[#anchor]`` reference and every relative Markdown link that does
    not resolve."""
    problems: list[str] = []
    cache: dict[Path, set[str]] = {}
    for path in paths:
        text = read(path)
        for number, line in enumerate(text.splitlines(), 1):
            for name, anchor in DOC_REFERENCE.findall(line):
                where = f"{path.relative_to(root)}:{number}"
                problems += _check_target(root / "docs" / name, anchor, where, cache, root)
        if path.suffix != ".md":
            continue
        for number, line in markdown_lines(text):
            for link in MARKDOWN_LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE):  # http:, mailto:, ...
                    continue
                file_part, _, anchor = link.partition("#")
                target = path if not file_part else (path.parent / file_part).resolve()
                problems += _check_target(target, anchor or None, f"{path.relative_to(root)}:{number}", cache, root)
    return problems


# ------------------------------------------------------------------------------------------------ the repository
@pytest.fixture(scope="module")
def repository_files() -> list[Path]:
    files = text_files()
    assert any(p.name == "README.md" for p in files), f"no README.md among the {len(files)} files listed"
    return files


def test_no_reference_to_private_design_documents(repository_files: list[Path]) -> None:
    problems = forbidden_mentions(repository_files)
    assert not problems, ("the repository must stand alone; point to docs/methods.md or docs/reference_results.md "
                          "instead:\n" + "\n".join(problems))


def test_doc_references_and_anchors_resolve(repository_files: list[Path]) -> None:
    problems = broken_references(repository_files)
    assert not problems, "broken references into the documentation:\n" + "\n".join(problems)


def test_methods_doc_is_linked_from_readme() -> None:
    assert "docs/methods.md" in read(REPO / "README.md")


# ------------------------------------------------------------------------------------------------ the checks
def test_github_anchor_rule() -> None:
    assert github_anchor("Soft-Intro VAE (SI-VAE)") == "soft-intro-vae-si-vae"
    assert github_anchor("VQ-VAE + LTM") == "vq-vae--ltm"
    assert github_anchor("Config (`core/Configurator.py`)") == "config-coreconfiguratorpy"
    assert github_anchor("CPU threads: the default policy (`experiment.threads: auto`)") == \
        "cpu-threads-the-default-policy-experimentthreads-auto"
    assert github_anchor("snake_case and Ümlaut") == "snake_case-and-ümlaut"


def test_checks_catch_planted_bad_references(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text("# Guide\n\n## Soft-Intro VAE (SI-VAE)\n\n## Repeated\n\n## Repeated\n\n"
                                   "```\n# not a heading\n```\n\n"
                                   "[ok](#repeated-1) [bad](#nowhere) [img](missing.png)\n", encoding="utf-8")
    guide, missing = "docs" + "/guide.md", "docs" + "/missing.md"  # split, so this file holds no such reference
    good = tmp_path / "good.py"
    good.write_text(f'"""See {guide}#soft-intro-vae-si-vae and {guide}#repeated-1."""\n', encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"# {guide}#si-vae\n# {missing}\n# {guide}#not-a-heading\n"
                   f"# {FORBIDDEN[0]}.md section 2, {FORBIDDEN[3]}/design\n", encoding="utf-8")
    assert broken_references([good], tmp_path) == []
    assert forbidden_mentions([good, docs / "guide.md"], tmp_path) == []
    problems = broken_references([bad, docs / "guide.md"], tmp_path)
    assert len(problems) == 5, problems
    assert any("#si-vae" in p for p in problems) and any("missing.md" in p for p in problems)
    assert any("#not-a-heading" in p for p in problems) and any("#nowhere" in p for p in problems)
    assert any("missing.png" in p for p in problems)
    assert len(forbidden_mentions([bad], tmp_path)) == 2
