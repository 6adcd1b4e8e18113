//! `dsc stats` and `dsc diff`: the cost model of one spec, and what changes between two.
//!
//! Both commands read resolved models only, so inherited fields and documented defaults
//! take part exactly as they do everywhere else. The numbers come from
//! [`dsc_compiler::stats`], whose documentation defines them.

use dsc_compiler::stats::{stats, Stats};
use dsc_dsl::ast::{Block, EntryBody, Item};
use dsc_dsl::span::FileId;
use dsc_dsl::Model;
use serde::Serialize;
use std::path::Path;

/// `dsc stats`: prints the cost table, or with `json` one pretty JSON object
/// `{"model": name, "params": {...}, "kv_cache": {...}, "flops": {...}}`.
pub fn stats_cmd(spec: &Path, model: Option<&str>, json: bool, context: u64) -> Result<(), String> {
    print!("{}", stats_text(spec, model, json, context)?);
    Ok(())
}

/// `dsc diff`: the resolved fields that differ between two models, then the change in the
/// main costs.
pub fn diff_cmd(a: &Path, model_a: Option<&str>, b: &Path, model_b: Option<&str>, context: u64) -> Result<(), String> {
    print!("{}", diff_text(a, model_a, b, model_b, context)?);
    Ok(())
}

/// The JSON report: the model's name first, then the stats in their declared order (a
/// struct rather than `json!`, whose map would sort the keys).
#[derive(Serialize)]
struct Report<'a> {
    model: &'a str,
    #[serde(flatten)]
    stats: &'a Stats,
}

fn stats_text(spec: &Path, model: Option<&str>, json: bool, context: u64) -> Result<String, String> {
    let spec = super::load_spec(spec, model)?;
    let m = &spec.model;
    let s = stats(m, context);
    if json {
        let report = Report { model: &m.name, stats: &s };
        let mut text = serde_json::to_string_pretty(&report).map_err(|e| format!("cannot write JSON: {e}"))?;
        text.push('\n');
        Ok(text)
    } else {
        Ok(s.render_table(m))
    }
}

fn diff_text(a: &Path, model_a: Option<&str>, b: &Path, model_b: Option<&str>, context: u64) -> Result<String, String> {
    let sa = super::load_spec(a, model_a)?;
    let sb = super::load_spec(b, model_b)?;
    let (ma, mb) = (&sa.model, &sb.model);
    let mut out = format!("a: {} ({})\nb: {} ({})\n\n", ma.name, a.display(), mb.name, b.display());

    let changes = field_changes(ma, mb)?;
    if changes.is_empty() {
        out.push_str("no resolved field differs\n");
    } else {
        let width = changes.iter().map(|c| c.0.len()).max().unwrap_or(0);
        for (path, va, vb) in &changes {
            out.push_str(&format!("{path:<width$}  {va} -> {vb}\n"));
        }
    }

    let (ca, cb) = (stats(ma, context), stats(mb, context));
    let bf16 = |s: &Stats| s.kv_cache.bytes_per_token.get("bf16").copied().unwrap_or(0);
    out.push_str(&format!("\ncost at context {context}\n"));
    // (label, a, b, divisor, unit, decimals)
    let rows: [(&str, u128, u128, f64, &str, usize); 4] = [
        ("params total", ca.params.total, cb.params.total, 1e9, "B", 3),
        ("params active", ca.params.active, cb.params.active, 1e9, "B", 3),
        ("FLOPs per token", ca.flops.per_token, cb.flops.per_token, 1e9, "GFLOP", 3),
        ("KV cache per token (bf16)", bf16(&ca), bf16(&cb), 1.0, "bytes", 0),
    ];
    for (label, x, y, div, unit, dec) in rows {
        let (fx, fy) = (x as f64 / div, y as f64 / div);
        let rel = if x == 0 { "n/a".to_string() } else { format!("{:+.1}%", (y as f64 - x as f64) / x as f64 * 100.0) };
        let d = fy - fx;
        out.push_str(&format!("  {label:<26} {fx:>12.dec$} {unit:<5} -> {fy:>12.dec$} {unit:<5}  {d:>+12.dec$} {unit:<5}  ({rel})\n"));
    }
    Ok(out)
}

/// The fields that differ, as `(path, a, b)` in spec vocabulary (`ffn moe.router.top_k`),
/// in the order the canonical printer writes them. A field on one side only reads
/// "(absent)" on the other.
fn field_changes(a: &Model, b: &Model) -> Result<Vec<(String, String, String)>, String> {
    let (la, lb) = (leaves(a)?, leaves(b)?);
    let get = |l: &[(String, String)], k: &str| l.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    let absent = || "(absent)".to_string();
    let mut out = Vec::new();
    for path in union_in_order(&la, &lb) {
        match (get(&la, &path), get(&lb, &path)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => out.push((path, x.unwrap_or_else(absent), y.unwrap_or_else(absent))),
        }
    }
    Ok(out)
}

