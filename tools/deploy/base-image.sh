#!/usr/bin/env bash
# Makes a Python base image from Debian packages only, for machines that reach no container registry
# (`make base-image`; `make images` uses it when PYTHON_IMAGE cannot be pulled).
#   tools/deploy/base-image.sh CONTAINER_CLI IMAGE
# Debian bookworm (minbase) with python3 and a virtualenv at /opt/python whose bin/ is first on PATH, so
# the Dockerfile's `pip install` and the Jobs' `python -m ...` work as on the official python image.
# The image trusts this machine's CA bundle (so that pip reaches PyPI through a TLS-intercepting proxy):
# it is for building and testing here, never for pushing. Kept by the container CLI: made once.
# Needs root (debootstrap, chroot) and debootstrap.
set -euo pipefail
cli=${1:?container CLI}
image=${2:?image name}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if "$cli" image inspect "$image" >/dev/null 2>&1; then
  echo "base-image: $image exists" >&2
  exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: apt-get install debootstrap" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "base-image: debootstrap needs root" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/todo-cqrs-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
started=$SECONDS
echo "base-image: debootstrap bookworm into $root (a minute or two)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" \
  > "$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
chroot "$root" python3 -m venv /opt/python
chroot "$root" /opt/python/bin/python -c 'import ssl, venv'  # fails here rather than in a build
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* \
       "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$cli" import \
  --change 'ENV PATH=/opt/python/bin:/usr/tools/sbin:/usr/tools/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'LABEL org.opencontainers.image.description="todo-cqrs local base: Debian bookworm python3, made by tools/deploy/base-image.sh; trusts the build machine CA bundle"' \
  --change 'CMD ["python"]' \
  - "$image" >/dev/null
echo "base-image: $image made in $((SECONDS - started)) s" >&2
