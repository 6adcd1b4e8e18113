//! Symbolic dimensions and shapes.
//!
//! A [`Dim`] is an affine form `kb·b + kc·c + ks·s + k` over the three run-time sizes of
//! an entry point: batch `b`, sequence `s` (new tokens per sequence) and cache length `c`
//! (tokens already in the KV cache). Affine is enough for every shape a DeepSeek forward
//! pass needs (`c+s` keys after a cache append, `s-1` positions for a shifted loss) and
//! keeps equality decidable: two dims are equal exactly when their coefficients are, so
//! `#[derive(PartialEq, Hash)]` is semantic equality and CSE can hash shapes.
//!
//! Products of symbols (`b·s`) are *not* expressible, on purpose: ops treat all leading
//! axes as batch axes instead of flattening tokens to `[b·s, d]`, so no op ever needs one.

use std::fmt;
use std::ops::{Add, Deref, Mul, Neg, Sub};

/// One of the run-time sizes a [`Dim`] may mention. The declaration order is the print
/// order (`b`, `c`, `s`), which is why `cache + seq` prints as `c+s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sym {
    /// Sequences in the batch.
    Batch,
    /// Tokens already held in the KV cache (0 in prefill and train).
    Cache,
    /// New tokens per sequence (the full prompt in prefill and train, 1 in decode).
    Seq,
}

impl Sym {
    pub const ALL: [Sym; 3] = [Sym::Batch, Sym::Cache, Sym::Seq];

    /// The one-letter name used in the text form.
    pub fn letter(self) -> char {
        match self {
            Sym::Batch => 'b',
            Sym::Cache => 'c',
            Sym::Seq => 's',
        }
    }
}

/// An affine size: integer coefficients on `b`, `c`, `s` plus a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Dim {
    /// Coefficients indexed by `Sym as usize`.
    coeff: [i64; 3],
    constant: i64,
}

impl Dim {
    /// The batch size `b`.
    pub const B: Dim = Dim { coeff: [1, 0, 0], constant: 0 };
    /// The cache length `c`.
    pub const C: Dim = Dim { coeff: [0, 1, 0], constant: 0 };
    /// The sequence length `s`.
    pub const S: Dim = Dim { coeff: [0, 0, 1], constant: 0 };

    /// A constant size.
    pub const fn lit(n: i64) -> Dim {
        Dim { coeff: [0, 0, 0], constant: n }
    }

    /// The dim that is exactly one symbol.
    pub const fn sym(s: Sym) -> Dim {
        let mut coeff = [0, 0, 0];
        coeff[s as usize] = 1;
        Dim { coeff, constant: 0 }
    }

    /// The coefficient of `s`.
    pub fn coeff(&self, s: Sym) -> i64 {
        self.coeff[s as usize]
    }

    /// The constant term.
    pub fn constant_term(&self) -> i64 {
        self.constant
    }

    /// `Some(n)` when the dim mentions no symbol.
    pub fn as_const(&self) -> Option<i64> {
        if self.coeff == [0, 0, 0] {
            Some(self.constant)
        } else {
            None
        }
    }

    /// Whether the dim is the constant `n`.
    pub fn is(&self, n: i64) -> bool {
        self.as_const() == Some(n)
    }

    /// Whether any symbol appears.
    pub fn is_symbolic(&self) -> bool {
        self.as_const().is_none()
    }

    /// The concrete size once the symbols are known.
    pub fn eval(&self, b: &Bindings) -> i64 {
        self.coeff[Sym::Batch as usize] * b.batch as i64
            + self.coeff[Sym::Cache as usize] * b.cache as i64
            + self.coeff[Sym::Seq as usize] * b.seq as i64
            + self.constant
    }

    /// [`Dim::eval`], or `None` where a term leaves `i64` (sizes a user typed).
    pub fn checked_eval(&self, b: &Bindings) -> Option<i64> {
        let term = |c: i64, v: u64| c.checked_mul(i64::try_from(v).ok()?);
        term(self.coeff[Sym::Batch as usize], b.batch)?
            .checked_add(term(self.coeff[Sym::Cache as usize], b.cache)?)?
            .checked_add(term(self.coeff[Sym::Seq as usize], b.seq)?)?
            .checked_add(self.constant)
    }
}

/// Why [`solve_symbols`] could not bind a symbol: `pairs[pair]` leaves no non-negative
/// whole value for `sym`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SolveError {
    pub pair: usize,
    pub sym: Sym,
}

