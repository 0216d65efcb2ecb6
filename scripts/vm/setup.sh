#!/usr/bin/env bash
# Prepares everything scripts/vm/run.sh needs to boot the ublk test guest:
# the host packages (qemu, static busybox, cpio, xz, kmod, fio, jq), Debian's 6.12
# kernel (bookworm-backports on bookworm) unpacked into a cache, and a
# busybox initramfs holding that kernel's ublk, loop, ext4 and 9p modules.
#
# Usage: scripts/vm/setup.sh [--refresh] [--quiet]
#   --refresh  apt-get update and move to the newest 6.12 kernel available
#   --quiet    print nothing when everything is already in place
#
# Idempotent: a second run does no network access and rebuilds nothing
# unless this script, guest-init.sh or the kernel changed. Must run as root.
# Cache: ${REPLBLK_VM_CACHE:-/var/cache/replblk-vm}
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${REPLBLK_VM_CACHE:-/var/cache/replblk-vm}
refresh=0
quiet=0
for arg in "$@"; do
    case $arg in
        --refresh) refresh=1 ;;
        --quiet) quiet=1 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { [ "$quiet" = 1 ] || echo "setup.sh: $*" >&2; }
die() { echo "setup.sh: error: $*" >&2; exit 1; }
# Runs a command with its output kept aside, shown only if it fails.
logged() {
    local out rc=0
    out=$(mktemp)
    "$@" > "$out" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        cat "$out" >&2
        rm -f "$out"
        die "failed ($rc): $*"
    fi
    rm -f "$out"
}

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, /var/cache)"

# Modules the initramfs loads, by name; their dependencies come from
# modules.dep. crc32c_generic is not a dependency of ext4 in modules.dep
# (ext4 asks the crypto API for "crc32c" at mount time), so it is listed.
# REPLBLK_VM_EXTRA_MODULES adds more (space separated).
wanted_modules="virtio_rng netfs 9pnet 9pnet_virtio 9p loop ublk_drv crc32c_generic ext4 ${REPLBLK_VM_EXTRA_MODULES:-}"

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# shellcheck disable=SC1091  # the host's, not in the repository
. /etc/os-release
codename=${VERSION_CODENAME:-}
apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        logged apt-get update
        apt_updated=1
    fi
}

# --- apt sources: the 6.12 kernel is in bookworm-backports on bookworm ----
if [ "$codename" = bookworm ]; then
    if ! grep -Eqs "^[^#]*bookworm-backports" /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
        log "adding bookworm-backports to the apt sources"
        echo "deb http://deb.debian.org/debian bookworm-backports main" \
            > /etc/apt/sources.list.d/replblk-bookworm-backports.list
        apt_updated=0
        refresh=1
    fi
fi

