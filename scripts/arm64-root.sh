#!/usr/bin/env bash
# An arm64 Debian root file system (bookworm, as Raspberry Pi OS bookworm) in which the
# aarch64 wheel is installed and run under qemu-user, as on a Pi. Needs root (debootstrap,
# chroot, binfmt_misc).
#
#   scripts/arm64-root.sh prepare          # build (or reuse) the root; print its path
#   scripts/arm64-root.sh install WHEEL    # install WHEEL in the root, print its id
#   scripts/arm64-root.sh run [-b SRC:DST] [-w SRC:DST] CMD ...
#                # CMD in the root with the wheel DLLAMA_ARM64_WHEEL=id, host dir SRC at DST
#                # (-b: read-only)
#
# The root is cached in $DLLAMA_CI_CACHE (default /var/cache/dllama-ci), under a name keyed
# by a hash of the recipe below, so CI builds it once per machine (~8 minutes) and reuses it.
# Host packages installed when missing: debootstrap (apt). qemu-user-static is not installed
# (it conflicts with qemu-user-binfmt): its qemu-aarch64-static alone is unpacked into the
# cache. An aarch64 binfmt_misc entry with the F flag points at that static qemu, so it works
# inside the chroot; QEMU_CPU in the environment picks the emulated CPU (cortex-a72 = Pi 4,
# cortex-a76 = Pi 5).
set -euo pipefail

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
INCLUDE=python3,python3-venv,python3-pip,ca-certificates
# the Python packages the wheel depends on, preinstalled in the cached venv
PY_DEPS="numpy sentencepiece typer"
CACHE=${DLLAMA_CI_CACHE:-/var/cache/dllama-ci}
BINFMT=/proc/sys/fs/binfmt_misc
BINFMT_NAME=dllama-aarch64

