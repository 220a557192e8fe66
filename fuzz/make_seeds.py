#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/<target>/ from real messages.

Keys and certificates are made with ssh-keygen in a temporary directory that is deleted
afterwards: only public keys and certificates (public material) end up in the corpus, never a
private key. Run from anywhere: `python3 fuzz/make_seeds.py`. Existing files are overwritten;
files the fuzzer added (content-hash names) are left alone.
"""

import base64
import os
import struct
import subprocess
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def keygen(tmp, name, kind, bits=None):
    path = os.path.join(tmp, name)
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", name, "-f", path]
    if bits:
        args[4:4] = ["-b", str(bits)]
    subprocess.run(args, check=True)
    with open(path + ".pub") as f:
        return path, f.read().strip()


# ------------------------------------------------------------------------------ authorized_keys


def authorized_keys(tmp):
    _, ed = keygen(tmp, "ed", "ed25519")
    _, ec = keygen(tmp, "ec", "ecdsa")
    _, rsa = keygen(tmp, "rsa", "rsa", 2048)
    _, small = keygen(tmp, "small", "rsa", 1024)
    write("authorized_keys", "plain", f"{ed}\n{ec}\n{rsa}\n")
    write(
        "authorized_keys",
        "options",
        f'command="/usr/bin/rrsync -ro /srv \\"x y\\"",no-pty {ed} c\n'
        f'restrict,pty,from="10.0.0.0/8,!10.0.0.1,192.0.2.*,::1" {ec}\n'
        f'environment="FOO=bar#baz",environment="A=1",expiry-time="20991231Z" {rsa}\n'
        f'cert-authority,principals="ops,admins",no-agent-forwarding {ed}\n',
    )
    write(
        "authorized_keys",
        "every-option",
        'cert-authority,principals="alice,bob",from="10.0.0.0/8,!10.0.0.1",'
        'expiry-time="20991231Z",environment="A=1",environment="B=x y",permitopen="localhost:80",'
        'permitlisten="*:8080",tunnel="1",no-touch-required,verify-required,no-user-rc,'
        'no-port-forwarding,no-agent-forwarding,no-x11-forwarding,no-pty,command="ls" '
        f"{ed}\n"
        "pty,agent-forwarding,port-forwarding,x11-forwarding,user-rc,touch-required "
        f"{ec}\n",
    )
    write(
        "authorized_keys",
        "bad-lines",
        f"# comment\n\n  \t# indented\r\n{ed}\r\nnot-an-option {ed}\nssh-ed25519 AAAAbroken\n"
        f'command="unterminated {ed}\n{small}\nssh-ed25519\nfrom="10.0.0.1/8" {ed}\n'
        f'expiry-time="19990101" {ed}\nno-pty,,pty {ed}\nno-pty, {ed}\n',
    )
    write("authorized_keys", "expiry-local", f'expiry-time="203001011230" {ed}\n')
    write("authorized_keys", "trusted-ca", f"# CAs\n\nnot a key\n{ed} ca comment\n")


# ------------------------------------------------------------------------------ certificates


def certificate(tmp):
    ca, _ = keygen(tmp, "ca", "ed25519")
    user, _ = keygen(tmp, "user", "ed25519")
    variants = [
        ("basic", ["-n", "alice,oneadmin"], 0x0F, b""),
        ("no-principals", [], 0x0F, b""),
        ("force-command", ["-n", "oneadmin", "-O", "force-command=/bin/date",
                           "-O", "source-address=127.0.0.0/8,::1"], 0x4F, b""),
        ("clear", ["-n", "alice", "-O", "clear", "-O", "permit-pty"], 0x4E,
         b'principals="alice",from="127.0.0.1",command="/bin/date"'),
        ("unknown-option", ["-n", "oneadmin", "-O", "verify-required"], 0x07, b""),
        ("expired", ["-n", "oneadmin", "-V", "20000101:20010101"], 0x03, b"no-pty"),
        ("host", ["-h", "-n", "oneadmin"], 0x0F, b""),
        ("ext", ["-n", "oneadmin", "-O", "extension:custom@example.com=v",
                 "-O", "critical:frob=x"], 0x1F, b"restrict,agent-forwarding"),
    ]
    for i, (name, opts, flags, line) in enumerate(variants):
        pub = user + ".pub"
        cert = user + "-cert.pub"
        if os.path.exists(cert):
            os.unlink(cert)
        subprocess.run(
            ["ssh-keygen", "-q", "-s", ca, "-I", f"id-{name}", "-z", str(i + 1)] + opts + [pub],
            check=True,
        )
        with open(cert) as f:
            blob = base64.b64decode(f.read().split()[1])
        write("certificate", name, bytes([flags]) + line + b"\n" + blob)


# ------------------------------------------------------------------------------ scp

R, P, D, SOURCE = 0x01, 0x02, 0x04, 0x10
T_FILE, T_NEW, T_UP = 0x20, 0x40, 0x60


def scp():
    seeds = {
        "file": (0, b"C0640 5 hello\nworld\0"),
        "tree": (R | P, b"C0640 5 hello\nworld\0D0755 0 dir\nT1600000000 0 1600000000 0\n"
                        b"C0600 3 f\nabc\0E\n"),
        "overwrite": (0, b"C0644 3 f\nnew\0"),
        "to-file": (T_FILE, b"C0644 3 x\nabc\0"),
        "to-new": (T_NEW, b"C0644 3 x\nabc\0"),
        "through-up": (T_UP, b"C0644 3 sentinel\nabc\0"),
        "into-symlink-dir": (R, b"D0755 0 up\nC0644 3 sentinel\nabc\0E\n"),
        "dotdot": (R, b"D0755 0 ..\nC0644 4 x\nevil\0E\n"),
        "slash": (0, b"C0644 10 ../x\n0123456789\0"),
        "size-lie": (0, b"C0644 100 img\n0123456789"),
        "peer-error": (0, b"C0644 3 f\nabc\x01scp: f: Input/output error\n"),
        "times": (P, b"T1 2000000 3 0\n"),
        "deep": (R, b"".join(b"D0755 0 d%d\n" % i for i in range(140))),
        "fatal": (0, b"\x02scp: gone\n"),
        "dir-mode": (R | P | D, b"D0000 0 locked\nC0000 1 x\nx\0E\n"),
        "source": (SOURCE | R | P, b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
        "source-err": (SOURCE, b"\x01scp: no\n\0"),
        "cmdline": (0, b"scp -v -r -p -d -t -- '/var/lib/one/datastores/1 x' \"a\\\"b\" ~/y *.img"),
    }
    for name, (flags, stream) in seeds.items():
        write("scp_sink", name, bytes([flags]) + stream)


# ------------------------------------------------------------------------------ SFTP


def s(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">I", len(b)) + b


def pkt(kind, rid, body=b""):
    p = bytes([kind]) + struct.pack(">I", rid) + body
    return struct.pack(">I", len(p)) + p


INIT = struct.pack(">IBI", 5, 1, 3)
H1 = s(struct.pack(">I", 1))
H2 = s(struct.pack(">I", 2))
u32 = lambda v: struct.pack(">I", v)
u64 = lambda v: struct.pack(">Q", v)
NOATTR = u32(0)
PERM = lambda m: u32(4) + u32(m)


def ext(name, body=b""):
    return s(name) + body


def sftp():
    seeds = {
        "upload": [pkt(3, 1, s("up.img") + u32(0x1A) + PERM(0o644)),
                   pkt(6, 2, H1 + u64(0) + s(b"hello")), pkt(4, 3, H1)],
        "overlay": [pkt(3, 1, s("f") + u32(0x0A) + NOATTR), pkt(6, 2, H1 + u64(2) + s(b"ab")),
                    pkt(10, 3, H1 + u32(1) + u64(4)), pkt(4, 4, H1)],
        "read": [pkt(3, 1, s("f") + u32(1) + NOATTR), pkt(5, 2, H1 + u64(0) + u32(32768)),
                 pkt(5, 3, H1 + u64(1 << 40) + u32(10)), pkt(8, 4, H1), pkt(4, 5, H1),
                 pkt(5, 6, H1 + u64(0) + u32(1))],
        "readdir": [pkt(11, 1, s(".")), pkt(12, 2, H1), pkt(12, 3, H1), pkt(4, 4, H1),
                    pkt(11, 5, s("up")), pkt(11, 6, s("/"))],
        "stat": [pkt(17, 1, s("f")), pkt(7, 2, s("abs")), pkt(17, 3, s("abs")),
                 pkt(17, 4, s("up/sentinel")), pkt(17, 5, s("loop")), pkt(17, 6, s("in/g"))],
        "setstat": [pkt(9, 1, s("f") + u32(0x0F) + u64(3) + u32(0) + u32(0) + u32(0o600)
                        + u32(1) + u32(2)),
                    pkt(9, 2, s("abs") + PERM(0o777)), pkt(9, 3, s("up/sentinel") + PERM(0o777)),
                    pkt(200, 4, ext("lsetstat@openssh.com", s("abs") + PERM(0o777)))],
        "rename": [pkt(18, 1, s("f") + s("g")), pkt(18, 2, s("g") + s("../outside/x")),
                   pkt(200, 3, ext("posix-rename@openssh.com", s("sub/g") + s("up/g"))),
                   pkt(18, 4, s("up/sentinel") + s("stolen"))],
        "links": [pkt(200, 1, ext("hardlink@openssh.com", s("abs") + s("hl"))),
                  pkt(200, 2, ext("hardlink@openssh.com", s("up/sentinel") + s("hl2"))),
                  pkt(20, 3, s("/etc/passwd") + s("lnk")), pkt(19, 4, s("lnk")),
                  pkt(19, 5, s("abs")), pkt(3, 6, s("lnk") + u32(1) + NOATTR)],
        "dirs": [pkt(14, 1, s("newdir") + PERM(0o700)), pkt(14, 2, s("up/newdir") + NOATTR),
                 pkt(15, 3, s("newdir")), pkt(13, 4, s("sub/g")), pkt(13, 5, s("abs")),
                 pkt(15, 6, s("."))],
        "paths": [pkt(16, 1, s(".")), pkt(16, 2, s("../../..")), pkt(16, 3, s("")),
                  pkt(200, 4, ext("expand-path@openssh.com", s("~/x"))),
                  pkt(200, 5, ext("expand-path@openssh.com", s("~root")))],
        "extensions": [pkt(200, 1, ext("limits@openssh.com")),
                       pkt(200, 2, ext("statvfs@openssh.com", s("."))),
                       pkt(3, 3, s("f") + u32(3) + NOATTR),
                       pkt(200, 4, ext("fsync@openssh.com", H1)),
                       pkt(200, 5, ext("fstatvfs@openssh.com", H1)),
                       pkt(200, 6, ext("nope@example.com"))],
        "malformed": [pkt(17, 1, u32(50) + b"x"), pkt(99, 2, b"whatever"), pkt(3, 3, b""),
                      struct.pack(">I", 0), pkt(1, 0, b""),
                      pkt(9, 4, s("f") + u32(0x80000000) + u32(0xFFFFFFFF))],
        "oversize": [struct.pack(">IB", 300 * 1024, 6) + u32(7) + b"\0" * 64],
        "excl-append": [pkt(3, 1, s("n") + u32(0x2A) + NOATTR), pkt(6, 2, H1 + u64(5) + s(b"x")),
                        pkt(3, 3, s("f") + u32(0x06) + NOATTR), pkt(6, 4, H2 + u64(0) + s(b"y")),
                        pkt(4, 5, H1), pkt(4, 6, H2)],
    }
    for name, packets in seeds.items():
        write("sftp", name, INIT + b"".join(packets))
    write("sftp", "no-init", pkt(17, 1, s("f")))


# ------------------------------------------------------------------------------ monitord

EX_MONITOR_VM = ("MONITOR_VM SUCCESS 3 1724150000 eNpNzDsPgjAUhuG/0nTWhHoZGDrIpUmRtlDaQ4gxDsYQih"
                 "E3lV9vJSE4nifvd0Agik6IJxSTDV6hJC1y1Vx+9/C4rScTSnKjNMUliaCo+Dt3tot7wowNq9oEnTCHQCV2"
                 "Kzt+ND1Ye29D7tKPGEvf7Rkw3fgdke664+0zrUDmttdxDZrZcdq/ZgeSLe4W931mSGT8n/GvnS3g7UDx+Q"
                 "ulOT8O")
EX_STATE_VM = ("STATE_VM SUCCESS 3 1724150005 eNoLjvRzjg8OcQxxta1MLeby9QwO9vRzh4oE+Ie7Bvm7uXGF+SrYKk"
               "QreLrYKhkaKekouLgG+PhHxoP4+XmpumAxBYgepaBQPz+gEUoKsQC1XRjP")
EX_BEACON = "BEACON_HOST SUCCESS 3 1724150010 eNozNDcyMTQ1MDA0AAAK8AH2"

MONITOR_HOST = ("HYPERVISOR=kvm\nUSEDMEMORY=3012345\nFREEMEMORY=13004567\nFREECPU=780\nUSEDCPU=20\n"
                "NETRX=123456789\nNETTX=98765432\n"
                'HUGEPAGE = [ NODE_ID = "0", SIZE = "2048", FREE = "0" ]\n'
                'MEMORY_NODE = [ NODE_ID = "0", FREE = "13004567", USED = "3012345" ]\n')
SYSTEM_HOST = ('HOSTNAME="kvm-1"\nHYPERVISOR=kvm\nTOTALCPU=800\nTOTALMEMORY=16016912\n'
               'VERSION="6.10.0"\n# comment\nCPUSPEED=2400\n')
STATE_VM = ('VM = [ ID="12", DEPLOY_ID="one-12", STATE="RUNNING" ]\n'
            'VM = [ ID="13", DEPLOY_ID="one-13", STATE="POWEROFF" ]\n'
            'VM = [ ID="-1", DEPLOY_ID="wild", STATE="UNKNOWN" ]\n')
VM_MONITOR = base64.b64encode(b'CPU="1.5"\nMEMORY="1048576"\nDISKRDBYTES=12\nSTATE="a"\n').decode()
MONITOR_VM = (f'VM = [ ID="12", DEPLOY_ID="one-12", MONITOR="{VM_MONITOR}" ]\n'
              'VM = [ ID="13", DEPLOY_ID="one-13" ]\n'
              'VM = [ ID="14", MONITOR="bm90IGEgdGVt\n  cGxhdGU9" ]\n')
ODD = ('A="multi\nline \\"quoted\\" value"\nB = bare value  \n'
       'V = [\n  K1 = "v1",\n  K2 = v2\n]\n# trailing comment\nlower=x\n')


def pack(text, level=9):
    return base64.b64encode(zlib.compress(text.encode(), level)).decode()


def monitord():
    msgs = {
        "monitor-vm": EX_MONITOR_VM,
        "state-vm": EX_STATE_VM,
        "beacon": EX_BEACON,
        "monitor-host": f"MONITOR_HOST SUCCESS 7 1724150100 {pack(MONITOR_HOST)}",
        "system-host": f"SYSTEM_HOST SUCCESS 7 1724150101 {pack(SYSTEM_HOST, 1)}\n",
        "failure": f"MONITOR_HOST FAILURE 8 1724150102 {pack('Error executing probe: no kvm')}",
        "exec-vm": f"EXEC_VM SUCCESS -1 0 {pack('ID=4')}\r\n",
        "empty-payload": "BEACON_HOST SUCCESS 3 1724150010",
        "newlines": "  \n BEACON_HOST\n SUCCESS\t3\n1724150010\n\n eNozNDcyMTQ1MDA0AAAK8AH2\ntrailing",
        "not-base64": "BEACON_HOST SUCCESS 3 1 %%%%",
        "bad-zlib": "BEACON_HOST SUCCESS 3 1 eNozNDcy",
        "unknown-type": "ATTACK_HOST SUCCESS 3 1 eNozNDcyMTQ1MDA0AAAK8AH2",
        "bad-host": "BEACON_HOST SUCCESS three 1 eNozNDcyMTQ1MDA0AAAK8AH2",
        "bad-epoch": "BEACON_HOST SUCCESS 3 yesterday eNozNDcyMTQ1MDA0AAAK8AH2",
        "bomb": "MONITOR_HOST SUCCESS 3 1 " + base64.b64encode(
            zlib.compress(b"\0" * (17 << 20), 9)).decode(),
        "trailing-garbage": "BEACON_HOST SUCCESS 3 1 " + base64.b64encode(
            zlib.compress(b"x") + b"garbage after the stream").decode(),
    }
    for name, m in msgs.items():
        write("monitord_message", name, m)
    for name, t in {"monitor-host": MONITOR_HOST, "system-host": SYSTEM_HOST,
                    "state-vm": STATE_VM, "monitor-vm": MONITOR_VM, "odd": ODD,
                    "errors": 'A = [ K = "v"\nB="unterminated\n'}.items():
        write("monitord_payload", name, t)


# ------------------------------------------------------------------------------ config


def config():
    write("config_toml", "full", """\
