"""What a compute host imports: the library's runtime never reaches the lab or the
simulated host (both ship in the package for the gate and the fast suite only).

Two checks: every runtime module imported in a fresh interpreter loads nothing of lab/ or
sim/, and no import statement of a runtime module (also one inside a function, which the
first check does not run) names them.  The one exception is the developer's ``nvmeof-mp
lab`` command (``cli.cmd_lab``), which only runs when someone types it.
"""

import ast
import pathlib
import subprocess
import sys

import nvmeof_mp

PACKAGE = pathlib.Path(nvmeof_mp.__file__).parent
DEV_ONLY = ("lab", "sim")
#: (module, function) allowed to import lab/ or sim/
ALLOWED = {("nvmeof_mp.cli", "cmd_lab")}


def runtime_modules():
    """Every module of the package outside lab/ and sim/, by dotted name."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if len(parts) > 1 and parts[1] in DEV_ONLY:
            continue
        out.append((".".join(parts), path))
    return out


def _is_dev_only(name):
    parts = name.split(".")
    return len(parts) > 1 and parts[0] == "nvmeof_mp" and parts[1] in DEV_ONLY


def dev_only_imports(module, source, is_package=False):
    """[(function or None, imported name)] of ``source``'s imports that reach lab/ or sim/,
    relative ones resolved against ``module``."""
    found: list = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef,
                                                     ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Import):
                found.extend((func, a.name) for a in child.names if _is_dev_only(a.name))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".")
                    pkg = pkg if is_package else pkg[:-1]
                    pkg = pkg[:len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                names = [base] + ["%s.%s" % (base, a.name) for a in child.names]
                found.extend([(func, n) for n in names if _is_dev_only(n)][:1])
            visit(child, inner)
    visit(ast.parse(source), None)
    return found


def test_no_runtime_module_imports_the_lab_or_the_simulated_host():
    modules = runtime_modules()
    assert {"nvmeof_mp.cli", "nvmeof_mp.osbrick", "nvmeof_mp.connector",
            "nvmeof_mp.privileged.storage"} <= {m for m, _ in modules}
    bad = [(m, func, name) for m, path in modules
           for func, name in dev_only_imports(m, path.read_text(), path.name == "__init__.py")
           if (m, func) not in ALLOWED]
    assert bad == []


def test_the_runtime_import_graph_has_no_lab_or_simulated_host():
    names = [m for m, _ in runtime_modules()]
    code = ("import sys\n" + "".join("import %s\n" % m for m in names)
            + "print(' '.join(sorted(m for m in sys.modules if m.startswith('nvmeof_mp.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "nvmeof_mp.osbrick" in out and "nvmeof_mp.cli" in out   # the probe itself works
    assert [m for m in out if _is_dev_only(m)] == []


def test_the_check_sees_every_way_of_importing_the_lab():
    """The check itself: an import of lab/ or sim/ anywhere in a module is found."""
    sources = [("nvmeof_mp.status", "import nvmeof_mp.lab.target\n"),
               ("nvmeof_mp.status", "from nvmeof_mp.sim import SimHost\n"),
               ("nvmeof_mp.status", "from nvmeof_mp import lab\n"),
               ("nvmeof_mp.status", "def later():\n    from .lab import guest\n"),
               ("nvmeof_mp.privileged.nvme",
                "class C:\n    def m(self):\n        from ..sim.host import SimHost\n")]
    for module, source in sources:
        assert dev_only_imports(module, source), source
    assert dev_only_imports("nvmeof_mp.privileged", "from . import sim\n", True) == []
    assert dev_only_imports("nvmeof_mp.status", "from nvmeof_mp import plan, status\n") == []
    assert dev_only_imports("nvmeof_mp.cli", "def cmd_lab(a):\n    from nvmeof_mp.lab "
                            "import gate\n") == [("cmd_lab", "nvmeof_mp.lab")]
