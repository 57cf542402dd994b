#!/usr/bin/env bash
# System packages the tests need (browser tests drive Debian's chromium; the network policy
# tests apply nftables rules; the PyCloud bridge's tests run a private redis-server; the
# container driver's tests run podman with runc on an image made from busybox-static's
# static /bin/busybox; the ssh target tests run Debian's OpenSSH server in network
# namespaces and the bench compares against pssh and pdsh's pdcp). Idempotent.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v nft >/dev/null || [[ -x /usr/sbin/nft ]] || need+=(nftables)
command -v redis-server >/dev/null || need+=(redis-server)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v parallel-ssh >/dev/null || need+=(pssh)
command -v pdcp >/dev/null || need+=(pdsh)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
    || need+=(busybox-static)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing system packages: ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
