"""Exceptions raised by nvmeof_mp.

The names follow os-brick's (``VolumeDeviceNotFound``, ``VolumePathsNotFound``...) so callers
that catch os-brick's exceptions by name keep working; the os-brick adapter maps them to the real
os-brick classes when os-brick is installed.
"""


class NVMeOFError(Exception):
    """Base class of every error this library raises."""

    message = "An unknown NVMe-oF connector error occurred."

    def __init__(self, message=None, **kwargs):
        self.kwargs = kwargs
        if message is None:
            try:
                message = self.message % kwargs
            except (KeyError, TypeError):
                message = self.message
        self.msg = message
        super().__init__(message)


class InvalidConnectionInfo(NVMeOFError, ValueError):
    """Connection information is malformed; raised before anything touches the host."""

    def __init__(self, key, reason):
        self.key = key
        self.reason = reason
        super().__init__("Invalid connection information: %s: %s" % (key, reason))


class UnsupportedHost(NVMeOFError):
    message = "This host cannot do it: %(reason)s"


class PortalConnectError(NVMeOFError):
    """One portal could not be connected (the kernel or nvme-cli refused it)."""

    def __init__(self, portal, reason, errno=None):
        self.portal = portal
        self.reason = reason
        self.errno = errno
        super().__init__("Connecting %s failed: %s" % (portal, reason))


class AlreadyConnected(PortalConnectError):
    """The kernel already has a controller for this portal, NQN and host NQN."""


class VolumeDeviceNotFound(NVMeOFError):
    message = "Volume device not found at %(device)s."


class VolumePathsNotFound(NVMeOFError):
    message = "Could not find any paths for the volume."


class TargetUnreachable(NVMeOFError):
    """No portal of a target could be connected."""

    def __init__(self, nqn, failures):
        self.nqn = nqn
        self.failures = failures
        detail = "; ".join(str(f) for f in failures) or "no portal tried"
        super().__init__("Could not connect to any portal of %s: %s" % (nqn, detail))


class PrivilegedArgumentError(NVMeOFError, ValueError):
    """A privileged entrypoint refused an argument (defence in depth)."""


class ReplicaError(NVMeOFError):
    message = "Replicated volume error: %(reason)s"


class LockDirectoryError(NVMeOFError):
    """The lock directory could be tampered with by another user: refused (fail closed)."""

    message = "Unsafe lock directory %(path)s: %(reason)s"


class DetachAborted(NVMeOFError):
    """A detach stopped before removing anything (a failed flush, md stop or dm remove): the
    volume is still attached.  ``force`` goes on past it instead, as os-brick's does."""

    message = "Detach of %(what)s stopped, the volume stays attached: %(reason)s"


class ForeignClaim(NVMeOFError):
    """A namespace this attach would hand out or join is held by a device-mapper map that is
    not ours (multipathd's): refused, and what the attach connected is undone."""

    message = "%(device)s is claimed by another device-mapper user: %(reason)s"
