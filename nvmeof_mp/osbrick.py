"""Plug nvmeof_mp into os-brick, so Nova and Cinder use it without a line changed.

Nova and Cinder build connectors with ``InitiatorConnector.factory('NVMEOF', root_helper, ...)``
and ask ``os_brick.initiator.connector.get_connector_properties(...)``.  ``register()`` points
os-brick's protocol mappings (NVME, NVMEOF) and its properties list at ``NVMeOFConnector``
below; no os-brick file is modified.  Ways to enable it:

* call ``nvmeof_mp.osbrick.register()`` in-process, or
* drop a ``.pth`` file with ``import nvmeof_mp.osbrick; nvmeof_mp.osbrick.install_import_hook()``
  into the service's site-packages: os-brick is then re-pointed whenever it is imported,
  and nothing is imported before that (see doc/source/os-brick.rst).

The entry point ``os_brick.connectors: NVMEOF = nvmeof_mp.osbrick:NVMeOFConnector`` names the
class for tools that look there.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import sys

from nvmeof_mp import connector as ours
from nvmeof_mp import exception as ex

CLASS_PATH = "nvmeof_mp.osbrick.NVMeOFConnector"
OS_BRICK_CLASS = "os_brick.initiator.connectors.nvmeof.NVMeOFConnector"
_NVME_KEYS = ("nqn", "nvme_hostid", "uuid", "system uuid", "nvme_native_multipath", "nvmeof_mp")


def register():
    """Make os-brick's factory and properties use nvmeof_mp for NVME / NVMEOF."""
    from os_brick import initiator
    from os_brick.initiator import connector as osb
    for name in dir(osb):
        if name.startswith("_connector_mapping"):
            mapping = getattr(osb, name)
            for proto in (initiator.NVME, initiator.NVMEOF):
                mapping[proto] = CLASS_PATH
    lst = osb.unix_connector_list
    lst[:] = [CLASS_PATH if c == OS_BRICK_CLASS else c for c in lst]
    if CLASS_PATH not in lst:
        lst.append(CLASS_PATH)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs ``register()`` right after ``os_brick.initiator.connector`` is imported."""

    target = "os_brick.initiator.connector"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            register()
        spec.loader.exec_module = exec_and_register
        return spec


def install_import_hook():
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
    if "os_brick.initiator.connector" in sys.modules:
        register()


@contextlib.contextmanager
def _as_os_brick_errors():
    """Raise os-brick's exception types where callers catch them by class."""
    from os_brick import exception as obe
    try:
        yield
    except ex.VolumePathsNotFound as e:
        raise obe.VolumePathsNotFound() from e
    except (ex.VolumeDeviceNotFound, ex.TargetUnreachable, ex.ReplicaError) as e:
        raise obe.VolumeDeviceNotFound(device=str(e)) from e
    except ex.InvalidConnectionInfo as e:
        raise obe.InvalidParameterValue(err=str(e)) from e
    except ex.NVMeOFError as e:
        raise obe.BrickException(message=str(e)) from e


def _translated(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _as_os_brick_errors():
            return method(*args, **kwargs)
    return wrapper


class NVMeOFConnector(ours.NVMeOFConnector):
    """nvmeof_mp's connector with os-brick's class attributes, hooks and exception types."""

    platform = "ALL"
    os_type = "LINUX"

    def __init__(self, root_helper=None, driver=None, use_multipath=False,
                 device_scan_attempts=5, *args, **kwargs):
        kwargs.pop("arch", None)
        self._execute = kwargs.pop("execute", None)
        super().__init__(root_helper, driver, use_multipath, device_scan_attempts,
                         *args, **kwargs)

    @classmethod
    def get_connector_properties(cls, root_helper, *args, **kwargs) -> dict:
        """Only the NVMe-oF keys: os-brick sets the generic ones (ip, host...) itself."""
        props = ours.NVMeOFConnector.get_connector_properties(root_helper, *args, **kwargs)
        return {k: v for k, v in props.items() if k in _NVME_KEYS}

    def connect_volume(self, connection_properties):
        from os_brick import utils

        # os-brick's hook: an encrypted volume gets a symlink the encryptor owns
        @utils.connect_volume_prepare_result
        def connect(conn, connection_properties):
            with _as_os_brick_errors():
                return ours.NVMeOFConnector.connect_volume(conn, connection_properties)
        return connect(self, connection_properties)

    def disconnect_volume(self, connection_properties, device_info, force=False,
                          ignore_errors=False):
        from os_brick import utils

        @utils.connect_volume_undo_prepare_result(unlink_after=True)
        def disconnect(conn, connection_properties, device_info, force=False,
                       ignore_errors=False):
            with _as_os_brick_errors():
                return ours.NVMeOFConnector.disconnect_volume(
                    conn, connection_properties, device_info, force, ignore_errors)
        return disconnect(self, connection_properties, device_info, force=force,
                          ignore_errors=ignore_errors)

    @_translated
    def extend_volume(self, connection_properties):
        return super().extend_volume(connection_properties)

    @_translated
    def get_volume_paths(self, connection_properties, device_info=None):
        return super().get_volume_paths(connection_properties, device_info)

    def get_all_available_volumes(self, connection_properties=None):
        return []

    def supports_multipath(self):
        return True

    def check_multipath(self, connection_properties):
        """Nothing to check before attach: each mode decides at attach time."""

    def set_execute(self, execute):
        self._execute = execute

    def set_root_helper(self, helper):
        self._root_helper = helper

    def set_driver(self, driver):
        self.driver = driver

    def check_IO_handle_valid(self, handle, data_type, protocol):
        if not isinstance(handle, data_type):
            from os_brick import exception as obe
            raise obe.InvalidIOHandleObject(protocol=protocol, actual_type=type(handle))
