"""Declared dependencies are the used ones: what the runtime modules import (also inside a
function) is declared in pyproject.toml, and each declared dependency is imported or run."""

import ast
import re
import sys
import tomllib

from test_import_graph import PACKAGE, runtime_modules

#: declared although nothing imports it (none now: tenacity was, and is no longer declared -
#: every retry here is a poll under a deadline on an injectable clock, ``waiting.poll``,
#: which the simulated host drives; tenacity's stop and wait conditions read the real clock)
NOT_YET_USED = set()


def _module_of(requirement):
    """``oslo.concurrency>=5.0`` -> ``oslo_concurrency``."""
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
    return re.sub(r"[.-]", "_", name).lower()


def third_party_imports():
    found = set()
    for _, path in runtime_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "nvmeof_mp"}


def test_declared_dependencies_are_the_used_ones():
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    required = {_module_of(r) for r in project["dependencies"]}
    plugin = {_module_of(r) for r in project["optional-dependencies"]["osbrick"]}
    scripts = {v.split(".")[0] for v in project["scripts"].values()}
    used = third_party_imports()
    assert used - required - plugin == set()            # imported, not declared
    assert required - used - scripts - NOT_YET_USED == set()    # declared, never used
    assert plugin <= used
    assert scripts - {"nvmeof_mp"} <= required          # a console script's package
