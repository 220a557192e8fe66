//! OpenNebula TM and datastore operations replayed against tm-sidecar as the front-end `fe`, each
//! compared with the same operation against a stock OpenSSH sshd as `fe`.
//!
//! Hosts: `fe` (tm-sidecar, or for the reference run a Debian sshd), `hv` (a Debian sshd playing the
//! hypervisor) and oned (the test itself, running the driver snippets of tests/tm/ with bash). One
//! ssh-agent holds oneadmin's key, the only key the servers accept; oned's ssh client config has
//! OpenNebula's settings (accept-new, ServerAliveInterval 10, ControlMaster auto + ControlPersist
//! for plain calls), the drivers add `-o ForwardAgent=yes -o ControlMaster=no -o ControlPath=none`
//! where they forward. Nested ssh calls made by scripts on fe and hv authenticate with the
//! forwarded agent.
//!
//! Every operation runs twice on freshly copied identical trees (tests/tm/golden.sh: sparse raw and
//! qcow2 images, snapshot dirs, disk.N, .monitor) at the same paths: once with fe = tm-sidecar, once
//! with fe = stock sshd. Exit code, stdout, stderr and both hosts' trees (path, type, mode, size,
//! content digest, symlink target, allocated blocks within a tolerance) must match.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::{Sidecar, StockSshd, run};
use sha2::{Digest, Sha256};

/// Bound for one replayed operation (they take well under a second each).
const T: Duration = Duration::from_secs(180);
const TM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tm");
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

// ---- hosts ------------------------------------------------------------------------------------

/// Which server plays `fe`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fe {
    Sidecar,
    Stock,
}

struct World {
    dir: tempfile::TempDir,
    sidecar: Sidecar,
    fe_ref: StockSshd,
    hv: StockSshd,
    agent: Agent,
}

impl World {
    fn new(pool: bool) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path();
        let golden = base.join("golden");
        std::fs::create_dir_all(&golden).unwrap();
        let mut build = Command::new("bash");
        build.arg(format!("{TM}/golden.sh")).arg(&golden);
        if pool {
            build.arg("pool");
        }
        let out = run(&mut build, T);
        assert!(
            out.status.success(),
            "golden.sh failed (needs qemu-utils, xorriso): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::create_dir_all(base.join("fe/datastores")).unwrap();
        std::fs::create_dir_all(base.join("ssh/ctl")).unwrap();
        std::fs::create_dir_all(base.join("oned")).unwrap();
        let fe_ds = base.join("fe/datastores");
        let sidecar = Sidecar::start_with(&["--transfer-root", fe_ds.to_str().unwrap()]);
        let public = std::fs::read_to_string(sidecar.keys.join("authorized_keys")).unwrap();
        // One home for every server: sshd would run the real home's ~/.bashrc (bash does for
        // `bash -c` under sshd), the sidecar its --home's. This one marks that it was read.
        std::fs::write(sidecar.home.join(".bashrc"), "export BASHRC_READ=yes\n").unwrap();
        let home = format!("SetEnv HOME={}", sidecar.home.display());
        let fe_ref = StockSshd::start_with_config(&public, &home);
        let hv = StockSshd::start_with_config(&public, &home);
        let agent = Agent::start(base, &sidecar.client_key());
        World {
            dir,
            sidecar,
            fe_ref,
            hv,
            agent,
        }
    }

    fn base(&self) -> &Path {
        self.dir.path()
    }

    fn fe_port(&self, fe: Fe) -> u16 {
        match fe {
            Fe::Sidecar => self.sidecar.ssh.port(),
            Fe::Stock => self.fe_ref.port,
        }
    }

