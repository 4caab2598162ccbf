"""Knative's queue-proxy (the sidecar of every Knative pod) in front of a local port, configured from a
Service of knative/services/ as Knative Serving would configure it in that Service's pod.

For the image tests (or a measurement), a function behind queue-proxy:

    from tools.queue_proxy import start_queue_proxy

    # The function already listens on 127.0.0.1:9084 (any port); "get-todos" names the Knative Service
    # whose containerConcurrency, timeoutSeconds and readinessProbe configure the proxy.
    with start_queue_proxy(9084, "get-todos") as proxy:
        load(proxy.url + "/todo/1")  # http://127.0.0.1:8012/todo/1 through queue-proxy, as in a pod
        print(proxy.log_tail())      # queue-proxy's own log, if something looked wrong
    # stopped (and its port free again) here, also when the block raised

start_queue_proxy returns once queue-proxy reports the function ready, probed the way the kubelet probes a
Knative pod (queue-proxy then runs the Service's readinessProbe against the user port itself). The first
call builds queue-proxy (about 40 s, cached in ~/.cache/todo-cqrs/bin; tools/deploy_tools.py).

Ports: `port` serves (8012 by default, as in a pod); queue-proxy also listens on 8022 (admin) and 9090
(metrics), fixed by Knative, so one runs per machine at a time. Like in a pod it listens on every
interface: send it traffic on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import IO

from tools import knative_pod
from tools.deploy_tools import ensure_binary
from tools.processes import killed_with_parent, port_free

ADMIN_PORT = 8022  # networking.QueueAdminPort
METRICS_PORT = 9090  # queue-proxy's metrics server
READY_TIMEOUT_S = 30.0


class QueueProxyError(RuntimeError):
    """queue-proxy could not start, or never reported the function ready."""


class QueueProxy:
    """A running queue-proxy. `url` is where to send requests; stop() (or leaving the `with`) ends it."""

    def __init__(
        self, process: subprocess.Popen[bytes], log: IO[bytes], port: int, env: dict[str, str]
    ) -> None:
        self.process = process
        self.port = port
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self._log = log

    def __enter__(self) -> QueueProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, max_bytes: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-max_bytes:].decode(errors="replace")

    def ready(self) -> bool:
        """True when queue-proxy answers a readiness probe as a kubelet sends it: the function is ready."""
        request = urllib.request.Request(self.url + "/", headers=knative_pod.QUEUE_PROBE_HEADERS)
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None:
                raise QueueProxyError(
                    f"queue-proxy exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise QueueProxyError(
                    f"queue-proxy did not report ready in {timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Ends queue-proxy at once. (In a pod, SIGTERM makes it drain for 30 s first; a local run that is
        finished with it has nothing in flight to drain.)"""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


def start_queue_proxy(
    user_port: int,
    service: str,
    *,
    port: int = knative_pod.QUEUE_SERVING_PORT,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> QueueProxy:
    """Start queue-proxy in front of 127.0.0.1:`user_port` with the env a pod of Knative Service `service`
    (knative/services/<service>.yaml) gives it, serving on `port`; return it once the function is ready."""
    env = knative_pod.queue_proxy_env(knative_pod.service_manifest(service), user_port, port)
    for needed in (port, ADMIN_PORT, METRICS_PORT):
        if not port_free(needed, ""):
            raise QueueProxyError(
                f"port {needed} is in use; queue-proxy needs it (another queue-proxy still running?)"
            )
    binary = ensure_binary("queue-proxy")
    log = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the QueueProxy, closed by stop()
    process = subprocess.Popen(
        [str(binary)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=killed_with_parent,  # it never outlives a bench or a test
    )
    proxy = QueueProxy(process, log, port, env)
    try:
        proxy.wait_ready(ready_timeout_s)
    except BaseException:
        proxy.stop()
        raise
    return proxy
