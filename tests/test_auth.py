"""DH-HMAC-CHAP on the simulated host: a missing or wrong key fails with an error that says
so, leaves no controller and no registry record, and the secret is in no error or log."""

import errno
import logging
import os

import pytest

from nvmeof_mp.exception import NVMeOFError
from nvmeof_mp.privileged import nvme

from simlab import NQN, P1, P2, conninfo

SECRET = "DHHC-1:00:ia6zGodOr4SEG0Zzaw398rpY0wqipUWj4jWjUh4HWUz6aQ2n:"
OTHER = "DHHC-1:00:" + "B" * 44 + ":"
CTRL = "DHHC-1:00:" + "C" * 44 + ":"


def failed_attach(lab, info, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NVMeOFError) as exc:
        lab.connector.connect_volume(info)
    assert lab.sim.controllers(NQN) == []                 # nothing is left
    assert lab.connector.attachments() == []              # no registry record
    secrets_dir = os.path.join(lab.root, "var/lib/nvmeof_mp/secrets")
    assert not os.path.isdir(secrets_dir) or os.listdir(secrets_dir) == []
    for secret in (SECRET, OTHER, CTRL):
        assert secret not in str(exc.value) and secret not in caplog.text
    return str(exc.value)


def test_missing_key_says_the_target_requires_one(lab, caplog):
    lab.target(ports=(4420, 4421))
    lab.sim.secrets[NQN] = SECRET
    text = failed_attach(lab, conninfo(portals=[P1, P2]), caplog)
    assert "Required key not available" in text
    assert "DH-HMAC-CHAP" in text and "no dhchap_secret" in text


def test_wrong_key_says_it_was_rejected(lab, caplog):
    lab.target(ports=(4420, 4421))
    lab.sim.secrets[NQN] = SECRET
    text = failed_attach(lab, conninfo(portals=[P1, P2], dhchap_secret=OTHER), caplog)
    assert "Key was rejected by service" in text
    assert "DH-HMAC-CHAP" in text and "rejected" in text


def test_wrong_controller_key_says_it_was_rejected(lab, caplog):
    lab.target(ports=(4420,))
    lab.sim.secrets[NQN] = SECRET
    lab.sim.ctrl_secrets[NQN] = CTRL
    info = conninfo(portals=[P1], dhchap_secret=SECRET, dhchap_ctrl_secret=OTHER)
    text = failed_attach(lab, info, caplog)
    assert "Key was rejected by service" in text and "DH-HMAC-CHAP" in text


def test_bidirectional_key_attaches_and_detaches(lab):
    lab.target(ports=(4420,))
    lab.sim.secrets[NQN] = SECRET
    lab.sim.ctrl_secrets[NQN] = CTRL
    info = conninfo(portals=[P1], dhchap_secret=SECRET, dhchap_ctrl_secret=CTRL)
    result = lab.connector.connect_volume(info)
    assert result["path"].startswith("/dev/nvme")
    lab.connector.disconnect_volume(info, result)
    assert lab.sim.controllers(NQN) == []


def test_nvme_cli_method_never_gets_a_secret_on_its_command_line():
    opts = nvme.connect_options({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": "4420",
                                 "transport": "tcp", "dhchap_secret": SECRET,
                                 "dhchap_ctrl_secret": CTRL})
    argv = " ".join(nvme.nvme_cli_argv(opts))
    assert SECRET not in argv and CTRL not in argv and "dhchap" not in argv


def test_nvme_cli_method_with_a_secret_and_no_fabrics_device_refuses(monkeypatch):
    monkeypatch.setattr(nvme, "FABRICS_DEV", "/nonexistent/nvme-fabrics")
    monkeypatch.setattr(nvme, "_connect_cli", lambda opts: pytest.fail("nvme-cli was run"))
    opts = nvme.connect_options({"nqn": NQN, "traddr": "127.0.0.1", "trsvcid": "4420",
                                 "transport": "tcp", "dhchap_secret": SECRET})
    reply = nvme.connect_many([opts], "nvme-cli")[0]
    assert reply["errno"] == errno.ENOENT and SECRET not in reply["error"]


def test_a_kernel_without_host_authentication_is_refused_a_secret(lab, caplog):
    """Linux without NVME_HOST_AUTH (Debian's 6.1) takes dhchap_secret= and ignores it: the
    volume would attach unauthenticated, a controller key unchecked.  Refused, and said why."""
    import shutil
    lab.target(ports=(4420,))
    shutil.rmtree(os.path.join(lab.root, "sys/module/nvme_auth"), ignore_errors=True)
    info = conninfo(portals=[P1], dhchap_secret=SECRET, dhchap_ctrl_secret=CTRL)
    text = failed_attach(lab, info, caplog)
    assert "NVME_HOST_AUTH" in text and "DH-HMAC-CHAP" in text
    plain = lab.connector.connect_volume(conninfo(portals=[P1]))   # no secret: attaches
    lab.connector.disconnect_volume(conninfo(portals=[P1]), plain)


def test_an_io_error_of_an_authenticated_connect_names_the_key(lab, caplog):
    """Linux 6.12 seen in the lab: a wrong host key where the target closes the connection
    before the host's last authentication message -> EIO (NVMe status 880), not EKEYREJECTED."""
    lab.target(ports=(4420,))
    eio = {"error": "Failed to write to /dev/nvme-fabrics: Input/output error",
           "errno": errno.EIO, "already": False}
    lab.sim.connect = lambda opts, hold=None: dict(eio)
    text = failed_attach(lab, conninfo(portals=[P1], dhchap_secret=OTHER), caplog)
    assert "Input/output error" in text and "DH-HMAC-CHAP" in text and "rejected" in text
    lab.sim.connect = lambda opts, hold=None: dict(eio)
    plain = pytest.raises(NVMeOFError, lab.connector.connect_volume, conninfo(portals=[P1]))
    assert "DH-HMAC-CHAP" not in str(plain.value)      # no key given: no key blamed


def test_host_authentication_is_known_before_nvme_core_is_loaded(tmp_path):
    """The first attach after boot: nvme_core (and with it nvme_auth) is not loaded yet; the
    kernel's module index says whether it can authenticate."""
    from nvmeof_mp.hostinfo import host_authenticates
    modules = tmp_path / "usr/lib/modules/6.12.0-test"
    modules.mkdir(parents=True)
    (modules / "modules.dep").write_text(
        "kernel/drivers/nvme/host/nvme-core.ko.xz: kernel/drivers/nvme/common/nvme-auth.ko.xz\n"
        "kernel/drivers/nvme/common/nvme-auth.ko.xz:\n")
    assert host_authenticates(str(tmp_path), "6.12.0-test")
    (modules / "modules.dep").write_text("kernel/drivers/nvme/host/nvme-core.ko:\n")
    assert not host_authenticates(str(tmp_path), "6.12.0-test")
