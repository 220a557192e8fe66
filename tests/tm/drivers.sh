# OpenNebula TM and datastore driver actions, reduced to their SSH traffic, for tests/tm_replay.rs.
# Each function takes the arguments oned gives the driver (SRC DST VMID DSID ...); what the real
# driver reads from `onevm show` (SPARSE, FORMAT, ...) comes from the environment. The command
# lines, the scripts sent to `bash -s` and the stream handling follow the drivers named in each
# comment (OpenNebula 6.x bash `ssh` TM, 7.x Ruby `local` TM, `fs_lvm_ssh`, `common/context`,
# `tm_cache.rb`, datastore `fs/cp`); see lib.sh for the helpers and for what differs.

# host name -> that host's root in the tests
host_root() {
    case $1 in
    fe) echo "$FE_ROOT" ;;
    hv) echo "$HV_ROOT" ;;
    esac
}

# "the same path on both hosts": paths compared without the per-host root
same_dir() {
    [ "${2#$(host_root "$1")}" = "${4#$(host_root "$3")}" ]
}

# ---- 6.x bash `ssh` TM ------------------------------------------------------------------------

# ssh/clone (ssh/ln is a symlink to it): runs on the source host (fe) with the agent forwarded,
# tar | nested ssh to the destination host
tm_ssh_clone() {
    local SRC=$1 DST=$2
    SRC_PATH=$(arg_path "$SRC")
    DST_PATH=$(arg_path "$DST")
    SRC_PATH_SNAP="${SRC_PATH}.snap"
    SRC_HOST=$(arg_host "$SRC")
    DST_HOST=$(arg_host "$DST")
    SRC_FILE=$(basename "$SRC_PATH")
    DST_FILE=$(basename "$DST_PATH")
    SRC_DIR=$(dirname "$SRC_PATH")
    DST_DIR=$(dirname "$DST_PATH")

    ssh_make_path "$DST_HOST" "$DST_DIR"
    enable_local_monitoring "$DST_HOST" "$DST_DIR" "ssh"

    log "Cloning $SRC_PATH in $DST_PATH"

    COPY_CMD=$(cat <<EOF
    set -e -o pipefail

    if [ -d "${SRC_PATH_SNAP}" ]; then
        SRC_SNAP="${SRC_FILE}.snap"
    fi

    if [[ "${SPARSE}" =~ ^(no|NO)$ ]]; then
        $TAR -C $SRC_DIR --transform="flags=r;s|$SRC_FILE|$DST_FILE|" -cf - $SRC_FILE \$SRC_SNAP | \\
            $RSSH $DST_HOST "$TAR -xf - -C $DST_DIR"
    else
        $TAR -C $SRC_DIR --transform="flags=r;s|$SRC_FILE|$DST_FILE|" -cSf - $SRC_FILE \$SRC_SNAP | \\
            $RSSH $DST_HOST "$TAR -xSf - -C $DST_DIR"
    fi
EOF
)
    ssh_forward ssh_exec_and_log "$SRC_HOST" "$COPY_CMD" "Error copying $SRC_PATH to $DST"
}

