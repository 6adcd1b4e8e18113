//! The launch ABI: how one IR node runs on a device, as data: its launches (kernel,
//! arguments, grid, cost, the sizes it runs at) with every size an expression of the
//! entry point's run-time sizes `b`, `c`, `s`. It depends on no other part of codegen
//! but the kernel's identity ([`KernelSpec`]); which launches a node gets is decided in
//! [`super::select`].
//!
//! This is the contract between codegen, `plan.json` and the runtimes: `select::node_work`
//! decides, once, from the node's symbolic types, which kernels run, in which order, on
//! which buffers, with which scalar arguments and grid; `dsc compile` prints it and a
//! runtime evaluates the same expressions against the bindings of a step and launches
//! it. Neither side re-derives a launch, so what is written is what runs.
//!
//! A node may take several launches (a concat is one copy per input, a dense SwiGLU
//! three matmuls and an elementwise product) and scratch buffers between them; a node
//! that moves no data (a row-major reshape) is an [`NodeWork::Alias`] of its input.

use super::spec::{Elem, KernelSpec};
use crate::ir::{Bindings, DType, Dim, Shape};
use std::fmt;

/// A size: a product / ceiling quotient of affine [`Dim`]s. Buffer lengths (`b·s·4096`)
/// and grids (`⌈b·s·4096 / 256⌉`) need products, which `Dim` deliberately lacks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Size {
    Dim(Dim),
    Mul(Box<Size>, Box<Size>),
    /// `⌈a / d⌉` for a positive constant `d`.
    CeilDiv(Box<Size>, i64),
    /// `min(a, k)` for a constant `k`.
    Min(Box<Size>, i64),
    /// `a + b` (costs sum the parts of a launch; no launch argument uses it).
    Add(Box<Size>, Box<Size>),
}

impl Size {
    pub fn lit(n: i64) -> Size {
        Size::Dim(Dim::lit(n))
    }

    /// The product of `dims` (1 for none), constants folded.
    pub fn product(dims: &[Dim]) -> Size {
        let k: i64 = dims.iter().filter_map(|d| d.as_const()).product();
        let mut s = Size::lit(k);
        for d in dims.iter().filter(|d| d.as_const().is_none()) {
            s = s.mul(Size::Dim(*d));
        }
        s
    }

    /// Elements of a shape.
    pub fn numel(shape: &Shape) -> Size {
        Size::product(&shape.0)
    }

    pub fn mul(self, other: Size) -> Size {
        match (self.as_const(), other.as_const()) {
            (Some(1), _) => other,
            (_, Some(1)) => self,
            (Some(a), Some(b)) => Size::lit(a * b),
            _ => Size::Mul(Box::new(self), Box::new(other)),
        }
    }

    pub fn plus(self, other: Size) -> Size {
        match (self.as_const(), other.as_const()) {
            (Some(0), _) => other,
            (_, Some(0)) => self,
            (Some(a), Some(b)) => Size::lit(a + b),
            _ => Size::Add(Box::new(self), Box::new(other)),
        }
    }

    pub fn ceil_div(self, d: i64) -> Size {
        assert!(d > 0, "ceil_div by {d}");
        match self.as_const() {
            Some(a) => Size::lit(a.div_euclid(d) + i64::from(a.rem_euclid(d) != 0)),
            None if d == 1 => self,
            None => Size::CeilDiv(Box::new(self), d),
        }
    }

    pub fn min(self, k: i64) -> Size {
        match self.as_const() {
            Some(a) => Size::lit(a.min(k)),
            None => Size::Min(Box::new(self), k),
        }
    }

    pub fn as_const(&self) -> Option<i64> {
        match self {
            Size::Dim(d) => d.as_const(),
            _ => None,
        }
    }

    /// [`Size::eval`], or `None` where a product or sum leaves `i64`.
    pub fn checked_eval(&self, b: &Bindings) -> Option<i64> {
        match self {
            Size::Dim(d) => d.checked_eval(b),
            Size::Mul(x, y) => x.checked_eval(b)?.checked_mul(y.checked_eval(b)?),
            Size::CeilDiv(x, d) => {
                let a = x.checked_eval(b)?;
                Some(a.div_euclid(*d) + i64::from(a.rem_euclid(*d) != 0))
            }
            Size::Min(x, k) => Some(x.checked_eval(b)?.min(*k)),
            Size::Add(x, y) => x.checked_eval(b)?.checked_add(y.checked_eval(b)?),
        }
    }