ssh-listen = ["0.0.0.0:22", "[::]:2222"]
host-key = ["/etc/tm-sidecar/keys/ssh_host_ed25519_key"]
authorized-keys = ["/etc/tm-sidecar/auth/authorized_keys"]
trusted-user-ca-keys = "/etc/tm-sidecar/auth/trusted_user_ca_keys"
allow-user = ["oneadmin"]
shell = "/bin/bash"
home = "/var/lib/one"
transfer-root = ["/var/lib/one/datastores"]
monitord-listen = ["0.0.0.0:4124"]
monitord-upstream = "127.0.0.1:4124"
monitord-private-key = "/etc/tm-sidecar/keys/monitord_rsa"
monitord-require-encryption = false
monitord-max-message-bytes = 4194304
monitord-max-inflated-bytes = 16777216
monitord-read-timeout = 10
monitord-max-connections = 256
monitord-rate-limit = 1000
monitord-max-hosts = 10000
admin-listen = "0.0.0.0:9124"
log-format = "json"
shutdown-grace = 30
max-sessions = 64
permit-user-environment = false
fsync-uploads = true
client-alive-interval = 15
client-alive-count-max = 3
""")
    write("config_toml", "off", 'monitord-listen = ["off"]\nadmin-listen = "off"\n')
    write("config_toml", "bad", 'shel = "/bin/sh"\nmax-sessions = 0\n[table]\nx = [1, [2, [3]]]\n')
    write("config_toml", "require", "monitord-require-encryption = true\n")
    write("config_toml", "types", 'ssh-listen = "not a list"\nshutdown-grace = -1\n'
                                  "monitord-rate-limit = 1e400\nlog-format = 'xml'\n")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        authorized_keys(tmp)
        certificate(tmp)
    scp()
    sftp()
    monitord()
    config()


if __name__ == "__main__":
    main()
