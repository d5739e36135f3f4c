"""Every relative link of the documentation leads somewhere: the file exists and its #anchor is a heading.

Checked: README.md, docs/*.md, BENCHMARKS.md and the model card template (a Jinja template: only its
plain relative links; links built from `{{ ... }}` are filled in at push time and skipped).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = ROOT / "src" / "ctpa_vq" / "templates" / "model_card.md"

# [text](target) and [text](target "title"); images too. Code spans are removed before matching.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, ...


def documentation_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md")), MODEL_CARD]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading id of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", markdown)):
        base = github_anchor(heading)
        count = seen.get(base, 0)
        ids.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return ids


def dead_links(page: Path) -> list[str]:
    """`page: target (why)` for each relative link of `page` that leads nowhere."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    dead = []
    for target in LINK.findall(text):
        if EXTERNAL.match(target) or "{{" in target or "{%" in target:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            dead.append(f"{page.name}: {target} (no file {linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            dead.append(f"{page.name}: {target} (no heading #{anchor} in {linked.name})")
    return dead


def test_the_pages_exist():
    """The files this test checks are there (a renamed page would otherwise pass unchecked)."""
    names = {p.relative_to(ROOT).as_posix() for p in documentation_files() if p.exists()}
    assert {"README.md", "BENCHMARKS.md", "src/ctpa_vq/templates/model_card.md"} <= names
    assert len([n for n in names if n.startswith("docs/")]) >= 6


@pytest.mark.parametrize("page", documentation_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_dead_relative_link(page: Path):
    assert dead_links(page) == []


def test_github_anchor_matches_githubs_ids():
    assert github_anchor("Will it fit? `ctpa-vq verify`") == "will-it-fit-ctpa-vq-verify"
    assert github_anchor("Clinical inputs: DICOM series, NRRD, MetaImage; spacing; privacy") == (
        "clinical-inputs-dicom-series-nrrd-metaimage-spacing-privacy")
    assert github_anchor("GPU memory (`benchmarks/memory.py`)") == "gpu-memory-benchmarksmemorypy"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize(
    "link, why",
    [
        ("[guide](docs/missing.md)", "no file"),
        ("[section](other.md#no-such-heading)", "no heading #no-such-heading"),
        ("[here](#nowhere)", "no heading #nowhere"),
    ],
)
def test_a_dead_link_is_caught(tmp_path: Path, link: str, why: str):
    """A copy of a page with one broken link fails; the same page with working links passes."""
    (tmp_path / "other.md").write_text("# Other\n\n## Real heading\n")
    page = tmp_path / "page.md"
    good = "# Page\n\n[ok](other.md#real-heading), [self](#page), [web](https://example.org/x.md), `[code](nope.md)`\n"
    page.write_text(good)
    assert dead_links(page) == []
    page.write_text(good + f"\nSee {link}.\n")
    found = dead_links(page)
    assert len(found) == 1 and why in found[0], found


def test_jinja_links_are_skipped_but_plain_ones_checked(tmp_path: Path):
    card = tmp_path / "model_card.md"
    card.write_text("[{{ parent.repo_id }}](https://huggingface.co/{{ parent.repo_id }}) [x]({{ url }})\n")
    assert dead_links(card) == []
    card.write_text("[licence](LICENCE.md)\n")
    assert dead_links(card) == [f"model_card.md: LICENCE.md (no file {tmp_path / 'LICENCE.md'})"]