# --- host packages ---------------------------------------------------------
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v xz >/dev/null || missing+=(xz-utils)
command -v depmod >/dev/null || missing+=(kmod)
# fio and jq for scripts/fio/run.sh, which the guest runs from the host's root.
command -v fio >/dev/null || missing+=(fio)
command -v jq >/dev/null || missing+=(jq)
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    others=()
    for p in "${missing[@]}"; do [ "$p" = qemu-system-x86 ] || others+=("$p"); done
    if [ ${#others[@]} -gt 0 ]; then
        log "installing ${others[*]}"
        logged env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${others[@]}"
    fi
    if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
        # qemu-utils may already be installed from backports (it is on this
        # project's machines); qemu-system-x86 from plain bookworm then
        # conflicts with it, so take the very same version.
        qv=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
        if [ -n "$qv" ] && dpkg-query -W -f='${Status}' qemu-utils | grep -q 'ok installed'; then
            target=()
            [[ $qv == *bpo* && -n $codename ]] && target=(-t "$codename-backports")
            log "installing qemu-system-x86=$qv (matching qemu-utils)"
            logged env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                "${target[@]}" "qemu-system-x86=$qv"
        else
            log "installing qemu-system-x86"
            logged env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86
        fi
    fi
fi
[ -x /bin/busybox ] || die "/bin/busybox missing after installing busybox-static"

# The guest binds the kernel's module tree onto the host's /lib/modules so
# that modprobe works in it; the mount point must exist on the host.
[ -d /lib/modules ] || mkdir -p /lib/modules

# --- kernel ----------------------------------------------------------------
kdir=""
if [ "$refresh" = 0 ] && [ -f "$cache/current/vm.env" ]; then
    kdir=$(readlink -f "$cache/current")
fi
if [ -z "$kdir" ]; then
    apt_update
    debnum=${VERSION_ID:-12}
    pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$' \
        | awk '{print $1}' | grep -E "\+deb${debnum}-amd64-unsigned$" | sort -V | tail -n 1 || true)
    [ -n "$pkg" ] || die "apt-cache search finds no linux-image-6.12.*+deb${debnum}-amd64-unsigned (check the apt sources)"
    ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    kdir="$cache/kernels/${pkg}_${ver}"
    if [ ! -f "$kdir/unpacked" ]; then
        log "downloading $pkg $ver"
        rm -rf "$kdir"
        mkdir -p "$kdir/dl"
        # apt's _apt user must be able to write the download directory.
        chown _apt "$kdir/dl" 2>/dev/null || true
        (cd "$kdir/dl" && logged apt-get download "$pkg=$ver")
        log "unpacking $pkg"
        dpkg -x "$kdir"/dl/*.deb "$kdir/root"
        rm -rf "$kdir/dl"
        touch "$kdir/unpacked"
    fi
fi

modtree=""
for d in "$kdir/root/lib/modules" "$kdir/root/usr/lib/modules"; do
    [ -d "$d" ] && modtree=$d
done
[ -n "$modtree" ] || die "no lib/modules in $kdir/root"
kver=$(ls "$modtree")
[ "$(echo "$kver" | wc -l)" = 1 ] || die "expected one kernel version in $modtree, found: $kver"
vmlinuz="$kdir/root/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || die "missing $vmlinuz"

# Debian's package does not ship modules.dep (its postinst runs depmod).
if [ ! -s "$modtree/$kver/modules.dep" ]; then
    log "depmod $kver"
    logged depmod -b "${modtree%/lib/modules}" "$kver"
fi

# --- initramfs -------------------------------------------------------------
stamp=$( {
    cat "$here/setup.sh" "$here/guest-init.sh" /bin/busybox
    echo "$kver $wanted_modules $modtree"
} | sha256sum | cut -d' ' -f1)
if [ "$(cat "$kdir/initramfs.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -f "$kdir/initramfs.cpio" ]; then
    log "building the initramfs for $kver"
    dep="$modtree/$kver/modules.dep"
    builtin="$modtree/$kver/modules.builtin"
    declare -A path_of=() deps_of=() done_mod=()
    while IFS= read -r line; do
        file=${line%%:*}
        name=$(basename "$file"); name=${name%%.ko*}; name=${name//-/_}
        path_of[$name]=$file
        deps_of[$name]=${line#*:}
    done < "$dep"
    order=()
    add_module() {
        local name=${1//-/_} d dn
        [ -n "${done_mod[$name]:-}" ] && return 0
        if [ -z "${path_of[$name]:-}" ]; then
            if grep -Eq "/${name//_/[-_]}\.ko$" "$builtin" 2>/dev/null; then
                done_mod[$name]=builtin
                return 0
            fi
            die "module $name is neither in modules.dep nor built in"
        fi
        for d in ${deps_of[$name]}; do
            dn=$(basename "$d"); dn=${dn%%.ko*}
            add_module "$dn"
        done
        done_mod[$name]=1
        order+=("$name")
    }
    for m in $wanted_modules; do add_module "$m"; done

    stage=$(mktemp -d "$kdir/stage.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,sbin,etc,modules,proc,sys,dev,ctl,newroot}
    cp /bin/busybox "$stage/bin/busybox"
    install -m 755 "$here/guest-init.sh" "$stage/init"
    for name in "${order[@]}"; do
        src="$modtree/$kver/${path_of[$name]}"
        case $src in
            *.xz) xz -dc "$src" > "$stage/modules/$name.ko" ;;
            *.zst) zstd -qdc "$src" > "$stage/modules/$name.ko" ;;
            *.gz) gzip -dc "$src" > "$stage/modules/$name.ko" ;;
            *) cp "$src" "$stage/modules/$name.ko" ;;
        esac
        echo "$name" >> "$stage/modules/order"
    done
    {
        echo "KVER='$kver'"
        echo "MODTREE='$modtree'"
    } > "$stage/etc/replblk-vm.conf"
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
        > "$kdir/initramfs.cpio.tmp"
    mv "$kdir/initramfs.cpio.tmp" "$kdir/initramfs.cpio"
    rm -rf "$stage"
    trap - EXIT
    echo "$stamp" > "$kdir/initramfs.stamp"
    log "modules: ${order[*]}"
fi

cat > "$kdir/vm.env.tmp" <<EOF
KVER='$kver'
VMLINUZ='$vmlinuz'
INITRD='$kdir/initramfs.cpio'
EOF
mv "$kdir/vm.env.tmp" "$kdir/vm.env"
if [ "$(readlink -f "$cache/current" 2>/dev/null)" != "$kdir" ]; then
    ln -sfn "$kdir" "$cache/current.tmp"
    mv -T "$cache/current.tmp" "$cache/current"
    # Drop kernels that are no longer current.
    for old in "$cache"/kernels/*; do
        [ "$old" = "$kdir" ] || { log "removing $old"; rm -rf "$old"; }
    done
fi
log "ready: kernel $kver, cache $kdir"
