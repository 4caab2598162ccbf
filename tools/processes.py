"""What the local tooling's process starters share: children that never outlive their parent, and
whether a local port is free."""

from __future__ import annotations

import ctypes
import signal
import socket

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: this process gets `signum` when its parent dies, even by SIGKILL (a `preexec_fn`). The
    kernel ties it to the spawning thread: spawn from a thread that lives as long as the child."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def killed_with_parent() -> None:
    """`die_with_parent` with SIGKILL: for a child that must not even shut down on its own terms."""
    die_with_parent(signal.SIGKILL)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind `port` on `host` now (a port in TIME_WAIT counts as free)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