# ssh/mv: stop/undeploy (hv -> fe) and resume (fe -> hv)
tm_ssh_mv() {
    local SRC DST
    SRC=$(fix_dir_slashes "$1")
    DST=$(fix_dir_slashes "$2")
    SRC_PATH=$(arg_path "$SRC")
    DST_PATH=$(arg_path "$DST")
    SRC_HOST=$(arg_host "$SRC")
    DST_HOST=$(arg_host "$DST")
    SRC_DIR=$(dirname "$SRC_PATH")
    DST_DIR=$(dirname "$DST_PATH")
    SRC_DS_DIR=$(dirname "$SRC_PATH")
    SRC_VM_DIR=$(basename "$SRC_PATH")

    MONITOR_CMD=$(cat <<EOF
if [ -r '${SRC_DIR}/.monitor' ]; then
    cat '${SRC_DIR}/.monitor' 2>/dev/null || :
fi
EOF
)
    MONITOR=$(ssh_monitor_and_log "$SRC_HOST" "$MONITOR_CMD" 'Get .monitor')

    ssh_make_path "$DST_HOST" "$DST_DIR"
    enable_local_monitoring "$DST_HOST" "$DST_DIR" "$MONITOR"

    # the driver tests SRC_DIR == DST_DIR: the same path on two hosts
    if same_dir "$SRC_HOST" "$SRC_DIR" "$DST_HOST" "$DST_DIR"; then
        RANDOM_FILE=$($SSH "$DST_HOST" "mktemp -p \"$DST_DIR\"")
        trap "$SSH $DST_HOST \"rm -f $RANDOM_FILE\"" EXIT
        # (the same path seen from the source host)
        SRC_VIEW=$(host_root "$SRC_HOST")${RANDOM_FILE#$(host_root "$DST_HOST")}
        if $SSH "$SRC_HOST" "test -f $SRC_VIEW"; then
            log "Not moving $SRC to $DST, they are the same path"
            exit 0
        fi
    fi

    log "Moving $SRC to $DST"

    ssh_exec_and_log "$DST_HOST" "rm -rf '$DST_PATH'" \
        "Error removing target path to prevent overwrite errors"

    TAR_SSH=$(cat <<EOF
set -e -o pipefail

$TAR -C $SRC_DS_DIR --sparse -cf - $SRC_VM_DIR | $RSSH $DST_HOST '$TAR -C $DST_DIR --sparse -xf -'
rm -rf $SRC_PATH
EOF
)
    ssh_forward ssh_exec_and_log "$SRC_HOST" "$TAR_SSH" "Error copying disk directory to target host"
    exit 0
}

# ssh/mvds: save a disk of a VM whose files are on fe back to the image datastore (local epilog)
tm_ssh_mvds() {
    local SRC=$1 DST=$2
    SRC_PATH=$(arg_path "$SRC")
    DST_PATH=$(arg_path "$DST")
    SRC_HOST=$(arg_host "$SRC")
    DST_HOST=$(arg_host "$DST")
    SRC_PATH_SNAP="${SRC_PATH}.snap"
    DST_SNAP="${DST}.snap"
    SRC_FILE=$(basename "$SRC_PATH")
    DST_FILE=$(basename "$DST_PATH")
    DST_DIR=$(dirname "$DST_PATH")
    SRC_DIR=$(dirname "$SRC_PATH")

    CONVERT_CMD=$(cat <<EOF
   if [ -L "$SRC_PATH" ]; then
       $QEMU_IMG convert -O qcow2 $SRC_PATH $SRC_PATH.full

       rm -f $SRC_PATH

       if [ -e $SRC_PATH_SNAP/base ]; then
           rm -f $SRC_PATH_SNAP/base $SRC_PATH_SNAP/base.1 $SRC_PATH_SNAP/rs_tmp

           if [ "\$(ls $SRC_PATH_SNAP)" = "${SRC_FILE}.snap" ]; then
               rm -f $SRC_PATH_SNAP/${SRC_FILE}.snap
           fi

           rmdir $SRC_PATH_SNAP
       elif [ -d $SRC_PATH_SNAP ]; then
           rm -rf $SRC_PATH_SNAP
       fi

       mv $SRC_PATH.full $SRC_PATH
   fi
EOF
)
    ssh_exec_and_log "$SRC_HOST" "$CONVERT_CMD" "Error converting $SRC to standalone image"

    log "Moving $SRC to datastore as $DST_PATH"

    if [ "$(fix_dir_slashes "$DST_HOST")" != "$DST_PATH" ]; then
        COPY_CMD=$(cat <<EOF
        set -e -o pipefail
        $TAR -C $SRC_DIR --transform="flags=r;s|$SRC_FILE|$DST_FILE|" -cSf - $SRC_FILE | \\
            $RSSH $DST_HOST "$TAR -xSf - -C $DST_DIR"
EOF
)
        ssh_forward ssh_exec_and_log "$SRC_HOST" "$COPY_CMD" \
            "Error copying $SRC to $DST_HOST:$DST_PATH"
    else
        REMOTE_CMD=$(cat <<EOF
        set -e -o pipefail
        $SSH $SRC_HOST "$TAR -C $SRC_DIR --transform=\"flags=r;s|$SRC_FILE|$DST_FILE|\" -cSf - $SRC_FILE" | \\
            $TAR -xSf - -C $DST_DIR
EOF
)
        multiline_exec_and_log "$REMOTE_CMD" "Error copying $SRC to $DST_PATH"
    fi

    if $SSH $SRC_HOST ls ${SRC_PATH_SNAP} >/dev/null 2>&1; then
        exec_and_log "rsync -r --delete ${SRC_HOST}:${SRC_PATH_SNAP}/ ${DST_SNAP}"
    fi

    rm -f ${DST}.md5sum
    exit 0
}

# ssh/cpds with a powered-off/stopped VM: export a qcow2 chain first (rc 42), then tar on stdout
tm_ssh_cpds() {
    SRC=$1
    DST=$2
    SNAP_ID=$3
    [ "${SNAP_ID}" != "-1" ] && SRC="${SRC}.snap/${SNAP_ID}"
    set_src_dst_vars() {
        SRC_PATH=$(arg_path "$SRC")
        DST_PATH=$(arg_path "$DST")
        SRC_HOST=$(arg_host "$SRC")
        DST_HOST=$(arg_host "$DST")
        SRC_FILE=$(basename "$SRC_PATH")
        DST_FILE=$(basename "$DST_PATH")
        SRC_DIR=$(dirname "$SRC_PATH")
        DST_DIR=$(dirname "$DST_PATH")
    }
    set_src_dst_vars
    SRC_TEMP_PATH="$(mktemp -u "${SRC_PATH}.XXXXXXXX")"

    CPDS_CMD_EXPORT=$(cat <<EOF
        set -e -o pipefail
        if [ -L $SRC_PATH ] && file -L $SRC_PATH | grep -q 'has backing file'; then
            $QEMU_IMG convert -O qcow2 $SRC_PATH $SRC_TEMP_PATH;
            exit 42;
        fi
EOF
)
    CPDS_CMD_ERR="Error creating export for disk at ${SRC_TEMP_PATH}"
    ssh_exec_and_log_no_error $SRC_HOST "$CPDS_CMD_EXPORT" "$CPDS_CMD_ERR" "100"
    RC=$?
    if [ $RC = 0 ]; then
        true
    elif [ $RC = 42 ]; then
        SRC="${SRC_HOST}:${SRC_TEMP_PATH}"
        set_src_dst_vars
        trap "ssh_exec_and_log $SRC_HOST \"$RM ${SRC_TEMP_PATH}\"" EXIT
    else
        error_message "cpds: Can not convert qcow2 chain $SRC_PATH"
        exit 1
    fi

    log "Moving $SRC to datastore as $DST_PATH"

    REMOTE_CMD=$(cat <<EOF
        set -e -o pipefail
        $SSH $SRC_HOST "$TAR -C $SRC_DIR --transform=\"flags=r;s|$SRC_FILE|$DST_FILE|\" -cSf - $SRC_FILE" | \\
            $TAR -xSf - -C $DST_DIR
EOF
)
    multiline_exec_and_log "$REMOTE_CMD" "Error copying $SRC to $DST_PATH"
    exit 0
}

# ssh/delete (= common/delete): rm -rf with up to ten tries
tm_ssh_delete() {
    DST_PATH=$(arg_path "$1")
    DST_HOST=$(arg_host "$1")
    log "Deleting $DST_PATH"
    delete_file=$(cat <<EOF
[ -e "$DST_PATH" ] || exit 0

times=10
function="rm -rf $DST_PATH"

count=1

ret=\$(\$function)
error=\$?

while [ \$count -lt \$times -a "\$error" != "0" ]; do
    sleep 1
    count=\$(( \$count + 1 ))
    ret=\$(\$function)
    error=\$?
done

[ "x\$error" = "x0" ]
EOF
)
    ssh_exec_and_log $DST_HOST "$delete_file" "Error deleting $DST_PATH"
}

# common/context: ISO made locally with xorriso, copied by tar to the VM's host
tm_context() {
    local args=("$@") n=$#
    DST=${args[n - 3]}
    local SRC=("${args[@]:0:n-3}")
    DST_PATH=$(arg_path "$DST")
    DST_HOST=$(arg_host "$DST")
    DST_DIR=$(dirname "$DST_PATH")
    DST_FILE=$(basename "$DST_PATH")

    ssh_make_path "$DST_HOST" "$DST_DIR"
    log "Generating context block device at $DST"

    VM_ID=$(basename "$DST_DIR")
    ISO_DIR="$FE_DS/.isofiles/$VM_ID"
    ISO_FILE="$VM_ID.iso"
    ISO_PATH="$ISO_DIR/$ISO_FILE"

    exec_and_log "rm -rf $ISO_DIR" "Could not delete temp. to make context dev"
    exec_and_log "mkdir -p $ISO_DIR" "Could not create temp. dir to make context dev"
    for f in "${SRC[@]}"; do
        exec_and_log "cp -R $f $ISO_DIR/" "Error copying $f to $ISO_DIR"
    done
    # test only: fixed dates so that the two runs build byte-identical ISOs
    find "$ISO_DIR" -exec touch -h -d @"$SOURCE_DATE_EPOCH" {} +

    MKCONTEXT_CMD=$(cat <<EOF
    set -e -o pipefail
    xorriso -as mkisofs -o $ISO_PATH.tmp -V CONTEXT -J -R $ISO_DIR
    mv $ISO_PATH.tmp $ISO_PATH
EOF
)
    multiline_exec_and_log "$MKCONTEXT_CMD" "Error creating iso fs"

    COPY_CMD=$(cat <<EOF
    set -e -o pipefail
    $TAR -C $ISO_DIR --transform="flags=r;s|$ISO_FILE|$DST_FILE|" -cSf - $ISO_FILE | \\
        $SSH $DST_HOST "$TAR -xSf - -C $DST_DIR"
EOF
)
    multiline_exec_and_log "$COPY_CMD" "Error copying context ISO to $DST"
    rm -rf $ISO_DIR >/dev/null 2>&1
    exit 0
}

# fs_lvm_ssh/clone: runs on the hypervisor (agent forwarded), which pulls the image from fe with
# `ssh -n fe "tar -cSO <path> 2> /dev/null"` into the LV ($DEV is a file here; thin-LV branch)
tm_fs_lvm_ssh_clone() {
    local SRC=$1 DST=$2 VM_ID=$3
    DST_PATH=$(arg_path "$DST")
    DST_HOST=$(arg_host "$DST")
    DST_DIR=$(dirname "$DST_PATH")
    SRC_PATH=$(arg_path "$SRC")
    SRC_HOST=$(arg_host "$SRC")
    DS_SYS_ID=$(echo $DST_DIR | awk -F '/' '{print $(NF-1)}')
    DISK_ID=$(basename ${DST_PATH} | cut -d. -f2)

    disable_local_monitoring $DST_HOST $DST_DIR

    LV_NAME="lv-one-$VM_ID-$DISK_ID"
    VG_NAME="vg-one-$DS_SYS_ID"
    DEV="$(host_root "$DST_HOST")/dev/${VG_NAME}/${LV_NAME}"

    CLONE_CMD=$(cat <<EOF
    set -e -o pipefail
    mkdir -p $DST_DIR

    hostname -f >"${DST_DIR}/.host" || :

    rm -f "$DST_PATH"
    ln -s "$DEV" "$DST_PATH"

    $RSSH -n $SRC_HOST "$TAR -cSO $SRC_PATH 2> /dev/null" | $TAR -xO 2> /dev/null > "$DEV"
EOF
)
    ssh_forward ssh_exec_and_log "$DST_HOST" "$CLONE_CMD" "Error cloning $SRC_PATH to $LV_NAME"
    exit 0
}

# datastore fs/cp with the front-end in BRIDGE_LIST: the image goes to fe on stdin of
# `dd of=<tmp> bs=64k conv=sparse`, is moved into place, converted, and its format read back
ds_fs_cp() {
    local SRC=$1 DST_HOST=$2 DST=$3 DRIVER=$4 IMAGE_HASH
    IMAGE_HASH=$(basename "$DST")
    BASE_PATH=$(dirname "$DST")
    STAGING_DIR=$(host_root "$DST_HOST")/var/tmp
    TMP_DST="$STAGING_DIR/$IMAGE_HASH"
    COPY_COMMAND="cat $SRC"

    ssh_exec_and_log "$DST_HOST" "mkdir -p \"$BASE_PATH\"" "Error setting up NFS mount"
    log "Copying local image $SRC to the image repository"

    CONVERT_CMD=$(cat <<EOF
    set -e -o pipefail
    FORMAT=\$($QEMU_IMG info $DST | grep "^file format:" | awk '{print \$3}' || :)

    if [ "x$DRIVER" = 'xqcow2' ] || [ "x$DRIVER" = 'xraw' ]; then
        if [ -n "\$FORMAT" ] && [ "\$FORMAT" != "$DRIVER" ] && [ "\$FORMAT" != "luks" ]; then
            $QEMU_IMG convert -O $DRIVER $DST $DST.tmp
            mv $DST.tmp $DST
        fi
    fi
EOF
)
    multiline_exec_and_log "set -e -o pipefail; $COPY_COMMAND | $SSH $DST_HOST $DD of=$TMP_DST bs=${DD_BLOCK_SIZE:-64k} conv=sparse" \
        "Error dumping $SRC to $DST_HOST:$TMP_DST"
    ssh_exec_and_log "$DST_HOST" "set -e -o pipefail; mkdir -p $BASE_PATH; mv -f $TMP_DST $DST" \
        "Error moving $TMP_DST to $DST in $DST_HOST"
    ssh_exec_and_log "$DST_HOST" "$CONVERT_CMD" "Error converting $DST in $DST_HOST"
    FORMAT=$(ssh_monitor_and_log $DST_HOST "set -e -o pipefail; $QEMU_IMG info $DST | grep \"^file format:\" | awk '{print \$3}'")
    if [ $? -ne 0 ] || [ -z "${FORMAT}" ]; then
        error_message "$FORMAT"
        exit 255
    fi
    echo "$DST $FORMAT"
}

# ---- 7.x Ruby `local` TM ----------------------------------------------------------------------

# Location#dir/#base/#path of "host:path"
loc() {
    L_HOST=$(arg_host "$1")
    L_PATH=$(echo "$1" | sed -r 's/^[^:]*:(.*)$/\1/')
    L_DIR=$(dirname "$L_PATH")
    L_BASE=$(basename "$L_PATH")
}

rb_make_dst_path() {
    local vmdir
    vmdir=$(dirname "$2")
    rb_ssh "$1" "$(printf 'set -e -o pipefail\n\nif [ ! -d %s ]; then\n    mkdir -p '\''%s'\''\nfi\n' "$vmdir" "$vmdir")" \
        nostdout nostderr "err=Error creating directory $1:$2" || exit $?
}

rb_enable_local_monitoring() {
    local dsdir
    dsdir=$(dirname "$(dirname "$2")")
    rb_ssh "$1" "$(cat <<EOS
set -e -o pipefail

MONITOR_FN="$dsdir/.monitor"

# create or update .monitor content
MONITOR=''
if [ -f "\${MONITOR_FN}" ]; then
    MONITOR="\$(cat "\${MONITOR_FN}" 2>/dev/null)"
fi

if [ "x\${MONITOR}" != "x$3" ]; then
    echo "$3" > "\${MONITOR_FN}"
fi
EOS
)" nostdout nostderr "err=Error creating $dsdir/.monitor at $1"
}

