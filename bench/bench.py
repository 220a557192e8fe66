#!/usr/bin/env python3
"""Side-by-side benchmarks: tm-sidecar against a stock OpenSSH sshd on loopback.

Both servers run on this machine with their own keys and accept the same client key; every
scenario runs alternately against each (A B, B A, A B ...) for --rounds rounds with the same OpenSSH
client, data comes from tmpfs (/dev/shm), and the table shows medians, min/max and the ratio.
Started by bench/run.sh, which installs what is missing and builds the release binary.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "tm-sidecar")
ME = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Server:
    def __init__(self, name, port, proc, pids_fn):
        self.name, self.port, self.proc, self.pids_fn = name, port, proc, pids_fn

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def children_of(pid):
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    tree, result = {}, [pid]
    pairs = [tuple(map(int, l.split())) for l in out.strip().splitlines()]
    for p, pp in pairs:
        tree.setdefault(pp, []).append(p)
    stack = [pid]
    while stack:
        for c in tree.get(stack.pop(), []):
            result.append(c)
            stack.append(c)
    return result


def pss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def start_servers(work, client_pub):
    # tm-sidecar
    keys = os.path.join(work, "sidecar-keys")
    subprocess.run([BIN, "keygen", "--no-monitord", "--dir", keys], check=True, capture_output=True)
    with open(os.path.join(keys, "authorized_keys"), "w") as f:
        f.write(client_pub)
    root = os.path.join(work, "root")
    os.makedirs(root, exist_ok=True)
    sp = free_port()
    mport = free_port()
    side = subprocess.Popen(
        [BIN, "serve", "--ssh-listen", f"127.0.0.1:{sp}", "--host-key",
         os.path.join(keys, "ssh_host_ed25519_key"), "--authorized-keys",
         os.path.join(keys, "authorized_keys"), "--allow-user", ME, "--home", work,
         "--transfer-root", work, "--monitord-listen", f"127.0.0.1:{mport}",
         "--admin-listen", "off", "--log-format", "json", "--max-sessions", "128",
         "--fsync-uploads", "false",
         # the same burst allowance as the sshd below (100 idle masters start at once)
         "--max-startups", "200:30:400", "--per-source-max-startups", "199"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    wait_port(sp)
    sidecar = Server("tm-sidecar", sp, side, lambda: [side.pid])
    sidecar.monitord_port = mport
    # stock sshd with equivalent settings
    d = os.path.join(work, "sshd")
    os.makedirs(d, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, "host")], check=True)
    with open(os.path.join(d, "ak"), "w") as f:
        f.write(client_pub)
    op = free_port()
    cfg = os.path.join(d, "sshd_config")
    with open(cfg, "w") as f:
        f.write(f"Port {op}\nListenAddress 127.0.0.1\nHostKey {d}/host\nPidFile {d}/pid\n"
                f"AuthorizedKeysFile {d}/ak\nStrictModes no\nPasswordAuthentication no\n"
                f"KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
                f"Subsystem sftp internal-sftp\nLogLevel ERROR\nPrintMotd no\nPrintLastLog no\n"
                f"MaxSessions 128\nMaxStartups 200:30:400\nUseDNS no\n")
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(op)
    openssh = Server("OpenSSH", op, sshd, lambda: children_of(sshd.pid))
    return openssh, sidecar


class Client:
    def __init__(self, key, work):
        self.key, self.work = key, work
        self.opts = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                     "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
                     "-o", "IdentityAgent=none", "-o", "LogLevel=ERROR", "-i", key]

    def ssh(self, srv, *args, extra=()):
        return ["ssh", *self.opts, *extra, "-p", str(srv.port), f"{ME}@127.0.0.1", *args]

    def scp(self, srv, *args, extra=()):
        return ["scp", *self.opts, *extra, "-P", str(srv.port), *args]

    def sftp(self, srv, extra=()):
        return ["sftp", *self.opts, *extra, "-P", str(srv.port), f"{ME}@127.0.0.1"]


TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid):
    """CPU time of a server process plus its reaped children (utime+stime+cutime+cstime):
    sshd's per-connection processes and their `cat`/`scp -t` children, tm-sidecar's children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICKS


def settled_cpu_seconds(srv):
    """Wait (bounded) until the server has no child processes left, so that every process that
    served the scenario has been reaped and counted, then read its CPU time."""
    deadline = time.time() + 5
    while len(srv.pids_fn()) > 1 and time.time() < deadline:
        time.sleep(0.02)
    return tree_cpu_seconds(srv.proc.pid)


