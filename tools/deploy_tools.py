"""The programs that verify the deployment on this machine, built once and cached outside the repository.

    python -m tools.deploy_tools build [kube-apiserver] [queue-proxy]    build what is missing, print paths
    python -m tools.deploy_tools crd kafkauser    make Strimzi's KafkaUser CRD (once), print its path
    python -m tools.deploy_tools crd eventpolicy  fetch Knative's EventPolicy CRD (once), print its path

kube-apiserver and queue-proxy are built with the local Go toolchain from the small Go modules of
tools/deploy/ (each pins one upstream release, go.sum included) through the Go module proxy. A binary is
cached in ~/.cache/todo-cqrs/bin/ under a name that carries its module's hash: editing a go.mod builds a
new one, and two processes that need the same binary at once build it once (a file lock).

Strimzi's KafkaUser CRD is not kept in the repository (nor in ../shared/schemas): it is made here, once,
from Strimzi's own artifacts on Maven Central (fetched with mvn, as tools/services.py fetches Kafka's
jars): the `api` jar holds the model classes, `crd-generator` the program Strimzi's build runs to write
packaging/install/cluster-operator/044-Crd-kafkauser.yaml from them. See STRIMZI_CRDS for which versions.

Knative Eventing's EventPolicy CRD is not kept either: it is a file of the knative.dev/eventing Go
module (config/core/resources/eventpolicy.yaml), fetched once through the Go module proxy (`go mod
download`, which checks it against the Go checksum database) and copied into ~/.cache/todo-cqrs/.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GO_MODULES = REPO / "tools" / "deploy"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "todo-cqrs"
BIN = CACHE / "bin"


class ToolError(RuntimeError):
    """A tool could not be found or built; the message says what to do."""


@dataclass(frozen=True)
class GoTool:
    name: str  # the binary, and its module's folder under tools/deploy/
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


# Strimzi's KafkaUser CRD, generated as Strimzi's build generates it (api/pom.xml, generate-crd-co-install-v1)
# with only kafka.strimzi.io/v1 served and stored, which is what Strimzi 1.x serves. The versions: api
# 0.51.0 is the newest whose classes a Java 17 runtime loads (1.x needs Java 21, which Debian bookworm
# does not package) and it already has the v1 API; crd-generator 0.45.0 is the newest published on Maven
# Central before 1.2.0 (also Java 21). The schema it writes is 0.51's v1: the same fields as 1.x's for
# SCRAM users and simple ACLs, without 1.x's TLS certificate validity fields and its two `required`
# lists (an ACL rule's operations, the spec), which the manifests carry anyway.
STRIMZI_API_VERSION = "0.51.0"
STRIMZI_CRD_GENERATOR_VERSION = "0.45.0"
# What the jars hashed to when these versions were chosen: a jar that differs is refused, not run.
STRIMZI_JAR_SHA256 = {
    f"api-{STRIMZI_API_VERSION}.jar": "219b54d570c408523f62bffc999041c64ea926afbc784be942290709fbbcde62",
    f"crd-generator-{STRIMZI_CRD_GENERATOR_VERSION}.jar": (
        "f03aab1b83d29bbd340ce484a4bb651faac7685c685865a30351a636da6008ea"
    ),
}
STRIMZI_CRDS = {"kafkauser": ("io.strimzi.api.kafka.model.user.KafkaUser", "kafkausers.kafka.strimzi.io")}
_STRIMZI_POM = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by tools.deploy_tools: Strimzi's api model and its CRD generator, to make a CRD. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.todo-cqrs</groupId>
  <artifactId>strimzi-crds</artifactId>
  <version>{STRIMZI_API_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>io.strimzi</groupId>
      <artifactId>api</artifactId>
      <version>{STRIMZI_API_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>io.strimzi</groupId>
      <artifactId>crd-generator</artifactId>
      <version>{STRIMZI_CRD_GENERATOR_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""


def strimzi_crd(kind: str) -> Path:
    """The path of Strimzi's CRD of `kind` (a key of STRIMZI_CRDS), made first when missing."""
    model, crd_name = STRIMZI_CRDS[kind]
    cache = CACHE / f"strimzi-{STRIMZI_API_VERSION}"
    target = cache / f"{crd_name}.yaml"

    def make() -> None:
        jars = _strimzi_jars(cache)
        java = shutil.which("java")
        if not java:
            raise ToolError("no Java runtime to make Strimzi's CRDs: apt-get install default-jre-headless")
        partial = target.with_name(target.name + ".partial")
        command = [
            java, "-cp", os.pathsep.join(str(j) for j in jars), "io.strimzi.crdgenerator.CrdGenerator",
            "--label", "app:strimzi", "--label", "strimzi.io/crd-install:true",
            "--target-kube", "1.16+", "--crd-api-version", "v1",
            "--api-versions", "v1", "--storage-version", "v1",
            "--yaml", f"{model}={partial}",
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if run.returncode != 0 or not partial.exists():
            partial.unlink(missing_ok=True)
            raise ToolError(f"Strimzi's CRD generator failed:\n{run.stdout}{run.stderr}"[-4000:])
        if f"name: {crd_name}" not in partial.read_text():
            raise ToolError(f"the generated CRD is not {crd_name}: {partial}")
        partial.rename(target)
        print(f"made {target} (Strimzi {STRIMZI_API_VERSION}'s {kind} CRD)", file=sys.stderr, flush=True)

    return _made_once(target, cache / ".lock", make)


def _strimzi_jars(cache: Path) -> list[Path]:
    jars_dir = cache / "jars"
    wanted = [
        jars_dir / f"api-{STRIMZI_API_VERSION}.jar",
        jars_dir / f"crd-generator-{STRIMZI_CRD_GENERATOR_VERSION}.jar",
    ]
    if all(j.exists() for j in wanted):
        return _checked(wanted)
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ToolError("Strimzi's CRD is not cached and mvn is missing: apt-get install maven")
    (cache / "pom.xml").write_text(_STRIMZI_POM)
    partial = cache / "jars.partial"
    shutil.rmtree(partial, ignore_errors=True)
    print(
        f"fetching Strimzi's api and crd-generator jars from Maven Central into {jars_dir}", file=sys.stderr
    )
    argv = [mvn, "-q", "-B", "dependency:copy-dependencies", "-DexcludeTransitive=true"]
    argv.append(f"-DoutputDirectory={partial}")
    run = subprocess.run(
        argv, cwd=cache, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600
    )
    if run.returncode != 0:
        raise ToolError(f"Maven could not fetch Strimzi's jars:\n{run.stdout}{run.stderr}"[-3000:])
    shutil.rmtree(jars_dir, ignore_errors=True)
    partial.rename(jars_dir)
    if missing := [str(j) for j in wanted if not j.exists()]:
        raise ToolError(f"Maven fetched no {', '.join(missing)}")
    return _checked(wanted)


def _checked(jars: list[Path]) -> list[Path]:
    for jar in jars:
        digest = hashlib.sha256(jar.read_bytes()).hexdigest()
        if digest != STRIMZI_JAR_SHA256[jar.name]:
            raise ToolError(f"{jar} has SHA-256 {digest}, not the pinned {STRIMZI_JAR_SHA256[jar.name]}")
    return jars


KNATIVE_EVENTING_VERSION = "v0.47.0"
KNATIVE_EVENTING_CRDS = {"eventpolicy": "config/core/resources/eventpolicy.yaml"}


def knative_eventing_crd(kind: str) -> Path:
    """The path of Knative Eventing's CRD of `kind` (a key of KNATIVE_EVENTING_CRDS), fetched first when
    missing."""
    cache = CACHE / f"knative-eventing-{KNATIVE_EVENTING_VERSION}"
    target = cache / Path(KNATIVE_EVENTING_CRDS[kind]).name

    def fetch() -> None:
        module = f"knative.dev/eventing@{KNATIVE_EVENTING_VERSION}"
        run = subprocess.run(
            [go_binary(), "mod", "download", "-json", module],
            cwd=cache,
            env={**os.environ, "GO111MODULE": "on"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if run.returncode != 0:
            raise ToolError(f"go mod download {module} failed:\n{run.stdout}{run.stderr}"[-3000:])
        source = Path(json.loads(run.stdout)["Dir"]) / KNATIVE_EVENTING_CRDS[kind]
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(source, partial)
        partial.rename(target)
        print(
            f"fetched {target} (knative.dev/eventing {KNATIVE_EVENTING_VERSION})", file=sys.stderr, flush=True
        )

    return _made_once(target, cache / ".lock", fetch)


def go_binary() -> str:
    found = shutil.which("go") or shutil.which("go", path="/usr/tools/go/bin:/usr/lib/go/bin")
    if not found:
        raise ToolError(
            "no Go toolchain: install Go 1.24 or later (https://go.dev/doc/install) and put it on PATH"
        )
    return found


def ensure_binary(name: str) -> Path:
    """The path of the cached binary `name` (a key of TOOLS), built first when missing."""
    tool = TOOLS[name]
    target = tool.cached_path()
    return _made_once(target, BIN / f".{name}.lock", lambda: _build(tool, target))


def _made_once(target: Path, lock_path: Path, make: Callable[[], None]) -> Path:
    """`target`, made by `make` when missing, under a file lock: another process may be making it
    right now, and then it is made once."""
    if target.exists():
        return target
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            make()
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
    parser = argparse.ArgumentParser(prog="python -m tools.deploy_tools", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or find cached) binaries and print their paths")
    build.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(TOOLS)} (default: all)")
    crd = commands.add_parser("crd", help="make (or find cached) a Strimzi or Knative CRD, print its path")
    crd.add_argument("kind", choices=sorted([*STRIMZI_CRDS, *KNATIVE_EVENTING_CRDS]))
    args = parser.parse_args(argv)
    if args.command == "crd":
        try:
            print(
                knative_eventing_crd(args.kind)
                if args.kind in KNATIVE_EVENTING_CRDS
                else strimzi_crd(args.kind)
            )
        except ToolError as error:
            print(f"deploy_tools: {error}", file=sys.stderr)
            return 1
        return 0
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
