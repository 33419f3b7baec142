#!/usr/bin/env bash
# Two "hosts" on one Linux machine (root): two network namespaces joined by a veth pair, each with
# its own address in 198.18.0.0/15 (reserved for benchmarks) and its own disk.
#
#   scripts/two_hosts.sh up NAME            make NAME-h1 (198.18.0.1) and NAME-h2 (198.18.0.2)
#   scripts/two_hosts.sh run NAME H -- CMD  run CMD on host H (1 or 2): in its network namespace and
#                                           in a mount namespace of its own, where DISK (printed by
#                                           `up`) is that host's private folder and /tmp, /dev/shm
#                                           are empty tmpfs: nothing written there is seen by the
#                                           other host
#   scripts/two_hosts.sh down NAME          end every process inside both namespaces, delete them
#                                           (the veth pair goes with them) and the folders
#   scripts/two_hosts.sh stale              take down the rehearsals of this script whose owner
#                                           process (the number in NAME, s2h<pid>) is gone
#
# Inside each host the link interface is called `link0`: GLOO_SOCKET_IFNAME=link0 on both.
# Traffic stays inside the two namespaces: they have no route to the machine's own interfaces.
# NAME: s2h<pid>[x] (a live process's id, so that parallel runs never clash and `stale` can tell
# leftovers), at most 12 characters.
set -euo pipefail

ROOT=${TWO_HOSTS_ROOT:-/var/tmp/scan-two-hosts}
NET=198.18.0

die() { echo "two_hosts: $*" >&2; exit 2; }
check_name() { [[ $1 =~ ^s2h[0-9]+[a-z]?$ && ${#1} -le 12 ]] || die "NAME must be s2h<pid>[a-z] (12 characters at most), got '$1'"; }

up() {
    local name=$1
    check_name "$name"
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
    ip netns add "$name-h1"
    ip netns add "$name-h2" || { ip netns del "$name-h1"; die "cannot make network namespace $name-h2"; }
    # the pair is made in the root namespace under unique names, then moved and renamed
    ip link add "${name}a" type veth peer name "${name}b"
    for h in 1 2; do
        local end=${name}a; [[ $h == 2 ]] && end=${name}b
        ip link set "$end" netns "$name-h$h"
        ip -n "$name-h$h" link set "$end" name link0
        ip -n "$name-h$h" addr add "$NET.$h/24" dev link0
        ip netns exec "$name-h$h" sysctl -qw net.ipv6.conf.link0.disable_ipv6=1  # IPv4 only on the link
        ip -n "$name-h$h" link set lo up
        ip -n "$name-h$h" link set link0 up
        mkdir -p "$ROOT/$name/host$h"
    done
    mkdir -p "$ROOT/$name/disk"
    echo "DISK=$ROOT/$name/disk HOST1=$NET.1 HOST2=$NET.2 IFNAME=link0"
}

run() {
    local name=$1 host=$2
    shift 2
    [[ ${1:-} == -- ]] && shift
    check_name "$name"
    [[ $host == 1 || $host == 2 ]] || die "host must be 1 or 2, got '$host'"
    local disk=$ROOT/$name/disk
    # shellcheck disable=SC2016  # $1..$@ expand in the inner shell
    exec ip netns exec "$name-h$host" unshare --mount --propagation private -- \
        sh -c 'mount --bind "$1" "$2" && mount -t tmpfs -o size=2g tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm && shift 2 && exec "$@"' \
        sh "$ROOT/$name/host$host" "$disk" "$@"
}

down() {
    local name=$1
    check_name "$name"
    for h in 1 2; do
        if ip netns list | grep -qw "$name-h$h"; then
            # every process left in the namespace was started through `run`: end each by its id
            for pid in $(ip netns pids "$name-h$h"); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$name-h$h"
        fi
    done
    ip link del "${name}a" 2>/dev/null || true  # only if `up` failed before moving it
    rm -rf "${ROOT:?}/$name"
}

stale() {
    local name
    for name in $(ip netns list | awk '{print $1}' | grep -E '^s2h[0-9]+[a-z]?-h[12]$' | sed 's/-h[12]$//' | sort -u || true); do
        local pid=${name#s2h}; pid=${pid%%[a-z]}
        if ! kill -0 "$pid" 2>/dev/null; then down "$name"; echo "took down stale $name"; fi
    done
}

cmd=${1:-}
shift || true
case $cmd in
    up) up "$@" ;;
    run) run "$@" ;;
    down) down "$@" ;;
    stale) stale ;;
    *) die "usage: $0 up NAME | run NAME HOST -- CMD... | down NAME | stale" ;;
esac
