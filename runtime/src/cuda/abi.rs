//! How a [`Launch`] becomes the arguments of a CubeCL-generated CUDA kernel, without a
//! device (so it is tested on every machine).
//!
//! The generated entry point (see `golden/kernels/*_cuda.snap`) takes
//!
//! ```text
//! extern "C" __global__ void NAME(T0 const* v1, T1 const* v5, ..., info_st const* vN)
//! ```
//!
//! one pointer per buffer, in the order the `#[cube]` function declares its buffer
//! parameters (a `Sequence` of buffers is one pointer per element; scalar parameters take
//! no pointer), then one pointer to a read-only `info_st` in device memory:
//!
//! ```text
//! struct info_st { uint32_t scalars_u32[S]; uint32_t static_meta[M]; };
//! ```
//!
//! `scalars_u32` holds the `u32` scalars in parameter order and is absent when there are
//! none; `static_meta` holds every buffer's length in elements, in pointer order. Each
//! array is padded to a multiple of 8 bytes (`cubecl_ir::metadata::INFO_ALIGN`, so an
//! even number of `u32`s): `cubecl-core-0.11.3/src/compute/builder.rs::create_info`
//! declares the layout and `codegen/info.rs::InfoBuilder::finish` fills it. With 32-bit
//! addressing (what `dsc_compiler::codegen` generates) lengths are `u32`. Kernels over
//! tensors (shape/stride metadata after the struct) or with scalars of other types are
//! outside this layout; [`parse_signature`] lets the tests catch either appearing.
//!
//! [`Launch::args`] lists arguments in exactly that parameter order, so the mapping is
//! generic ([`Launch::resolve`]): a buffer, a table or each of a node's inputs is the
//! next pointer, a `u32` is the next scalar.
//!
//! [`Launch::args`]: dsc_compiler::codegen::launch::Launch::args
//! [`Launch::resolve`]: dsc_compiler::codegen::launch::Launch::resolve

use dsc_compiler::codegen::launch::Resolved;

/// `u32`s per 8-byte `INFO_ALIGN` unit.
const WORDS_PER_ALIGN: usize = 2;

/// The `info_st` words for `r`: see [`info_words`]; `len` tells a caller's buffer's
/// length in elements.
pub fn info<B>(r: &Resolved<B>, len: impl Fn(&B) -> usize) -> Result<Vec<u32>, String> {
    let lens: Vec<u32> = r.ptrs.iter().map(|p| u32_of(p.len(&len) as i64)).collect::<Result<_, _>>()?;
    Ok(info_words(&r.scalars, &lens))
}

/// The number of `u32`s of each `info_st` array as declared: `count` rounded up to whole
/// 8-byte units.
pub fn padded(count: usize) -> usize {
    count.next_multiple_of(WORDS_PER_ALIGN)
}

/// `info_st` as `u32` words: the scalars (padded), then the buffer lengths (padded).
/// Padding words are 0.
pub fn info_words(scalars: &[u32], buffer_lens: &[u32]) -> Vec<u32> {
    let mut w = Vec::with_capacity(padded(scalars.len()) + padded(buffer_lens.len()));
    w.extend_from_slice(scalars);
    w.resize(padded(scalars.len()), 0);
    w.extend_from_slice(buffer_lens);
    w.resize(padded(scalars.len()) + padded(buffer_lens.len()), 0);
    w
}

fn u32_of(v: i64) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("{v} does not fit a u32 argument"))
}

/// What a generated kernel's text declares: its entry name, the C type of each pointer
/// parameter before `info_st` (`float`, `__half`, `int32_t`, `uint32_t`, ...), and the
/// `info_st` arrays as (field name, declared length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub entry: String,
    pub params: Vec<String>,
    /// Whether the last parameter is `info_st const*`.
    pub has_info: bool,
    pub info_fields: Vec<(String, usize)>,
}