    /// Its value at `b` as a `u32` kernel argument, or why it is not one.
    pub fn eval_u32(&self, b: &Bindings) -> Result<u32, String> {
        let v = self.checked_eval(b).ok_or_else(|| format!("size {self} overflows at {b:?}"))?;
        u32::try_from(v).map_err(|_| format!("size {self} = {v} does not fit a u32 argument"))
    }

    pub fn eval(&self, b: &Bindings) -> i64 {
        match self {
            Size::Dim(d) => d.eval(b),
            Size::Mul(x, y) => x.eval(b) * y.eval(b),
            Size::CeilDiv(x, d) => {
                let a = x.eval(b);
                a.div_euclid(*d) + i64::from(a.rem_euclid(*d) != 0)
            }
            Size::Min(x, k) => x.eval(b).min(*k),
            Size::Add(x, y) => x.eval(b) + y.eval(b),
        }
    }
}

impl fmt::Display for Size {
    /// `4096`, `b*s*4096` (no parentheses around sums: `(c+s)*128`), `ceil(b*s*4096/256)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Dim(d) => {
                let t = d.to_string();
                if t.contains(['+', '-']) && !t.starts_with('-') {
                    write!(f, "({t})")
                } else {
                    f.write_str(&t)
                }
            }
            Size::Mul(a, b) => write!(f, "{a}*{b}"),
            Size::CeilDiv(a, d) => write!(f, "ceil({a}/{d})"),
            Size::Min(a, k) => write!(f, "min({a}, {k})"),
            Size::Add(a, b) => write!(f, "({a}+{b})"),
        }
    }
}

/// A buffer a launch binds: one of the node's inputs or outputs (by slot), or one of its
/// scratch buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buf {
    Input(u16),
    Output(u16),
    Scratch(u16),
}

/// One argument of a launch, in the kernel's parameter order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Arg {
    /// A device buffer.
    Buf(Buf),
    /// All the node's inputs, in slot order, as one argument (CubeCL's `Sequence`; the
    /// elementwise kernel reads any number of inputs).
    Inputs,
    /// A `u32` scalar.
    U32(Size),
    /// A small `u32` array (shapes, strides) that the runtime uploads for the launch.
    Table(Vec<Size>),
    /// A small array of `f32` constants (RoPE's frequencies) that the runtime uploads
    /// for the launch, held as bit patterns so that `Arg` stays `Eq + Hash`.
    F32Table(Vec<u32>),
}

/// One kernel launch: the kernel, its arguments, and the number of cubes along x, y, z
/// (the cube's own shape is [`KernelSpec::cube_shape`]), and what it costs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Launch {
    pub kernel: KernelSpec,
    pub args: Vec<Arg>,
    pub grid: [Size; 3],
    pub cost: Cost,
    /// At which sizes it runs (`None`: always): one of a node's alternative launches,
    /// picked at run time.
    pub when: Option<When>,
}

/// The sizes at which a launch runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum When {
    /// `size ≤ n`.
    AtMost(Size, i64),
    /// `size > n`.
    Above(Size, i64),
    /// All of them.
    All(Vec<When>),
    /// Not it.
    Not(Box<When>),
}

impl When {
    /// Whether it holds at `b` (`None` where a size leaves `i64`).
    pub fn holds(&self, b: &Bindings) -> Option<bool> {
        Some(match self {
            When::AtMost(s, n) => s.checked_eval(b)? <= *n,
            When::Above(s, n) => s.checked_eval(b)? > *n,
            When::All(ws) => {
                for w in ws {
                    if !w.holds(b)? {
                        return Some(false);
                    }
                }
                true
            }
            When::Not(w) => !w.holds(b)?,
        })
    }

    /// As `plan.json` writes it.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let size = |s: &Size| s.as_const().map_or_else(|| json!(s.to_string()), |c| json!(c));
        match self {
            When::AtMost(s, n) => json!({ "size": size(s), "at_most": n }),
            When::Above(s, n) => json!({ "size": size(s), "above": n }),
            When::All(ws) => json!({ "all": ws.iter().map(When::to_json).collect::<Vec<_>>() }),
            When::Not(w) => json!({ "not": w.to_json() }),
        }
    }
}

impl Launch {
    /// A launch that executes `flops` and touches every buffer it binds whole.
    pub fn new(kernel: KernelSpec, args: Vec<Arg>, grid: [Size; 3], flops: Size) -> Launch {
        Launch { kernel, args, grid, cost: Cost { flops, partial: vec![] }, when: None }
    }

