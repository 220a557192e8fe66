# Helpers of OpenNebula's bash drivers, rewritten to the same wire shapes (mad/sh/scripts_common.sh,
# tm_mad/tm_common.sh, and the 7.x Ruby TransferManager::Action#ssh / SSHCommand / LocalCommand):
# the same ssh command lines, the same scripts on stdin, the same stream captures and exit codes.
# Sourced by tests/tm_replay.rs before tests/tm/drivers.sh.
#
# Only differences from a real front-end, all because the three "hosts" (oned, fe, hv) share one
# machine and one user in the tests:
#  - every ssh reads a per-test client config with -F: oned's ($ONED_SSH_CONFIG: ControlMaster auto,
#    as the /usr/lib/one/sh/override/ssh wrapper sets it, ControlPersist 70s) and the nodes'
#    ($NODE_SSH_CONFIG: share/ssh/etc/config, ControlMaster no) for ssh run by scripts on fe or hv;
#  - each host has its own root ($FE_ROOT, $HV_ROOT) where a real host has /var/lib/one and /var/tmp.
#    oned and fe share $FE_ROOT, as oned and the sidecar share the datastore volume in the pod.

export LANG=C
SCRIPT_NAME=${SCRIPT_NAME:-tm}

SSH="ssh -F $ONED_SSH_CONFIG"
SSH_FWD="$SSH -o ForwardAgent=yes -o ControlMaster=no -o ControlPath=none"
# what a script running on fe or on a hypervisor calls as `ssh`
RSSH="ssh -F $NODE_SSH_CONFIG"
# rsync run by oned starts `ssh` from oned's PATH (the override wrapper: ControlMaster auto)
export RSYNC_RSH="$SSH"
TAR=tar
DD=dd
QEMU_IMG=qemu-img
RM=rm

FE_DS=$FE_ROOT/datastores
HV_DS=$HV_ROOT/datastores

log_function() { echo "$1: $SCRIPT_NAME: $2" 1>&2; }
log() { log_function INFO "$1"; }
log_error() { log_function ERROR "$1"; }
error_message() { echo "$1" 1>&2; }

arg_host() { echo "$1" | sed -r 's/^([^:]*):.*$/\1/'; }
fix_dir_slashes() { dirname "$1/file" | sed -E 's#/+#/#g'; }
arg_path() { fix_dir_slashes "$(echo "$1" | sed -r 's/^[^:]*:(.*)$/\1/')"; }

exec_and_log() {
    local err rc
    err=$(${1} 2>&1 1>/dev/null)
    rc=$?
    if [ $rc -ne 0 ]; then
        log_error "Command \"$1\" failed: $err"
        error_message "${2:-Error executing \"$1\": $err}"
        exit $rc
    fi
}

multiline_exec_and_log() {
    local err rc
    err=$(bash -s 2>&1 1>/dev/null <<EOF
export LANG=C
export LC_ALL=C
$1
EOF
)
    rc=$?
    if [ $rc -ne 0 ]; then
        log_error "Command \"$1\" failed: $err"
        error_message "${2:-Error executing $1: $err}"
        exit $rc
    fi
}

ssh_forward() {
    local saved="$SSH" rc
    SSH="$SSH_FWD"
    "$@"
    rc=$?
    SSH="$saved"
    return $rc
}

# stderr is captured (stdout discarded); $4 is another rc that is not logged as a failure
ssh_exec_and_log_no_error() {
    SSH_EXEC_ERR=$($SSH $1 bash -s 2>&1 1>/dev/null <<EOF
export LANG=C
export LC_ALL=C
$2
EOF
)
    SSH_EXEC_RC=$?
    if [ $SSH_EXEC_RC -ne 0 ] && [ $SSH_EXEC_RC != "$4" ]; then
        log_error "Command \"$2\" failed: $SSH_EXEC_ERR"
        error_message "${3:-Error executing $2: $SSH_EXEC_ERR}"
    fi
    return $SSH_EXEC_RC
}

ssh_exec_and_log() {
    ssh_exec_and_log_no_error "$@"
    local rc=$?
    [ "$rc" != 0 ] && exit $rc
    return 0
}

