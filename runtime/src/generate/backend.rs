//! The interface every execution backend implements, and the values that cross it.
//!
//! A backend runs the two inference entry points of a compiled model: `prefill` (a batch
//! of prompts, no cache in, the cache out) and `decode` (one token per sequence, the
//! cache in, the cache one position longer out). Everything else (padding, masks,
//! sampling, stopping, timing) is the generation loop's ([`super::generate`]), so a new
//! backend implements [`Backend`] and nothing more. The reference interpreter is the
//! first ([`super::reference::ReferenceBackend`]).

use crate::reference::Tensor;
use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// A backend failed to run a step (a kernel error, a shape it could not bind).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendError {
    pub message: String,
}

impl BackendError {
    pub fn new(message: impl Into<String>) -> BackendError {
        BackendError { message: message.into() }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BackendError {}

/// One step's inputs: `batch × seq` tokens, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInput {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<i64>,
    /// RoPE position of every token (per sequence, so left-padded prompts start at 0).
    pub positions: Vec<i64>,
    /// Additive mask `[batch, seq, cached + seq]` (0 visible, `-inf` hidden), or `None`
    /// when every key is visible (up to causality). Padded batches need one.
    pub mask: Option<Vec<f32>>,
    /// Also return every router's decisions ([`StepOutput::routing`]).
    pub capture_routing: bool,
    /// Prefill: the logits of the last position only (`[batch, 1, vocab]`), all that a
    /// generation samples from; the final norm and head skip the other positions.
    pub last_logits: bool,
    /// Sample the next token where the logits are, when the backend can (a device
    /// engine): the step then returns [`StepOutput::sampled`] and no logits. Only for
    /// steps with one row of logits per sequence (decode, prefill with `last_logits`).
    pub sample: Option<SampleParams>,
}

pub use dsc_compiler::codegen::kernels::sample::SampleParams;

/// Tokens a backend sampled where the logits were, one per sequence, with each token's
/// log-probability under softmax(logits / T) (T = 1 when greedy) and that
/// distribution's entropy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub tokens: Vec<i64>,
    pub logprobs: Vec<f64>,
    pub entropy: Vec<f64>,
}

/// The routers' decisions in one MoE layer: per token (`[batch, seq, top_k]`), the chosen
/// experts in the router's order (by score) and their final gate weights.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRouting {
    pub layer: Option<u32>,
    pub indices: Tensor,
    pub weights: Tensor,
}

/// The KV cache of a batch: two tensors per layer, position-major `[len, batch, ..]`. For
/// MHA/GQA the rotated keys and the values, `[len, b, kv_heads, head_dim]` each; for MLA
/// the normalised latent `[len, b, kv_lora_rank]` and the rotated shared rope key
/// `[len, b, qk_rope_head_dim]` (see `dsc_compiler::lower`).
///
/// It lives where the backend computes: host tensors for the reference interpreter, device
/// buffers for a device engine, which keeps them there from the prompt pass to the last
/// decode step (the host sees only their shapes). Clones share a device cache; a backend
/// that writes a cache in place must not write one that a clone still reads.
#[derive(Clone)]
pub struct KvCache {
    shapes: Vec<Vec<usize>>,
    bytes: u64,
    store: CacheStore,
}

/// Where a [`KvCache`]'s tensors are.
#[derive(Clone)]
pub enum CacheStore {
    Host(Vec<Tensor>),
    /// The backend's own values (`cache.{L}.a`, `cache.{L}.b`, layer by layer), which only
    /// that backend reads.
    Device(Arc<dyn Any + Send + Sync>),
}

impl KvCache {
    /// A cache held as host tensors.
    pub fn host(tensors: Vec<Tensor>) -> KvCache {
        let shapes = tensors.iter().map(|t| t.shape().to_vec()).collect();
        let bytes = tensors.iter().map(|t| (t.numel() * elem_bytes(t)) as u64).sum();
        KvCache { shapes, bytes, store: CacheStore::Host(tensors) }
    }

    /// A cache a backend keeps on its device: the tensors' shapes, the bytes they take
    /// there, and the backend's handles to them.
    pub fn on_device(shapes: Vec<Vec<usize>>, bytes: u64, values: Arc<dyn Any + Send + Sync>) -> KvCache {
        KvCache { shapes, bytes, store: CacheStore::Device(values) }
    }

