"""The documentation stays true to the tree: every folder of the package and of the
repository is named in the architecture page's layout, and every link between pages
points at a page that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO / "docs" / "architecture.md"


def _layout() -> str:
    text = ARCHITECTURE.read_text()
    return text.split("## Layout", 1)[1].split("```", 2)[1]


def test_the_layout_names_every_folder_and_module_of_the_package() -> None:
    layout = _layout()
    package = REPO / "appliance"
    folders = [p.name for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"]
    modules = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    missing = [f"{name}/" for name in folders if f"  {name}/" not in layout]
    missing += [name for name in modules if name not in layout]
    assert missing == [], f"docs/architecture.md's layout does not name: {missing}"


def test_the_layout_names_every_folder_of_the_repository() -> None:
    layout = _layout()
    ignored = {"var", "build", "dist", "__pycache__"}
    folders = [
        p.name
        for p in REPO.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and p.name not in ignored
        and not p.name.endswith(".egg-info")
    ]
    missing = [name for name in folders if not re.search(rf"^{re.escape(name)}/", layout, re.M)]
    assert missing == [], f"docs/architecture.md's layout does not name: {missing}"


def test_links_between_pages_lead_somewhere() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == [], broken
