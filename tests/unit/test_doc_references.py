"""The docs point at things that exist: every link between them reaches a file and, with an #anchor, a
heading of it; every Prometheus series they name is one the code exports."""

from __future__ import annotations

import re
from pathlib import Path

from libs.settings import PROJECT_ROOT

# docs/benchmarks.md is a log of past runs; its links are checked like the others, its series are history.
PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks); a repeated heading's get `-1`, `-2`, ..."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            base = slug(match.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(pages: list[Path]) -> list[str]:
    """`page:line: target (why)` for each relative link that reaches no file, or no heading of it."""
    broken = []
    for page in pages:
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text(encoding="utf-8"))
        for match in LINK.finditer(text):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = f"{page.relative_to(page.parents[1])}:{text.count(chr(10), 0, match.start()) + 1}"
            reached = (page.parent / path).resolve() if path else page
            if not reached.exists():
                broken.append(f"{where}: {target} (no such file)")
            elif anchor and reached.suffix == ".md" and anchor not in anchors(reached):
                broken.append(f"{where}: {target} (no such heading)")
    return broken


def test_every_link_between_the_docs_resolves() -> None:
    assert sum(len(LINK.findall(p.read_text(encoding="utf-8"))) for p in PAGES) > 50, "too few links found"
    assert broken_links(PAGES) == []


def test_a_link_to_a_missing_file_or_heading_is_found(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\n## The `inbox` claim\n\n## Settings\n\n## Settings\n")
    (docs / "b.md").write_text(
        "# B\n\n[ok](a.md#the-inbox-claim) [ok](a.md#settings-1) [ok](#b)\n"
        "[gone](c.md) [no heading](a.md#the-outbox) [own](#nope)\n"
        "```\n[in code](d.md)\n```\n"
    )

    assert broken_links([docs / "b.md"]) == [
        "docs/b.md:4: c.md (no such file)",
        "docs/b.md:4: a.md#the-outbox (no such heading)",
        "docs/b.md:4: #nope (no such heading)",
    ]


def exported_series() -> set[str]:
    """Every `driftloop_*` name given as a string in the code that registers series (libs, services)."""
    found: set[str] = set()
    for top in ("libs", "services"):
        for path in (PROJECT_ROOT / top).rglob("*.py"):
            found |= set(re.findall(r"[\"'](driftloop_[a-z0-9_]+)[\"']", path.read_text(encoding="utf-8")))
    return found


EXPANDED = r"(driftloop_[a-z0-9_]*_)\{([a-z0-9_,]+)\}"


def named_series(pages: list[Path]) -> list[tuple[str, str]]:
    """(page, name) of each series a page names; `driftloop_x_{a,b}` stands for `driftloop_x_a` and
    `driftloop_x_b`. Names that end in `_` are prefixes (the serving replicas' NOTIFY channel)."""
    named = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for stem, options in re.findall(EXPANDED, text):
            named += [(page.name, stem + option) for option in options.split(",")]
        text = re.sub(EXPANDED, "", text)
        named += [(page.name, name) for name in re.findall(r"\bdriftloop_[a-z0-9_]*[a-z0-9]\b", text)]
    return named


NOT_SERIES = {
    "driftloop_audit_writer",  # the audit trail's database role
    "driftloop_lb",  # bench/serving's load-balancer pid, in benchmarks.md
}


def test_every_series_the_docs_name_is_exported() -> None:
    pages = [p for p in PAGES if p.name != "benchmarks.md"]
    named = [(page, name) for page, name in named_series(pages) if not name.startswith("driftloop_sbx")]
    exported = exported_series()

    assert len({name for _, name in named}) > 20, "the scan found too few names to prove anything"
    assert [(page, name) for page, name in named if name not in exported | NOT_SERIES] == []
