//! Compile speed: spec text → optimised IR (parse, resolve, lower one mode, run that mode's
//! default pipeline as `dsc compile` does) for every published spec in `specs/` and every
//! mode. The compiler is single-threaded, so this is one core's time; pin it to one
//! anyway for steady numbers:
//!
//! ```text
//! taskset -c 0 cargo bench -p dsc-runtime --bench compile
//! taskset -c 0 cargo bench -p dsc-runtime --bench compile -- deepseek_v3/decode
//! ```
//!
//! Release builds run no verifier between passes (`PassCx::verify_each` is on only with
//! debug assertions), as a release `dsc compile` does. The spec file is read once; its
//! text is parsed on every iteration.

use criterion::{criterion_group, criterion_main, Criterion};
use dsc_compiler::ir::Mode;
use dsc_compiler::lower::lower_mode;
use dsc_compiler::passes::{compile, PassCx, PassSelection};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The published specs (not `specs/tiny/`), by file name.
fn published() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("specs/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "dsc"))
        .collect();
    v.sort();
    v
}

/// Spec text to the optimised module of `mode`; returns its node count.
fn spec_to_ir(path: &Path, text: &str, mode: Mode) -> usize {
    let spec = dsc_dsl::load_str(path, text, None).unwrap_or_else(|f| panic!("{}", f.render()));
    let mut m = lower_mode(&spec, mode).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut cx = PassCx::new(mode);
    compile(&mut m, &PassSelection::all(), &mut cx).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    m.functions.iter().map(|f| f.graph.len()).sum()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20);
    for path in published() {
        let text = std::fs::read_to_string(&path).expect("spec");
        let name = path.file_stem().expect("file name").to_string_lossy().into_owned();
        for mode in Mode::ALL {
            group.bench_function(format!("{name}/{mode}"), |b| b.iter(|| spec_to_ir(black_box(&path), black_box(&text), mode)));
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
