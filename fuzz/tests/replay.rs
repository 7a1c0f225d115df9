//! Runs every fuzz target's hook over its seeds (made from `iscsi-proto/testdata`), the
//! committed regression inputs in `fuzz/regressions/<target>/`, and whatever libFuzzer left in
//! `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/`, with the plain test harness. This
//! is the cheap half of `fuzz/smoke.sh`: no sanitizer build, no libFuzzer.

use std::path::Path;

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let data = std::fs::read(e.path()).ok()?;
            Some((e.path().display().to_string(), data))
        })
        .collect();
    out.sort();
    out
}

fn replay(target: &str) {
    let (_, hook) = ktgt_fuzz::TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .expect("known target");
    let seeds: Vec<_> = ktgt_fuzz::seeds()
        .into_iter()
        .filter(|s| s.target == target)
        .collect();
    assert!(seeds.len() >= 10, "{target}: only {} seeds", seeds.len());
    for s in &seeds {
        hook(&s.data);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut on_disk = 0;
    for sub in ["regressions", "corpus", "artifacts"] {
        for (path, data) in files(&root.join(sub).join(target)) {
            eprintln!("{target}: {path}");
            hook(&data);
            on_disk += 1;
        }
    }
    eprintln!(
        "{target}: replayed {} seeds and {on_disk} files",
        seeds.len()
    );
}

#[test]
fn pdu_decode() {
    replay("pdu_decode");
}

#[test]
fn text_ltds() {
    replay("text_ltds");
}

#[test]
fn login() {
    replay("login");
}

#[test]
fn cdb() {
    replay("cdb");
}
