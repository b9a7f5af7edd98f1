"""What Cinder really sends is accepted; what could smuggle options into the kernel is not.

The connection infos are the shapes cinder 29.0.0's nvmet target helper produced in the lab
(target_prefix ``nvme-subsystem-1`` as devstack sets it, Cinder's default prefix, a shared
target named after the host), and the KumoScale driver's single-replica form.
"""

import pytest
from hypothesis import given, settings, strategies as st

from nvmeof_mp import connection
from nvmeof_mp.exception import InvalidConnectionInfo, PrivilegedArgumentError
from nvmeof_mp.privileged import nvme

VOL = "5f0c3b7e-7a55-4b8e-9d0c-2b1f6a4e8c31"
CINDER_NQNS = [
    "nqn.nvme-subsystem-1-" + VOL,                        # devstack's target_prefix
    "nqn.nvme-subsystem-1-compute-1",                     # lvm_share_target: one per host
    "nqn.iqn.2010-10.org.openstack:-" + VOL,              # Cinder's default target_prefix
    "nqn.2014-08.org.openstack:volume-" + VOL,            # spec form
]


@pytest.mark.parametrize("nqn", CINDER_NQNS)
def test_cinder_nvmet_v2_connection_info(nqn):
    info = {"target_nqn": nqn, "vol_uuid": VOL, "ns_id": "10",
            "portals": [["192.0.2.10", "4420", "tcp"], ["192.0.2.11", 4420, "RoCEv2"]]}
    req = connection.parse(info)
    assert req.target.nqn == nqn and req.target.uuid == VOL
    assert [p.transport for p in req.target.portals] == ["tcp", "rdma"]


@pytest.mark.parametrize("nqn", CINDER_NQNS)
def test_cinder_nvmet_v1_connection_info(nqn):
    info = {"target_portal": "192.0.2.10", "target_port": 4420, "nqn": nqn,
            "transport_type": "tcp", "ns_id": 10, "volume_nguid": None}
    req = connection.parse(info)
    assert req.target.nqn == nqn and req.target.nsid == 10


@pytest.mark.parametrize("nqn", CINDER_NQNS)
def test_the_daemon_accepts_what_the_client_accepts(nqn):
    opts = nvme.connect_options({"nqn": nqn, "traddr": "192.0.2.10", "trsvcid": "4420",
                                 "transport": "tcp"})
    assert nvme.fabrics_option_string(opts).split(",")[0] == "nqn=" + nqn


def test_the_option_string_carries_the_default_policy():
    """ctrl_loss_tmo -1 (reconnect forever) is a value, not an option to refuse."""
    from nvmeof_mp.policy import TimeoutPolicy
    opts = dict(BASE, **TimeoutPolicy().controller_options(replica_leg=False))
    text = nvme.fabrics_option_string(nvme.connect_options(opts))
    assert "ctrl_loss_tmo=-1" in text.split(",")


@pytest.mark.parametrize("nqn,reason", [
    ("nqn.x:" + "a" * 220, "223 bytes"),
    ("nqn.x:a,hostnqn=evil", "','"),
    ("nqn.x:a=b", "'='"),
    ("nqn.x:a\nb", "control"),
    ("nqn.x: a", "whitespace"),
    ("nqn.x:\u200ba", "control"),          # a zero-width space: format character
    ("-n", "'-'"),
    ("", "non-empty"),
])
def test_nqns_the_kernel_or_a_tool_would_split_are_refused(nqn, reason):
    with pytest.raises(InvalidConnectionInfo, match=reason) as exc:
        connection.parse({"target_nqn": nqn, "vol_uuid": VOL,
                          "portals": [["192.0.2.10", 4420, "tcp"]]})
    assert exc.value.key == "target_nqn"


@pytest.mark.parametrize("traddr", [
    "fe80::1%eth0,tls_key=123\nduplicate_connect",
    "fe80::1%eth0,host_iface=eth1",
    "fe80::1%eth 0",
    "fe80::1%" + "e" * 16,                 # longer than an interface name can be
    "fe80::1%",
    "fe80::1%a/b",
])
def test_ipv6_scope_ids_cannot_smuggle_fabrics_options(traddr):
    with pytest.raises(InvalidConnectionInfo, match="scope"):
        connection.parse({"target_nqn": CINDER_NQNS[0], "vol_uuid": VOL,
                          "portals": [[traddr, 4420, "tcp"]]})
    with pytest.raises(PrivilegedArgumentError):
        nvme.connect_options({"nqn": CINDER_NQNS[0], "traddr": traddr, "trsvcid": "4420",
                              "transport": "tcp"})


def test_the_daemon_wants_a_scope_id_that_names_an_interface_of_the_host():
    with pytest.raises(PrivilegedArgumentError, match="not an interface"):
        nvme.connect_options(dict(BASE, traddr="fe80::1%nosuchif0"))
    assert nvme.connect_options(dict(BASE, traddr="fe80::1%1"))["traddr"] == "fe80::1%1"


def test_a_real_interface_scope_id_is_kept():
    req = connection.parse({"target_nqn": CINDER_NQNS[0], "vol_uuid": VOL,
                            "portals": [["fe80::1%lo", 4420, "tcp"]]})
    assert req.target.portals[0].traddr == "fe80::1%lo"


_hostile = st.text(alphabet=st.sampled_from(list(",=\n\r\t %:-\x00\x7f\u200b\u2028/\\\"'")
                                            + list("abcnqn.19-0:")), max_size=40)
