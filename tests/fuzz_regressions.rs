//! Replays every committed fuzz input on the stable toolchain: the seed corpora
//! (`fuzz/corpus/<target>/`) and the reproducers of fixed findings (`fuzz/regressions/<target>/`)
//! go through the same entry functions the libFuzzer targets call
//! ([`tm_sidecar::fuzzing`]), and none may panic. Also guards the corpus itself: known target
//! names only, small, and nothing that looks like a private key.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use tm_sidecar::fuzzing::TARGETS;

const MAX_FILES_PER_TARGET: usize = 250;
const MAX_TOTAL_BYTES: u64 = 4 << 20;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// (target, file) for every input under `fuzz/<kind>/*/`.
fn inputs(kind: &str) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(fuzz_dir().join(kind)) else {
        return out;
    };
    for d in dirs {
        let d = d.unwrap();
        if !d.file_type().unwrap().is_dir() {
            continue;
        }
        let target = d.file_name().to_string_lossy().into_owned();
        for f in std::fs::read_dir(d.path()).unwrap() {
            let f = f.unwrap();
            if f.file_type().unwrap().is_file() {
                out.push((target.clone(), f.path()));
            }
        }
    }
    out.sort();
    out
}

fn entry(target: &str) -> tm_sidecar::fuzzing::Entry {
    TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("fuzz input for unknown target {target:?}"))
}

/// Panics seen on any thread: the transfer targets run work on tokio's blocking pool and on
/// handle worker threads, where a panic does not reach the caller (libFuzzer aborts on it).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics_on_every_thread() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn replay(kind: &str) -> usize {
    count_panics_on_every_thread();
    let all = inputs(kind);
    for (target, path) in &all {
        let data = std::fs::read(path).unwrap();
        let f = entry(target);
        let before = PANICS.load(Ordering::SeqCst);
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(
            r.is_ok() && PANICS.load(Ordering::SeqCst) == before,
            "{target}: {} panics (reproduce with `cargo +nightly fuzz run {target} {}`)",
            path.display(),
            path.display()
        );
    }
    all.len()
}

#[test]
fn seed_corpora_replay_without_panics() {
    let n = replay("corpus");
    assert!(n > 0, "no seed corpus found under fuzz/corpus");
    // Every target has seeds.
    for (name, _) in TARGETS {
        assert!(
            fuzz_dir().join("corpus").join(name).is_dir(),
            "fuzz/corpus/{name} is missing"
        );
    }
}

#[test]
fn regression_inputs_replay_without_panics() {
    replay("regressions");
}

#[test]
fn every_target_has_a_libfuzzer_binary() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        let src = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        assert!(
            text.contains(&format!("tm_sidecar::fuzzing::{name}(")),
            "{} must call tm_sidecar::fuzzing::{name}",
            src.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml lacks a [[bin]] for {name}"
        );
    }
}

#[test]
fn committed_inputs_stay_small_and_hold_no_private_key() {
    let mut total = 0u64;
    let mut per_target = std::collections::BTreeMap::<String, usize>::new();
    let markers: Vec<String> = ["", "OPENSSH ", "RSA ", "EC ", "DSA "]
        .iter()
        .flat_map(|kind| {
            [
                format!("BEGIN {kind}PRIVATE KEY"),
                format!("BEGIN {}PRIVATE KEY", kind.trim_end()),
            ]
        })
        .collect();
    for (target, path) in inputs("corpus").into_iter().chain(inputs("regressions")) {
        let data = std::fs::read(&path).unwrap();
        total += data.len() as u64;
        *per_target.entry(target).or_default() += 1;
        let text = String::from_utf8_lossy(&data);
        for m in &markers {
            assert!(
                !text.contains(m.as_str()),
                "{} looks like it holds a private key",
                path.display()
            );
        }
    }
    assert!(
        total <= MAX_TOTAL_BYTES,
        "committed fuzz inputs take {total} bytes; minimize them (fuzz/README.md)"
    );
    for (target, n) in per_target {
        assert!(
            n <= MAX_FILES_PER_TARGET,
            "{target}: {n} committed inputs; minimize the corpus (fuzz/README.md)"
        );
    }
}
