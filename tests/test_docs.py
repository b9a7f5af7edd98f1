"""The design page's module map names every module of the package, and nothing else."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nvmeof_mp"
DESIGN = ROOT / "doc" / "source" / "design.rst"
# documented as packages, one line each; their modules are not listed
PACKAGES = ("lab", "sim")


def modules_on_disk():
    """``nvmeof_mp/...`` of every module, lab/ and sim/ as packages."""
    found = {"nvmeof_mp/%s/" % name for name in PACKAGES if (PACKAGE / name).is_dir()}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in PACKAGES or "__pycache__" in rel.parts:
            continue
        found.add("nvmeof_mp/" + rel.as_posix())
    return found


def module_map(text):
    """The first column of the table under the "Module map" heading."""
    section = text.split("\nModule map\n----------\n", 1)
    assert len(section) == 2, "design.rst has no 'Module map' section"
    body = re.split(r"\n[^\n]+\n-{3,}\n", section[1], maxsplit=1)[0]
    return re.findall(r"^``(nvmeof_mp/[^`]*)``", body, flags=re.MULTILINE)


def test_module_map_lists_every_module_once():
    named = module_map(DESIGN.read_text())
    assert len(named) == len(set(named)), "named twice: %s" % sorted(
        {n for n in named if named.count(n) > 1})
    on_disk = modules_on_disk()
    missing = sorted(on_disk - set(named))
    stale = sorted(set(named) - on_disk)
    assert not missing, "modules missing from the module map of design.rst: %s" % missing
    assert not stale, "the module map of design.rst names what does not exist: %s" % stale


def test_module_map_reader_sees_a_missing_and_a_stale_line():
    text = ("Module map\n----------\n\n====  ====\n``nvmeof_mp/a.py``  one\n"
            "``nvmeof_mp/lab/``  two\n====  ====\n\nNext\n----\n``nvmeof_mp/b.py`` x\n")
    assert module_map("intro\n" + text) == ["nvmeof_mp/a.py", "nvmeof_mp/lab/"]
