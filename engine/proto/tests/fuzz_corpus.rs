//! Replays the cargo-fuzz corpus (engine/proto/fuzz/corpus/decode_decide) and every vector datagram
//! through the decoder and the decision path as an ordinary test: none may panic, and every
//! answer must be a well-formed packet (checked inside `decode_and_decide`).

use std::path::PathBuf;

use dynauth_proto::fuzzing::decode_and_decide;

#[test]
fn fuzz_corpus_replays_without_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_decide");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus folder exists") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        decode_and_decide(&data);
        // Every prefix too: truncation is the commonest real-world damage.
        for end in (0..data.len()).step_by(7) {
            decode_and_decide(&data[..end]);
        }
        replayed += 1;
    }
    assert!(
        replayed >= 40,
        "corpus too small: {replayed} files in {}",
        dir.display()
    );
}
