# Sourced by scripts/test-aarch64.sh and scripts/build-wheels.sh: a Rust compiler that can
# build for aarch64-unknown-linux-gnu, from Debian packages only (no rustup download).
#
#   aarch64_rust            # exports RUSTC and AARCH64_RUSTFLAGS (add them to the target's
#                           # CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS)
#   apt_install PKG...      # apt-get install PKG... (no recommends), only those missing
#
# The compiler is Debian's rustc-web (an amd64 package; the rustup one has no aarch64 std
# here). Its aarch64 standard library is the arm64 package libstd-rust-web-dev: when it is
# not installed, its .deb is downloaded and unpacked into $DLLAMA_CI_CACHE (default
# /var/cache/dllama-ci) and used through --sysroot, instead of installing it, since
# installing an arm64 package pulls arm64 libc6 and libllvm, which must match the host's
# versions and so can upgrade them. DLLAMA_AARCH64_STD=unpack takes that route even when the
# package is installed.

apt_updated=0
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing (apt): ${missing[*]}" >&2
    if [ $apt_updated = 0 ]; then apt-get update -q >&2; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

aarch64_rust() {
    apt_install rustc-web
    export RUSTC=/usr/bin/rustc
    local ver
    ver=$(dpkg-query -W -f='${Version}' rustc-web)
    AARCH64_RUSTFLAGS=""
    if [ "${DLLAMA_AARCH64_STD:-}" != unpack ] &&
        [ "$(dpkg-query -W -f='${Version}' libstd-rust-web-dev:arm64 2>/dev/null || true)" = "$ver" ]; then
        export AARCH64_RUSTFLAGS   # installed system-wide, in rustc's own sysroot
        return 0
    fi
    local cache=${DLLAMA_CI_CACHE:-/var/cache/dllama-ci}
    local sysroot="$cache/rust-aarch64-sysroot-${ver//[:~+]/_}"
    if [ ! -d "$sysroot/lib/rustlib/aarch64-unknown-linux-gnu/lib" ]; then
        echo "unpacking libstd-rust-web-dev:arm64=$ver into $sysroot" >&2
        mkdir -p "$cache"
        dpkg --print-foreign-architectures | grep -qx arm64 || {
            dpkg --add-architecture arm64
            apt_updated=0
        }
        local tmp
        tmp=$(mktemp -d "$cache/rust-std.XXXXXX")
        if ! (cd "$tmp" && apt-get download -q "libstd-rust-web-dev:arm64=$ver" >/dev/null 2>&1); then
            [ $apt_updated = 0 ] && apt-get update -q >&2 && apt_updated=1
            (cd "$tmp" && apt-get download -q "libstd-rust-web-dev:arm64=$ver" >&2)
        fi
        dpkg-deb -x "$tmp"/libstd-rust-web-dev_*_arm64.deb "$tmp/x"
        mkdir -p "$sysroot/lib/rustlib"
        rm -rf "$sysroot/lib/rustlib/aarch64-unknown-linux-gnu"
        mv "$tmp/x/usr/lib/rustlib/aarch64-unknown-linux-gnu" "$sysroot/lib/rustlib/"
        rm -rf "$tmp"
    fi
    AARCH64_RUSTFLAGS="--sysroot $sysroot"
    export AARCH64_RUSTFLAGS
}