# stdout is captured (stderr discarded) and echoed
ssh_monitor_and_log() {
    SSH_EXEC_OUT="$($SSH $1 bash -s 2>/dev/null <<EOF
export LANG=C
export LC_ALL=C
$2
EOF
)"
    SSH_EXEC_RC=$?
    if [ $SSH_EXEC_RC -ne 0 ]; then
        log_error "Command \"${3:-$2}\" failed: $SSH_EXEC_OUT"
        exit $SSH_EXEC_RC
    fi
    echo "$SSH_EXEC_OUT"
}

ssh_make_path() {
    SSH_EXEC_ERR=$($SSH $1 bash -s 2>&1 1>/dev/null <<EOF
set -e -o pipefail

if [ ! -d $2 ]; then
    mkdir -p $2
fi
EOF
)
    SSH_EXEC_RC=$?
    if [ $SSH_EXEC_RC -ne 0 ]; then
        error_message "Error creating directory $2 at $1: $SSH_EXEC_ERR"
        exit $SSH_EXEC_RC
    fi
}

enable_local_monitoring() {
    SSH_EXEC_ERR=$($SSH $1 bash -s 2>&1 1>/dev/null <<EOF
set -e -o pipefail

MONITOR_FN="$(dirname $2)/.monitor"

# create or update .monitor content
MONITOR=''
if [ -f "\${MONITOR_FN}" ]; then
    MONITOR="\$(cat "\${MONITOR_FN}" 2>/dev/null)"
fi

if [ "x\${MONITOR}" != "x$3" ]; then
    echo "$3" > "\${MONITOR_FN}"
fi
EOF
)
    SSH_EXEC_RC=$?
    if [ $SSH_EXEC_RC -ne 0 ]; then
        error_message "Error creating $2/.monitor at $1: $SSH_EXEC_ERR"
        exit $SSH_EXEC_RC
    fi
}

disable_local_monitoring() {
    SSH_EXEC_ERR=$($SSH $1 bash -s 2>&1 1>/dev/null <<EOF
set -e -o pipefail

MONITOR_FN="$(dirname $2)/.monitor"

# remove .monitor file
rm -f "\${MONITOR_FN}"

EOF
)
    SSH_EXEC_RC=$?
    if [ $SSH_EXEC_RC -ne 0 ]; then
        error_message "Error creating $2/.monitor at $1: $SSH_EXEC_ERR"
        exit $SSH_EXEC_RC
    fi
}

# --- 7.x Ruby helpers --------------------------------------------------------------------------

# TransferManager::Action#ssh: `ssh <opts> HOST bash -s [1>/dev/null] [2>/dev/null]` as ONE string
# run by /bin/sh (SSHCommand via Open3), so the redirections apply to the local ssh; the script
# starts with LANG/LC_ALL/PATH exports. Options after CMDS: forward, nostdout, nostderr, ok_rc=N.
# Prints the captured stdout and stderr; on failure logs like DriverLogger. Returns the rc.
rb_ssh() {
    local host=$1 cmds=$2 opts='-o ControlMaster=no -o ControlPath=none' shell='bash -s' ok=''
    local err_msg="Command failed:" out err rc o
    shift 2
    for o; do
        case $o in
        forward) opts="$opts -o ForwardAgent=yes" ;;
        nostdout) shell="$shell 1>/dev/null" ;;
        nostderr) shell="$shell 2>/dev/null" ;;
        ok_rc=*) ok=${o#ok_rc=} ;;
        err=*) err_msg=${o#err=} ;;
        esac
    done
    local tmp
    tmp=$(mktemp -d)
    /bin/sh -c "ssh -F $ONED_SSH_CONFIG $opts $host $shell" >"$tmp/out" 2>"$tmp/err" <<EOS
export LANG=C
export LC_ALL=C
export PATH=\$PATH:/usr/sbin:/sbin
$cmds
EOS
    rc=$?
    cat "$tmp/out"
    cat "$tmp/err" >&2
    if [ $rc -ne 0 ] && [ "$rc" != "$ok" ]; then
        log_error "$err_msg"
        log_error "  [STDOUT] \"$(tr '\n' ' ' <"$tmp/out")\""
        log_error "  [STDERR] \"$(tr '\n' ' ' <"$tmp/err")\""
    fi
    rm -rf "$tmp"
    return $rc
}

# LocalCommand.run_sh: `bash -s 1>/dev/null` locally, stderr logged on failure
rb_run_sh() {
    local err rc
    err=$(bash -s 2>&1 1>/dev/null <<<"$1")
    rc=$?
    [ $rc -ne 0 ] && log_error "$err"
    return $rc
}
