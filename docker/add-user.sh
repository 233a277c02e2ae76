#!/bin/sh
# The image's default user, the last layer of every runnable image so that another uid rebuilds only that layer.
# uid 0 (a root CI runner) keeps root; any other uid gets a user `rldock` (an existing user with that uid, such as
# Ubuntu's `ubuntu`, is renamed). Compose overrides the user anyway (HOST_UID:HOST_GID); this is for plain runs.
set -eu
uid=$1
mkdir -p /workspace/models /workspace/saves /workspace/data
if [ "$uid" != 0 ]; then
    existing=$(getent passwd "$uid" | cut -d: -f1 || true)
    if [ -n "$existing" ]; then
        usermod --login rldock --home /tmp "$existing"
    else
        useradd --no-create-home --home-dir /tmp --uid "$uid" --shell /bin/bash rldock
    fi
fi
chown "$uid" /workspace/models /workspace/saves /workspace/data
