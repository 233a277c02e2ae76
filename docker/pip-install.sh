#!/bin/sh
# `pip install` for image builds. Every RUN that installs packages mounts the build's optional secrets and the
# wheel folder; this script turns them into pip settings for that one command, so none of them lands in a layer:
#   /run/secrets/pip_ca         CA bundle (a TLS-intercepting proxy, a private mirror)  -> PIP_CERT
#   /run/secrets/pip_index_url  package index or mirror, may hold credentials         -> PIP_INDEX_URL
#   /wheels                     docker/wheels/ of the build context (local torch etc.) -> --find-links
set -eu
if [ -s /run/secrets/pip_ca ]; then
    export PIP_CERT=/run/secrets/pip_ca
fi
if [ -s /run/secrets/pip_index_url ]; then
    PIP_INDEX_URL=$(cat /run/secrets/pip_index_url)
    export PIP_INDEX_URL
fi
if [ -d /wheels ]; then
    set -- --find-links /wheels "$@"
fi
exec pip install --no-cache-dir "$@"