/// A model's fields as `(dotted path, value text)`, read off its canonical spec text: the
/// printer already writes every field, defaults included, in a fixed order and in the
/// words of the spec language, so the diff speaks that language too.
fn leaves(m: &Model) -> Result<Vec<(String, String)>, String> {
    let text = dsc_dsl::print::print_model(m);
    let file = dsc_dsl::parse::parse_file(FileId(0), &text)
        .map_err(|d| format!("internal: the printed form of `{}` does not parse: {}", m.name, d.message))?;
    let mut out = vec![("name".to_string(), m.name.clone())];
    for item in &file.items {
        if let Item::Model(decl) = item {
            walk(&decl.body, "", &text, &mut out);
        }
    }
    Ok(out)
}

fn walk(block: &Block, prefix: &str, text: &str, out: &mut Vec<(String, String)>) {
    for e in &block.entries {
        let name = match &e.label {
            Some(l) => format!("{} {}", e.key.node, l.node),
            None => e.key.node.clone(),
        };
        let path = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
        match &e.body {
            EntryBody::Value(v) => out.push((path, text[v.span.start as usize..v.span.end as usize].to_string())),
            EntryBody::Block(b) => walk(b, &path, text, out),
        }
    }
}

/// Paths of `a` in order, with those only in `b` inserted after the path that precedes
/// them in `b`, so a section that exists on one side only stays in place.
fn union_in_order(a: &[(String, String)], b: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = a.iter().map(|(p, _)| p.clone()).collect();
    let mut prev: Option<usize> = None;
    for (p, _) in b {
        match out.iter().position(|q| q == p) {
            Some(i) => prev = Some(i),
            None => {
                let at = prev.map_or(0, |i| i + 1);
                out.insert(at, p.clone());
                prev = Some(at);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

    fn spec(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs").join(name)
    }

    #[test]
    fn json_report_has_model_first_and_all_sections() {
        let text = stats_text(&spec("deepseek_v2_lite.dsc"), None, true, 4096).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["model"], "deepseek_v2_lite");
        assert_eq!(v["params"]["total"], 15_706_484_224u64);
        assert_eq!(v["kv_cache"]["elements_per_token"], 27 * 576);
        assert_eq!(v["kv_cache"]["bytes_per_token"]["bf16"], 27 * 576 * 2);
        assert_eq!(v["flops"]["context"], 4096);
        let order: Vec<usize> = ["\"model\"", "\"params\"", "\"kv_cache\"", "\"flops\""].iter().map(|k| text.find(k).unwrap()).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn table_names_the_model() {
        let text = stats_text(&spec("deepseek_v3.dsc"), None, false, 4096).unwrap();
        assert!(text.starts_with("deepseek_v3: 61 layers"), "{text}");
        assert!(text.contains("671,026,419,200"), "{text}");
    }

    #[test]
    fn missing_spec_is_an_error() {
        assert!(stats_text(&spec("no_such_model.dsc"), None, false, 1).is_err());
    }

    #[test]
    fn diff_v2_lite_against_v2() {
        let text = diff_text(&spec("deepseek_v2.dsc"), None, &spec("deepseek_v2_lite.dsc"), None, 4096).unwrap();
        for want in [
            "name",
            "deepseek_v2 -> deepseek_v2_lite",
            "hidden",
            "5120 -> 2048",
            "attention mla.q_lora_rank",
            "1536 -> none",
            "ffn moe.router.group_score",
            "max -> none",
            "params total",
            "(-93.3%)",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Unchanged fields are not listed.
        assert!(!text.contains("vocab"), "{text}");
        assert!(!text.contains("kv_lora_rank"), "{text}");
    }

    #[test]
    fn diff_shows_sections_present_on_one_side() {
        let text = diff_text(&spec("deepseek_v2.dsc"), None, &spec("deepseek_v3.dsc"), None, 4096).unwrap();
        assert!(text.contains("mtp.depth"), "{text}");
        assert!(text.contains("(absent) -> 1\n"), "{text}");
    }

    #[test]
    fn diff_gqa_to_mla_marks_absent_fields() {
        let text = diff_text(&spec("deepseek_llm_7b.dsc"), None, &spec("deepseek_v2_lite.dsc"), None, 4096).unwrap();
        assert!(text.contains("attention mha.head_dim"), "{text}");
        assert!(text.contains("128 -> (absent)"), "{text}"); // head_dim
        assert!(text.contains("attention mla.kv_lora_rank"), "{text}");
        assert!(text.contains("(absent) -> 512"), "{text}");
    }

    #[test]
    fn diff_of_a_model_with_itself_is_empty_of_fields() {
        let text = diff_text(&spec("deepseek_v3.dsc"), None, &spec("deepseek_v3.dsc"), None, 4096).unwrap();
        assert!(text.contains("no resolved field differs"), "{text}");
        assert!(text.contains("(+0.0%)"), "{text}");
    }

    #[test]
    fn union_keeps_one_sided_paths_in_place() {
        let l = |xs: &[&str]| xs.iter().map(|x| (x.to_string(), String::new())).collect::<Vec<_>>();
        let u = union_in_order(&l(&["a", "c", "e"]), &l(&["a", "b", "c", "d", "e", "f"]));
        assert_eq!(u, ["a", "b", "c", "d", "e", "f"]);
        let u = union_in_order(&l(&["b"]), &l(&["a", "b"]));
        assert_eq!(u, ["a", "b"]);
    }
}
