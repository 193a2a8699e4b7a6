"""The README and the guides stay true: every relative link points somewhere, and every command
marked runnable runs as written.

Links: every `[text](target)` in README.md and docs/ (generated reports included) whose target is not a URL
must name an existing file or folder, and an anchor into a Markdown file must name one of its headings
(GitHub's slugs). Commands: every fenced block whose info string is `bash runnable` in README.md and
docs/*.md runs with bash, errors fatal, in a fresh copy of the tracked files (what a clone holds), offline,
from the copy's root, with this environment's `python` first on PATH.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import ROOT, _env

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", path.read_text(), flags=re.M)
    return {slug(h) for h in headings}


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks and spans are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_somewhere(path):
    assert not broken_links(path), f"{path.relative_to(ROOT)}: {broken_links(path)}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](page.md#title) [gone](nope.md) [bad anchor](page.md#missing) `[code](x.md)`\n")
    assert [b.split(" (")[0] for b in broken_links(page)] == ["nope.md", "page.md#missing"]


def runnable_blocks() -> list[tuple[str, str]]:
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(RUNNABLE.findall(path.read_text())):
            out.append((f"{path.relative_to(ROOT)}#{i + 1}", block))
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The tracked files, as a fresh clone has them (no runs/, no caches, no venv)."""
    dest = tmp_path_factory.mktemp("clone") / "moe-dist"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return dest


def test_the_guides_have_runnable_commands():
    names = [name for name, _ in runnable_blocks()]
    assert any(n.startswith("docs/getting-started.md") for n in names), names


@pytest.mark.parametrize("name, block", runnable_blocks(), ids=[name for name, _ in runnable_blocks()])
def test_a_runnable_command_runs_as_written(clone, name, block):
    env = _env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(clone)})
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
