//! `dsc generate --model DIR (--input IDS.json | --prompt TEXT) --max-new-tokens N
//! [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop ID]... [--ignore-eos]
//! [--json] [--stats]`: the prompt pass, then one decode step per new token through the
//! KV cache.
//!
//! With `--json` it prints `{"generated": [[new ids of sequence 0], ...]}` (and `"text"`
//! when the prompt was text); otherwise one line per sequence, decoded to text when the
//! directory has a `tokenizer.json`. Sequences stop at the model's EOS (from
//! `generation_config.json`) unless `--ignore-eos`, and at any `--stop` id. `--stats`
//! prints timings, tokens per second and memory to stderr.

use super::logits::{load, read_ids, ModelArgs};
use crate::generate::{generate, GenerateOptions};
use crate::sampling::Sampling;
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `dsc generate`.
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `{"input_ids": [[...], ...]}`; sequences may differ in length.
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    pub input: Option<PathBuf>,
    /// A text prompt, tokenized with DIR/tokenizer.json.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Tokens to generate per sequence (fewer where a stop token comes first).
    #[arg(long, default_value_t = 16, allow_negative_numbers = true, value_parser = super::unsigned::<usize>)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (the most likely token every step).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample among the K most likely tokens only (with --temperature > 0).
    #[arg(long, allow_negative_numbers = true, value_parser = super::unsigned::<usize>)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to P, 0 < P ≤ 1 (with
    /// --temperature > 0).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Seed of the sampler (the same seed gives the same tokens).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = super::unsigned::<u64>)]
    pub seed: u64,
    /// Also stop at this token id (repeatable).
    #[arg(long)]
    pub stop: Vec<i64>,
    /// Do not stop at the model's EOS token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print `{"generated": [[...], ...]}`.
    #[arg(long)]
    pub json: bool,
    /// Print timings, tokens per second and memory to stderr.
    #[arg(long)]
    pub stats: bool,
}

/// `dsc generate`.
pub fn generate_cmd(args: &GenerateArgs) -> Result<(), String> {
    let loaded = load(&args.model)?;
    let info = &loaded.info;
    let prompts = match (&args.input, &args.prompt) {
        (Some(path), _) => read_ids(path)?,
        (None, Some(text)) => {
            let tok = info
                .tokenizer
                .as_deref()
                .ok_or_else(|| format!("--prompt needs `{}`", args.model.model.join("tokenizer.json").display()))?;
            vec![tokenizer::encode(tok, text)?]
        }
        (None, None) => return Err("give --input IDS.json or --prompt TEXT".into()),
    };
    for w in &info.generation.warnings {
        eprintln!("warning: {w}");
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    info.check_context(
        longest.saturating_add(args.max_new_tokens),
        &format!("the prompt ({longest} tokens) with {} new tokens", args.max_new_tokens),
    )?;
    let mut stop = args.stop.clone();
    if !args.ignore_eos {
        stop.extend(&info.generation.eos);
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed },
        stop,
        pad: info.generation.pad.unwrap_or(0),
        ..GenerateOptions::default()
    };
    let g = generate(loaded.backend.as_ref(), &prompts, &opts).map_err(|e| e.to_string())?;

    // Text when there is a tokenizer, except in JSON for id input (ids in, ids out).
    let texts: Option<Vec<String>> = match &info.tokenizer {
        Some(tok) if args.prompt.is_some() || !args.json => Some(tokenizer::decode(tok, &g.tokens)?),
        _ => None,
    };
    let mut out = String::new();
    if args.json {
        let mut j = serde_json::json!({ "generated": g.tokens });
        if let (Some(t), true) = (&texts, args.prompt.is_some()) {
            j["text"] = serde_json::json!(t);
        }
        out.push_str(&j.to_string());
        out.push('\n');
    } else {
        for (i, t) in g.tokens.iter().enumerate() {
            match &texts {
                Some(texts) => out.push_str(&format!("{}\n", texts[i])),
                None => out.push_str(&format!("{}\n", t.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" "))),
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()).map_err(|e| format!("cannot write to stdout: {e}"))?;

    if args.stats {
        let s = &g.stats;
        eprintln!(
            "backend {}: batch {}, prompt {} tokens (padded to {}), prefill {:.1} ms",
            loaded.backend.name(),
            s.batch,
            s.prompt_tokens,
            s.padded_len,
            s.prefill_secs * 1e3
        );
        eprintln!("decode: {} steps in {:.1} ms, {:.1} tokens/s", s.decode_steps, s.decode_secs * 1e3, s.decode_tokens_per_sec());
        if let Some(c) = loaded.backend.counts() {
            eprintln!(
                "host link: {} bytes of weights up; {} bytes of inputs up and {} bytes of results down over the run (the KV cache stays on the device)",
                c.weights_to_device, c.to_device, c.to_host
            );
        }
        let w = &info.weights;
        eprintln!(
            "memory: KV cache {} bytes for {} positions × {} sequences ({} values per position per sequence); weights {} bytes held (bf16, f16 and FP8 as stored, the rest as f32) of {} bytes mapped",
            s.cache_bytes,
            s.cache_len,
            s.batch,
            s.cache_elements_per_token,
            w.decoded_bytes(),
            w.mapped_bytes()
        );
    }
    Ok(())
}

/// Text ↔ ids through a `tokenizer.json`, when built with the `tokenizer` feature.
mod tokenizer {
    use super::Path;

    /// The largest `tokenizer.json` read (DeepSeek-V3's is 7.8 MB; parsing takes several
    /// times the file in memory, so the bound is on that, not only on the read).
    #[cfg(feature = "tokenizer")]
    const TOKENIZER_LIMIT: u64 = 256 << 20;

    #[cfg(feature = "tokenizer")]
    fn open(path: &Path) -> Result<tokenizers::Tokenizer, String> {
        let text = dsc_dsl::files::read_text(path, TOKENIZER_LIMIT).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        text.parse::<tokenizers::Tokenizer>().map_err(|e| format!("`{}`: {e}", path.display()))
    }

    #[cfg(feature = "tokenizer")]
    pub fn encode(path: &Path, text: &str) -> Result<Vec<i64>, String> {
        let enc = open(path)?.encode(text, true).map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Each sequence as text (the tokenizer read once).
    #[cfg(feature = "tokenizer")]
    pub fn decode(path: &Path, seqs: &[Vec<i64>]) -> Result<Vec<String>, String> {
        let tok = open(path)?;
        seqs.iter()
            .map(|ids| {
                let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                tok.decode(&ids, true).map_err(|e| format!("cannot detokenize: {e}"))
            })
            .collect()
    }

    #[cfg(not(feature = "tokenizer"))]
    const OFF: &str = "this dsc was built without the `tokenizer` feature: pass --input IDS.json";

    #[cfg(not(feature = "tokenizer"))]
    pub fn encode(_: &Path, _: &str) -> Result<Vec<i64>, String> {
        Err(OFF.into())
    }

    /// Without the feature the ids are printed as they are.
    #[cfg(not(feature = "tokenizer"))]
    pub fn decode(_: &Path, seqs: &[Vec<i64>]) -> Result<Vec<String>, String> {
        Ok(seqs.iter().map(|ids| ids.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" ")).collect())
    }
}