/// Reads [`Signature`] off CUDA C++ that `kernel_source(.., Target::Cuda)` produced.
pub fn parse_signature(src: &str) -> Result<Signature, String> {
    let mut info_fields = Vec::new();
    if let Some(start) = src.find("struct info_st {") {
        let body = &src[start + "struct info_st {".len()..];
        let body = &body[..body.find("};").ok_or("info_st is not closed")?];
        for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
            // `uint32_t scalars_u32[4]`
            let (_, rest) = decl.rsplit_once(' ').ok_or_else(|| format!("info_st field `{decl}`"))?;
            let (field, n) = rest.split_once('[').ok_or_else(|| format!("info_st field `{decl}` is not an array"))?;
            let n = n.trim_end_matches(']').parse::<usize>().map_err(|e| format!("info_st field `{decl}`: {e}"))?;
            info_fields.push((field.to_string(), n));
        }
    }
    let g = src.find("__global__ void").ok_or("no __global__ entry point")?;
    let mut head = src[g + "__global__ void".len()..].trim_start();
    if let Some(rest) = head.strip_prefix("__launch_bounds__(") {
        head = rest[rest.find(')').ok_or("__launch_bounds__ not closed")? + 1..].trim_start();
    }
    let open = head.find('(').ok_or("entry point without parameters")?;
    let close = head.find(')').ok_or("entry point parameters not closed")?;
    let entry = head[..open].trim().to_string();
    let mut params: Vec<String> = Vec::new();
    let mut has_info = false;
    for p in head[open + 1..close].split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // `float const* const __restrict__ v1`, `float * const __restrict__ v13`
        let ty = p.split(['*', ' ']).next().unwrap_or("").to_string();
        if !p.contains('*') {
            return Err(format!("parameter `{p}` is not a pointer"));
        }
        if has_info {
            return Err(format!("parameter `{p}` after info_st"));
        }
        if ty == "info_st" {
            has_info = true;
        } else {
            params.push(ty);
        }
    }
    Ok(Signature { entry, params, has_info, info_fields })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dsc_compiler::codegen::launch::{NodeWork, Ptr};
    use dsc_compiler::codegen::select::node_work;
    use dsc_compiler::codegen::{kernel_source, Target};
    use dsc_compiler::ir::Bindings;
    use dsc_compiler::ir::{DType, Mode, Module, NodeId, Op};
    use std::collections::BTreeMap;

    #[test]
    fn info_words_pad_each_array_to_eight_bytes() {
        assert_eq!(info_words(&[], &[7, 8, 9]), vec![7, 8, 9, 0]);
        assert_eq!(info_words(&[5], &[7, 8]), vec![5, 0, 7, 8]);
        assert_eq!(info_words(&[1, 2, 3], &[4, 5, 6, 7]), vec![1, 2, 3, 0, 4, 5, 6, 7]);
        assert_eq!(padded(0), 0);
        assert_eq!(padded(1), 2);
    }

    #[test]
    fn parses_the_golden_signature() {
        let golden = include_str!("../../../golden/kernels/tiny_llama_decode_cuda.snap");
        let start = golden.find("==== matmul_f32.cu").unwrap();
        let sig = parse_signature(&golden[start..]).unwrap();
        assert_eq!(sig.entry, "matmul_f32");
        assert_eq!(sig.params, ["float", "float", "float"]);
        assert!(sig.has_info);
        assert_eq!(sig.info_fields, [("scalars_u32".to_string(), 4), ("static_meta".to_string(), 4)]);
    }

    /// A buffer of the tests: the IR dtype the plan gives it.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Fake(DType);

    /// The C types a pointer to a buffer holding `d` may have in generated code.
    fn c_types(d: DType) -> &'static [&'static str] {
        match d {
            DType::F32 => &["float"],
            DType::F16 => &["__half"],
            // Integers are held as i32; a kernel may read them as either signedness.
            DType::I32 | DType::I64 => &["int32_t", "uint32_t"],
            _ => &[],
        }
    }

    /// Every launch of every node with a kernel, in the prefill and decode modules of
    /// every tiny spec (both MLA forms), one per distinct (kernel, argument kinds).
    /// A launch with a label and the dtypes of the node's inputs, outputs and scratch.
    pub(crate) type Found = (String, dsc_compiler::codegen::launch::Launch, Vec<DType>, Vec<DType>, Vec<DType>);

    pub(crate) fn launches() -> Vec<Found> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny");
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let mut seen = BTreeMap::new();
        for file in files.iter().filter(|p| p.extension().is_some_and(|e| e == "dsc")) {
            for mode in [Mode::Prefill, Mode::Decode] {
                for mla in [dsc_compiler::passes::mla_absorb::MlaMode::Absorb, dsc_compiler::passes::mla_absorb::MlaMode::Decompress] {
                    let m = compiled(file, mode, mla);
                    for f in &m.functions {
                        for n in f.graph.nodes() {
                            collect(&f.graph, n, &mut seen);
                        }
                    }
                }
            }
        }
        seen.into_values().collect()
    }

    pub(crate) fn compiled(file: &std::path::Path, mode: Mode, mla: dsc_compiler::passes::mla_absorb::MlaMode) -> Module {
        let spec = crate::cli::load_spec(file, None).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut module = dsc_compiler::lower::lower_mode(&spec, mode).unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
        let mut cx = dsc_compiler::passes::PassCx::new(mode);
        cx.mla = mla;
        dsc_compiler::passes::compile(&mut module, &dsc_compiler::passes::PassSelection::default(), &mut cx)
            .unwrap_or_else(|_| panic!("{}: the pass pipeline failed", file.display()));
        module
    }

    fn collect(g: &dsc_compiler::ir::Graph, n: NodeId, seen: &mut BTreeMap<String, Found>) {
        if matches!(g.node(n).op, Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Call { .. } | Op::Return) {
            return;
        }
        let Ok(NodeWork::Launches { scratch, launches }) = node_work(g, n) else { return };
        let ins: Vec<DType> = g.inputs(n).iter().map(|&v| g.ty(v).dtype).collect();
        let outs: Vec<DType> = g.node(n).outputs.iter().map(|t| t.dtype).collect();
        let scratch: Vec<DType> = scratch.iter().map(|s| s.dtype).collect();
        for l in launches {
            let key = format!("{} {:?} {ins:?}", l.kernel.name(), l.args.iter().map(std::mem::discriminant).collect::<Vec<_>>());
            let label = format!("{} ({})", l.kernel.name(), g.node(n).op.name());
            seen.entry(key).or_insert((label, l, ins.clone(), outs.clone(), scratch.clone()));
        }
    }

    /// The layout `Launch::resolve` and [`info_words`] produce agrees with the struct and the
    /// parameter list the generated source declares, for every kernel the tiny specs use:
    /// as many pointers, each of the buffer's type, and `info_st` arrays of the lengths
    /// the words fill.
    #[test]
    fn layout_matches_generated_sources() {
        let all = launches();
        assert!(all.len() >= 4, "only {} launches", all.len());
        let bind = Bindings { batch: 2, seq: 3, cache: 5 };
        let mut kinds = BTreeMap::new();
        for (label, l, ins, outs, scratch) in &all {
            let src = kernel_source(&l.kernel, Target::Cuda);
            let sig = parse_signature(&src).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(sig.entry, l.kernel.name(), "{label}");
            let (ins, outs, scratch): (Vec<Fake>, Vec<Fake>, Vec<Fake>) = (
                ins.iter().map(|&d| Fake(d)).collect(),
                outs.iter().map(|&d| Fake(d)).collect(),
                scratch.iter().map(|&d| Fake(d)).collect(),
            );
            let r = l.resolve(&ins, &outs, &scratch, &bind).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(sig.params.len(), r.ptrs.len(), "{label}: pointer parameters {:?} for {:?}", sig.params, l.args);
            for (i, (p, ty)) in r.ptrs.iter().zip(&sig.params).enumerate() {
                let ok: &[&str] = match p {
                    Ptr::Buf(Fake(d)) => c_types(*d),
                    Ptr::U32s(_) => &["uint32_t"],
                    Ptr::F32Bits(_) => &["float"],
                };
                assert!(ok.contains(&ty.as_str()), "{label}: parameter {i} is `{ty}`, the launch binds {p:?}");
            }
            let words = info(&r, |_| 1).unwrap();
            let mut want = Vec::new();
            if !r.scalars.is_empty() {
                want.push(("scalars_u32".to_string(), padded(r.scalars.len())));
            }
            want.push(("static_meta".to_string(), padded(r.ptrs.len())));
            assert!(sig.has_info, "{label}: no info_st parameter");
            assert_eq!(sig.info_fields, want, "{label}: info_st");
            assert_eq!(words.len(), want.iter().map(|w| w.1).sum::<usize>(), "{label}: info words");
            *kinds.entry(format!("{:?}", std::mem::discriminant(&l.kernel))).or_insert(0) += 1;
        }
        eprintln!("checked {} launches of {} kernel kinds", all.len(), kinds.len());
    }
}