rb_host_fingerprint() {
    rb_ssh "$1" "$(cat <<'EOF'
{
  cat /etc/machine-id;
  ip --br l | awk '{print $1, $3}';
} |
    sha256sum |
    awk '{print $1}'
EOF
)" 'err=Compute VM fingerprint'
}

# local/clone (local/ln is a symlink to it): raw runs on fe (tar | nested ssh to the host);
# qcow2 runs on the host, which pulls with `ssh -n fe "<multi-line script>" | tar -x`
tm_local_clone() {
    loc "$1"; S_HOST=$L_HOST; S_PATH=$L_PATH; S_DIR=$L_DIR; S_BASE=$L_BASE
    loc "$2"; D_HOST=$L_HOST; D_PATH=$L_PATH; D_DIR=$L_DIR; D_BASE=$L_BASE
    local disk_id=${D_BASE##*.} tar_opt=Sf script host
    [[ "${SPARSE:-yes}" =~ ^(no|NO)$ ]] && tar_opt=f

    rb_make_dst_path "$D_HOST" "$D_PATH"
    rb_enable_local_monitoring "$D_HOST" "$D_PATH" ssh
    log "Cloning $S_PATH to $D_PATH"

    case ${FORMAT:-raw} in
    raw)
        host=$S_HOST
        script=$(cat <<SCRIPT
set -e -o pipefail

if [ -d "$S_PATH.snap" ]; then
    SRC_SNAP="$S_BASE.snap"
fi

tar -C $S_DIR --transform='flags=r;s|$S_BASE|$D_BASE|' -c$tar_opt - $S_BASE \$SRC_SNAP | \\
    $RSSH $D_HOST "tar -x$tar_opt - -C $D_DIR"
SCRIPT
)
        ;;
    qcow2)
        host=$D_HOST
        script=$(cat <<SCRIPT
set -e -o pipefail

pushd $D_DIR > /dev/null
rm -rf $D_PATH $D_PATH.snap

$RSSH -n $S_HOST "
    if [ -d '$S_PATH.snap' ]; then
        SRC_SNAP='$S_BASE.snap'
    fi

    tar -C $S_DIR --transform='flags=r;s|$S_BASE|$D_BASE|' \\
        -c$tar_opt - $S_BASE \\\$SRC_SNAP" \\
| tar -x$tar_opt - -C $D_DIR

if [ -L '$D_PATH' ] && [ -d '$D_PATH.snap' ]; then
    PREVIOUS_SNAP="\$(readlink "$D_PATH" | xargs basename)"
    ln -sf disk.$disk_id.snap/\$PREVIOUS_SNAP disk.$disk_id
elif [ -f '$D_PATH' ] && [ ! -e '$D_PATH.snap' ]; then
    mkdir '$D_PATH.snap'
    mv '$D_PATH' '$D_PATH.snap/0'
    ln -s '$D_BASE.snap/0' '$D_PATH'
else
    echo 'Invalid qcow2 directory structure' >&2
    exit 1
fi

popd
SCRIPT
)
        ;;
    esac
    rb_ssh "$host" "$script" forward \
        "err=copying $1 to $2 from $host (format: ${FORMAT:-raw})"
    exit $?
}

