#!/usr/bin/env bash
# Build (or reuse from cache) the supermachine guest kernel.
#
#   K=$(supermachine-vmm/guest/build-kernel.sh)     # stdout: the vmlinux path, nothing else
#
# Debian linux-source-6.1 + patches/*.patch + `make tinyconfig` + kernel.config + olddefconfig,
# `make vmlinux`, installed into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/supermachine/kernel/<key>/{vmlinux,config,build-info}
# where <key> = first 16 hex of sha256(linux-source version, kernel.config, every patch, this script).
# A cache hit prints the path and exits at once. All logging goes to stderr.
#
# Environment:
#   SUPERMACHINE_KERNEL_JOBS   make -j value (default: nproc)
#   SUPERMACHINE_KEEP_BUILD=1  keep the build tree (its path is logged) instead of deleting it
#   TMPDIR                     where the ~2 GB build tree goes (default /tmp)
set -euo pipefail

# Everything except the final path goes to stderr.
exec 3>&1 1>&2

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="$here/kernel.config"
patch_dir="$here/patches"
src_pkg=linux-source-6.1
src_tarball=/usr/src/linux-source-6.1.tar.xz
arch=x86_64

[[ $(uname -m) == x86_64 ]] || die "only x86_64 hosts are supported (this is $(uname -m))"
[[ -f $fragment ]] || die "missing $fragment"

# --- 1. build dependencies (installed only if missing) ---------------------------------------------
deps=("$src_pkg" bc bison flex libelf-dev libssl-dev build-essential patch xz-utils)

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

missing=()
for p in "${deps[@]}"; do
    pkg_installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing missing packages: ${missing[*]}"
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root (or sudo) to apt-get install ${missing[*]}"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        log "apt-get install failed; running apt-get update and retrying"
        "${sudo[@]}" apt-get update >&2
        "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
fi
[[ -f $src_tarball ]] || die "$src_tarball not found although $src_pkg is installed"

# --- 2. cache key ----------------------------------------------------------------------------------
shopt -s nullglob
patches=("$patch_dir"/*.patch)
shopt -u nullglob
src_version=$(dpkg-query -W -f='${Version}' "$src_pkg")

key=$(
    {
        printf 'linux-source-version %s\n' "$src_version"
        printf 'fragment\n'; cat "$fragment"
        for p in "${patches[@]}"; do
            printf 'patch %s\n' "$(basename "$p")"; cat "$p"
        done
        printf 'script\n'; cat "$self"
    } | sha256sum | cut -c1-16
)

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/supermachine/kernel"
dest="$cache_root/$key"

if [[ -f $dest/vmlinux ]]; then
    echo "$dest/vmlinux" >&3
    exit 0
fi

mkdir -p "$cache_root"
# One builder per key at a time; a second caller waits and then takes the cache hit.
mkdir -p "$cache_root/.locks"
exec 9>"$cache_root/.locks/$key"
if ! flock -n 9; then
    log "another build of $key is running; waiting for it"
    flock 9
fi
if [[ -f $dest/vmlinux ]]; then
    echo "$dest/vmlinux" >&3
    exit 0
fi

# --- 3. unpack + patch -----------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/supermachine-kernel.XXXXXX")
staging="$cache_root/$key.tmp.$$"
cleanup() {
    rm -rf "$staging"
    if [[ ${SUPERMACHINE_KEEP_BUILD:-0} == 1 ]]; then
        log "build tree kept at $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

log "key $key (linux-source $src_version, ${#patches[@]} patches); building in $work"
start=$SECONDS
tar -xJf "$src_tarball" -C "$work"
src="$work/linux-source-6.1"
[[ -d $src ]] || die "unexpected tarball layout: no linux-source-6.1/ in $src_tarball"

for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$src" -p1 --batch --forward --quiet <"$p" || die "patch $(basename "$p") does not apply"
done

# --- 4. configure + verify -------------------------------------------------------------------------
kmake() {
    make -C "$src" ARCH="$arch" \
        KBUILD_BUILD_USER=supermachine KBUILD_BUILD_HOST=supermachine \
        KBUILD_BUILD_TIMESTAMP="supermachine-$key" \
        "$@"
}

kmake tinyconfig >&2
# merge_config.sh lists every redefined value; keep that in a log, show it only on failure.
if ! (cd "$src" && ARCH="$arch" scripts/kconfig/merge_config.sh -m .config "$fragment") \
    >"$work/merge_config.log" 2>&1; then
    cat "$work/merge_config.log" >&2
    die "merge_config.sh failed"
fi
kmake olddefconfig >&2

# Every option the fragment asks for must be in the final .config exactly as asked.
bad=0
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        if ! grep -qxF -- "$line" "$src/.config"; then
            got=$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$src/.config" || echo "absent")
            log "config: wanted '$line', got '$got'"
            bad=1
        fi
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        if grep -qE "^${BASH_REMATCH[1]}=" "$src/.config"; then
            log "config: wanted '$line', got '$(grep -E "^${BASH_REMATCH[1]}=" "$src/.config")'"
            bad=1
        fi
    fi
done <"$fragment"
((bad == 0)) || die "options from kernel.config did not survive olddefconfig (missing dependency?)"
log "config verified: every option in kernel.config is set as asked"

# --- 5. build + install ----------------------------------------------------------------------------
jobs=${SUPERMACHINE_KERNEL_JOBS:-$(nproc)}
log "make -j$jobs vmlinux (several minutes)"
kmake -j"$jobs" vmlinux >&2

mkdir -p "$staging"
cp "$src/vmlinux" "$staging/vmlinux"
cp "$src/.config" "$staging/config"
{
    echo "key=$key"
    echo "linux_source_version=$src_version"
    echo "kernelrelease=$(make -s --no-print-directory -C "$src" ARCH="$arch" kernelrelease 2>/dev/null || true)"
    echo "patches=$(for p in "${patches[@]}"; do basename "$p"; done | paste -sd, -)"
    echo "build_seconds=$((SECONDS - start))"
    echo "jobs=$jobs"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$staging/build-info"

# Atomic install: the key directory appears complete or not at all.
if ! mv -T "$staging" "$dest" 2>/dev/null; then
    [[ -f $dest/vmlinux ]] || die "could not install into $dest"
    log "$dest appeared meanwhile; keeping it"
fi
log "built in $((SECONDS - start)) s: $dest/vmlinux ($(stat -c %s "$dest/vmlinux") bytes)"
echo "$dest/vmlinux" >&3