/// Binds `b`, `c`, `s` from declared dims and the sizes arguments have there: a dim with
/// one unknown symbol determines it once the others are known, repeated until nothing
/// changes (so `[b, s]` ids and a `[b, c+s, ..]` cache bind all three). `c` defaults to 0
/// when nothing mentions it; `b` or `s` may stay unbound (an error only where a shape
/// needs them). What the reference interpreter and the device runtimes both bind with;
/// a caller checks every shape against the result.
pub fn solve_symbols(pairs: &[(Dim, i64)]) -> Result<[Option<i64>; 3], SolveError> {
    let mut known: [Option<i64>; 3] = [None; 3];
    loop {
        let mut progress = false;
        for (i, (d, actual)) in pairs.iter().enumerate() {
            let unknown: Vec<Sym> = Sym::ALL.into_iter().filter(|&s| d.coeff(s) != 0 && known[s as usize].is_none()).collect();
            let [s] = unknown[..] else { continue };
            let rest: i64 = Sym::ALL.into_iter().filter(|&o| o != s).map(|o| d.coeff(o) * known[o as usize].unwrap_or(0)).sum();
            let num = actual - rest - d.constant_term();
            let k = d.coeff(s);
            if num % k != 0 || num / k < 0 {
                return Err(SolveError { pair: i, sym: s });
            }
            known[s as usize] = Some(num / k);
            progress = true;
        }
        if !progress {
            break;
        }
    }
    known[Sym::Cache as usize].get_or_insert(0);
    Ok(known)
}

/// Concrete values for the symbols, e.g. for one decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bindings {
    pub batch: u64,
    pub seq: u64,
    pub cache: u64,
}

impl From<u64> for Dim {
    /// Model sizes come as `u64` from `dsc_dsl::model`; resolution bounds them far below
    /// `i64::MAX`.
    fn from(n: u64) -> Dim {
        Dim::lit(n as i64)
    }
}

impl From<Sym> for Dim {
    fn from(s: Sym) -> Dim {
        Dim::sym(s)
    }
}

impl Add for Dim {
    type Output = Dim;
    fn add(self, o: Dim) -> Dim {
        let mut coeff = self.coeff;
        for (a, b) in coeff.iter_mut().zip(o.coeff) {
            *a += b;
        }
        Dim { coeff, constant: self.constant + o.constant }
    }
}

impl Add<i64> for Dim {
    type Output = Dim;
    fn add(self, n: i64) -> Dim {
        self + Dim::lit(n)
    }
}

impl Neg for Dim {
    type Output = Dim;
    fn neg(self) -> Dim {
        self * -1
    }
}

impl Sub for Dim {
    type Output = Dim;
    fn sub(self, o: Dim) -> Dim {
        self + -o
    }
}

impl Sub<i64> for Dim {
    type Output = Dim;
    fn sub(self, n: i64) -> Dim {
        self + Dim::lit(-n)
    }
}

impl Mul<i64> for Dim {
    type Output = Dim;
    fn mul(self, k: i64) -> Dim {
        Dim { coeff: self.coeff.map(|c| c * k), constant: self.constant * k }
    }
}

impl fmt::Display for Dim {
    /// `b`, `s`, `c+s`, `2*s-1`, `128`, `0`: symbols in `b, c, s` order, then the constant.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in Sym::ALL {
            let k = self.coeff(s);
            if k == 0 {
                continue;
            }
            let sign = if k < 0 {
                "-"
            } else if first {
                ""
            } else {
                "+"
            };
            let mag = k.unsigned_abs();
            if mag == 1 {
                write!(f, "{sign}{}", s.letter())?;
            } else {
                write!(f, "{sign}{mag}*{}", s.letter())?;
            }
            first = false;
        }
        if first {
            write!(f, "{}", self.constant)
        } else if self.constant > 0 {
            write!(f, "+{}", self.constant)
        } else if self.constant < 0 {
            write!(f, "{}", self.constant)
        } else {
            Ok(())
        }
    }
}

/// The dims of one tensor, outermost first. A scalar has rank 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn new(dims: Vec<Dim>) -> Shape {
        Shape(dims)
    }
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    /// The innermost dim; `None` for a scalar.
    pub fn last(&self) -> Option<Dim> {
        self.0.last().copied()
    }
    /// Element count when every dim is constant.
    pub fn const_numel(&self) -> Option<i64> {
        self.0.iter().map(Dim::as_const).product()
    }
    /// Whether two shapes hold the same number of elements for *every* binding of the
    /// symbols. Checked by factoring: the constant dims multiply to the same number and
    /// the symbolic dims are the same multiset. Sound but not complete (`[2*s]` vs
    /// `[s, 2]` is rejected), which is what [`crate::ir::Op::Reshape`] documents.
    pub fn same_numel(&self, other: &Shape) -> bool {
        fn split(s: &Shape) -> (i64, Vec<Dim>) {
            let mut k = 1i64;
            let mut syms = Vec::new();
            for d in &s.0 {
                match d.as_const() {
                    Some(n) => k = k.saturating_mul(n),
                    None => syms.push(*d),
                }
            }
            // Any order works as long as both sides use the same one.
            syms.sort_by_key(|d| (d.coeff, d.constant));
            (k, syms)
        }
        split(self) == split(other)
    }
    /// The concrete shape once the symbols are known.
    pub fn eval(&self, b: &Bindings) -> Vec<i64> {
        self.0.iter().map(|d| d.eval(b)).collect()
    }
}