    /// Fresh trees from the golden copy. The sidecar holds its transfer root open, so
    /// `fe/datastores` itself is emptied, never replaced.
    fn reset(&self) {
        let b = self.base();
        for host in ["fe", "hv"] {
            let root = b.join(host);
            if root.exists() {
                for e in std::fs::read_dir(&root).unwrap() {
                    let p = e.unwrap().path();
                    if host == "fe" && p.file_name().is_some_and(|n| n == "datastores") {
                        for e in std::fs::read_dir(&p).unwrap() {
                            remove(&e.unwrap().path());
                        }
                    } else {
                        remove(&p);
                    }
                }
            }
            std::fs::create_dir_all(&root).unwrap();
            let out = run(
                Command::new("cp")
                    .arg("-a")
                    .arg(b.join("golden").join(host).join("."))
                    .arg(&root),
                T,
            );
            assert!(
                out.status.success(),
                "cp: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for f in ["oned_known_hosts", "node_known_hosts"] {
            let _ = std::fs::remove_file(b.join("ssh").join(f));
        }
    }

    /// oned's client config (ControlMaster auto, as OpenNebula's ssh wrapper sets it) and the
    /// nodes' (OpenNebula's shipped config: ControlMaster no), with `fe` pointing at `fe`.
    fn write_configs(&self, fe: Fe) {
        let ssh = self.base().join("ssh");
        for (name, master, known, prefix) in [
            ("oned_config", "auto", "oned_known_hosts", "M"),
            ("node_config", "no", "node_known_hosts", "N"),
        ] {
            let text = format!(
                "Host fe\n    HostName 127.0.0.1\n    Port {fe}\n    HostKeyAlias fe\n\
                 Host hv\n    HostName 127.0.0.1\n    Port {hv}\n    HostKeyAlias hv\n\
                 Host *\n    User {user}\n    BatchMode yes\n    ConnectTimeout 30\n\
                 \x20   StrictHostKeyChecking accept-new\n    UserKnownHostsFile {known}\n\
                 \x20   GlobalKnownHostsFile /dev/null\n    ServerAliveInterval 10\n\
                 \x20   ControlMaster {master}\n    ControlPersist 70s\n\
                 \x20   ControlPath {ctl}/{prefix}-%C.sock\n",
                fe = self.fe_port(fe),
                hv = self.hv.port,
                user = common::me(),
                known = ssh.join(known).display(),
                ctl = ssh.join("ctl").display(),
            );
            std::fs::write(ssh.join(name), text).unwrap();
        }
    }

    /// `bash` with the driver library loaded, as oned runs a driver.
    fn driver(&self, script: &str) -> Command {
        let b = self.base();
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(format!(
                "source {TM}/lib.sh && source {TM}/drivers.sh || exit 99\n{script}"
            ))
            .current_dir(b.join("oned"))
            .env("FE_ROOT", b.join("fe"))
            .env("HV_ROOT", b.join("hv"))
            .env("ONED_SSH_CONFIG", b.join("ssh/oned_config"))
            .env("NODE_SSH_CONFIG", b.join("ssh/node_config"))
            .env("SSH_AUTH_SOCK", &self.agent.sock)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .env_remove("SSH_AGENT_PID")
            .env_remove("SSH_CONNECTION")
            .env_remove("SSH_CLIENT");
        c
    }

    /// Stop the ControlPersist masters oned's plain calls left behind.
    fn stop_masters(&self) {
        for host in ["fe", "hv"] {
            let _ = Command::new("ssh")
                .arg("-F")
                .arg(self.base().join("ssh/oned_config"))
                .args(["-O", "exit", host])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    fn trees(&self) -> BTreeMap<String, Entry> {
        let mut t = BTreeMap::new();
        for host in ["fe", "hv"] {
            walk(&self.base().join(host), host, &mut t);
        }
        t
    }

    /// Run one operation with `fe` played by `fe`, on fresh trees.
    fn run_once(&self, fe: Fe, script: &str) -> Outcome {
        self.reset();
        self.write_configs(fe);
        let logins = self.logins();
        let out = run(&mut self.driver(script), T);
        self.stop_masters();
        if fe == Fe::Sidecar {
            assert!(
                self.logins() > logins,
                "the sidecar saw no login: the operation did not reach it"
            );
        }
        Outcome {
            results: vec![OpResult::from(&out)],
            trees: self.trees(),
        }
    }

    /// The operation with fe = tm-sidecar, then with fe = stock sshd.
    fn both(&self, script: &str) -> (Outcome, Outcome) {
        (
            self.run_once(Fe::Sidecar, script),
            self.run_once(Fe::Stock, script),
        )
    }

    /// Run the operation against both servers and require the same outcome; returns the
    /// sidecar's outcome for further checks.
    fn same(&self, name: &str, script: &str) -> Outcome {
        let started = Instant::now();
        let (ours, theirs) = self.both(script);
        compare(name, &ours, &theirs, &self.sidecar);
        if std::env::var_os("TM_REPLAY_SHOW").is_some() {
            for r in &ours.results {
                eprintln!(
                    "--- {name}: rc {}\n[stdout]\n{}[stderr]\n{}",
                    r.rc, r.stdout, r.stderr
                );
            }
        }
        eprintln!(
            "{name}: same outcome (rc {}) in {:.1?}",
            ours.results[0].rc,
            started.elapsed()
        );
        ours
    }

    /// Several operations at once, after one plain call has started oned's ControlMaster to fe
    /// (and one to hv); returns the outcome and how many SSH logins the sidecar saw meanwhile.
    fn run_many(&self, fe: Fe, scripts: &[String]) -> (Outcome, usize) {
        self.reset();
        self.write_configs(fe);
        let warm = run(&mut self.driver("$SSH fe true && $SSH hv true"), T);
        assert!(
            warm.status.success(),
            "warm-up: {}",
            String::from_utf8_lossy(&warm.stderr)
        );
        let logins_before = self.logins();
        let execs_before = self.log_events("channel_closed");
        let handles: Vec<_> = scripts
            .iter()
            .map(|s| {
                let mut cmd = self.driver(s);
                std::thread::spawn(move || OpResult::from(&run(&mut cmd, T)))
            })
            .collect();
        let results = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let logins = self.logins() - logins_before;
        let execs = self.log_events("channel_closed") - execs_before;
        if fe == Fe::Sidecar {
            assert!(
                execs >= scripts.len(),
                "the sidecar served only {execs} channels"
            );
        }
        self.stop_masters();
        (
            Outcome {
                results,
                trees: self.trees(),
            },
            logins,
        )
    }

    fn logins(&self) -> usize {
        self.log_events("login")
    }

    fn log_events(&self, event: &str) -> usize {
        let needle = format!("\"event\":\"{event}\"");
        self.sidecar
            .logs
            .lines()
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_masters();
    }
}

fn remove(p: &Path) {
    let md = std::fs::symlink_metadata(p).unwrap();
    if md.is_dir() {
        std::fs::remove_dir_all(p).unwrap();
    } else {
        std::fs::remove_file(p).unwrap();
    }
}

// ---- outcomes ---------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct OpResult {
    rc: i32,
    stdout: String,
    stderr: String,
}

impl From<&std::process::Output> for OpResult {
    fn from(o: &std::process::Output) -> OpResult {
        OpResult {
            rc: o.status.code().unwrap_or(-1),
            stdout: normalize(&String::from_utf8_lossy(&o.stdout)),
            stderr: normalize(&String::from_utf8_lossy(&o.stderr)),
        }
    }
}

struct Outcome {
    results: Vec<OpResult>,
    trees: BTreeMap<String, Entry>,
}

impl Outcome {
    fn rc(&self) -> i32 {
        self.results[0].rc
    }
    fn stdout(&self) -> &str {
        &self.results[0].stdout
    }
    fn stderr(&self) -> &str {
        &self.results[0].stderr
    }
    fn file(&self, path: &str) -> &Entry {
        self.trees
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing; stderr: {}", self.stderr()))
    }
    fn has(&self, path: &str) -> bool {
        self.trees.contains_key(path)
    }
}

/// One file-system object, keyed by `<host>/<path below the host root>`.
#[derive(Debug, Clone)]
struct Entry {
    kind: char,
    mode: u32,
    size: u64,
    /// sha256 of the content (see [`content_digest`]), or the target of a symlink
    digest: String,
    alloc: u64,
}

impl Entry {
    fn same_except_alloc(&self, o: &Entry) -> bool {
        self.kind == o.kind && self.mode == o.mode && self.size == o.size && self.digest == o.digest
    }
}

fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Entry>) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let key = normalize(&format!("{rel}/{}", name.to_string_lossy()));
        let md = std::fs::symlink_metadata(&path).unwrap();
        let mode = md.permissions().mode() & 0o7777;
        let alloc = md.blocks() * 512;
        let entry = if md.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap();
            Entry {
                kind: 'l',
                mode: 0,
                size: 0,
                digest: normalize(&target.to_string_lossy()),
                alloc: 0,
            }
        } else if md.is_dir() {
            walk(&path, &key, out);
            Entry {
                kind: 'd',
                mode,
                size: 0,
                digest: String::new(),
                alloc: 0,
            }
        } else if md.is_file() {
            Entry {
                kind: 'f',
                mode,
                size: md.len(),
                digest: content_digest(&path),
                alloc,
            }
        } else {
            Entry {
                kind: '?',
                mode,
                size: 0,
                digest: String::new(),
                alloc: 0,
            }
        };
        out.insert(key, entry);
    }
}