# local/mv
tm_local_mv() {
    loc "$1"; S_HOST=$L_HOST; S_PATH=$L_PATH; S_DIR=$L_DIR; S_BASE=$L_BASE
    loc "$2"; D_HOST=$L_HOST; D_PATH=$L_PATH; D_DIR=$L_DIR
    local monitor rc
    # rc.stdout keeps its trailing newline
    monitor=$(
        rb_ssh "$S_HOST" "$(cat <<EOF
if [ -r '$S_DIR/.monitor' ]; then
    cat '$S_DIR/.monitor' 2>/dev/null || true
fi
EOF
)" 'err=Get .monitor'
        rc=$?
        echo x
        exit $rc
    ) || exit $?
    monitor=${monitor%x}

    rb_make_dst_path "$D_HOST" "$D_PATH"
    [ -n "$monitor" ] && rb_enable_local_monitoring "$D_HOST" "$D_PATH" "$monitor"

    if same_dir "$S_HOST" "$S_DIR" "$D_HOST" "$D_DIR"; then
        # Both fingerprints are computed as the driver does; here the hosts share one machine, so
        # they are equal, and the driver would skip the move: they are logged instead.
        log "fingerprint $S_HOST: $(rb_host_fingerprint "$S_HOST")"
        log "fingerprint $D_HOST: $(rb_host_fingerprint "$D_HOST")"
    fi

    log "Moving $1 to $2"
    rb_ssh "$S_HOST" "$(cat <<EOF
