"""The documentation stays inside the repository (issue 25, point 5): no tracked file points at
the workplace's shared folder or at the model contract's old name, and every relative link in
README.md and docs/*.md reaches a file of the checkout. The model and evaluation contracts
are docs/model.md and docs/evaluation.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Built from parts so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared" + "/docs", "/work" + "/shared", "hm4sr" + "_model.md")

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)  # fenced code blocks
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)  # `code`, ``code with ` in it``
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, file: ...


def tracked_files() -> list[str]:
    """Paths of the checkout's tracked files (git ls-files), relative to the root."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed): nothing to scan")
    return [p for p in out.decode().split("\0") if p]


def relative_links(text: str) -> list[str]:
    """Targets of the relative links of a markdown text, anchors cut off: inline links,
    images and reference definitions outside code; URLs, mail links and same-page
    anchors are not relative links."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)
    out = []
    for target in targets:
        if SCHEME.match(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path:
            out.append(path)
    return out


def broken_links(markdown: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``markdown`` whose file does not exist, as 'file: target'."""
    bad = []
    for target in relative_links(markdown.read_text(encoding="utf-8")):
        resolved = (root / target.lstrip("/")) if target.startswith("/") else (markdown.parent / target)
        if not resolved.exists():
            bad.append(f"{markdown.relative_to(root)}: {target}")
    return bad


def test_no_tracked_file_points_outside_the_repository():
    hits = []
    for path in tracked_files():
        file = ROOT / path
        if not file.is_file():  # deleted in the working tree, not yet committed
            continue
        data = file.read_bytes()
        for needle in OUTSIDE:
            if needle.encode() in data:
                line = data[:data.index(needle.encode())].count(b"\n") + 1
                hits.append(f"{path}:{line}: {needle}")
    assert not hits, "files that point outside the repository (use docs/model.md, docs/evaluation.md):\n" + \
        "\n".join(hits)


def test_the_contracts_are_in_the_repository():
    for name in ("model.md", "evaluation.md"):
        assert (ROOT / "docs" / name).is_file()
        assert f"docs/{name}" in tracked_files()


def test_every_relative_link_in_readme_and_docs_reaches_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 3
    bad = [b for page in pages for b in broken_links(page)]
    assert not bad, "links to files that do not exist:\n" + "\n".join(bad)


def test_the_link_check_finds_a_broken_link_and_ignores_what_is_not_one(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# There\n")
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[ok](there.md#a-section) [up](../img.png) ![image](../img.png \"title\") [anchor](#here)\n"
        "[web](https://example.org/missing.md) [mail](mailto:someone@example.org)\n"
        "`[in code](missing-in-span.md)`\n"
        "```\n[in a fence](missing-in-fence.md)\n```\n"
        "[broken](missing.md) and [broken too](sub/gone.md#x)\n"
        "[ref]: missing-ref.md\n")
    assert broken_links(page, tmp_path) == ["docs/page.md: missing.md", "docs/page.md: sub/gone.md",
                                            "docs/page.md: missing-ref.md"]