die() { echo "arm64-root: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, binfmt_misc)"

# qemu-aarch64-static, unpacked from Debian's qemu-user-static package into the cache
qemu_static() {
    local ver dir
    ver=$(apt-cache policy qemu-user-static | awk '/Candidate:/ {print $2}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "apt knows no qemu-user-static (apt-get update?)"
    dir="$CACHE/qemu-user-static-${ver//[:~+]/_}"
    if [ ! -x "$dir/qemu-aarch64-static" ]; then
        local tmp
        tmp=$(mktemp -d "$CACHE/qemu.XXXXXX")
        (cd "$tmp" && apt-get download -q "qemu-user-static=$ver" >/dev/null 2>&1) \
            || die "apt-get download qemu-user-static=$ver failed"
        dpkg-deb --fsys-tarfile "$tmp"/qemu-user-static_*.deb \
            | tar -x -C "$tmp" ./usr/bin/qemu-aarch64-static
        mkdir -p "$dir"
        mv "$tmp/usr/bin/qemu-aarch64-static" "$dir/"
        rm -rf "$tmp"
    fi
    echo "$dir/qemu-aarch64-static"
}

# an aarch64 binfmt_misc entry (F: the interpreter is opened now, so it need not exist in
# the chroot) pointing at the static qemu; systemd would do this from binfmt.d, but CI
# containers and VMs often run without it
binfmt() {
    local qemu=$1
    [ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT" \
        || die "cannot mount binfmt_misc"
    if [ -e "$BINFMT/$BINFMT_NAME" ] && ! grep -qx "interpreter $qemu" "$BINFMT/$BINFMT_NAME"; then
        echo -1 >"$BINFMT/$BINFMT_NAME"   # an entry for an older qemu: replace it
    fi
    if [ ! -e "$BINFMT/$BINFMT_NAME" ]; then
        # magic and mask of an aarch64 ELF executable, as /usr/lib/binfmt.d/qemu-aarch64.conf
        local magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
        local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
        echo ":$BINFMT_NAME:M::$magic:$mask:$qemu:F" >"$BINFMT/register"
    fi
}

# The recipe (its text is hashed into the cache key: change it and a new root is built).
build_root() {
    local root=$1 qemu=$2
    debootstrap --arch=arm64 --foreign --variant=minbase --include="$INCLUDE" \
        "$SUITE" "$root" "$MIRROR"
    # also reachable under the path of Debian's own qemu-user-binfmt entry, should that one
    # be registered after ours (binfmt_misc tries the newest entry first)
    install -D "$qemu" "$root/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    in_root "$root" /debootstrap/debootstrap --second-stage
    in_root "$root" python3 -m venv /opt/dllama
    # shellcheck disable=SC2086
    in_root "$root" /opt/dllama/bin/pip install -q --disable-pip-version-check $PY_DEPS
}

# CMD inside ROOT, with /proc, /dev and the host's DNS, in a private mount namespace (the
# mounts vanish with the command); BINDS: "host:guest:ro|rw" directories bound in
in_root() {
    local root=$1; shift
    # the host's DNS, and its CA bundle (which has the certificate of a TLS-intercepting
    # proxy, where the host goes through one)
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    # (before debootstrap's second stage the root has no /etc/ssl/certs yet)
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
        mkdir -p "$root/etc/ssl/certs"
        cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    fi
    unshare --mount --propagation private -- bash -euc '
        root=$1; binds=$2; wheel=$3; shift 3
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        for b in $binds; do   # SRC:DST:ro or SRC:DST:rw
            src=${b%%:*}; rest=${b#*:}; dst=${rest%:*}; mode=${rest##*:}
            mkdir -p "$root$dst"
            mount --bind "$src" "$root$dst"
            [ "$mode" = rw ] || mount -o remount,bind,ro "$root$dst"
        done
        path=/opt/dllama/bin:/usr/local/bin:/usr/bin:/bin
        pythonpath=
        if [ -n "$wheel" ]; then path=$wheel/bin:$path; pythonpath=$wheel; fi
        # a clean environment: nothing of the host'"'"'s Python, pip or Rust set-up leaks in
        keep=()
        for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY TERM; do
            [ -z "${!v:-}" ] || keep+=("$v=${!v}")
        done
        exec chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH="$path" \
            PYTHONPATH="$pythonpath" PIP_DISABLE_PIP_VERSION_CHECK=1 "${keep[@]}" "$@"
    ' in_root "$root" "${BINDS:-}" "${WHEEL_DIR:-}" "$@"
}

root_path() {
    local key
    key=$(printf '%s\n' "$SUITE" "$MIRROR" "$INCLUDE" "$PY_DEPS" "$(declare -f build_root)" \
        | sha256sum | cut -c1-16)
    echo "$CACHE/arm64-root-$key"
}

prepare() {
    mkdir -p "$CACHE"
    command -v debootstrap >/dev/null || {
        echo "installing: debootstrap" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2
    }
    local qemu root
    qemu=$(qemu_static)
    binfmt "$qemu"
    root=$(root_path)
    if [ ! -e "$root/.complete" ]; then
        echo "building $root (debootstrap $SUITE arm64, once per machine)" >&2
        local tmp=$root.partial.$$
        rm -rf "$tmp"
        local t0=$SECONDS
        build_root "$tmp" "$qemu" >&2
        touch "$tmp/.complete"
        rm -rf "$root"
        mv "$tmp" "$root"
        echo "built in $((SECONDS - t0)) s" >&2
    fi
    # a smoke test of the emulation itself
    [ "$(in_root "$root" uname -m)" = aarch64 ] || die "$root does not run as aarch64"
    echo "$root"
}

cmd=${1:-}; shift || true
case "$cmd" in
    prepare)
        # one builder at a time per machine
        mkdir -p "$CACHE"
        exec 9>"$CACHE/.lock"
        flock 9
        prepare
        ;;
    install)
        [ $# -eq 1 ] && [ -f "$1" ] || die "usage: arm64-root.sh install WHEEL"
        root=$(root_path)
        [ -e "$root/.complete" ] || die "no root at $root: run prepare first"
        exec 9>"$CACHE/.lock"
        flock 9
        # Each wheel gets its own directory, named by its hash, so that runs of different
        # checkouts on one machine do not replace each other's package; the dependencies
        # go into the shared venv.
        id=$(sha256sum "$1" | cut -c1-16)
        dir=/opt/dllama-wheels/$id
        if [ ! -e "$root$dir/.complete" ]; then
            mkdir -p "$root/opt/dllama-wheels"
            find "$root/opt/dllama-wheels" -mindepth 1 -maxdepth 1 -mtime +7 -exec rm -rf {} +
            rm -rf "$root$dir" "$root$dir.partial"
            mkdir -p "$root$dir.partial"
            cp "$1" "$root$dir.partial/"
            in_root "$root" pip install -q --disable-pip-version-check --no-deps \
                --target "$dir.partial" "$dir.partial/$(basename "$1")" >&2
            # the requirements of the wheel (not those of its extras)
            mapfile -t reqs < <(unzip -p "$1" '*.dist-info/METADATA' \
                | sed -n 's/^Requires-Dist: *//p' | grep -v 'extra *==' | sed 's/ *;.*//')
            [ ${#reqs[@]} -eq 0 ] || in_root "$root" pip install -q \
                --disable-pip-version-check "${reqs[@]}" >&2
            touch "$root$dir.partial/.complete"
            mv "$root$dir.partial" "$root$dir"
        fi
        touch "$root$dir"
        echo "$id"
        ;;
    run)
        root=$(root_path)
        [ -e "$root/.complete" ] || die "no root at $root: run prepare first"
        binds=""
        while :; do
            case "${1:-}" in
                -b) binds="$binds $2:ro"; shift 2 ;;
                -w) binds="$binds $2:rw"; shift 2 ;;
                *) break ;;
            esac
        done
        [ -n "${DLLAMA_ARM64_WHEEL:-}" ] && [ -e "$root/opt/dllama-wheels/$DLLAMA_ARM64_WHEEL/.complete" ] \
            || die "DLLAMA_ARM64_WHEEL is not the id of an installed wheel (arm64-root.sh install)"
        BINDS=$binds WHEEL_DIR=/opt/dllama-wheels/$DLLAMA_ARM64_WHEEL in_root "$root" "$@"
        ;;
    *)
        die "usage: arm64-root.sh prepare | install WHEEL | run [-b|-w SRC:DST] CMD ..."
        ;;
esac
