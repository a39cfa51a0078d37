"""The README and docs/ link to each other by file and heading: every relative link must reach a
file that exists and, with an anchor, a heading of that file (as GitHub makes anchors)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in page.read_text().splitlines()
            if line.startswith("#") and " " in line}


def test_anchor_is_githubs():
    assert anchor(" `make aot`: kernels compiled for a GPU") == "make-aot-kernels-compiled-for-a-gpu"
    assert anchor("Attention's backward") == "attentions-backward"
    assert anchor("fp32, like for like") == "fp32-like-for-like"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_reach_a_file_and_heading(page):
    links = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    broken = []
    for target in links:
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (fragment and fragment not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"
