//! Replays every committed fuzz corpus through the same oracle the fuzz target runs, so a crash
//! once found stays fixed. Corpora live in `fuzz/corpus/<target>/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "corpus input {} fails", path.display());
        n += 1;
    }
    n
}

#[test]
fn frame_decode_corpus_replays_cleanly() {
    let n = replay("frame_decode", securesmart_transport::fuzzing::frame_decode);
    assert!(n >= 8, "the corpus is present ({n} inputs)");
}

#[test]
fn every_fuzz_target_has_a_replayed_corpus() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let replayed = ["frame_decode"];
    for entry in std::fs::read_dir(targets).unwrap() {
        let name = entry
            .unwrap()
            .path()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            replayed.contains(&name.as_str()),
            "fuzz target {name} has no replay test"
        );
    }
}
