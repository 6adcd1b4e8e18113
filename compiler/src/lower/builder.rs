//! A function under construction: [`Builder`] wraps a [`Function`] so the lowering code
//! reads like the model code it mirrors (`b.matmul(x, w)?`), stamps every node with the
//! spec span of the section being lowered, numbers arguments as they are declared, and
//! turns shape-rule failures into [`LowerError`]s that name the function.

use super::LowerError;
use crate::ir::{BinaryOp, DType, Dim, Function, NodeId, Op, Shape, Signature, Ty, Value};
use dsc_dsl::resolve::SpanMap;
use dsc_dsl::span::Span;

pub(super) struct Builder<'s> {
    f: Function,
    spans: &'s SpanMap,
    /// The span new nodes get; set per spec section with [`Builder::at`].
    span: Option<Span>,
    next_input: u32,
}

impl<'s> Builder<'s> {
    pub fn new(name: &str, spans: &'s SpanMap) -> Builder<'s> {
        Builder { f: Function::new(name), spans, span: None, next_input: 0 }
    }

    /// Nodes built from now on carry the span of the first of `keys` the spec recorded
    /// (most specific first: `tie_embeddings` is only recorded when written, so it falls
    /// back to `vocab`).
    pub fn at(&mut self, keys: &[&str]) {
        self.span = keys.iter().find_map(|k| self.spans.get(k));
    }

    pub fn finish(self) -> Function {
        self.f
    }

    pub fn ty(&self, v: Value) -> &Ty {
        self.f.graph.ty(v)
    }

    // ------------------------------------------------------------ leaves

    /// The next argument of the function; indices follow declaration order.
    pub fn input(&mut self, name: &str, ty: Ty) -> Value {
        let i = self.next_input;
        self.next_input += 1;
        self.f.graph.input(i, name, ty, self.span).into()
    }

    pub fn param(&mut self, name: &str, ty: Ty) -> Value {
        self.f.graph.param(name, ty, self.span).into()
    }

    pub fn constant(&mut self, value: f64, dtype: DType) -> Value {
        self.f.graph.constant(value, dtype, self.span).into()
    }

    pub fn ret(&mut self, values: &[Value]) {
        self.f.graph.ret(values, self.span);
    }

    // ------------------------------------------------------------ ops

    /// Any op, typed by its shape rule.
    pub fn node(&mut self, op: Op, inputs: &[Value]) -> Result<NodeId, LowerError> {
        let function = &self.f.name;
        self.f.graph.add_inferred(op, inputs, self.span).map_err(|error| LowerError::Shape { function: function.clone(), error })
    }

    /// A single-output op.
    pub fn op(&mut self, op: Op, inputs: &[Value]) -> Result<Value, LowerError> {
        self.node(op, inputs).map(Value::from)
    }

    pub fn call(&mut self, function: &str, layer: Option<u32>, sig: &Signature, args: &[Value]) -> Result<NodeId, LowerError> {
        let name = &self.f.name;
        self.f.graph.call(function, layer, sig, args, self.span).map_err(|error| LowerError::Shape { function: name.clone(), error })
    }

    /// `x · wᵀ` for a torch-style `[out, in]` weight.
    pub fn matmul(&mut self, x: Value, w: Value) -> Result<Value, LowerError> {
        self.op(Op::MatMul, &[x, w])
    }

    /// `x · wᵀ` with a fresh `[out, in]` weight of the value's dtype.
    pub fn linear(&mut self, x: Value, name: &str, out: u64) -> Result<Value, LowerError> {
        let t = self.ty(x).clone();
        let inp = t.shape.last().unwrap_or(Dim::lit(0));
        let w = self.param(name, Ty::new(t.dtype, [Dim::from(out), inp]));
        self.matmul(x, w)
    }

    pub fn binary(&mut self, op: BinaryOp, a: Value, b: Value) -> Result<Value, LowerError> {
        self.op(Op::Binary(op), &[a, b])
    }

    /// RMSNorm over the last axis with a fresh gain param of the value's dtype.
    pub fn rms_norm(&mut self, x: Value, gain: &str, eps: f64) -> Result<Value, LowerError> {
        let t = self.ty(x).clone();
        let d = t.shape.last().unwrap_or(Dim::lit(0));
        let g = self.param(gain, Ty::new(t.dtype, [d]));
        self.op(Op::RmsNorm { eps: eps.into() }, &[x, g])
    }

    pub fn reshape(&mut self, x: Value, dims: impl Into<Shape>) -> Result<Value, LowerError> {
        self.op(Op::Reshape { shape: dims.into() }, &[x])
    }

    /// `len` elements from `start` along `axis`.
    pub fn slice(&mut self, x: Value, axis: u8, start: impl Into<Dim>, len: impl Into<Dim>) -> Result<Value, LowerError> {
        self.op(Op::Slice { axis, start: start.into(), len: len.into() }, &[x])
    }

    pub fn concat(&mut self, xs: &[Value], axis: u8) -> Result<Value, LowerError> {
        self.op(Op::Concat { axis }, xs)
    }

    /// `x` as `to`; no node when it already is.
    pub fn cast(&mut self, x: Value, to: DType) -> Result<Value, LowerError> {
        if self.ty(x).dtype == to {
            Ok(x)
        } else {
            self.op(Op::Cast { to }, &[x])
        }
    }
}
