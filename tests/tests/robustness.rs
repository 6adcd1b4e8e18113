//! The parser and resolver never panic: thousands of mutations of valid specs (byte and
//! token edits, spliced lines, number extremes) must each resolve or fail with
//! diagnostics that render. Deterministic (seeded), so a failure reproduces; set
//! `DSC_FUZZ_CASES` to run more than the default.

use std::path::{Path, PathBuf};

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "=",
    ",",
    "..",
    " step ",
    "0",
    "1",
    "-1",
    "3..",
    "0..0",
    "1e-6",
    "1e400",
    "none",
    "true",
    "model",
    "extends",
    "include",
    "\"x.dsc\"",
    "moe",
    "dense",
    "mla",
    "gqa",
    "mha",
    "ffn",
    "layers",
    "router",
    "yarn",
    "groups",
    "top_k",
    "99999999999999999999",
    "18446744073709551616",
    "\n",
    "//",
    "é",
    "\u{0}",
];

fn spec_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut out = Vec::new();
    for dir in [root.clone(), root.join("tiny")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "dsc") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn mutate(rng: &mut Rng, text: &str, lines_pool: &[String]) -> String {
    let mut s: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(s.len() + 1).min(s.len());
        match rng.below(6) {
            0 if !s.is_empty() => {
                let n = 1 + rng.below(8);
                let end = (at + n).min(s.len());
                s.drain(at..end);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                s.splice(at..at, t.chars());
            }
            2 => {
                // Replace a number with an extreme one.
                if let Some(p) = (at..s.len()).find(|i| s[*i].is_ascii_digit()) {
                    let end = (p..s.len()).find(|i| !s[*i].is_ascii_digit()).unwrap_or(s.len());
                    let t = ["0", "1", "7", "65536", "4294967296", "1000000000000"][rng.below(6)];
                    s.splice(p..end, t.chars());
                }
            }
            3 => {
                let line = &lines_pool[rng.below(lines_pool.len())];
                s.splice(at..at, format!("\n{line}\n").chars());
            }
            4 => s.truncate(at),
            _ if !s.is_empty() => {
                let (a, b) = (at.min(s.len() - 1), rng.below(s.len()));
                s.swap(a, b);
            }
            _ => {}
        }
    }
    s.into_iter().collect()
}

#[test]
fn mutated_specs_never_panic() {
    let cases: usize = std::env::var("DSC_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
    let files = spec_files();
    let texts: Vec<(PathBuf, String)> = files.iter().map(|p| (p.clone(), std::fs::read_to_string(p).unwrap())).collect();
    let pool: Vec<String> = texts.iter().flat_map(|(_, t)| t.lines().map(str::to_string)).collect();
    let mut rng = Rng(0x5eed_d5c0_0000_0001);
    let (mut ok, mut failed) = (0usize, 0usize);
    for i in 0..cases {
        let (path, text) = &texts[i % texts.len()];
        let mutated = mutate(&mut rng, text, &pool);
        let result = std::panic::catch_unwind(|| match dsc_dsl::load_str(path, &mutated, None) {
            Ok(spec) => {
                // A spec that resolves must survive everything downstream of resolution:
                // the cost model, and printing back to a spec that resolves to the same model.
                let stats = dsc_compiler::stats::stats(&spec.model, 4096);
                assert!(stats.params.active <= stats.params.total);
                let text = dsc_dsl::print::print_model(&spec.model);
                let again = dsc_dsl::load_str(Path::new("printed.dsc"), &text, None).expect("printed form resolves");
                assert_eq!(again.model, spec.model);
                true
            }
            Err(f) => {
                assert!(!f.diagnostics.is_empty(), "failure without diagnostics");
                assert!(!f.render().is_empty());
                false
            }
        });
        match result {
            Ok(true) => ok += 1,
            Ok(false) => failed += 1,
            Err(_) => panic!("case {i} panicked on a mutation of {}:\n{mutated}", path.display()),
        }
    }
    eprintln!("{cases} mutated specs: {ok} resolved, {failed} rejected with diagnostics");
    assert!(ok > 0 && failed > 0, "the mutations should produce both outcomes");
}
