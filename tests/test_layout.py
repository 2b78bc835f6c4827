"""The README's Layout section and the package docstrings match the tree, and the layers hold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_modules() -> set[str]:
    """The modules the README's Layout tree names, as paths under lmforge/: an entry is a line at
    two spaces ("  tasks/ ..." or "  config.py ..."), continued by the deeper-indented lines after
    it; every name.py in a folder's entry is in that folder."""
    tree = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```")[1].split("lmforge/\n", 1)[1]
    named, prefix = set(), None
    for line in tree.splitlines():
        if not line.startswith("   "):  # a new entry (or the end of lmforge/: configs/, docs/, ...)
            entry = line.split()[0] if line.strip() else ""
            prefix = None if not line.startswith("  ") else (entry if entry.endswith("/") else "")
        if prefix is not None:
            named |= {prefix + name for name in re.findall(r"\b([a-z_]+\.py)\b", line)}
    return named


def test_the_readme_layout_names_every_module_and_nothing_that_is_gone():
    modules = {p.relative_to(ROOT / "lmforge").as_posix() for p in (ROOT / "lmforge").rglob("*.py")
               if p.name != "__init__.py"}
    named = layout_modules()
    assert not modules - named, f"modules the README's Layout does not name: {sorted(modules - named)}"
    assert not named - modules, f"the README's Layout names modules that are gone: {sorted(named - modules)}"


def test_every_package_says_what_lives_there_and_what_it_may_import():
    for init in (ROOT / "lmforge").glob("*/__init__.py"):
        doc = init.read_text()
        assert doc.startswith('"""') and "May import" in doc.split('"""')[1], init


def test_the_import_layers_hold():
    proc = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]
