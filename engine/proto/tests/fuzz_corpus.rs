//! Replays the cargo-fuzz corpus (engine/proto/fuzz/corpus/decode_decide) and every vector datagram
//! through the decoder and the decision path as an ordinary test: none may panic, and every
//! answer must be a well-formed packet (checked inside `decode_and_decide`).

use std::path::PathBuf;

use dynauth_proto::fuzzing::{decide_batches, decide_sequence, decode_and_decide};

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

/// The corpus as sequences: each file sent, then retransmitted at once (a replay from the
/// cache), then again after the 300 s answer window (decided afresh), so the oracle in
/// `decide_sequence` checks replay bytes and expiry; the clock moves between files.
#[test]
fn fuzz_corpus_replays_as_sequences() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_decide");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the corpus folder exists")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    files.sort();
    let (mut answers, mut replays) = (0, 0);
    for window in files.windows(3) {
        let mut sequence = Vec::new();
        for data in window {
            let len = u16::try_from(data.len().min(4096)).unwrap();
            for step in [1u16, 0, 301] {
                sequence.extend_from_slice(&len.to_be_bytes());
                sequence.extend_from_slice(&step.to_be_bytes());
                sequence.extend_from_slice(&data[..usize::from(len)]);
            }
        }
        let stats = decide_sequence(&sequence);
        answers += stats.answers;
        replays += stats.replays;
    }
    assert!(
        answers > 100,
        "the sequences reach the decisions: {answers} answers"
    );
    assert!(replays > 30, "and the duplicate cache: {replays} replays");
}

/// The seed corpus of the sequence target (engine/proto/fuzz/corpus/decide_sequence: each
/// file several datagrams with clock steps, `decide_sequence`'s format) replays through the
/// sequence oracle, every file whole and cut short; together they reach the decisions and the
/// duplicate cache (a seed set that never replays would not exercise the replay and expiry
/// checks).
#[test]
fn fuzz_sequence_corpus_replays_without_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decide_sequence");
    let (mut files, mut answers, mut replays) = (0, 0, 0);
    for entry in std::fs::read_dir(&dir).expect("the corpus folder exists") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let stats = decide_sequence(&data);
        answers += stats.answers;
        replays += stats.replays;
        for end in (0..data.len()).step_by(97) {
            decide_sequence(&data[..end]);
        }
        files += 1;
    }
    assert!(files >= 10, "seed corpus too small: {files} files");
    assert!(
        answers > 20,
        "the seeds reach the decisions: {answers} answers"
    );
    assert!(replays > 5, "and the duplicate cache: {replays} replays");
}

/// The corpus through the batch engine API (`decide_batches`): each file three times in a
/// row (the second and third copies land in the same batch of eight as the first, so they
/// are duplicates in flight there and replays one by one), the clock moving between files.
/// Every batch must send what one-by-one decisions send; the sequence seeds too, whole.
#[test]
fn fuzz_corpus_replays_as_batches() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut files: Vec<_> = std::fs::read_dir(root.join("decode_decide"))
        .expect("the corpus folder exists")
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    files.sort();
    let mut sequence = Vec::new();
    for data in &files {
        let len = u16::try_from(data.len().min(4096)).unwrap();
        for step in [1u16, 0, 0] {
            sequence.extend_from_slice(&len.to_be_bytes());
            sequence.extend_from_slice(&step.to_be_bytes());
            sequence.extend_from_slice(&data[..usize::from(len)]);
        }
    }
    let stats = decide_batches(&sequence);
    assert!(
        stats.answers > 40 && stats.sealed > 20,
        "the batches reach the decisions and the lanes: {stats:?}"
    );
    assert!(stats.in_flight > 10, "and same-batch copies: {stats:?}");
    for entry in std::fs::read_dir(root.join("decide_sequence")).expect("the corpus folder") {
        decide_batches(&std::fs::read(entry.unwrap().path()).unwrap());
    }
}