impl Deref for Shape {
    type Target = [Dim];
    fn deref(&self) -> &[Dim] {
        &self.0
    }
}

impl From<Vec<Dim>> for Shape {
    fn from(v: Vec<Dim>) -> Shape {
        Shape(v)
    }
}

impl<const N: usize> From<[Dim; N]> for Shape {
    fn from(v: [Dim; N]) -> Shape {
        Shape(v.to_vec())
    }
}

impl fmt::Display for Shape {
    /// `[b,s,7168]`; a scalar is `[]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_solve_from_argument_shapes() {
        // ids [b, s] and a cache [b, c+s, 4]: all three, in any order of the pairs.
        let pairs = [(Dim::B, 2), (Dim::C + Dim::S, 9), (Dim::S, 3), (Dim::lit(4), 4)];
        assert_eq!(solve_symbols(&pairs), Ok([Some(2), Some(6), Some(3)]));
        let rev: Vec<(Dim, i64)> = pairs.iter().rev().copied().collect();
        assert_eq!(solve_symbols(&rev), Ok([Some(2), Some(6), Some(3)]));
        // Nothing mentions c: 0; s never bound: left open.
        assert_eq!(solve_symbols(&[(Dim::B, 5)]), Ok([Some(5), Some(0), None]));
        // A size no whole non-negative value fits: which pair and which symbol.
        assert_eq!(solve_symbols(&[(Dim::S, 3), (Dim::C + Dim::S, 2)]), Err(SolveError { pair: 1, sym: Sym::Cache }));
        assert_eq!(solve_symbols(&[(Dim::S * 2, 7)]), Err(SolveError { pair: 0, sym: Sym::Seq }));
    }

    #[test]
    fn display() {
        assert_eq!(Dim::B.to_string(), "b");
        assert_eq!(Dim::S.to_string(), "s");
        assert_eq!(Dim::C.to_string(), "c");
        assert_eq!((Dim::S + Dim::C).to_string(), "c+s");
        assert_eq!(Dim::lit(128).to_string(), "128");
        assert_eq!(Dim::lit(0).to_string(), "0");
        assert_eq!((Dim::S - 1).to_string(), "s-1");
        assert_eq!((Dim::S * 2 + 3).to_string(), "2*s+3");
        assert_eq!((Dim::lit(4) - Dim::S).to_string(), "-s+4");
        assert_eq!((-(Dim::B * 3)).to_string(), "-3*b");
        let sh = Shape::from([Dim::B, Dim::S, Dim::lit(7168)]);
        assert_eq!(sh.to_string(), "[b,s,7168]");
        assert_eq!(Shape::scalar().to_string(), "[]");
    }

    #[test]
    fn arithmetic_is_canonical() {
        // Equality is structural, and structural is semantic for affine forms.
        assert_eq!(Dim::C + Dim::S, Dim::S + Dim::C);
        assert_eq!((Dim::S + 1) - 1, Dim::S);
        assert_eq!(Dim::S - Dim::S, Dim::lit(0));
        assert_eq!(Dim::S * 3 - Dim::S * 3, Dim::lit(0));
        assert_ne!(Dim::S, Dim::C);
        assert_eq!(Dim::lit(3).as_const(), Some(3));
        assert_eq!((Dim::S + 3).as_const(), None);
        assert!(Dim::from(7u64).is(7));
        assert_eq!(Dim::sym(Sym::Cache), Dim::C);
    }

    #[test]
    fn evaluation() {
        let b = Bindings { batch: 2, seq: 1, cache: 100 };
        assert_eq!((Dim::C + Dim::S).eval(&b), 101);
        assert_eq!((Dim::B * 3 - 1).eval(&b), 5);
        assert_eq!(Shape::from([Dim::B, Dim::C + Dim::S, Dim::lit(8)]).eval(&b), vec![2, 101, 8]);
    }

    #[test]
    fn numel() {
        let a = Shape::from([Dim::B, Dim::S, Dim::lit(32), Dim::lit(128)]);
        let b = Shape::from([Dim::B, Dim::S, Dim::lit(4096)]);
        let c = Shape::from([Dim::S, Dim::B, Dim::lit(4096)]);
        let d = Shape::from([Dim::B, Dim::C, Dim::lit(4096)]);
        assert!(a.same_numel(&b));
        assert!(b.same_numel(&c));
        assert!(!b.same_numel(&d));
        assert_eq!(Shape::from([Dim::lit(2), Dim::lit(3)]).const_numel(), Some(6));
        assert_eq!(b.const_numel(), None);
    }
}
