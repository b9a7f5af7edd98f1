"""DH-HMAC-CHAP against an nvmet that authenticates (kernel 6.12+: NVME_HOST_AUTH and
NVME_TARGET_AUTH; Debian's 6.1 has neither, these tests skip there).

"Host-wide" key: the key of this host's own NQN (/etc/nvme/hostnqn) on the target, the same in
the connection info of every volume; "per-volume": a volume with its own ``host_nqn`` and its own
key.  The library reads keys from the connection info only (no host-level key option).

While every connect runs, the root target agent scans /proc/*/cmdline and /proc/*/environ of
every process for the key; afterwards the kernel log, the test's log and the error text.
"""

import base64
import hashlib
import json
import logging
import os
import zlib

import pytest

from nvmeof_mp.connector import NVMeOFConnector
from nvmeof_mp.exception import NVMeOFError

from conftest import REGISTRY_VOLUMES, root_helper
from test_gate import NQN, U1, U2, controllers, info, one_subsystem

pytestmark = pytest.mark.usefixtures("no_leftovers")
VOL_HOST_NQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-4333-8444-555555555555"
METHODS = ("fabrics", "nvme-cli")


def key(seed):
    """A DH-HMAC-CHAP key in transport form: 32 bytes, their CRC-32 (little endian), base64."""
    raw = hashlib.sha256(seed.encode()).digest()
    return "DHHC-1:00:%s:" % base64.b64encode(raw + zlib.crc32(raw).to_bytes(4, "little")
                                              ).decode()


HOST_KEY, CTRL_KEY, WRONG_KEY, VOL_KEY = (key(s) for s in ("host", "ctrl", "wrong", "vol"))


def host_auth():
    """Does this kernel's NVMe host authenticate (NVME_HOST_AUTH: nvme_auth loaded or built
    in)?  Without it the kernel takes dhchap_secret= and ignores it."""
    if os.path.isdir("/sys/module/nvme_auth"):
        return True
    release = os.uname().release
    for base in ("/lib/modules", "/usr/lib/modules"):
        try:
            with open(os.path.join(base, release, "modules.builtin")) as f:
                if "/nvme-auth.ko" in f.read():
                    return True
        except OSError:
            pass
    return False


@pytest.fixture
def auth_target(target):
    if not host_auth():
        pytest.skip("kernel %s: no NVMe host authentication (NVME_HOST_AUTH)"
                    % os.uname().release)
    if not target.auth_supported():
        pytest.skip("kernel %s: nvmet cannot authenticate (NVME_TARGET_AUTH)"
                    % os.uname().release)
    return target


@pytest.fixture(params=METHODS)
def conn(request, connector):
    if request.param == "fabrics":
        return connector
    return NVMeOFConnector(root_helper=root_helper(), use_multipath=True,
                           connect_method="nvme-cli")


def host_nqn(connector):
    return connector.host_identity()[0]


def auth_subsystem(target, hostnqn, nqn=NQN, uuid=U1, port=(1, 4420), **keys):
    target.add_subsystem(nqn, allow_any_host=False)
    target.allow_host(nqn, hostnqn)
    target.set_host_keys(hostnqn, **keys)
    one_subsystem_ns(target, nqn, uuid, port)


def one_subsystem_ns(target, nqn, uuid, port):
    target.add_namespace(nqn, 1, 64, uuid, ana_group=1)
    if str(port[0]) not in target.state()["ports"]:
        target.add_port(*port)
    target.link(port[0], nqn)


class Watch:
    """The agent looks for ``secrets`` in every process while the block runs."""

    def __init__(self, target, caplog, *secrets):
        self.target, self.caplog, self.secrets = target, caplog, secrets

    def __enter__(self):
        self.caplog.set_level(logging.DEBUG)
        self.target.watch_secret(*self.secrets)
        return self

    def __exit__(self, *exc):
        found = self.target.watch_secret_result()
        assert found["scans"] > 0
        assert found["seen"] == [] and not found["kernel_log"], found
        for s in self.secrets:
            assert s not in self.caplog.text and s[10:40] not in self.caplog.text


def records():
    out = []
    for name in sorted(os.listdir(REGISTRY_VOLUMES)) if os.path.isdir(REGISTRY_VOLUMES) else []:
        with open(os.path.join(REGISTRY_VOLUMES, name)) as f:
            out.append(f.read())
    return out


def assert_stored_root_only(target, *secrets):
    """Every record holds no secret and says it has some; each secret file is root's, 0600,
    in a 0700 directory, and holds the secrets."""
    texts = records()
    for text in texts:
        assert "dhchap" not in text and not any(s in text for s in secrets)
        assert json.loads(text)["secrets"] is True
    for secret in secrets:
        files = target.secret_files(secret)
        assert files["dir_mode"] == 0o700 and len(files["files"]) == len(texts)
        for entry in files["files"].values():
            assert entry == {"mode": 0o600, "uid": 0, "holds": True}


def live_attach(conn, target, caplog, vol, secret):
    with Watch(target, caplog, secret):
        result = conn.connect_volume(vol)
    assert os.path.exists(result["path"])
    assert set(controllers().values()) == {"live"}
    return result


@pytest.mark.cover("DH-HMAC-CHAP host key (one-way)")
@pytest.mark.root_too
def test_auth_host_wide_key_unidirectional(conn, auth_target, caplog):
    hostnqn = host_nqn(conn)
    auth_subsystem(auth_target, hostnqn, key=HOST_KEY)
    vol = dict(info(ports=(4420,)), dhchap_secret=HOST_KEY)
    result = live_attach(conn, auth_target, caplog, vol, HOST_KEY)
    assert_stored_root_only(auth_target, HOST_KEY)
    conn.disconnect_volume(vol, result)
    assert auth_target.secret_files(HOST_KEY)["files"] == {}


