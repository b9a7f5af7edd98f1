"""The operator's ``nvmeof-mp paths`` against a simulated host's sysfs tree."""

import json

from hypothesis import given, settings, strategies as st

from nvmeof_mp import cli
from nvmeof_mp.exception import InvalidConnectionInfo
from simlab import NQN, conninfo


def test_paths_of_a_device_and_of_a_conninfo(lab, tmp_path, capsys):
    lab.target()
    lab.connector.connect_volume(conninfo())
    lab.sim.path_down(NQN, 4421)
    assert cli.main(["--root", lab.root, "paths", "/dev/nvme0n1"]) == 1     # degraded
    out = capsys.readouterr().out
    assert "[DEGRADED]" in out and "connecting" in out and "ana=optimized" in out
    path = tmp_path / "ci.json"
    path.write_text(json.dumps(conninfo()))
    lab.sim.path_up(NQN, 4421)
    lab.sim.clock.sleep(2)
    assert cli.main(["--json", "--root", lab.root, "paths", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "healthy" and len(report["paths"]) == 2


def test_paths_of_an_unknown_device(lab, capsys):
    assert cli.main(["--root", lab.root, "paths", "/dev/sda"]) == 2


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["vol_uuid", "target_nqn", "portals", "nqn",
                                        "volume_replicas", "dm_replicas", "alias"]),
                       st.one_of(st.text(max_size=10), st.integers(), st.lists(st.text(),
                                                                              max_size=3))))
def test_fuzzed_connect_never_reaches_the_kernel(info):
    from simlab import Lab
    import tempfile
    import pathlib
    lab = Lab(pathlib.Path(tempfile.mkdtemp()))
    try:
        lab.connector.connect_volume(info)
    except InvalidConnectionInfo:
        pass
    assert sum(lab.sim.calls.values()) == 0


def test_status_and_heal_all_from_the_registry(lab, monkeypatch, capsys):
    lab.target()
    lab.connector.connect_volume(conninfo())
    monkeypatch.setattr(cli, "_connector", lambda args: lab.connector)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "/dev/nvme0n1" in out and "attached" in out and "HEALTHY" in out
    for name in lab.sim.controllers(NQN):
        lab.sim.expire(name)
    assert cli.main(["status"]) == 1
    assert "DOWN" in capsys.readouterr().out
    assert cli.main(["heal", "--all"]) == 0
    assert "healed (healthy)" in capsys.readouterr().out
    assert cli.main(["--json", "status"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["targets"][0]["verdict"] == "healthy"
    assert cli.main(["heal"]) == 2 and cli.main(["heal", "--all", "x.json"]) == 2
