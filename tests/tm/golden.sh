#!/usr/bin/env bash
# Builds the datastore trees of the two hosts used by tests/tm_replay.rs:
#   $1/fe  the front-end (tm-sidecar, or the stock sshd it is compared with), also oned's own files
#   $1/hv  the hypervisor (a stock sshd)
# With $2 = pool, fifteen more stopped VMs (100-114) for the concurrency test.
# Images are made with qemu-img/qemu-io: sparse, 2 GiB apparent size, a few MiB written, with
# deterministic content so that two trees built from this one compare equal.
set -euo pipefail
G=$1
FE=$G/fe
HV=$G/hv
SIZE=2G

# raw image: data at the start, in the middle and at the very end; one allocated all-zero MiB
raw() {
    qemu-img create -q -f raw "$1" $SIZE
    qemu-io -f raw -c "write -q -P 0x5a 0 1M" -c "write -q -P 0xa5 1G 2M" \
        -c "write -q -P 0x3c 2047M 1M" "$1"
    dd if=/dev/zero of="$1" bs=1M seek=512 count=1 conv=notrunc status=none
}

# qcow2 image; "prealloc" makes the file itself 2 GiB apparent (preallocation=metadata), sparse
qcow2() {
    local opts=()
    [ "${2:-}" = prealloc ] && opts=(-o preallocation=metadata)
    qemu-img create -q -f qcow2 "${opts[@]}" "$1" $SIZE
    qemu-io -f qcow2 -c "write -q -P 0x11 0 1M" -c "write -q -P 0x22 1536M 1M" "$1"
}

# qcow2 snapshot chain as OpenNebula keeps it next to a disk:
#   <name> -> <name>.snap/1,  <name>.snap/1 (backing <name>.snap/0),  <name>.snap/<name>.snap -> .
# The base is preallocated (2 GiB sparse file) unless $3 = compact.
chain() {
    local dir=$1 name=$2 base=prealloc
    [ "${3:-}" = compact ] && base=
    mkdir -p "$dir/$name.snap"
    qcow2 "$dir/$name.snap/0" $base
    ln -s . "$dir/$name.snap/$name.snap"
    (cd "$dir/$name.snap" && qemu-img create -q -f qcow2 -b "$name.snap/0" -F qcow2 1 &&
        qemu-io -f qcow2 -c "write -q -P 0x33 64M 1M" 1)
    ln -s "$name.snap/1" "$dir/$name"
}

iso() {
    local src
    src=$(mktemp -d)
    printf 'ONE_VMID="%s"\nETH0_IP="10.0.0.%s"\n' "$2" "$2" > "$src/context.sh"
    touch -d @1700000000 "$src/context.sh" "$src"
    SOURCE_DATE_EPOCH=1700000000 xorriso -as mkisofs -o "$1" -V CONTEXT -J -R "$src" 2>/dev/null
    rm -rf "$src"
}

deployment() {
    printf '<domain type="kvm"><name>one-%s</name></domain>\n' "$2" > "$1"
}

# ---- front-end --------------------------------------------------------------------------------
mkdir -p "$FE/datastores/0" "$FE/datastores/1" "$FE/var/tmp" "$FE/vms"
echo ssh > "$FE/datastores/0/.monitor"

# image datastore 1
I=$FE/datastores/1
raw "$I/3b1c2ad9b2a3e5a3c3f1e0d2c4b5a6f7"                          # raw image
qcow2 "$I/8f5e0c1d3a2b4c6d8e0f1a2b3c4d5e6f"                        # qcow2 image
qcow2 "$I/c0ffee00c0ffee00c0ffee00c0ffee00" prealloc               # qcow2, 2 GiB file
chain "$I" 5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a                        # persistent qcow2 with snapshots
mkdir "$I/3b1c2ad9b2a3e5a3c3f1e0d2c4b5a6f7.snap"                    # raw image with a snapshot
raw "$I/3b1c2ad9b2a3e5a3c3f1e0d2c4b5a6f7.snap/0"
# a stale image snapshot dir that rsync --delete must clean
mkdir -p "$I/77777777777777777777777777777777.snap"
echo stale > "$I/77777777777777777777777777777777.snap/stale"

# stopped/undeployed VMs in system datastore 0
vm_fe() {
    local d=$FE/datastores/0/$1
    mkdir -p "$d"
    deployment "$d/deployment.0" "$1"
    # compact base: the mvds drivers copy .snap dirs with `rsync -r` (no -S), which would write
    # a preallocated 2 GiB base out in full, with any server
    chain "$d" disk.0 compact
    iso "$d/disk.1" "$1"
    raw "$d/disk.2"
    mkdir "$d/disk.2.snap"
    printf 'snapshot of disk.2\n' > "$d/disk.2.snap/0"
    chmod 0640 "$d/disk.2.snap/0"
}
vm_fe 7
vm_fe 8
# fifteen more for the TM pool test (only when asked: they make every reset slower)
if [ "${2:-}" = pool ]; then
    for i in $(seq 100 114); do
        mkdir -p "$FE/datastores/0/$i"
        cp -a "$FE/datastores/0/7/." "$FE/datastores/0/$i/"
        deployment "$FE/datastores/0/$i/deployment.0" "$i"
    done
fi
# what oned puts in the context ISO of VM 9
mkdir -p "$FE/vms/9"
printf 'ONE_VMID="9"\nSSH_PUBLIC_KEY="ssh-ed25519 AAAA oneadmin"\n' > "$FE/vms/9/context.sh"
printf '#!/bin/sh\necho init\n' > "$FE/vms/9/init.sh"
chmod 0755 "$FE/vms/9/init.sh"
# an image being uploaded through the datastore driver
mkdir -p "$FE/upload"
qemu-img create -q -f raw "$FE/upload/small.raw" 256M
qemu-io -f raw -c "write -q -P 0x42 0 1M" -c "write -q -P 0x24 200M 3M" "$FE/upload/small.raw"
qcow2 "$FE/upload/small.qcow2"

# ---- hypervisor -------------------------------------------------------------------------------
mkdir -p "$HV/datastores/0" "$HV/var/tmp/one" "$HV/dev/vg-one-0"
echo ssh > "$HV/datastores/0/.monitor"
vm_hv() {
    local d=$HV/datastores/0/$1
    mkdir -p "$d"
    deployment "$d/deployment.0" "$1"
    raw "$d/disk.0"
    iso "$d/disk.1" "$1"
    chain "$d" disk.2
}
vm_hv 5
vm_hv 6
# stale content the mv drivers must replace
mkdir -p "$HV/datastores/0/7"
echo stale > "$HV/datastores/0/7/leftover"