KEYS = ("nqn", "traddr", "trsvcid", "transport", "host_nqn", "host_id", "dhchap_secret",
        "dhchap_ctrl_secret")
BASE = {"nqn": CINDER_NQNS[3], "traddr": "fe80::1%lo", "trsvcid": "4420", "transport": "tcp",
        "host_nqn": "nqn.2014-08.org.nvmexpress:uuid:" + VOL, "host_id": VOL}


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(KEYS), _hostile, _hostile)
def test_fuzz_nothing_hostile_reaches_the_fabrics_option_string(key, prefix, hostile):
    """Whatever a caller sends the daemon, the option string it writes to /dev/nvme-fabrics
    has exactly the options the daemon chose, each once, and no line break."""
    opts = dict(BASE)
    opts[key] = (opts.get(key) or "") + prefix + hostile
    try:
        text = nvme.fabrics_option_string(nvme.connect_options(opts))
    except PrivilegedArgumentError:
        return
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    names = [part.split("=", 1)[0] for part in text.split(",")]
    assert len(names) == len(set(names))
    assert set(names) <= {"nqn", "transport", "traddr", "trsvcid", "hostnqn", "hostid",
                          "dhchap_secret", "dhchap_ctrl_secret"}
    assert all(part.count("=") == 1 or part.startswith("dhchap") for part in text.split(","))
    assert all(not any(c.isspace() for c in part) for part in text.split(","))


@pytest.fixture
def controllers(tmp_path, monkeypatch):
    """A /sys/class/nvme with a fabrics controller of ours and a local PCIe disk's."""
    base = tmp_path / "class-nvme"
    for name, transport in (("nvme0", "pcie"), ("nvme1", "tcp"), ("nvme2", "rdma")):
        (base / name).mkdir(parents=True)
        (base / name / "transport").write_text(transport + "\n")
        for attr in ("delete_controller", "rescan_controller", "ctrl_loss_tmo"):
            (base / name / attr).write_text("")
    monkeypatch.setattr(nvme, "SYS_CLASS_NVME", str(base))
    return base


def test_the_daemon_acts_only_on_fabrics_controllers(controllers):
    """delete_controller, rescan_controllers and set_controller_attrs take their names
    through ``fabrics_controller``: a local PCIe disk's controller is never touched."""
    for act in (lambda n: nvme.fabrics_controller(n),
                lambda n: nvme._write_attr(n, "ctrl_loss_tmo", -1)):
        with pytest.raises(PrivilegedArgumentError, match="not a fabrics controller"):
            act("nvme0")
        with pytest.raises(PrivilegedArgumentError, match="not a fabrics controller"):
            act("nvme9")                # gone, or never there
    assert (controllers / "nvme0" / "delete_controller").read_text() == ""
    assert nvme.fabrics_controller("nvme1") == "nvme1"
    assert nvme._write_attr("nvme2", "ctrl_loss_tmo", -1) is None
    assert (controllers / "nvme2" / "ctrl_loss_tmo").read_text() == "-1"


# ---- the connection info Cinder 29.0.0's LVM driver + nvmet helper really sent in the lab
# (tests/gate/test_gate_cinder.py, recorded in gate-metrics.txt), with the keys the volume
# manager adds and the ``device_path`` Nova's LibvirtNVMEVolumeDriver puts in after attach

LAB_PORT = 4430
MANAGER_KEYS = {"qos_specs": None, "access_mode": "rw", "encrypted": False,
                "enforce_multipath": False}


def _lvm_nvmet_v2(shared):
    port, nsid = (LAB_PORT, 10) if shared else (str(LAB_PORT), "10")   # config vs location
    nqn = "nqn.nvme-subsystem-1-" + ("compute-1" if shared else VOL)
    return dict({"target_nqn": nqn, "vol_uuid": VOL,
                 "portals": [["127.0.0.1", port, "tcp"], ["127.0.0.2", port, "tcp"]],
                 "ns_id": nsid}, **MANAGER_KEYS)


def _lvm_nvmet_v1(shared):
    port, nsid = (LAB_PORT, 10) if shared else (str(LAB_PORT), "10")
    nqn = "nqn.iqn.2010-10.org.openstack:-" + ("compute-1" if shared else VOL)
    return dict({"target_portal": "127.0.0.1", "target_port": port, "nqn": nqn,
                 "transport_type": "tcp", "ns_id": nsid}, **MANAGER_KEYS)


@pytest.mark.parametrize("data", [_lvm_nvmet_v2(False), _lvm_nvmet_v2(True),
                                  _lvm_nvmet_v1(False), _lvm_nvmet_v1(True)],
                         ids=["v2", "v2-shared", "v1", "v1-shared"])
def test_cinder_lvm_nvmet_connection_info_through_nova_calls(lab, data):
    from nvmeof_mp.sim import SimNamespace
    nqn = data.get("target_nqn") or data["nqn"]
    lab.sim.add_target(nqn, [("127.0.0.1", LAB_PORT), ("127.0.0.2", LAB_PORT)],
                       [SimNamespace(10, VOL)])
    data = dict(data)
    result = lab.connector.connect_volume(data)
    data["device_path"] = result["path"]          # as LibvirtNVMEVolumeDriver.connect_volume
    portals = len(data.get("portals", [None]))
    assert lab.sim.calls["connect"] == portals
    lab.sim.targets[nqn].namespaces[0].size_sectors *= 2
    assert lab.connector.extend_volume(data) == 131072 * 2 * 512
    lab.connector.disconnect_volume(data, None, force=False)
    assert lab.sim.controllers(nqn) == []
