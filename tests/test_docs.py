"""The README's links lead somewhere (mkdocs build --strict checks the docs' own links and anchors), and
every `from dictlab… import …` the README and the docs show imports."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def test_every_link_of_the_readme_leads_to_a_file_and_an_anchor_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(#[^)\s]+)?\)", (ROOT / "README.md").read_text())
    local = [(target, anchor) for target, anchor in links if not target.startswith(("http://", "https://"))]
    assert local, "the README links into docs/"
    for target, anchor in local:
        path = ROOT / target
        assert path.exists(), target
        if anchor:
            assert anchor[1:] in _anchors(path), target + anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_dictlab_import_shown_in_the_docs_imports(page):
    for module, names in re.findall(r"^\s*from (dictlab[\w.]*) import ([\w, ]+)$", page.read_text(), re.M):
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"
