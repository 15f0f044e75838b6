//! Replays every committed fuzz corpus through the same oracle its fuzz target runs, so a crash
//! once found stays fixed. Corpora live in `fuzz/corpus/<target>/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use securesmart::membership::fuzzing as membership;
use securesmart::transport::fuzzing as transport;

/// A fuzz body: panics when its oracle fails.
type Body = fn(&[u8]);

/// Every fuzz target and the function it fuzzes.
const TARGETS: &[(&str, Body)] = &[
    ("frame_decode", transport::frame_decode),
    ("crl", transport::crl),
    ("membership_command", membership::membership_command),
    ("enroll_request", membership::enroll_request),
    ("csr", membership::csr),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_corpus_replays_cleanly() {
    for (target, body) in TARGETS {
        let dir = root().join("fuzz/corpus").join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(outcome.is_ok(), "corpus input {} fails", path.display());
            n += 1;
        }
        assert!(n >= 3, "{target}: the corpus is present ({n} inputs)");
    }
}

#[test]
fn every_fuzz_target_has_a_replayed_corpus() {
    for entry in std::fs::read_dir(root().join("fuzz/fuzz_targets")).unwrap() {
        let name = entry
            .unwrap()
            .path()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz target {name} has no replay"
        );
    }
}