def warm_free_memory(work, mib):
    """Write and delete `mib` MiB on tmpfs, untimed, right before an upload.

    On a VM with free page reporting (virtio-balloon; this benchmark's Firecracker guest has it)
    memory the guest leaves free for a few seconds is handed back to the host, and the first
    write into it then faults into the host: 1-2 s per GiB more. An atomic upload always writes
    into memory it has not used before (the old copy stays until the rename), while sshd's
    `scp -t` overwrites the previous copy in place, so without this step the upload rows measure
    how much memory the host took back since the last transfer. Freed just before the transfer,
    these pages are reused before the guest reports them (it waits 2 s). Done for both servers;
    --cold-uploads skips it. Bare metal and VMs without free page reporting never pay this.
    """
    path = os.path.join(work, "warm.bin")
    with open(path, "wb") as f:
        chunk = b"\0" * (1 << 20)
        for _ in range(mib):
            f.write(chunk)
    os.unlink(path)


def timed(cmd, **kw):
    t = time.perf_counter()
    r = subprocess.run(cmd, **kw)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(map(str, cmd))[:200]}")
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=2048, help="stream/scp/sftp size")
    ap.add_argument("--parallel-mib", type=int, default=256, help="size of each of the 15 parallel uploads")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated scenario name prefixes")
    ap.add_argument("--cold-uploads", action="store_true",
                    help="do not warm the guest's free memory before uploads (see warm_free_memory)")
    args = ap.parse_args()

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = tempfile.mkdtemp(prefix="tm-bench.", dir=shm)
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work):
    key = os.path.join(work, "client")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    client_pub = open(key + ".pub").read()
    openssh, sidecar = start_servers(work, client_pub)
    c = Client(key, work)
    size = args.size_mib << 20
    src = os.path.join(work, "src.bin")
    subprocess.run(["head", "-c", str(size), "/dev/urandom"], stdout=open(src, "wb"), check=True)
    small = os.path.join(work, "par.bin")
    subprocess.run(["head", "-c", str(args.parallel_mib << 20), "/dev/urandom"], stdout=open(small, "wb"), check=True)
    dst = os.path.join(work, "dst.bin")
    gcm = ["-c", "aes128-gcm@openssh.com"]
    mib = args.size_mib

    def exec_up(srv, extra=()):
        return timed(c.ssh(srv, "cat > /dev/null", extra=extra), stdin=open(src, "rb"))

    def exec_down(srv, extra=()):
        return timed(c.ssh(srv, f"cat {src}", extra=extra), stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def warm():
        if not args.cold_uploads:
            warm_free_memory(work, args.size_mib + 1024)

    def scp_up(srv, legacy):
        warm()
        return timed(c.scp(srv, src, f"{ME}@127.0.0.1:{dst}", extra=["-O"] if legacy else []))

    def scp_down(srv, legacy):
        return timed(c.scp(srv, f"{ME}@127.0.0.1:{src}", dst, extra=["-O"] if legacy else []))

    def sftp_batch(srv, line, upload=False):
        if upload:
            warm()
        return timed(c.sftp(srv, extra=["-b", "-"]), input=line.encode(), stdout=subprocess.DEVNULL)

    def new_conn(srv):
        t = time.perf_counter()
        for _ in range(100):
            subprocess.run(c.ssh(srv, "true"), check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t

    def with_master(srv, fn):
        ctl = os.path.join(work, f"ctl-{srv.port}")
        m = subprocess.Popen(c.ssh(srv, extra=["-M", "-N", "-S", ctl, "-o", "ControlPersist=no"]), stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while subprocess.run(["ssh", "-S", ctl, "-O", "check", "x"], capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError("master did not start")
            time.sleep(0.05)
        try:
            return fn(ctl)
        finally:
            subprocess.run(["ssh", "-S", ctl, "-O", "exit", "x"], capture_output=True)
            m.wait(10)

    def mux_exec(srv):
        def go(ctl):
            t = time.perf_counter()
            for _ in range(100):
                subprocess.run(["ssh", "-S", ctl, "x", "true"], check=True, stdin=subprocess.DEVNULL)
            return time.perf_counter() - t
        return with_master(srv, go)

    def mux_parallel(srv):
        def go(ctl):
            t = time.perf_counter()
            procs = [subprocess.Popen(["ssh", "-S", ctl, "x", "cat > /dev/null"], stdin=open(small, "rb")) for _ in range(15)]
            if any(p.wait() != 0 for p in procs):
                raise RuntimeError("parallel upload failed")
            return time.perf_counter() - t
        return with_master(srv, go)

    def memory(srv, n):
        # PSS (KiB) of all server processes with n idle authenticated connections
        masters = []
        for i in range(n):
            ctl = os.path.join(work, f"idle-{srv.port}-{i}")
            masters.append((ctl, subprocess.Popen(c.ssh(srv, extra=["-M", "-N", "-S", ctl, "-o", "ControlPersist=no"]), stdin=subprocess.DEVNULL)))
        deadline = time.time() + 120
        for ctl, _ in masters:
            while subprocess.run(["ssh", "-S", ctl, "-O", "check", "x"], capture_output=True).returncode != 0:
                if time.time() > deadline:
                    raise RuntimeError("idle connections did not come up")
                time.sleep(0.05)
        time.sleep(1)
        value = pss_kib(srv.pids_fn())
        for ctl, m in masters:
            subprocess.run(["ssh", "-S", ctl, "-O", "exit", "x"], capture_output=True)
            m.wait(10)
        return value

    scenarios = [
        # name, fn(server) -> seconds (or KiB for memory), unit shown in the table
        (f"exec upload {mib} MiB (default cipher)", lambda s: exec_up(s), "MiB/s"),
        (f"exec download {mib} MiB (default cipher)", lambda s: exec_down(s), "MiB/s"),
        (f"exec upload {mib} MiB (aes128-gcm)", lambda s: exec_up(s, gcm), "MiB/s"),
        (f"exec download {mib} MiB (aes128-gcm)", lambda s: exec_down(s, gcm), "MiB/s"),
        (f"scp -O upload {mib} MiB", lambda s: scp_up(s, True), "MiB/s"),
        (f"scp -O download {mib} MiB", lambda s: scp_down(s, True), "MiB/s"),
        (f"scp (SFTP) upload {mib} MiB", lambda s: scp_up(s, False), "MiB/s"),
        (f"scp (SFTP) download {mib} MiB", lambda s: scp_down(s, False), "MiB/s"),
        (f"sftp put {mib} MiB", lambda s: sftp_batch(s, f"put {src} {dst}\n", upload=True), "MiB/s"),
        (f"sftp get {mib} MiB", lambda s: sftp_batch(s, f"get {src} {dst}\n"), "MiB/s"),
        # the same download with the client writing nowhere (as exec download does): on 2 cores
        # the client's own tmpfs writes otherwise take the CPU the server leaves it
        (f"sftp get {mib} MiB to /dev/null", lambda s: sftp_batch(s, f"get {src} /dev/null\n"), "MiB/s"),
        ("new connection + true x100", new_conn, "s"),
        ("exec over ControlMaster x100", mux_exec, "s"),
        (f"15 parallel {args.parallel_mib} MiB uploads (mux)", mux_parallel, "agg MiB/s"),
        ("memory PSS idle", lambda s: memory(s, 0), "KiB"),
        ("memory PSS 100 idle connections", lambda s: memory(s, 100), "KiB"),
    ]
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    rows, cpu_rows = [], []
    for name, fn, unit in scenarios:
        if only and not any(name.startswith(p) for p in only):
            continue
        results = {openssh.name: [], sidecar.name: []}
        cpu = {openssh.name: [], sidecar.name: []}  # server CPU seconds per GiB moved
        error = None
        rounds = 1 if unit == "KiB" else args.rounds
        moved_mib = {"MiB/s": mib, "agg MiB/s": 15 * args.parallel_mib}.get(unit)
        for r in range(rounds):
            # A B, B A, A B ...: neither server always runs right after the other one
            for srv in (openssh, sidecar) if r % 2 == 0 else (sidecar, openssh):
                try:
                    cpu0 = settled_cpu_seconds(srv) if moved_mib else 0
                    v = fn(srv)
                    if moved_mib:
                        cpu[srv.name].append((settled_cpu_seconds(srv) - cpu0) * 1024 / moved_mib)
                except Exception as e:  # keep going: report the failure in the table
                    error = f"{srv.name}: {e}"
                    continue
                if moved_mib:
                    v = moved_mib / v
                results[srv.name].append(v)
        rows.append((name, unit, results[openssh.name], results[sidecar.name], error))
        print_row(rows[-1], flush=True)
        if moved_mib and cpu[openssh.name] and cpu[sidecar.name]:
            cpu_rows.append((name, cpu[openssh.name], cpu[sidecar.name]))

    print()
    print(f"| scenario | unit | OpenSSH median | tm-sidecar median | ratio | OpenSSH min/max | tm-sidecar min/max |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print_row(row, table=True)
    print()
    print("Server CPU per GiB moved (the server process and its reaped children; lower is better):")
    print()
    print("| scenario | OpenSSH s/GiB | tm-sidecar s/GiB | ratio |")
    print("|---|---|---|---|")
    for name, a, b in cpu_rows:
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {name} | {ma:.2f} | {mb:.2f} | {mb / ma if ma else float('nan'):.2f}x |")
    for s in (openssh, sidecar):
        s.stop()


def fmt(v):
    return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def print_row(row, table=False, flush=False):
    name, unit, a, b, error = row
    if not a or not b:
        line = f"| {name} | {unit} | {'n/a' if not a else fmt(statistics.median(a))} | {'n/a' if not b else fmt(statistics.median(b))} | n/a | | | {error or ''}"
    else:
        ma, mb = statistics.median(a), statistics.median(b)
        ratio = mb / ma if ma else float("nan")
        line = (f"| {name} | {unit} | {fmt(ma)} | {fmt(mb)} | {ratio:.2f}x | "
                f"{fmt(min(a))}–{fmt(max(a))} | {fmt(min(b))}–{fmt(max(b))} |")
    if table or flush:
        print(line if table else "# " + line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
