"""The target agent: a root-side JSON-over-unix-socket server so a test running as the lab
user can change the target (:class:`.target.Target`), and its client."""

import json
import os
import socket
import socketserver
import threading

#: Target methods the agent serves.
AGENT_OPS = ("add_subsystem", "allow_host", "set_host_keys", "auth_supported", "secret_files",
             "watch_secret", "watch_secret_result", "add_namespace", "resize_namespace",
             "remove_namespace", "add_port", "link", "unlink", "set_ana_state", "state",
             "teardown", "cleanup_initiator", "kill_process", "mount_scratch",
             "umount_scratch", "hold_exclusive", "release_exclusive", "clear_registry",
             "rdma", "drop_port", "undrop_ports", "stop_subsystem", "start_subsystem",
             "start_multipathd", "stop_multipathd", "multipathd_show", "dm_tables",
             "dm_status", "cinder")


class TargetAgent:
    """Root-side JSON-over-unix-socket server so a non-root test can change the target.

    One JSON object per line: ``{"op": ..., "args": [...], "kwargs": {...}}`` ->
    ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
    """

    def __init__(self, target, sock_path: str, mode: int = 0o666):
        self.target = target
        self.sock_path = sock_path
        self._lock = threading.Lock()
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    reply = agent.dispatch(line)
                    self.wfile.write(json.dumps(reply).encode() + b"\n")

        if os.path.exists(sock_path):
            os.unlink(sock_path)
        os.makedirs(os.path.dirname(sock_path) or ".", exist_ok=True)
        self.server = socketserver.ThreadingUnixStreamServer(sock_path, Handler)
        self.server.daemon_threads = True
        os.chmod(sock_path, mode)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="target-agent")

    def dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            if req.get("op") not in AGENT_OPS:
                raise ValueError(f"unknown op {req.get('op')!r}")
            with self._lock:
                result = getattr(self.target, req["op"])(*req.get("args", []),
                                                         **req.get("kwargs", {}))
            return {"ok": True, "result": result}
        except Exception as exc:  # the client re-raises it; the agent keeps serving
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def start(self) -> "TargetAgent":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class TargetError(RuntimeError):
    """A target operation failed in the agent."""


class TargetClient:
    """Same methods as :class:`Target`, forwarded to a :class:`TargetAgent`."""

    def __init__(self, sock_path: str | None = None, timeout: float = 60):
        self.sock_path = sock_path or os.environ["NVMEOF_MP_TARGET_SOCK"]
        self.timeout = timeout

    def _call(self, op: str, *args, **kwargs):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.sock_path)
            sock.sendall(json.dumps({"op": op, "args": args, "kwargs": kwargs}).encode()
                         + b"\n")
            reply = json.loads(sock.makefile("rb").readline())
        if not reply["ok"]:
            raise TargetError(f"{op}: {reply['error']}")
        return reply["result"]

    def __getattr__(self, name):
        if name not in AGENT_OPS:
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)
