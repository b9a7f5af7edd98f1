"""The Cinder worker (root, in the VM, in the Cinder venv; see :mod:`.cinder`).

Cinder's ``LVMVolumeDriver`` with ``target_helper = nvmet``, its volumes as
``cinder.objects.Volume`` with an admin context and no database, as Cinder's own unit tests
build them.  The volume manager's steps are done in its order (``_connection_create``,
``attachment_delete``, ``extend_volume``) and its ``_parse_connection_options`` runs for real,
so the connection info is what Cinder's API hands Nova.  Requests and replies are JSON lines
on stdin / the original stdout (``python -m nvmeof_mp.lab.cinder_worker``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

STATE_DIR = "/run/nvmeof-lab/cinder"
NVMET = Path("/sys/kernel/config/nvmet")
LVM_CONF = """devices {
    global_filter = [ "a|^/dev/loop[0-9]+$|", "r|.*|" ]
}
"""


def _sh(*argv) -> str:
    # stdin not inherited: it is the worker's request pipe
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL).stdout


class Backends:
    """Cinder's LVM drivers by backend name, and the volumes made through them (root)."""

    def __init__(self, state_dir: str = STATE_DIR):
        import logging
        logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
        logging.getLogger("cinder.volume.targets").setLevel(logging.DEBUG)
        from oslo_concurrency import lockutils
        from oslo_privsep import priv_context

        import cinder.privsep
        from cinder import context, objects
        from cinder.common import config  # noqa: F401  (registers cinder's global options)
        from cinder.volume import configuration
        self.state_dir = state_dir
        os.makedirs(state_dir, exist_ok=True)
        # LVM sees only the loop devices, as devstack's lvm.conf filter does on a host that
        # is its own initiator: no scan of the attached NVMe namespaces (paths come and go)
        conf_dir = os.path.join(state_dir, "lvm")
        os.makedirs(conf_dir, exist_ok=True)
        with open(os.path.join(conf_dir, "lvm.conf"), "w") as f:
            f.write(LVM_CONF)
        os.environ["LVM_SYSTEM_DIR"] = conf_dir
        self.conf = configuration.CONF
        self.conf([], project="cinder", default_config_files=[])
        lockutils.set_defaults(os.path.join(state_dir, "locks"))
        objects.register_all()
        # root in the VM: Cinder's privsep daemon forked, as by a root service
        cinder.privsep.sys_admin_pctxt.start(priv_context.Method.FORK)
        self.ctxt = context.get_admin_context()
        self.drivers = {}
        self.volumes = {}       # id -> (backend name, Volume)

    # -- the volume group ------------------------------------------------------------------
    def op_volume_group(self, name: str, size_gb: int) -> dict:
        """A VG on a loop device over a sparse file in a tmpfs (made once per VM)."""
        if subprocess.run(["vgs", name], capture_output=True).returncode == 0:
            return {"vg": name, "created": False}
        image = os.path.join(self.state_dir, f"{name}.img")
        with open(image, "wb") as f:
            f.truncate(size_gb << 30)
        loop = _sh("losetup", "--find", "--show", image).strip()
        _sh("pvcreate", "-q", loop)
        _sh("vgcreate", "-q", name, loop)
        return {"vg": name, "created": True, "pv": loop}

    # -- drivers -------------------------------------------------------------------------------
    def op_backend(self, name: str, options: dict) -> dict:
        """Cinder's LVMVolumeDriver for config group ``name`` with ``options`` (as in a
        ``[name]`` section of cinder.conf); set up as the volume manager does."""
        from cinder.volume import configuration, driver
        from cinder.volume.drivers import lvm
        if name in self.drivers:
            return {"backend": name, "created": False}
        conf = configuration.Configuration(driver.volume_opts, config_group=name)
        conf.append_config_values(lvm.volume_opts)
        for opts in (driver.iser_opts, driver.nvmeof_opts, driver.nvmet_opts):
            conf.append_config_values(opts)
        for key, value in dict(options, volume_backend_name=name).items():
            self.conf.set_override(key, value, group=name)
        drv = lvm.LVMVolumeDriver(configuration=conf, db=None, host=self._host(name))
        drv.do_setup(self.ctxt)
        drv.check_for_setup_error()
        self.drivers[name] = drv
        return {"backend": name, "created": True,
                "target": type(drv.target_driver).__module__ + "."
                + type(drv.target_driver).__name__}

    def _host(self, backend: str) -> str:
        return f"{os.uname().nodename}@{backend}"

    # -- the volume life cycle -------------------------------------------------------------
    def op_create_volume(self, backend: str, volume_id: str, size_gb: int) -> dict:
        from cinder import objects
        volume = objects.Volume(
            context=self.ctxt, id=volume_id, _name_id=None, size=size_gb, status="creating",
            host=f"{self._host(backend)}#{backend}", volume_type_id=None, multiattach=False,
            encryption_key_id=None, provider_location=None, provider_auth=None,
            admin_metadata={}, volume_attachment=objects.VolumeAttachmentList(objects=[]))
        update = self.drivers[backend].create_volume(volume)
        volume.update(update or {})
        volume.status = "available"
        self.volumes[volume_id] = (backend, volume)
        return {"name": volume.name, "size": volume.size}

    def op_attach(self, volume_id: str, connector: dict, instance: str) -> dict:
        """The volume manager's ``_connection_create``: validate_connector, create_export
        (its model update kept on the object), initialize_connection, then the manager's own
        ``_parse_connection_options``; returns the connection info Cinder's attachments API
        gives Nova (flattened, with ``driver_volume_type`` and ``attachment_id``)."""
        import uuid as uuidlib

        from cinder import objects
        from cinder.volume import manager
        backend, volume = self.volumes[volume_id]
        drv = self.drivers[backend]
        drv.validate_connector(connector)
        update = drv.create_export(self.ctxt, volume, connector)
        volume.update(update or {})
        conn_info = drv.initialize_connection(volume, connector)
        conn_info = manager.VolumeManager._parse_connection_options(
            _ManagerView(drv), self.ctxt, volume, conn_info)
        attachment = objects.VolumeAttachment(
            context=self.ctxt, id=str(uuidlib.uuid4()), volume_id=volume_id,
            instance_uuid=instance, connector=connector, attach_status="attached")
        volume.volume_attachment.objects.append(attachment)
        volume.status = "in-use"
        data = conn_info.pop("data", {})
        info = dict(data, **conn_info)
        info["attachment_id"] = attachment.id
        info["enforce_multipath"] = connector.get("enforce_multipath", False)
        return {"connection_info": info, "provider_location": volume.provider_location}

    def op_extend_volume(self, volume_id: str, new_size_gb: int) -> dict:
        backend, volume = self.volumes[volume_id]
        self.drivers[backend].extend_volume(volume, new_size_gb)
        volume.size = new_size_gb
        return {"size": volume.size}

    def op_detach(self, volume_id: str, attachment_id: str) -> dict:
        """The manager's ``attachment_delete``: terminate_connection with the attachment's
        connector, then remove_export unless the connection is shared.  Unlike the manager,
        a failing remove_export is not swallowed: the job wants to see it."""
        backend, volume = self.volumes[volume_id]
        drv = self.drivers[backend]
        attachments = volume.volume_attachment.objects
        attachment = next(a for a in attachments if a.id == attachment_id)
        shared = drv.terminate_connection(volume, attachment.connector, force=False)
        if shared is not None and not shared:
            drv.remove_export(self.ctxt.elevated(), volume)
        attachments.remove(attachment)
        volume.status = "in-use" if attachments else "available"
        return {"shared_connection": shared}

    def op_delete_volume(self, volume_id: str) -> dict:
        backend, volume = self.volumes.pop(volume_id)
        self.drivers[backend].delete_volume(volume)
        return {"deleted": volume.name}

    def op_forget_all(self) -> list:
        """After a failed test: detach and delete every volume still known (best effort)."""
        done = []
        for volume_id in list(self.volumes):
            backend, volume = self.volumes[volume_id]
            for attachment in list(volume.volume_attachment.objects):
                try:
                    self.op_detach(volume_id, attachment.id)
                except Exception as exc:       # report, go on cleaning
                    done.append(f"detach {volume_id}: {exc}")
            try:
                self.drivers[backend].remove_export(self.ctxt, volume)
                self.op_delete_volume(volume_id)
                done.append(f"deleted {volume_id}")
            except Exception as exc:
                self.volumes.pop(volume_id, None)
                done.append(f"delete {volume_id}: {exc}")
        return done

    # -- what is left ------------------------------------------------------------------------
    def op_state(self, vg: str) -> dict:
        """LVs of ``vg``, nvmet subsystems (with namespaces) and ports (with addresses)."""
        lvs = _sh("lvs", "--noheadings", "-o", "lv_name", vg).split()
        subsystems = {s.name: sorted(n.name for n in (s / "namespaces").iterdir())
                      for s in (NVMET / "subsystems").iterdir()}
        ports = {}
        for port in (NVMET / "ports").iterdir():
            attr = {a: (port / f"addr_{a}").read_text().strip()
                    for a in ("trtype", "traddr", "trsvcid")}
            ports[port.name] = dict(attr, subsystems=sorted(
                p.name for p in (port / "subsystems").iterdir()))
        return {"lvs": lvs, "subsystems": subsystems, "ports": ports}


