#!/usr/bin/env bash
# Make a local OS image from Debian's packages, for hosts that reach no image registry (air-gapped, or only a
# package mirror): debootstrap a minimal bookworm with Python 3.11, venv and pip, then `docker import` it.
# It serves as BASE_IMAGE for the CPU flavour of rldock/base and as EVAL_BASE_IMAGE (DOCS.md, Air-gapped hosts).
#
#   docker/debian-base.sh NAME [MIRROR]      e.g. docker/debian-base.sh local/debian-python:bookworm
#
# Needs root (debootstrap) and a reachable Debian mirror (default: the first one apt on this host uses).
# Never name the result after an upstream image (python:3.11-slim, nvidia/cuda:…): it is not one.
set -euo pipefail

if [ "${1:-}" = "" ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
name=$1
host_mirror() {  # the first Debian (not security) mirror in this host's apt sources, if any
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2> /dev/null \
        | grep -oE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' | awk '{print $2}' | head -n1 || true
}
mirror=${2:-$(host_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}
for tool in debootstrap docker; do
    command -v "$tool" > /dev/null || { echo "debian-base.sh: $tool is not installed (apt-get install $tool)" >&2; exit 1; }
done

root=$(mktemp -d "${TMPDIR:-/tmp}/rldock-debian-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "debian-base.sh: debootstrap bookworm from $mirror (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$mirror" > "$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Smaller image, same behaviour: apt lists and caches are fetched again by any build that installs packages.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | docker import --change 'CMD ["python3"]' - "$name" > /dev/null
echo "debian-base.sh: $name ($(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}'))"