set -e -o pipefail

tar -C '$S_DIR' --sparse -cf - '$S_BASE' |
    $RSSH '$D_HOST' '
      rm -rf '$D_PATH';
      tar -C $D_DIR --sparse -xf -;
    '
rm -rf '$S_PATH'
EOF
)" forward 'err=Error copying disk directory to target host'
    exit $?
}

# local/mvds: tar on stdout of `ssh fe "tar ... -cSf - <disk>"`, then for qcow2
# `rsync -r --delete fe:<disk>.snap/ <dst>.snap`
tm_local_mvds() {
    loc "$1"; S_HOST=$L_HOST; S_DIR=$L_DIR; S_BASE=$L_BASE
    loc "$2"; D_PATH=$L_PATH; D_DIR=$L_DIR; D_BASE=$L_BASE
    log "Moving $1 to datastore as $D_PATH"
    rb_run_sh "$(cat <<SCRIPT
set -e -o pipefail
$SSH $S_HOST "tar -C $S_DIR --transform='flags=r;s|$S_BASE|$D_BASE|' -cSf - $S_BASE" | tar -xSf - -C $D_DIR
SCRIPT
)" || exit $?
    [ "${FORMAT:-raw}" = raw ] && exit 0
    rb_run_sh "$(cat <<EOF