    /// Whether it runs at `b` (a size past `i64` runs nothing: the launch's own sizes
    /// would not fit either).
    pub fn runs(&self, b: &Bindings) -> bool {
        self.when.as_ref().is_none_or(|w| w.holds(b).unwrap_or(false))
    }

    /// The same launch, touching only `touch` of `buf`.
    pub fn touching(mut self, buf: Buf, touch: Touch) -> Launch {
        self.cost.partial.push((buf, touch));
        self
    }
}

/// One pointer parameter of a launch, resolved: a buffer the caller holds, or a table to
/// upload for the launch.
#[derive(Debug, Clone, PartialEq)]
pub enum Ptr<'a, B> {
    /// A buffer the caller holds.
    Buf(&'a B),
    /// An [`Arg::Table`], evaluated: to upload as a `u32` buffer.
    U32s(Vec<u32>),
    /// An [`Arg::F32Table`] (bit patterns): to upload as an `f32` buffer.
    F32Bits(Vec<u32>),
}

impl<B> Ptr<'_, B> {
    /// Elements of the buffer, with `len` telling a caller's buffer's.
    pub fn len(&self, len: impl Fn(&B) -> usize) -> usize {
        match self {
            Ptr::Buf(b) => len(b),
            Ptr::U32s(v) | Ptr::F32Bits(v) => v.len(),
        }
    }
}

/// A launch's arguments resolved against its buffers and the run-time sizes, split as
/// CubeCL's generated code takes them: the buffer parameters in order, and the `u32`
/// scalars in order. Every device binds a launch from this.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved<'a, B> {
    pub ptrs: Vec<Ptr<'a, B>>,
    pub scalars: Vec<u32>,
}

impl Launch {
    /// Resolves the arguments: buffers by slot (`ins`, `outs`, `scratch`), every node
    /// input for [`Arg::Inputs`], sizes evaluated against `bind`.
    pub fn resolve<'a, B>(&self, ins: &'a [B], outs: &'a [B], scratch: &'a [B], bind: &Bindings) -> Result<Resolved<'a, B>, String> {
        let mut r = Resolved { ptrs: Vec::new(), scalars: Vec::new() };
        for (i, a) in self.args.iter().enumerate() {
            match a {
                Arg::Buf(b) => {
                    let d = match *b {
                        Buf::Input(k) => ins.get(k as usize),
                        Buf::Output(k) => outs.get(k as usize),
                        Buf::Scratch(k) => scratch.get(k as usize),
                    };
                    let d = d.ok_or_else(|| format!("{}: argument {i} names a missing buffer {b:?}", self.kernel.name()))?;
                    r.ptrs.push(Ptr::Buf(d));
                }
                Arg::Inputs => r.ptrs.extend(ins.iter().map(Ptr::Buf)),
                Arg::U32(s) => r.scalars.push(s.eval_u32(bind)?),
                Arg::Table(t) => r.ptrs.push(Ptr::U32s(t.iter().map(|s| s.eval_u32(bind)).collect::<Result<_, _>>()?)),
                Arg::F32Table(bits) => r.ptrs.push(Ptr::F32Bits(bits.clone())),
            }
        }
        Ok(r)
    }

    /// The grid at `bind`, cubes along x, y, z.
    pub fn grid_at(&self, bind: &Bindings) -> Result<[u32; 3], String> {
        let [x, y, z] = [0, 1, 2].map(|i| self.grid[i].eval_u32(bind));
        Ok([x?, y?, z?])
    }
}

/// What a launch does, for the traffic model ([`super::traffic`]): the floating-point
/// operations its cubes execute and how much of each buffer it binds it touches. It is
/// decided where the launch is, by the code that knows the kernel, so a new kernel states
/// its cost once.
///
/// FLOPs count what runs, tile padding included (a 64-row matmul tile over one row of x
/// does 64 rows of multiply-adds; a multiply-add is 2), so padding shows as overhead
/// against the model's own FLOPs. Comparisons (top-k, routing) are not FLOPs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cost {
    pub flops: Size,
    /// Buffers the launch touches only in part. Every other bound buffer is touched
    /// whole: each element of an input read once, of an output written once (re-reads a
    /// cache can serve are not counted: this is the traffic the kernel cannot avoid).
    pub partial: Vec<(Buf, Touch)>,
}

