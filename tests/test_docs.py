"""The README and docs/: the Quick start is two commands that CI runs as written, and every link resolves."""
import re

from conftest import ROOT


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S)
    assert block, "the README has no Quick start code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_docs_quick_start_is_two_commands_that_ci_runs_verbatim():
    first, second = quick_start()  # exactly two
    assert "pip install ." in first and first.endswith("ijepa-fast train")
    assert 'pip install ".[test]"' in second and "pytest tests" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert first in ci and second in ci


def test_docs_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 6
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    readme = (ROOT / "README.md").read_text()
    for page in pages[1:]:
        assert f"docs/{page.name}" in readme, f"the README does not link {page.name}"
