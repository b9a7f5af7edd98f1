"""Detach safety: bounded flushes, force semantics, nothing left behind (issue 12, items 5
and 13) - on the simulated host, plus the privileged pieces that need no daemon."""

import os

from nvmeof_mp.privileged import storage


def test_md_stop_without_udev_removes_the_dangling_alias_link(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(storage, "_run", lambda argv: calls.append(argv) or
                        {"ok": True, "out": "", "error": ""})
    md = tmp_path / "md"
    md.mkdir()
    os.symlink("../md127", md / "vol1")              # no udev: nobody removes it
    (tmp_path / "md126").write_text("")
    os.symlink("../md126", md / "other")             # still points at a device: kept
    result = storage.stop_array("vol1", dev=str(tmp_path))
    assert result["ok"] and calls == [["mdadm", "--stop", "/dev/md/vol1"]]
    assert not os.path.lexists(md / "vol1")
    assert os.path.islink(md / "other")


def test_md_stop_keeps_the_link_when_the_stop_failed_or_it_still_resolves(tmp_path,
                                                                           monkeypatch):
    md = tmp_path / "md"
    md.mkdir()
    os.symlink("../md127", md / "vol1")
    monkeypatch.setattr(storage, "_run", lambda argv: {"ok": False, "out": "",
                                                       "error": "mdadm: busy"})
    assert not storage.stop_array("vol1", dev=str(tmp_path))["ok"]
    assert os.path.islink(md / "vol1")
    monkeypatch.setattr(storage, "_run", lambda argv: {"ok": True, "out": "", "error": ""})
    (tmp_path / "md127").write_text("")              # udev re-made it for a new array
    storage.stop_array("vol1", dev=str(tmp_path))
    assert os.path.islink(md / "vol1")