/// How much of a buffer a launch touches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Touch {
    /// This many elements (a slice's window, the gathered rows of a table).
    Elems(Size),
    /// The `[experts, ..]` rows of a weight that `tokens · top_k` routing choices reach.
    /// Under uniform routing each token picks an expert with probability `k / E`, so
    /// `E · (1 - (1 - k/E)^tokens)` experts are reached in expectation.
    Experts { experts: i64, top_k: i64, tokens: Size },
}

impl Touch {
    /// The fraction of a buffer of `len` elements touched, at bindings `b` (`None` where
    /// a size leaves `i64`).
    pub fn fraction(&self, len: i64, b: &Bindings) -> Option<f64> {
        Some(match self {
            Touch::Elems(n) if len > 0 => (n.checked_eval(b)? as f64 / len as f64).min(1.0),
            Touch::Elems(_) => 0.0,
            Touch::Experts { experts, top_k, tokens } => expert_fraction(*experts, *top_k, tokens.checked_eval(b)?),
        })
    }
}

/// The expected fraction of `experts` experts that `tokens` tokens reach when each picks
/// `top_k` of them uniformly at random: `1 - (1 - k/E)^tokens`.
pub fn expert_fraction(experts: i64, top_k: i64, tokens: i64) -> f64 {
    if experts <= 0 {
        return 0.0;
    }
    let miss = 1.0 - (top_k.min(experts) as f64 / experts as f64);
    1.0 - miss.powf(tokens.max(0) as f64)
}

/// A scratch buffer a node's launches share: its element type and length.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scratch {
    pub dtype: DType,
    pub len: Size,
}

/// What running a node takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeWork {
    /// No data moves: output 0 is input `.0`'s buffer under another shape.
    Alias(u16),
    /// Launches in order; output buffers are allocated by the caller.
    Launches { scratch: Vec<Scratch>, launches: Vec<Launch> },
    /// A `cache_append` along the leading axis: output 0 is input 0 followed by input 1.
    /// `copy` copies input 0 to the front of the output, `write` writes input 1 after it.
    /// An executor that holds input 0 in a buffer with room past its end, which no other
    /// append has written yet, makes that buffer the output and launches `write` only:
    /// the cache grows in place and its older positions never move. Otherwise it
    /// allocates the output (with room for later appends) and launches both. The traffic
    /// model counts the in-place form.
    Append { copy: Box<Launch>, write: Box<Launch> },
}

impl NodeWork {
    /// Every kernel the node may launch.
    pub fn kernels(&self) -> impl Iterator<Item = &KernelSpec> {
        self.launches().into_iter().map(|l| &l.kernel)
    }

    /// The scratch buffers and launches of the work run out of place (an alias has none;
    /// an append both copies).
    pub fn run_parts(&self) -> (&[Scratch], Vec<&Launch>) {
        match self {
            NodeWork::Launches { scratch, launches } => (scratch, launches.iter().collect()),
            _ => (&[], self.launches()),
        }
    }

    /// What runs at sizes `b`: the scratch buffers (one element for one no running launch
    /// binds: an alternative launch's scratch is not allocated) and the launches, as
    /// [`NodeWork::run_parts`] gives them, those whose [`Launch::when`] fails left out.
    pub fn at(&self, b: &Bindings) -> (Vec<Scratch>, Vec<&Launch>) {
        let (scratch, launches) = self.run_parts();
        let running: Vec<&Launch> = launches.into_iter().filter(|l| l.runs(b)).collect();
        let bound = |i: usize| running.iter().any(|l| l.args.contains(&Arg::Buf(Buf::Scratch(i as u16))));
        let scratch = scratch
            .iter()
            .enumerate()
            .map(|(i, s)| if bound(i) { s.clone() } else { Scratch { dtype: s.dtype, len: Size::lit(1) } })
            .collect();
        (scratch, running)
    }

    /// Every launch the node may make, in order.
    pub fn launches(&self) -> Vec<&Launch> {
        match self {
            NodeWork::Alias(_) => vec![],
            NodeWork::Launches { launches, .. } => launches.iter().collect(),
            NodeWork::Append { copy, write } => vec![&**copy, &**write],
        }
    }
}

/// A grid of `x` cubes.
pub fn grid_x(x: Size) -> [Size; 3] {
    [x, Size::lit(1), Size::lit(1)]
}

/// The most cubes along one grid axis every target allows (wgpu's limit for y and z,
/// and for x on most adapters).
pub const MAX_GRID_AXIS: i64 = 65_535;