    /// The tensors, when the backend keeps them on the host.
    pub fn tensors(&self) -> Option<&[Tensor]> {
        match &self.store {
            CacheStore::Host(t) => Some(t),
            CacheStore::Device(_) => None,
        }
    }

    pub fn store(&self) -> &CacheStore {
        &self.store
    }

    pub fn into_store(self) -> CacheStore {
        self.store
    }

    /// Shapes of the cache tensors, wherever they are.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Cached positions per sequence.
    pub fn len(&self) -> usize {
        self.shapes.first().map_or(0, |s| s.first().copied().unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the cache occupies as the backend holds it.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Elements per cached position of one sequence, all layers together; times the
    /// model dtype's size it is the cache's cost per token.
    pub fn elements_per_token(&self) -> u64 {
        self.shapes.iter().map(|s| s.iter().skip(2).product::<usize>() as u64).sum()
    }
}

impl fmt::Debug for KvCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = match self.store {
            CacheStore::Host(_) => "host",
            CacheStore::Device(_) => "device",
        };
        f.debug_struct("KvCache").field("shapes", &self.shapes).field("bytes", &self.bytes).field("on", &at).finish()
    }
}

/// Host caches are equal when their tensors are; device caches when they are the same
/// buffers.
impl PartialEq for KvCache {
    fn eq(&self, other: &KvCache) -> bool {
        match (&self.store, &other.store) {
            (CacheStore::Host(a), CacheStore::Host(b)) => a == b,
            (CacheStore::Device(a), CacheStore::Device(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

fn elem_bytes(t: &Tensor) -> usize {
    use crate::reference::Data;
    match t.data() {
        Data::F32(_) | Data::I32(_) => 4,
        Data::F64(_) | Data::I64(_) => 8,
        Data::Bool(_) | Data::F8(_) => 1,
        Data::Bf16(_) | Data::F16(_) => 2,
    }
}

/// One step's results.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// `[batch, seq, vocab]`, `f32`; `[batch, 1, 0]` when the backend sampled instead.
    pub logits: Tensor,
    /// The tokens the backend sampled, when the step asked and it could.
    pub sampled: Option<Sampled>,
    pub cache: KvCache,
    /// One entry per MoE layer when the step asked for it, in layer order.
    pub routing: Vec<LayerRouting>,
}

/// An execution backend for a compiled model.
pub trait Backend {
    /// Its name, as `--backend` spells it.
    fn name(&self) -> &str;
    /// Rows of the output head.
    fn vocab(&self) -> usize;
    /// The prompt pass: no cache in; logits for every position and the new cache out.
    fn prefill(&self, input: &StepInput) -> Result<StepOutput, BackendError>;
    /// One new token per sequence (`seq` = 1) after `cache`; consumes the cache and
    /// returns it one position longer.
    fn decode(&self, input: &StepInput, cache: KvCache) -> Result<StepOutput, BackendError>;
    /// What a device backend has moved over the host link so far (`None` on the host).
    fn counts(&self) -> Option<crate::plan_exec::Counts> {
        None
    }
}

/// The backends `--backend` accepts.
pub const BACKENDS: &[&str] = &[
    "reference",
    #[cfg(feature = "wgpu")]
    "wgpu",
    #[cfg(feature = "cuda")]
    "cuda",
];

/// `--backend`'s value parser: one of [`BACKENDS`], or an error (a usage error, exit 2)
/// that lists them, and for a backend this build left out, how to build it in.
pub fn parse_backend(s: &str) -> Result<String, String> {
    if BACKENDS.contains(&s) {
        return Ok(s.to_string());
    }
    match s {
        "cuda" => Err("this dsc was built without the `cuda` backend: rebuild with `cargo build --release --features cuda` (libcuda and NVRTC are loaded at run time; no CUDA toolkit is needed to build)".into()),
        "wgpu" => Err("this dsc was built without the `wgpu` backend: rebuild with its default features".into()),
        _ => Err(format!("unknown backend `{s}`; available: {}", BACKENDS.join(", "))),
    }
}
