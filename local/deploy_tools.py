"""The programs that verify the deployment on this machine, built once and cached outside the repository.

    python -m local.deploy_tools build [kube-apiserver] [queue-proxy]    build what is missing, print paths

kube-apiserver and queue-proxy are built with the local Go toolchain from the small Go modules of
local/deploy/ (each pins one upstream release, go.sum included) through the Go module proxy. A binary is
cached in ~/.cache/todo-cqrs/bin/ under a name that carries its module's hash: editing a go.mod builds a
new one, and two processes that need the same binary at once build it once (a file lock).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GO_MODULES = REPO / "local" / "deploy"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "todo-cqrs"
BIN = CACHE / "bin"


class ToolError(RuntimeError):
    """A tool could not be found or built; the message says what to do."""


@dataclass(frozen=True)
class GoTool:
    name: str  # the binary, and its module's folder under local/deploy/
    package: str  # the Go package that is the program
    pinned_module: str  # the upstream module whose version names the binary
    about: str  # for the progress line: what it is and how long a first build takes

    @property
    def module_dir(self) -> Path:
        return GO_MODULES / self.name

    def version(self) -> str:
        match = re.search(rf"^\s*{re.escape(self.pinned_module)} (v\S+)", self.go_mod(), re.MULTILINE)
        if not match:
            raise ToolError(f"{self.module_dir}/go.mod does not require {self.pinned_module}")
        return match.group(1)

    def go_mod(self) -> str:
        return (self.module_dir / "go.mod").read_text()

    def ldflags(self) -> str:
        flags = "-s -w"
        if self.pinned_module == "k8s.io/kubernetes":
            # Without it the server reports v0.0.0-master, and kubectl warns about the version skew.
            version = self.version()
            major, minor = version.lstrip("v").split(".")[:2]
            flags += (
                f" -X k8s.io/component-base/version.gitVersion={version}"
                f" -X k8s.io/component-base/version.gitMajor={major}"
                f" -X k8s.io/component-base/version.gitMinor={minor}"
            )
        return flags

    def cached_path(self) -> Path:
        digest = hashlib.sha256()
        for name in ("go.mod", "go.sum"):
            digest.update((self.module_dir / name).read_bytes())
        digest.update(self.ldflags().encode())
        return BIN / f"{self.name}-{self.version()}-{digest.hexdigest()[:12]}"


TOOLS = {
    tool.name: tool
    for tool in (
        GoTool(
            "kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes",
            "the Kubernetes API server; a first build takes about 6 minutes on 2 cores",
        ),
        GoTool(
            "queue-proxy",
            "knative.dev/serving/cmd/queue",
            "knative.dev/serving",
            "Knative's queue-proxy; a first build takes about 40 seconds",
        ),
    )
}


def go_binary() -> str:
    found = shutil.which("go") or shutil.which("go", path="/usr/local/go/bin:/usr/lib/go/bin")
    if not found:
        raise ToolError(
            "no Go toolchain: install Go 1.24 or later (https://go.dev/doc/install) and put it on PATH"
        )
    return found


def ensure_binary(name: str) -> Path:
    """The path of the cached binary `name` (a key of TOOLS), built first when missing."""
    tool = TOOLS[name]
    target = tool.cached_path()
    if target.exists():
        return target
    BIN.mkdir(parents=True, exist_ok=True)
    with (BIN / f".{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if target.exists():
            return target
        _build(tool, target)
    return target


def _build(tool: GoTool, target: Path) -> None:
    print(
        f"building {tool.name} {tool.version()} ({tool.about}; cached in {BIN})", file=sys.stderr, flush=True
    )
    partial = target.with_name(target.name + ".partial")
    env = {**os.environ, "CGO_ENABLED": "0"}
    command = [
        go_binary(),
        "build",
        "-trimpath",
        "-ldflags",
        tool.ldflags(),
        "-o",
        str(partial),
        tool.package,
    ]
    started = time.monotonic()
    run = subprocess.run(command, cwd=tool.module_dir, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ToolError(f"building {tool.name} failed:\n{run.stdout}{run.stderr}"[-6000:])
    partial.rename(target)
    for stale in BIN.glob(f"{tool.name}-*"):  # older builds of the same tool
        if stale != target and not stale.name.endswith(".partial"):
            stale.unlink(missing_ok=True)
    print(f"built {target} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.deploy_tools", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or find cached) binaries and print their paths")
    build.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(TOOLS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tool(s): {', '.join(sorted(unknown))}; known: {', '.join(TOOLS)}")
    try:
        for name in args.names or list(TOOLS):
            print(ensure_binary(name))
    except ToolError as error:
        print(f"deploy_tools: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
