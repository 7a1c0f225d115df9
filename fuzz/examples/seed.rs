//! Writes the seeds of every fuzz target into `<dir>/<target>/` (default `fuzz/corpus`, where
//! `cargo fuzz run` looks). Run through `fuzz/seed.sh`.

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let seeds = ktgt_fuzz::seeds();
    for (target, _) in ktgt_fuzz::TARGETS {
        std::fs::create_dir_all(dir.join(target))?;
    }
    for s in &seeds {
        std::fs::write(dir.join(s.target).join(format!("seed-{}", s.name)), &s.data)?;
    }
    for (target, _) in ktgt_fuzz::TARGETS {
        let n = seeds.iter().filter(|s| s.target == target).count();
        println!("{target}: {n} seeds in {}", dir.join(target).display());
    }
    Ok(())
}