/// sha256 over the file's content in a form that does not depend on how it is stored: every
/// 64 KiB block that holds a non-zero byte, with its offset, then the size. Equal for equal
/// contents, sparse or not; data extents are found with SEEK_DATA/SEEK_HOLE so that holes in a
/// 2 GiB image cost nothing.
fn content_digest(path: &Path) -> String {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 64 * 1024;
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut next_block = 0u64; // first block index not yet hashed
    let mut pos = 0u64;
    while pos < size {
        let data = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => panic!("SEEK_DATA {}: {e}", path.display()),
        };
        let hole = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(data)).unwrap();
        let first = (data / BLOCK).max(next_block);
        let last = hole.div_ceil(BLOCK);
        for b in first..last {
            let off = b * BLOCK;
            let len = BLOCK.min(size - off) as usize;
            file.read_exact_at(&mut buf[..len], off).unwrap();
            if buf[..len].iter().any(|&x| x != 0) {
                h.update(off.to_le_bytes());
                h.update(&buf[..len]);
            }
        }
        next_block = last;
        pos = hole;
    }
    h.update(size.to_le_bytes());
    let digest = h.finalize();
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// mktemp's random parts: `tmp.XXXXXXXXXX` (`mktemp -p DIR`) and `disk.N.XXXXXXXX`
/// (cpds' `mktemp -u <disk>.XXXXXXXX`) become `RANDOM`.
fn normalize(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let alnum_run = |at: usize| {
        b[at..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric())
            .count()
    };
    while i < b.len() {
        let before = &out[..];
        let len = if before.ends_with(b"tmp.") {
            10
        } else if before.ends_with(b".") && after_disk_n(before) {
            8
        } else {
            0
        };
        if len > 0 && alnum_run(i) == len {
            out.extend_from_slice(b"RANDOM");
            i += len;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `…disk.<digits>.` at the end of `s`.
fn after_disk_n(s: &[u8]) -> bool {
    let s = &s[..s.len() - 1];
    let digits = s.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    digits > 0 && s[..s.len() - digits].ends_with(b"disk.")
}

/// Allocation may differ a little (file-system block rounding, tar's hole detection on block
/// boundaries), never by more than 1 MiB + 2 %.
fn alloc_close(a: u64, b: u64) -> bool {
    a.abs_diff(b) <= MIB + a.max(b) / 50
}

/// Everything that differs between the two outcomes (empty when they match), plus sparse
/// images that did not stay sparse.
fn differences(ours: &Outcome, theirs: &Outcome) -> String {
    let mut diffs = String::new();
    for (i, (a, b)) in ours.results.iter().zip(&theirs.results).enumerate() {
        if a != b {
            let _ = writeln!(
                diffs,
                "operation {i}:\n  tm-sidecar: rc {}\n    stdout {:?}\n    stderr {:?}\n  \
                 stock sshd: rc {}\n    stdout {:?}\n    stderr {:?}",
                a.rc, a.stdout, a.stderr, b.rc, b.stdout, b.stderr
            );
        }
    }
    for (k, a) in &ours.trees {
        match theirs.trees.get(k) {
            None => {
                let _ = writeln!(diffs, "only with tm-sidecar: {k} {a:?}");
            }
            Some(b) if !a.same_except_alloc(b) => {
                let _ = writeln!(diffs, "{k}:\n  tm-sidecar {a:?}\n  stock sshd {b:?}");
            }
            Some(b) if !alloc_close(a.alloc, b.alloc) => {
                let _ = writeln!(
                    diffs,
                    "{k}: allocated {} bytes with tm-sidecar, {} with stock sshd",
                    a.alloc, b.alloc
                );
            }
            Some(_) => {}
        }
    }
    for (k, b) in &theirs.trees {
        if !ours.trees.contains_key(k) {
            let _ = writeln!(diffs, "only with stock sshd: {k} {b:?}");
        }
    }
    // Sparse images stay sparse (a "device" written through `tar -xO >` is not an image file).
    for (who, o) in [("tm-sidecar", ours), ("stock sshd", theirs)] {
        for (k, e) in &o.trees {
            if e.kind == 'f' && e.size >= GIB && !k.starts_with("hv/dev/") && e.alloc > 64 * MIB {
                let _ = writeln!(
                    diffs,
                    "{k}: not sparse with {who} ({} of {} bytes allocated)",
                    e.alloc, e.size
                );
            }
        }
    }
    diffs
}

fn compare(name: &str, ours: &Outcome, theirs: &Outcome, sidecar: &Sidecar) {
    let diffs = differences(ours, theirs);
    if !diffs.is_empty() {
        let logs = sidecar.logs.lines();
        let tail = &logs[logs.len().saturating_sub(30)..];
        panic!(
            "{name}: tm-sidecar and stock sshd differ\n{diffs}\nsidecar log tail:\n{}",
            tail.join("\n")
        );
    }
}

// ---- datastore layout (tests/tm/golden.sh) ----------------------------------------------------

const RAW: &str = "3b1c2ad9b2a3e5a3c3f1e0d2c4b5a6f7";
const QCOW: &str = "8f5e0c1d3a2b4c6d8e0f1a2b3c4d5e6f";
const QCOW_PREALLOC: &str = "c0ffee00c0ffee00c0ffee00c0ffee00";
const CHAIN: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const NEW: &str = "d00dfeedd00dfeedd00dfeedd00dfeed";
const STALE: &str = "77777777777777777777777777777777";

fn assert_ok(name: &str, o: &Outcome) {
    assert_eq!(o.rc(), 0, "{name} failed: {}", o.stderr());
}

/// The raw image as golden.sh writes it: 2 GiB, a few MiB allocated.
fn assert_raw_image(o: &Outcome, path: &str) {
    let e = o.file(path);
    assert_eq!(e.kind, 'f', "{path}");
    assert_eq!(e.size, 2 * GIB, "{path}");
    assert_eq!(
        e.digest,
        o.file(&format!("fe/datastores/1/{RAW}")).digest,
        "{path}"
    );
    assert!(e.alloc < 16 * MIB, "{path} not sparse: {e:?}");
}

// ---- the operations ---------------------------------------------------------------------------

#[test]
fn clone_and_ln() {
    let w = World::new(false);

    // 6.x ssh/clone of a raw image: oned -> fe (agent forwarded) -> tar | ssh hv 'tar -xSf'
    let o = w.same(
        "ssh clone raw",
        &format!("tm_ssh_clone fe:$FE_DS/1/{RAW} hv:$HV_DS/0/9/disk.0 9 1"),
    );
    assert_ok("ssh clone raw", &o);
    assert_raw_image(&o, "hv/datastores/0/9/disk.0");
    assert!(o.stderr().contains("INFO: tm: Cloning"), "{}", o.stderr());
    assert!(o.has("hv/datastores/0/.monitor"));

    // qcow2 with its .snap dir: --transform renames both, $SRC_SNAP expanded on fe
    let o = w.same(
        "ssh clone qcow2 with snapshots",
        &format!("tm_ssh_clone fe:$FE_DS/1/{CHAIN} hv:$HV_DS/0/9/disk.1 9 1"),
    );
    assert_ok("ssh clone qcow2", &o);
    assert_eq!(o.file("hv/datastores/0/9/disk.1").kind, 'l');
    assert!(o.has("hv/datastores/0/9/disk.1.snap/1"));
    assert!(o.file("hv/datastores/0/9/disk.1.snap/0").size > GIB);

    // SPARSE=no: plain tar -cf / -xf (6.10+)
    let o = w.same(
        "ssh clone SPARSE=no",
        &format!("SPARSE=no tm_ssh_clone fe:$FE_DS/1/{QCOW} hv:$HV_DS/0/9/disk.2 9 1"),
    );
    assert_ok("ssh clone SPARSE=no", &o);

    // ssh/ln is the same script (a symlink to clone): persistent raw image with a snapshot
    let o = w.same(
        "ssh ln persistent raw",
        &format!("SCRIPT_NAME=ln tm_ssh_clone fe:$FE_DS/1/{RAW} hv:$HV_DS/0/9/disk.3 9 1"),
    );
    assert_ok("ssh ln", &o);
    assert_raw_image(&o, "hv/datastores/0/9/disk.3.snap/0");

    // 7.x local/clone, raw: Ruby helper script on fe, nested ssh to hv
    let o = w.same(
        "local clone raw",
        &format!("FORMAT=raw tm_local_clone fe:$FE_DS/1/{RAW} hv:$HV_DS/0/9/disk.0 9 1"),
    );
    assert_ok("local clone raw", &o);
    assert_raw_image(&o, "hv/datastores/0/9/disk.0");

    // 7.x local/ln (= clone), qcow2: the hypervisor pulls from fe with a multi-line
    // `ssh -n fe "if ...; fi; tar ... \$SRC_SNAP"`, tar on stdout
    let o = w.same(
        "local ln qcow2 chain (hv pulls)",
        &format!("FORMAT=qcow2 tm_local_clone fe:$FE_DS/1/{CHAIN} hv:$HV_DS/0/9/disk.0 9 1"),
    );
    assert_ok("local ln qcow2", &o);
    let link = o.file("hv/datastores/0/9/disk.0");
    assert_eq!((link.kind, link.digest.as_str()), ('l', "disk.0.snap/1"));

    let o = w.same(
        "local clone qcow2 (hv pulls)",
        &format!(
            "FORMAT=qcow2 tm_local_clone fe:$FE_DS/1/{QCOW_PREALLOC} hv:$HV_DS/0/9/disk.4 9 1"
        ),
    );
    assert_ok("local clone qcow2", &o);
    assert!(o.file("hv/datastores/0/9/disk.4.snap/0").size > GIB);

    // failure: the image is gone; tar's error from fe reaches oned through ssh_exec_and_log
    let o = w.same(
        "ssh clone missing image",
        "tm_ssh_clone fe:$FE_DS/1/0000000000000000 hv:$HV_DS/0/9/disk.0 9 1",
    );
    assert_ne!(o.rc(), 0);
    assert!(o.stderr().contains("Cannot stat"), "{}", o.stderr());
    assert!(o.stderr().contains("Error copying"), "{}", o.stderr());
}

#[test]
fn mv_stop_undeploy_and_resume() {
    let w = World::new(false);

    // stop/undeploy, 6.x: the hypervisor streams `tar -cf - 5 | ssh fe 'tar -C ... -xf -'`
    let o = w.same(
        "ssh mv hv -> fe",
        "tm_ssh_mv hv:$HV_DS/0/5 fe:$FE_DS/0/5 5 0",
    );
    assert_ok("ssh mv to fe", &o);
    assert!(!o.has("hv/datastores/0/5"));
    let e = o.file("fe/datastores/0/5/disk.0");
    assert!(e.size == 2 * GIB && e.alloc < 16 * MIB, "{e:?}");
    assert_eq!(o.file("fe/datastores/0/5/disk.2").kind, 'l');
    // the mktemp -p probe file was removed by the trap
    assert!(
        !o.trees.keys().any(|k| k.contains("RANDOM")),
        "{:?}",
        o.trees.keys()
    );

    // resume, 6.x: fe streams to the hypervisor (agent forwarded), replacing stale files there
    let o = w.same(
        "ssh mv fe -> hv",
        "tm_ssh_mv fe:$FE_DS/0/7 hv:$HV_DS/0/7 7 0",
    );
    assert_ok("ssh mv from fe", &o);
    assert!(!o.has("fe/datastores/0/7"));
    assert!(!o.has("hv/datastores/0/7/leftover"));
    assert!(o.has("hv/datastores/0/7/disk.0.snap/0"));
    let e = o.file("hv/datastores/0/7/disk.2");
    assert!(e.size == 2 * GIB && e.alloc < 16 * MIB, "{e:?}");

    // 7.x local/mv both ways: multi-line exec string `rm -rf ...; tar -C ... -xf -;` at fe,
    // host fingerprints (machine-id, ip --br l) from both hosts
    let o = w.same(
        "local mv hv -> fe",
        "tm_local_mv hv:$HV_DS/0/6 fe:$FE_DS/0/6 6 0",
    );
    assert_ok("local mv to fe", &o);
    assert!(o.stderr().contains("fingerprint fe: "), "{}", o.stderr());
    assert!(o.has("fe/datastores/0/6/disk.2.snap/0"));
    let o = w.same(
        "local mv fe -> hv",
        "tm_local_mv fe:$FE_DS/0/8 hv:$HV_DS/0/8 8 0",
    );
    assert_ok("local mv from fe", &o);
    assert!(!o.has("fe/datastores/0/8"));
}

#[test]
fn mvds_and_cpds() {
    let w = World::new(false);

    // 6.x ssh/mvds, qcow2 chain: qemu-img convert on fe, then the tar stream on stdout
    let o = w.same(
        "ssh mvds qcow2 chain",
        &format!("tm_ssh_mvds fe:$FE_DS/0/7/disk.0 $FE_DS/1/{NEW} 7 1"),
    );
    assert_ok("ssh mvds chain", &o);
    assert_eq!(o.file(&format!("fe/datastores/1/{NEW}")).kind, 'f');
    assert!(!o.has("fe/datastores/0/7/disk.0.snap"));

    // raw disk with a .snap dir: `ls <p>.snap` succeeds, `rsync -r --delete fe:<p>.snap/ <dst>.snap`
    let o = w.same(
        "ssh mvds raw + rsync",
        &format!("tm_ssh_mvds fe:$FE_DS/0/7/disk.2 $FE_DS/1/{NEW} 7 1"),
    );
    assert_ok("ssh mvds raw", &o);
    assert_eq!(o.file(&format!("fe/datastores/1/{NEW}")).size, 2 * GIB);
    assert!(o.has(&format!("fe/datastores/1/{NEW}.snap/0")));

    // 7.x local/mvds qcow2: rsync --delete into an existing .snap with a stale file
    let o = w.same(
        "local mvds qcow2 + rsync --delete",
        &format!("FORMAT=qcow2 tm_local_mvds fe:$FE_DS/0/7/disk.0 $FE_DS/1/{STALE} 7 1"),
    );
    assert_ok("local mvds qcow2", &o);
    assert!(!o.has(&format!("fe/datastores/1/{STALE}.snap/stale")));
    assert!(o.has(&format!("fe/datastores/1/{STALE}.snap/0")));
    let o = w.same(
        "local mvds raw",
        &format!("FORMAT=raw tm_local_mvds fe:$FE_DS/0/7/disk.2 $FE_DS/1/{NEW} 7 1"),
    );
    assert_ok("local mvds raw", &o);

    // 6.x ssh/cpds of a qcow2 chain: the export script exits 42, the copy uses the export, the
    // EXIT trap removes it
    let o = w.same(
        "ssh cpds rc 42",
        &format!("tm_ssh_cpds fe:$FE_DS/0/7/disk.0 $FE_DS/1/{NEW} -1 7 1"),
    );
    assert_ok("ssh cpds 42", &o);
    assert!(o.has(&format!("fe/datastores/1/{NEW}")));
    assert!(!o.trees.keys().any(|k| k.contains("RANDOM")));
    // rc 0 path (raw disk), and a snapshot id
    let o = w.same(
        "ssh cpds rc 0",
        &format!("tm_ssh_cpds fe:$FE_DS/0/7/disk.2 $FE_DS/1/{NEW} -1 7 1"),
    );
    assert_ok("ssh cpds 0", &o);
    let o = w.same(
        "ssh cpds snapshot",
        &format!("tm_ssh_cpds fe:$FE_DS/0/7/disk.2 $FE_DS/1/{NEW} 0 7 1"),
    );
    assert_ok("ssh cpds snapshot", &o);
    assert_eq!(
        o.file(&format!("fe/datastores/1/{NEW}")).size,
        "snapshot of disk.2\n".len() as u64
    );
    // 7.x local/cpds (readlink -f, tar -chSf)
    let o = w.same(
        "local cpds rc 42",
        &format!("tm_local_cpds fe:$FE_DS/0/7/disk.0 $FE_DS/1/{NEW} -1 7 1"),
    );
    assert_ok("local cpds", &o);
    assert_eq!(o.file(&format!("fe/datastores/1/{NEW}")).kind, 'f');
    assert!(!o.trees.keys().any(|k| k.contains("RANDOM")));
}

#[test]
fn delete_context_monitor_mktemp() {
    let w = World::new(false);

    let o = w.same("ssh delete", "tm_ssh_delete fe:$FE_DS/0/7 7 0");
    assert_ok("ssh delete", &o);
    assert!(!o.has("fe/datastores/0/7"));
    let o = w.same(
        "ssh delete (already gone)",
        "tm_ssh_delete fe:$FE_DS/0/77 77 0",
    );
    assert_ok("ssh delete gone", &o);
    // rm fails (an immutable file): ten tries a second apart, then the driver's error
    let o = w.same(
        "ssh delete, retry loop",
        r#"chattr +i $FE_DS/0/7/disk.1 || exit 90
        trap "chattr -i $FE_DS/0/7/disk.1" EXIT
        (tm_ssh_delete fe:$FE_DS/0/7 7 0)"#,
    );
    assert_eq!(o.rc(), 1);
    assert_eq!(
        o.stderr().matches("Operation not permitted").count(),
        10,
        "{}",
        o.stderr()
    );
    assert!(o.stderr().contains("Error deleting"), "{}", o.stderr());
    assert!(o.has("fe/datastores/0/7/disk.1") && !o.has("fe/datastores/0/7/disk.2"));
    let o = w.same("local delete", "tm_local_delete fe:$FE_DS/0/8 8 0");
    assert_ok("local delete", &o);
    assert!(!o.has("fe/datastores/0/8"));

    // common/context: ISO built locally with xorriso, tar | ssh fe "tar -xSf - -C <dir>"
    let o = w.same(
        "context ISO",
        "tm_context $FE_ROOT/vms/9/context.sh $FE_ROOT/vms/9/init.sh fe:$FE_DS/0/9/disk.1 9 0",
    );
    assert_ok("context", &o);
    assert!(o.file("fe/datastores/0/9/disk.1").size > 300_000);
    assert!(!o.has("fe/datastores/.isofiles/9"));

    // .monitor: enable (unchanged, then changed), read back (stdout only), disable, 7.x variant
    let o = w.same(
        ".monitor enable/disable",
        r#"
        ssh_make_path fe $FE_DS/0/12
        enable_local_monitoring fe $FE_DS/0/12 ssh
        echo "1: $(ssh_monitor_and_log fe "cat $FE_DS/0/.monitor")"
        enable_local_monitoring fe $FE_DS/0/12 qcow2
        echo "2: $(ssh_monitor_and_log fe "cat $FE_DS/0/.monitor")"
        disable_local_monitoring fe $FE_DS/0/12
        echo "3: $(ssh_monitor_and_log fe "ls -a $FE_DS/0")"
        rb_enable_local_monitoring fe $FE_DS/0/12/disk.0 ssh
        echo "4: $(ssh_monitor_and_log fe "cat $FE_DS/0/.monitor")"
        "#,
    );
    assert_ok(".monitor", &o);
    assert_eq!(
        o.stdout(),
        "1: ssh\n2: qcow2\n3: .\n..\n12\n7\n8\n4: ssh\n",
        "{}",
        o.stderr()
    );

    // The comparison is not vacuous: a result that depends on the server is reported.
    let (ours, theirs) =
        w.both(r#"$SSH fe "echo \${SSH_CONNECTION##* } > $FE_DS/port; echo \$SSH_CONNECTION""#);
    let diffs = differences(&ours, &theirs);
    assert!(diffs.contains("fe/datastores/port:"), "{diffs}");
    assert!(diffs.contains("stdout"), "{diffs}");

    // A long silent step (a big qemu-img convert): OpenNebula's ServerAliveInterval makes the
    // client probe the server; here every second, giving up after one unanswered probe.
    let o = w.same(
        "silent step with keepalives",
        r#"$SSH -o ControlMaster=no -o ControlPath=none -o ServerAliveInterval=1 \
            -o ServerAliveCountMax=1 fe 'sleep 4; echo done'"#,
    );
    assert_eq!((o.rc(), o.stdout()), (0, "done\n"), "{}", o.stderr());

    // mktemp -p on fe: the name on stdout, the file there (0600), test -f, rm -f
    let o = w.same(
        "mktemp -p",
        r#"
        f=$($SSH fe "mktemp -p \"$FE_DS/0\"") || exit 1
        echo "$f"
        $SSH fe "test -f $f"; echo "test -f: $?"
        $SSH fe "stat -c %a $f"
        $SSH fe "rm -f $f"
        $SSH fe "test -f $f"; echo "after rm: $?"
        "#,
    );
    assert_ok("mktemp", &o);
    assert!(
        o.stdout()
            .ends_with("/datastores/0/tmp.RANDOM\ntest -f: 0\n600\nafter rm: 1\n"),
        "{}",
        o.stdout()
    );
}

#[test]
fn hypervisor_pulls_from_fe() {
    let w = World::new(false);

    // tm_cache.rb: scp on the hypervisor (OpenSSH 9: SFTP subsystem on fe), JSON on stdout
    let o = w.same(
        "tm_cache scp (SFTP)",
        &format!("tm_cache_get hv fe:$FE_DS/1/{QCOW} 4"),
    );
    assert_ok("tm_cache sftp", &o);
    assert!(o.stdout().contains("\"host\":\"hv\""), "{}", o.stdout());
    assert_eq!(
        o.file("hv/var/tmp/one/cache/4").digest,
        o.file(&format!("fe/datastores/1/{QCOW}")).digest
    );
    // ... and with -O (an 8.x host: exec `scp -f` on fe)
    let o = w.same(
        "tm_cache scp -O",
        &format!("SCP_OPTS=-O tm_cache_get hv fe:$FE_DS/1/{QCOW} 4"),
    );
    assert_ok("tm_cache -O", &o);
    assert_eq!(
        o.file("hv/var/tmp/one/cache/4").digest,
        o.file(&format!("fe/datastores/1/{QCOW}")).digest
    );
    // a missing image: the same message from scp in both modes, no JSON, no file
    for opts in ["", "-O"] {
        let o = w.same(
            &format!("tm_cache scp {opts} missing image"),
            &format!("SCP_OPTS={opts} tm_cache_get hv fe:$FE_DS/1/0000000000000000 4"),
        );
        assert!(o.stdout().is_empty(), "{}", o.stdout());
        assert!(o.stderr().contains("No such file"), "{}", o.stderr());
        assert!(!o.has("hv/var/tmp/one/cache/4"));
    }

    // fs_lvm_ssh/clone: `ssh -n fe "tar -cSO <path> 2> /dev/null" | tar -xO > $DEV` on the host
    let o = w.same(
        "fs_lvm_ssh clone",
        &format!("tm_fs_lvm_ssh_clone fe:$FE_DS/1/{RAW} hv:$HV_DS/0/9/disk.0 9 1"),
    );
    assert_ok("fs_lvm_ssh clone", &o);
    let dev = o.file("hv/dev/vg-one-0/lv-one-9-0");
    assert_eq!(dev.size, 2 * GIB);
    assert_eq!(dev.digest, o.file(&format!("fe/datastores/1/{RAW}")).digest);
    assert_eq!(o.file("hv/datastores/0/9/disk.0").kind, 'l');
    assert!(!o.has("hv/datastores/0/.monitor"));
}

#[test]
fn datastore_and_stream_captures() {
    let w = World::new(false);

    // datastore fs/cp with fe in BRIDGE_LIST: image on stdin of `dd of=<tmp> bs=64k conv=sparse`
    let o = w.same(
        "fs/cp raw via dd",
        &format!("ds_fs_cp $FE_ROOT/upload/small.raw fe $FE_DS/1/{NEW} raw"),
    );
    assert_ok("fs/cp raw", &o);
    assert!(o.stdout().ends_with(&format!("/datastores/1/{NEW} raw\n")));
    let e = o.file(&format!("fe/datastores/1/{NEW}"));
    assert_eq!(e.digest, o.file("fe/upload/small.raw").digest);
    assert!(e.alloc < 8 * MIB, "dd conv=sparse left holes: {e:?}");
    // a qcow2 upload converted to raw on fe
    let o = w.same(
        "fs/cp qcow2 -> raw",
        &format!("ds_fs_cp $FE_ROOT/upload/small.qcow2 fe $FE_DS/1/{NEW} raw"),
    );
    assert_ok("fs/cp qcow2", &o);
    assert_eq!(o.file(&format!("fe/datastores/1/{NEW}")).size, 2 * GIB);

    // ssh_monitor_and_log keeps stdout only; ssh_exec_and_log keeps stderr only (and the rc)
    let o = w.same(
        "stdout-only capture",
        r#"out=$(ssh_monitor_and_log fe 'echo to-stdout; echo to-stderr >&2; printf "last line"')
           echo "[$out]""#,
    );
    assert_eq!(o.stdout(), "[to-stdout\nlast line]\n");
    let o = w.same(
        "stderr-only capture",
        r#"ssh_exec_and_log_no_error fe 'echo to-stdout; echo to-stderr >&2; exit 3' 'it failed'
           echo "rc=$? err=[$SSH_EXEC_ERR]""#,
    );
    // (the first contact with fe also leaves ssh's accept-new warning in the capture)
    assert!(o.stdout().starts_with("rc=3 err=["), "{}", o.stdout());
    assert!(o.stdout().ends_with("\nto-stderr]\n"), "{}", o.stdout());
    assert!(o.stderr().contains("it failed"), "{}", o.stderr());
    let o = w.same(
        "ssh_exec_and_log exits",
        r#"ssh_exec_and_log fe 'mkdir /proc/nope' 'mkdir failed'; echo not reached"#,
    );
    assert_eq!(o.rc(), 1);
    assert!(o.stdout().is_empty());

    // 7.x Ruby helper: multi-line script with `export PATH=$PATH:/usr/sbin:/sbin`, stdout and
    // stderr kept, or dropped locally by `bash -s 1>/dev/null 2>/dev/null`
    let script = r#"
        for t in qemu-img tar rsync mkfs.ext4 sha256sum; do
            printf "%s=%s\n" "$t" "$(type -P $t)"
        done
        echo "${PATH##*:}"
        echo "bashrc: ${BASHRC_READ:-no} home: $HOME"
        echo warn >&2
        exit 5"#;
    let o = w.same(
        "Ruby helper multi-line",
        &format!("rb_ssh fe '{script}'; echo rc=$?"),
    );
    assert!(
        o.stdout().contains("qemu-img=/usr/bin/qemu-img\n"),
        "{}",
        o.stdout()
    );
    assert!(
        o.stdout().contains("\n/sbin\nbashrc: yes home: "),
        "{}",
        o.stdout()
    );
    assert!(o.stdout().ends_with("\nrc=5\n"), "{}", o.stdout());
    assert!(o.stderr().contains("\nwarn\n"), "{}", o.stderr());
    let o = w.same(
        "Ruby helper nostdout nostderr",
        &format!("rb_ssh fe '{script}' nostdout nostderr; echo rc=$?"),
    );
    assert_eq!(o.stdout(), "rc=5\n");
}

/// oned runs TM actions 15 at a time (`one_tm -t 15`); plain calls share one ControlMaster
/// connection to fe.
#[test]
fn tm_pool_fifteen_at_once_through_one_master() {
    let w = World::new(true);
    let scripts: Vec<String> = (100..115)
        .map(|vm| match vm % 5 {
            0 => format!("tm_ssh_mvds fe:$FE_DS/0/{vm}/disk.2 $FE_DS/1/pool{vm} {vm} 1"),
            1 => format!("tm_ssh_cpds fe:$FE_DS/0/{vm}/disk.0 $FE_DS/1/pool{vm} -1 {vm} 1"),
            2 => format!("ds_fs_cp $FE_ROOT/upload/small.raw fe $FE_DS/1/pool{vm} raw"),
            3 => format!("tm_ssh_delete fe:$FE_DS/0/{vm} {vm} 0"),
            _ => format!(
                r#"ssh_make_path fe $FE_DS/0/{vm}/new
                enable_local_monitoring fe $FE_DS/0/{vm} ssh
                f=$($SSH fe "mktemp -p $FE_DS/0/{vm}/new") && $SSH fe "test -f $f" &&
                    ssh_monitor_and_log fe "ls $FE_DS/0/{vm}; rm -f $f" &&
                    $SSH fe "tar -C $FE_DS/0/{vm} -cSf - disk.2" | tar -tvf - | wc -l"#
            ),
        })
        .collect();
    let started = Instant::now();
    let (ours, logins) = w.run_many(Fe::Sidecar, &scripts);
    let (theirs, _) = w.run_many(Fe::Stock, &scripts);
    for (i, r) in ours.results.iter().enumerate() {
        assert_eq!(r.rc, 0, "operation {i} ({}): {}", scripts[i], r.stderr);
    }
    assert_eq!(
        logins, 0,
        "all plain calls must go through the ControlMaster opened before"
    );
    compare("15 operations at once", &ours, &theirs, &w.sidecar);
    for vm in [100, 105, 110] {
        assert_eq!(
            ours.file(&format!("fe/datastores/1/pool{vm}")).size,
            2 * GIB
        );
    }
    for vm in [103, 108, 113] {
        assert!(!ours.has(&format!("fe/datastores/0/{vm}")));
    }
    eprintln!("15 at once: same outcome in {:.1?}", started.elapsed());
}