@pytest.mark.cover("DH-HMAC-CHAP host and controller keys (bidirectional)")
def test_auth_host_wide_key_bidirectional(conn, auth_target, caplog):
    auth_subsystem(auth_target, host_nqn(conn), key=HOST_KEY, ctrl_key=CTRL_KEY)
    vol = dict(info(ports=(4420,)), dhchap_secret=HOST_KEY, dhchap_ctrl_secret=CTRL_KEY)
    with Watch(auth_target, caplog, HOST_KEY, CTRL_KEY):
        result = conn.connect_volume(vol)
    assert set(controllers().values()) == {"live"}
    assert_stored_root_only(auth_target, HOST_KEY, CTRL_KEY)
    conn.disconnect_volume(vol, result)


@pytest.mark.cover("DH-HMAC-CHAP per-volume host NQN and key")
def test_auth_per_volume_key_beside_host_wide_key(connector, auth_target, caplog):
    """Two volumes at once: one as this host (host-wide key), one with its own host NQN and
    its own key; each target knows only its host's key."""
    hostnqn = host_nqn(connector)
    other = NQN + "-vol"
    auth_subsystem(auth_target, hostnqn, key=HOST_KEY)
    auth_subsystem(auth_target, VOL_HOST_NQN, nqn=other, uuid=U2, key=VOL_KEY)
    shared = dict(info(ports=(4420,)), dhchap_secret=HOST_KEY)
    own = dict(info(uuid=U2, nqn=other, ports=(4420,)), dhchap_secret=VOL_KEY,
               host_nqn=VOL_HOST_NQN)
    first = live_attach(connector, auth_target, caplog, shared, HOST_KEY)
    second = live_attach(connector, auth_target, caplog, own, VOL_KEY)
    hostnqns = sorted(open("/sys/class/nvme/%s/hostnqn" % c).read().strip()
                      for c in controllers())
    assert hostnqns == sorted([hostnqn, VOL_HOST_NQN])
    records_text = "".join(records())
    assert HOST_KEY not in records_text and VOL_KEY not in records_text
    files = auth_target.secret_files(VOL_KEY)["files"].values()
    assert sorted(e["holds"] for e in files) == [False, True]   # each volume its own key
    connector.disconnect_volume(own, second)
    connector.disconnect_volume(shared, first)


def refused(conn, target, caplog, vol, secret):
    with Watch(target, caplog, secret):
        with pytest.raises(NVMeOFError) as exc:
            conn.connect_volume(vol)
    text = str(exc.value)
    for s in (HOST_KEY, CTRL_KEY, WRONG_KEY):
        assert s not in text and s[10:40] not in text
    assert controllers() == {} and records() == []      # nothing is left
    assert target.secret_files(secret)["files"] == {}
    return text


@pytest.mark.cover("DH-HMAC-CHAP missing or wrong key: clear error, nothing left")
def test_auth_missing_key_is_enokey(conn, auth_target, caplog):
    auth_subsystem(auth_target, host_nqn(conn), key=HOST_KEY)
    text = refused(conn, auth_target, caplog, info(ports=(4420,)), HOST_KEY)
    assert "Required key not available" in text and "no dhchap_secret" in text


@pytest.mark.cover("DH-HMAC-CHAP missing or wrong key: clear error, nothing left")
def test_auth_wrong_key_is_ekeyrejected(conn, auth_target, caplog):
    auth_subsystem(auth_target, host_nqn(conn), key=HOST_KEY)
    vol = dict(info(ports=(4420,)), dhchap_secret=WRONG_KEY)
    text = refused(conn, auth_target, caplog, vol, WRONG_KEY)
    # 6.12 under TCG, now and then: the target closes the connection before the host's last
    # authentication message, and the kernel returns EIO (after its 60 s timeout)
    assert ("Key was rejected by service" in text and "rejected dhchap_secret" in text) or (
        "Input/output error" in text and "rejected dhchap_secret" in text), text


@pytest.mark.cover("DH-HMAC-CHAP missing or wrong key: clear error, nothing left")
def test_auth_wrong_controller_key_is_ekeyrejected(conn, auth_target, caplog):
    auth_subsystem(auth_target, host_nqn(conn), key=HOST_KEY, ctrl_key=CTRL_KEY)
    vol = dict(info(ports=(4420,)), dhchap_secret=HOST_KEY, dhchap_ctrl_secret=WRONG_KEY)
    text = refused(conn, auth_target, caplog, vol, WRONG_KEY)
    assert "Key was rejected by service" in text and "dhchap_ctrl_secret" in text


@pytest.mark.cover("DH-HMAC-CHAP on a kernel without host authentication: refused")
def test_auth_kernel_without_host_auth_refuses_a_secret(conn, target, caplog):
    """6.1: the kernel would ignore the keys and connect unauthenticated; the library says
    so and connects nothing (the target here needs no key: the kernel would have succeeded)."""
    if host_auth():
        pytest.skip("kernel %s authenticates" % os.uname().release)
    one_subsystem(target, ports=((1, 4420),))
    vol = dict(info(ports=(4420,)), dhchap_secret=HOST_KEY, dhchap_ctrl_secret=CTRL_KEY)
    text = refused(conn, target, caplog, vol, HOST_KEY)
    assert "NVME_HOST_AUTH" in text