rsync -r --delete $1.snap/ $2.snap

if [ -L '$D_PATH' ] && [ -d '$D_PATH.snap' ]; then
    PREVIOUS_SNAP="\$(readlink "$D_PATH" | xargs basename)"
    ln -sf $D_BASE.snap/\$PREVIOUS_SNAP $D_PATH
elif [ -f '$D_PATH' ] && [ ! -e '$D_PATH.snap' ]; then
    true
else
    echo 'Invalid qcow2 directory structure' >&2
    exit 1
fi
EOF
)"
    exit $?
}

# local/cpds, powered-off VM: export with rc 42, tar -chSf on stdout, rm of the export
tm_local_cpds() {
    local src=$1 snap=$3 tmp rc
    [ "$snap" != -1 ] && src="$src.snap/$snap"
    loc "$src"; S_HOST=$L_HOST; S_PATH=$L_PATH
    loc "$2"; D_DIR=$L_DIR; D_BASE=$L_BASE
    tmp=$(mktemp -u "$S_PATH.XXXXXXXX")
    rb_ssh "$S_HOST" "$(cat <<SCRIPT
set -e -o pipefail
if [ -L "$S_PATH" ] && file -L "$S_PATH" | grep -q 'has backing file'; then
    qemu-img convert -O qcow2 "\$(readlink -f "$S_PATH")" "$tmp";
    exit 42;
fi
SCRIPT
)" ok_rc=42 "err=Error creating export of disk"
    rc=$?
    if [ $rc != 0 ] && [ $rc != 42 ]; then
        log_error "cpds: Cannot export disk ($S_PATH) for saving"
        exit 1
    fi
    [ $rc = 42 ] && loc "$S_HOST:$tmp"
    log "Moving $L_HOST:$L_PATH to datastore as $2"
    rb_run_sh "$(cat <<SCRIPT