/// At least `cubes` cubes for a kernel that indexes by `ABSOLUTE_POS` (linear over the
/// whole grid) and guards against the element count: folded into `x · y` once `cubes`
/// exceeds [`MAX_GRID_AXIS`], so an elementwise launch is not capped at 16.7M elements.
pub fn grid_linear(cubes: Size) -> [Size; 3] {
    if cubes.as_const().is_some_and(|c| c <= MAX_GRID_AXIS) {
        return grid_x(cubes);
    }
    [cubes.clone().min(MAX_GRID_AXIS), cubes.ceil_div(MAX_GRID_AXIS), Size::lit(1)]
}

/// One cube per row for `rows` rows, `y` cubes along the other axis: the rows fold into
/// `x · z` once they exceed [`MAX_GRID_AXIS`] (a prefill's softmax has `b·heads·s` rows).
/// The kernel reads its row with `kernels::row_pos` and skips the rows past the end that
/// the last `z` slice holds.
pub fn grid_rows(rows: Size, y: Size) -> [Size; 3] {
    if rows.as_const().is_some_and(|c| c <= MAX_GRID_AXIS) {
        return [rows, y, Size::lit(1)];
    }
    [rows.clone().min(MAX_GRID_AXIS), y, rows.ceil_div(MAX_GRID_AXIS)]
}

/// One launch with no scratch.
pub fn single(launch: Launch) -> NodeWork {
    NodeWork::Launches { scratch: vec![], launches: vec![launch] }
}

/// The multiply-adds (2 FLOPs each) of a tiled product over `k`: every cube of `grid`
/// computes a whole `tile × tile` output block, padding rows and columns included.
pub fn tiled_flops(grid: &[Size; 3], tile: i64, k: Size) -> Size {
    let [x, y, z] = grid.clone();
    x.mul(y).mul(z).mul(Size::lit(2 * tile * tile)).mul(k)
}

/// The element type a kernel holds a float buffer in.
pub fn elem_dtype(e: Elem) -> DType {
    match e {
        Elem::F32 => DType::F32,
        Elem::F16 => DType::F16,
        Elem::Bf16 => DType::Bf16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_fold_print_and_evaluate() {
        let s = Size::product(&[Dim::B, Dim::S, Dim::lit(64), Dim::lit(2)]);
        assert_eq!(s.to_string(), "128*b*s");
        let g = s.clone().ceil_div(256);
        assert_eq!(g.to_string(), "ceil(128*b*s/256)");
        let bind = Bindings { batch: 3, seq: 5, cache: 7 };
        assert_eq!(g.eval(&bind), (128 * 15usize).div_ceil(256) as i64);
        assert_eq!(Size::lit(1000).ceil_div(256), Size::lit(4));
        // A linear grid folds into y past 65,535 cubes and covers every element.
        let big = Size::product(&[Dim::B, Dim::S, Dim::lit(4096)]).ceil_div(256);
        let [x, y, _] = grid_linear(big.clone());
        assert_eq!(x.to_string(), "min(ceil(4096*b*s/256), 65535)");
        for (batch, seq) in [(1, 1), (1, 4095), (1, 4096), (3, 2000), (8, 4096)] {
            let bind = Bindings { batch, seq, cache: 0 };
            let (x, y, need) = (x.eval(&bind), y.eval(&bind), big.eval(&bind));
            assert!(x <= MAX_GRID_AXIS && y <= MAX_GRID_AXIS && x * y >= need && x * (y - 1) < need, "{batch}×{seq}: {x}×{y} for {need}");
        }
        assert_eq!(grid_linear(Size::lit(100))[1], Size::lit(1));
        // A row grid folds into z, leaving y to the kernel, and covers every row.
        let rows = Size::product(&[Dim::B, Dim::S, Dim::lit(128)]);
        let [x, y, z] = grid_rows(rows.clone(), Size::lit(3));
        assert_eq!(y, Size::lit(3));
        for (batch, seq) in [(1, 1), (1, 511), (1, 512), (4, 4096), (64, 4096)] {
            let bind = Bindings { batch, seq, cache: 0 };
            let (x, z, need) = (x.eval(&bind), z.eval(&bind), rows.eval(&bind));
            assert!(x <= MAX_GRID_AXIS && z <= MAX_GRID_AXIS && x * z >= need && x * (z - 1) < need, "{batch}×{seq}: {x}×{z} for {need}");
        }
        assert_eq!(grid_rows(Size::lit(100), Size::lit(1)), grid_x(Size::lit(100)));
        let kv = Size::product(&[Dim::B, Dim::C + Dim::S]);
        assert_eq!(kv.to_string(), "b*(c+s)");
        assert_eq!(kv.eval(&bind), 36);
    }
}
