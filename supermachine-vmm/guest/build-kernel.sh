#!/usr/bin/env bash
# Build (or reuse from cache) the supermachine guest kernel, for x86_64 or arm64.
#
#   K=$(supermachine-vmm/guest/build-kernel.sh [--arch x86_64|aarch64])   # stdout: the path, nothing else
#
# Debian linux-source-6.1 + patches/*.patch (those for this architecture) + `make tinyconfig` +
# the architecture's fragment + olddefconfig, then
#   x86_64:  kernel.config,         `make vmlinux`  -> ELF vmlinux (PVH entry)
#   aarch64: kernel-aarch64.config, `make Image`    -> uncompressed arm64 Image
# installed into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/supermachine/kernel/<key>/{vmlinux|Image,config,build-info}
# where <key> = first 16 hex of sha256(architecture, linux-source version, the fragment, every
# patch applied, this script). Another architecture than the host's is cross-built
# (gcc-aarch64-linux-gnu / gcc-x86-64-linux-gnu). A patch that changes arch/<other architecture>/
# is not applied (0001 and 0002, PVM workarounds, are x86-only). A cache hit prints the path and
# exits at once. All logging goes to stderr.
#
# Environment:
#   SUPERMACHINE_GUEST_ARCH    x86_64 or aarch64 (arm64 is accepted too); --arch wins; default: the host's
#   SUPERMACHINE_KERNEL_JOBS   make -j value (default: nproc)
#   SUPERMACHINE_KEEP_BUILD=1  keep the build tree (its path is logged) instead of deleting it
#   TMPDIR                     where the ~2 GB build tree goes (default /tmp)
set -euo pipefail

# Everything except the final path goes to stderr.
exec 3>&1 1>&2

log() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() { log "usage: build-kernel.sh [--arch x86_64|aarch64]"; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
patch_dir="$here/patches"
src_pkg=linux-source-6.1
src_tarball=/usr/src/linux-source-6.1.tar.xz

guest_arch=${SUPERMACHINE_GUEST_ARCH:-$(uname -m)}
while (($#)); do
    case "$1" in
        --arch) guest_arch=${2:-}; [[ -n $guest_arch ]] || usage; shift 2 ;;
        --arch=*) guest_arch=${1#--arch=}; shift ;;
        *) usage ;;
    esac
done

# guest_arch: the name in the cache key and logs (uname -m / Rust spelling); arch: the kernel's
# ARCH=; srcarch: its directory under arch/; target: the make target; product: where make leaves
# it; image: its name in the cache.
case "$guest_arch" in
    x86_64 | amd64)
        guest_arch=x86_64 arch=x86_64 srcarch=x86 fragment="$here/kernel.config" target=vmlinux
        product=vmlinux image=vmlinux triple=x86_64-linux-gnu ;;
    aarch64 | arm64)
        guest_arch=aarch64 arch=arm64 srcarch=arm64 fragment="$here/kernel-aarch64.config" target=Image
        product=arch/arm64/boot/Image image=Image triple=aarch64-linux-gnu ;;
    *) die "unsupported guest architecture '$guest_arch' (x86_64 or aarch64)" ;;
esac
[[ -f $fragment ]] || die "missing $fragment"

# The host builds its own architecture natively and the other one with Debian's cross compiler.
cross=()
cross_pkg=
if [[ $guest_arch != "$(uname -m)" ]]; then
    cross=(CROSS_COMPILE="$triple-")
    cross_pkg=gcc-${triple//_/-}
fi

# --- 1. build dependencies (installed only if missing) ---------------------------------------------
deps=("$src_pkg" bc bison flex libelf-dev libssl-dev build-essential patch xz-utils)
[[ -z $cross_pkg ]] || deps+=("$cross_pkg")

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

[[ -z $cross_pkg ]] || command -v "$triple-gcc" >/dev/null || die "$triple-gcc not found although $cross_pkg is installed"

# The arm64 fragment repeats the x86 one's feature set ("## --- Block / virtio" to the end) so that
# a guest program sees the same kernel on both; a change to one without the other fails here.
if [[ $guest_arch == aarch64 ]]; then
    features() { sed -n '/^## --- Block \/ virtio/,$p' "$1" | grep -E '^(# )?CONFIG_' || true; }
    # The one x86-only line there: arm64 announces devices in the device tree.
    if ! drift=$(diff <(features "$here/kernel.config" | grep -v '^CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=') \
        <(features "$fragment")); then
        log "kernel.config and $(basename "$fragment") no longer list the same features (< x86, > arm64):"
        log "$drift"
        die "make the feature sections of both fragments agree"
    fi
fi

# --- 2. cache key ----------------------------------------------------------------------------------
# A patch that touches arch/<another architecture>/ has nothing to do in this build: leaving it out
# keeps it out of this architecture's key too.
shopt -s nullglob
patches=() skipped=()
for p in "$patch_dir"/*.patch; do
    if grep -E '^\+\+\+ b/arch/' "$p" | grep -vqE "^\+\+\+ b/arch/$srcarch/"; then
        skipped+=("$(basename "$p")")
        continue
    fi
    patches+=("$p")
done
shopt -u nullglob
src_version=$(dpkg-query -W -f='${Version}' "$src_pkg")

key=$(
    {
        printf 'arch %s\n' "$guest_arch"
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

if [[ -f $dest/$image ]]; then
    echo "$dest/$image" >&3
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
if [[ -f $dest/$image ]]; then
    echo "$dest/$image" >&3
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

log "key $key ($guest_arch, linux-source $src_version, ${#patches[@]} patches); building in $work"
((${#skipped[@]} == 0)) || log "not applied (they change another architecture's code): ${skipped[*]}"
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
    make -C "$src" ARCH="$arch" "${cross[@]}" \
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
((bad == 0)) || die "options from $(basename "$fragment") did not survive olddefconfig (missing dependency?)"
log "config verified: every option in $(basename "$fragment") is set as asked"

# --- 5. build + install ----------------------------------------------------------------------------
jobs=${SUPERMACHINE_KERNEL_JOBS:-$(nproc)}
log "make -j$jobs $target (several minutes)"
kmake -j"$jobs" "$target" >&2

mkdir -p "$staging"
cp "$src/$product" "$staging/$image"
cp "$src/.config" "$staging/config"
{
    echo "key=$key"
    echo "arch=$guest_arch"
    echo "linux_source_version=$src_version"
    echo "kernelrelease=$(make -s --no-print-directory -C "$src" ARCH="$arch" "${cross[@]}" kernelrelease 2>/dev/null || true)"
    echo "patches=$(for p in "${patches[@]}"; do basename "$p"; done | paste -sd, -)"
    echo "build_seconds=$((SECONDS - start))"
    echo "jobs=$jobs"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$staging/build-info"

# Atomic install: the key directory appears complete or not at all.
if ! mv -T "$staging" "$dest" 2>/dev/null; then
    [[ -f $dest/$image ]] || die "could not install into $dest"
    log "$dest appeared meanwhile; keeping it"
fi
log "built in $((SECONDS - start)) s: $dest/$image ($(stat -c %s "$dest/$image") bytes)"
echo "$dest/$image" >&3
