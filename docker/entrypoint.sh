#!/usr/bin/env bash
# Entry point of every rldock image: fail in one line when a mounted folder is not writable by the container's user
# (the usual cause: HOST_UID/HOST_GID in .env differ from the owner of ./saves or ./models), then run the command.
set -euo pipefail

for dir in ${RLDOCK_WRITABLE_DIRS:-/workspace/saves /workspace/models}; do
    if [ -d "$dir" ] && [ ! -w "$dir" ]; then
        echo "rldock: $dir is not writable by uid $(id -u); set HOST_UID=$(stat -c %u "$dir") HOST_GID=$(stat -c %g "$dir") in .env or chown the folder (DOCS.md, Troubleshooting)" >&2
        exit 77
    fi
done

exec "$@"