class _ManagerView:
    """What ``VolumeManager._parse_connection_options`` uses of its manager: the driver and
    the block-size helper (both Cinder's own code)."""

    def __init__(self, driver):
        self.driver = driver

    def _set_connection_block_size(self, conn_info):
        from cinder.volume import manager
        return manager.VolumeManager._set_connection_block_size(self, conn_info)


def serve(requests, replies) -> int:
    """Set Cinder up at once, then answer JSON requests, one a line, until end of input."""
    try:
        backends, failed = Backends(), None
    except Exception as exc:   # every request gets the reason
        import traceback
        traceback.print_exc()
        backends, failed = None, f"Cinder set-up failed: {type(exc).__name__}: {exc}"
    for line in requests:
        try:
            req = json.loads(line)
            if failed:
                raise RuntimeError(failed)
            op = getattr(backends, "op_" + req["op"], None)
            if op is None:
                raise ValueError(f"unknown op {req['op']!r}")
            reply = {"ok": True, "result": op(**req.get("kwargs", {}))}
        except Exception as exc:   # the client raises it; the worker goes on serving
            import traceback
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply, default=str) + "\n")
        replies.flush()
    return 0


def main() -> int:
    # replies on the original stdout; anything Cinder or a library prints goes to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return serve(sys.stdin, replies)


if __name__ == "__main__":
    sys.exit(main())
