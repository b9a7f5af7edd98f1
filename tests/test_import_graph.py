"""What a compute host imports: the library's runtime never reaches the lab or the
simulated host (both ship in the package for the gate and the fast suite only)."""

import subprocess
import sys

RUNTIME = ("nvmeof_mp.connector", "nvmeof_mp.osbrick", "nvmeof_mp.cli",
           "nvmeof_mp.privileged", "nvmeof_mp.recovery", "nvmeof_mp.status")


def test_the_runtime_import_graph_has_no_lab_or_simulated_host():
    code = ("import sys\n" + "".join("import %s\n" % m for m in RUNTIME)
            + "print(' '.join(sorted(m for m in sys.modules if m.startswith('nvmeof_mp.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "nvmeof_mp.connector" in out          # the probe itself works
    assert [m for m in out if m.startswith(("nvmeof_mp.lab", "nvmeof_mp.sim"))] == []