set -e -o pipefail
$SSH $L_HOST "tar -C $L_DIR --transform='flags=r;s|$L_BASE|$D_BASE|' -chSf - $L_BASE" | tar -xSf - -C $D_DIR
SCRIPT
)"
    rc=$?
    if [ -n "$tmp" ] && [ "$L_PATH" = "$tmp" ]; then
        rb_ssh "$S_HOST" "rm $tmp" "err=Error deleting $tmp"
    fi
    exit $rc
}

# local/delete
tm_local_delete() {
    loc "$1"
    log "Deleting $L_PATH"
    rb_ssh "$L_HOST" "$(cat <<SCRIPT
[ -e "$L_PATH" ] || exit 0

times=10
function="rm -rf $L_PATH"

count=1

ret=\$(\$function)
error=\$?

while [ \$count -lt \$times -a "\$error" != "0" ]; do
    sleep 1
    count=\$(( \$count + 1 ))
    ret=\$(\$function)
    error=\$?
done

[ "x\$error" = "x0" ]
SCRIPT
)" "err=Error deleting $L_PATH"
    exit $?
}

# tm_cache.rb (7.x, CACHE_ENABLE=YES): oned asks the host (agent forwarded) to fill its cache,
# the host fetches `scp -o ControlMaster=no -o ControlPath=none fe:<path> <cache>/<id>` and prints
# the JSON answer. SCP_OPTS="-O" gives what a host with OpenSSH < 9 does (exec `scp -f`).
# (tm_cache.rb drops scp's stderr; here it is kept so that the servers' messages are compared.)
tm_cache_get() {
    local host=$1 fe_src=$2 id=$3 cache
    cache=$(host_root "$host")/var/tmp/one/cache
    rb_ssh "$host" "$(cat <<EOF
mkdir -p $cache
if scp -F $NODE_SSH_CONFIG ${SCP_OPTS:-} -o ControlMaster=no -o ControlPath=none $fe_src $cache/$id; then
    echo '{"src":"$cache/$id","host":"$host"}'
else
    rm -f $cache/$id
fi
EOF
)" forward 'err=Cache lookup failed'
}
