//! The fuzz targets' short form for `make test` (the long form is `make fuzz`): every seed
//! input in fuzz/corpus/<target>/ and every regression input in fuzz/regressions/<target>/
//! (each crash a fuzzer found, kept) through the target's entry point, on stable Rust.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
            count += 1;
        }
    }
    assert!(count >= 3, "{target}: only {count} inputs");
}

#[test]
fn frames() {
    replay("frames", fanout_ws::fuzzing::frames);
}

#[test]
fn upgrade() {
    replay("upgrade", fanout_ws::fuzzing::upgrade);
}

#[test]
fn op() {
    replay("op", fanout_ws::fuzzing::op);
}

#[test]
fn cursor() {
    replay("cursor", fanout_ws::fuzzing::cursor);
}

#[test]
fn jwt() {
    replay("jwt", fanout_ws::fuzzing::jwt);
}

#[test]
fn publish_body() {
    replay("publish_body", fanout_api::routes::fuzz_publish);
}

#[test]
fn batch_body() {
    replay("batch_body", fanout_api::routes::fuzz_batch);
}
