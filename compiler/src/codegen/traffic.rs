//! The traffic model: how far a compiled plan is from the least its step must move and
//! compute (`dsc compile --target T --emit cost`).
//!
//! Each launch of a [`Plan`] states its own [`Cost`](super::launch::Cost) where the launch
//! is decided: the FLOPs its cubes execute (tile padding included) and how much of each
//! buffer it binds it touches. This module evaluates those at a step's sizes (`b`, `c`,
//! `s`), walking the entry point and every call (a layer body called 58 times counts 58
//! times), and sets the totals against [`crate::stats::step_ideal`], which knows nothing
//! of the plan. Bytes are the traffic a kernel cannot avoid (each element it touches read
//! or written once per launch): copies, broadcasts, casts and padded tiles show up as
//! overhead; re-reads a cache would serve do not.
//!
//! The time a plan implies on a device is the sum over launches of
//! `max(bytes / bandwidth, flops / peak)`: each kernel at the roofline, launch latency
//! and overlap between kernels ignored. Presets: [`Device::PRESETS`].

use super::launch::{Arg, Buf, Launch, NodeWork, Scratch};
use super::plan::{FunctionPlan, Plan, Step};
use crate::ir::{Bindings, Mode};
use crate::stats::StepIdeal;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::fmt::Write;

/// A device's memory bandwidth and peak arithmetic rate for the plan's dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub name: String,
    pub bytes_per_s: f64,
    pub flops_per_s: f64,
}

impl Device {
    /// `(name, bytes/s, dense bf16 FLOP/s)`: NVIDIA's published figures for the SXM parts
    /// (H100: 3.35 TB/s HBM3, 989 TFLOP/s; H200: 4.8 TB/s HBM3e, the same tensor cores).
    pub const PRESETS: [(&'static str, f64, f64); 2] = [("h100", 3.35e12, 989e12), ("h200", 4.8e12, 989e12)];

    /// A preset by name, or `BANDWIDTH_GB_S,TFLOPS` (`3350,989`).
    pub fn parse(s: &str) -> Result<Device, String> {
        if let Some((name, bw, fl)) = Device::PRESETS.iter().find(|p| p.0.eq_ignore_ascii_case(s)) {
            return Ok(Device { name: name.to_string(), bytes_per_s: *bw, flops_per_s: *fl });
        }
        let expected = || {
            let names: Vec<&str> = Device::PRESETS.iter().map(|p| p.0).collect();
            format!("unknown device `{s}`; expected {} or `GB/s,TFLOP/s` (e.g. `3350,989`)", names.join(", "))
        };
        let (bw, fl) = s.split_once(',').ok_or_else(expected)?;
        let num = |t: &str| t.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0);
        match (num(bw), num(fl)) {
            (Some(bw), Some(fl)) => Ok(Device { name: format!("{bw} GB/s, {fl} TFLOP/s"), bytes_per_s: bw * 1e9, flops_per_s: fl * 1e12 }),
            _ => Err(format!("device `{s}`: both figures must be positive numbers (GB/s, TFLOP/s)")),
        }
    }

    /// Seconds for `bytes` and `flops` at the roofline.
    pub fn seconds(&self, bytes: f64, flops: f64) -> f64 {
        (bytes / self.bytes_per_s).max(flops / self.flops_per_s)
    }
}

/// One launch site of the plan, over every call of its function in the step.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchTraffic {
    pub function: String,
    /// The IR node (`%12 matmul`) the launch belongs to.
    pub node: String,
    pub kernel: String,
    /// Times it runs per step (a layer body's launches run once per layer).
    pub calls: u64,
    /// Bytes read and written, all calls.
    pub bytes: f64,
    /// FLOPs executed, all calls.
    pub flops: f64,
}

/// A plan's traffic at one step's sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    pub mode: Mode,
    pub sizes: Bindings,
    /// In plan order (entry first, then each called function in the order first called).
    pub launches: Vec<LaunchTraffic>,
}

impl Traffic {
    /// Evaluates every launch of `plan` at `sizes`, or says which size is too large: a
    /// buffer or FLOP count past `i64` is an error, never a wrapped number.
    pub fn of(plan: &Plan, sizes: Bindings) -> Result<Traffic, String> {
        let mut calls: BTreeMap<&str, u64> = BTreeMap::new();
        let mut order: Vec<&str> = Vec::new();
        count_calls(plan, &plan.entry, 1, &mut calls, &mut order);
        let mut launches = Vec::new();
        for name in order {
            let f = &plan.functions[name];
            function_traffic(f, calls[name], &sizes, &mut launches).ok_or_else(|| {
                format!(
                    "b={} c={} s={}: `{name}` has a buffer or a FLOP count past 2^63 at these sizes; give smaller --batch, --context or --seq",
                    sizes.batch, sizes.cache, sizes.seq
                )
            })?;
        }
        Ok(Traffic { mode: plan.mode, sizes, launches })
    }

    pub fn total_bytes(&self) -> f64 {
        self.launches.iter().map(|l| l.bytes).sum()
    }

    pub fn total_flops(&self) -> f64 {
        self.launches.iter().map(|l| l.flops).sum()
    }

    /// The step's time on `device`: each launch at its roofline, summed.
    pub fn seconds(&self, device: &Device) -> f64 {
        self.launches.iter().map(|l| device.seconds(l.bytes, l.flops)).sum()
    }

    /// Bytes, FLOPs and launches per call site grouped by IR op (`matmul`, `broadcast`,
    /// `expert_ffn`), largest traffic first.
    pub fn by_op(&self) -> Vec<(String, f64, f64, u64)> {
        let mut m: BTreeMap<String, (f64, f64, u64)> = BTreeMap::new();
        for l in &self.launches {
            let op = l.node.split_once(' ').map_or(l.node.as_str(), |(_, op)| op).to_string();
            let e = m.entry(op).or_default();
            e.0 += l.bytes;
            e.1 += l.flops;
            e.2 += l.calls;
        }
        let mut v: Vec<(String, f64, f64, u64)> = m.into_iter().map(|(k, (b, f, c))| (k, b, f, c)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// How many times each function runs per step, and the order functions are first reached.
fn count_calls<'p>(plan: &'p Plan, name: &'p str, times: u64, calls: &mut BTreeMap<&'p str, u64>, order: &mut Vec<&'p str>) {
    let Some((key, f)) = plan.functions.get_key_value(name) else { return };
    if !calls.contains_key(key.as_str()) {
        order.push(key);
    }
    *calls.entry(key).or_insert(0) += times;
    for s in &f.steps {
        if let Step::Call { function, .. } = s {
            count_calls(plan, function, times, calls, order);
        }
    }
}

fn function_traffic(f: &FunctionPlan, calls: u64, sizes: &Bindings, out: &mut Vec<LaunchTraffic>) -> Option<()> {
    let buffer_bytes = |b: usize| {
        let bp = &f.buffers[b];
        Some((bp.len().checked_eval(sizes)?.max(0) as f64, bp.dtype.bytes() as f64))
    };
    for s in &f.steps {
        let Step::Node { label, inputs, outputs, work } = s else { continue };
        let (scratch, launches): (&[Scratch], Vec<&Launch>) = match work {
            NodeWork::Alias(_) => continue,
            NodeWork::Launches { scratch, launches } => (scratch, launches.iter().collect()),
            // In place: only the new entries are written.
            NodeWork::Append { write, .. } => (&[], vec![&**write]),
        };
        // Alternative launches count at the sizes where they run.
        for l in launches.into_iter().filter(|l| l.runs(sizes)) {
            // Each distinct buffer the launch binds, once (an input bound twice is read once).
            let mut bound: Vec<Buf> = Vec::new();
            for a in &l.args {
                match a {
                    Arg::Buf(b) => bound.push(*b),
                    Arg::Inputs => bound.extend((0..inputs.len() as u16).map(Buf::Input)),
                    Arg::U32(_) | Arg::Table(_) | Arg::F32Table(_) => {}
                }
            }
            bound.sort();
            bound.dedup();
            let mut bytes = 0.0;
            for b in bound {
                let (len, elem) = match b {
                    Buf::Input(i) => buffer_bytes(inputs[i as usize])?,
                    Buf::Output(i) => buffer_bytes(outputs[i as usize])?,
                    Buf::Scratch(i) => {
                        let sc = &scratch[i as usize];
                        (sc.len.checked_eval(sizes)?.max(0) as f64, sc.dtype.bytes() as f64)
                    }
                };
                let fraction = match l.cost.partial.iter().find(|(pb, _)| *pb == b) {
                    Some((_, t)) => t.fraction(len as i64, sizes)?,
                    None => 1.0,
                };
                bytes += len * elem * fraction;
            }
            let flops = l.cost.flops.checked_eval(sizes)?.max(0) as f64;
            out.push(LaunchTraffic {
                function: f.name.clone(),
                node: label.clone(),
                kernel: l.kernel.name(),
                calls,
                bytes: bytes * calls as f64,
                flops: flops * calls as f64,
            });
        }
    }
    Some(())
}

/// A plan's traffic set against the step's ideal on a device: what `--emit cost` prints.
#[derive(Debug, Clone)]
pub struct CostReport {
    pub model: String,
    pub traffic: Traffic,
    pub ideal: StepIdeal,
    pub device: Device,
}

impl CostReport {
    /// `traffic / ideal` for bytes and FLOPs.
    pub fn ratios(&self) -> (f64, f64) {
        (self.traffic.total_bytes() / self.ideal.bytes(), self.traffic.total_flops() / self.ideal.flops)
    }

    /// One JSON object: sizes, device, `total_bytes`, `ideal_bytes`, `total_flops`,
    /// `ideal_flops` (per step), their ratios and times, the ideal's parts, and `kernels`,
    /// one entry per launch site (`bytes` and `flops` over its `calls`, so they sum to the
    /// totals).
    pub fn to_json(&self) -> Json {
        let t = &self.traffic;
        let (rb, rf) = self.ratios();
        let kernels: Vec<Json> = t
            .launches
            .iter()
            .map(|l| json!({ "function": l.function, "node": l.node, "name": l.kernel, "calls": l.calls, "bytes": l.bytes, "flops": l.flops }))
            .collect();
        json!({
            "model": self.model,
            "mode": t.mode.name(),
            "sizes": { "b": t.sizes.batch, "c": t.sizes.cache, "s": t.sizes.seq },
            "device": { "name": self.device.name, "bytes_per_s": self.device.bytes_per_s, "flops_per_s": self.device.flops_per_s },
            "total_bytes": t.total_bytes(),
            "ideal_bytes": self.ideal.bytes(),
            "bytes_ratio": rb,
            "total_flops": t.total_flops(),
            "ideal_flops": self.ideal.flops,
            "flops_ratio": rf,
            "time_s": t.seconds(&self.device),
            "ideal_time_s": self.device.seconds(self.ideal.bytes(), self.ideal.flops),
            "ideal": self.ideal,
            "kernels": kernels,
        })
    }

    /// The report as a table: totals against the ideal, then traffic by IR op.
    pub fn render(&self) -> String {
        let t = &self.traffic;
        let i = &self.ideal;
        let (rb, rf) = self.ratios();
        let (secs, ideal_secs) = (t.seconds(&self.device), self.device.seconds(i.bytes(), i.flops));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} {} step at b={} c={} s={} on {}:",
            self.model, t.mode, t.sizes.batch, t.sizes.cache, t.sizes.seq, self.device.name
        );
        let _ = writeln!(s, "                     plan          ideal    plan/ideal");
        let _ = writeln!(s, "  bytes      {:>14}  {:>14}  {rb:>8.3}×", human(t.total_bytes(), "B"), human(i.bytes(), "B"));
        let _ = writeln!(s, "  FLOPs      {:>14}  {:>14}  {rf:>8.3}×", human(t.total_flops(), "FLOP"), human(i.flops, "FLOP"));
        let _ = writeln!(s, "  time       {:>14}  {:>14}  {:>8.3}×", seconds(secs), seconds(ideal_secs), secs / ideal_secs);
        let _ = writeln!(
            s,
            "  ideal bytes: weights {}, KV read {}, KV written {}, ids and logits {}",
            human(i.weight_bytes, "B"),
            human(i.kv_read_bytes, "B"),
            human(i.kv_write_bytes, "B"),
            human(i.io_bytes, "B")
        );
        let _ = writeln!(s, "\n  by op              launches          bytes     share          FLOPs");
        let total = t.total_bytes().max(1.0);
        for (op, bytes, flops, calls) in t.by_op() {
            let _ = writeln!(
                s,
                "  {op:<16} {calls:>10}  {:>14}  {:>7.2}%  {:>14}",
                human(bytes, "B"),
                100.0 * bytes / total,
                human(flops, "FLOP")
            );
        }
        s
    }
}

/// `1.234 GB`: decimal prefixes, three decimals.
fn human(v: f64, unit: &str) -> String {
    let prefixes = [("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)];
    match prefixes.iter().find(|(_, f)| v.abs() >= *f) {
        Some((p, f)) => format!("{:.3} {p}{unit}", v / f),
        None => format!("{v:.0} {unit}"),
    }
}

fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.3} µs", s * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::launch::expert_fraction;
    use crate::ir::{Dim, Function, Graph, Module, Op, Value};
    use crate::passes::test_util::{f32t, module_of, n};
    use crate::stats::{stats, step_ideal};

    fn op(g: &mut Graph, op: Op, args: &[Value]) -> Value {
        g.add_inferred(op, args, None).unwrap().into()
    }

    /// A matmul then a slice of its result: each launch's bytes and FLOPs by hand.
    #[test]
    fn a_small_plan_costs_what_its_kernels_touch() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, Dim::S, n(4)]), None).into();
        let w = g.param("w", f32t([n(8), n(4)]), None).into();
        let y = op(&mut g, Op::MatMul, &[x, w]);
        let s = op(&mut g, Op::Slice { axis: 2, start: n(2), len: n(3) }, &[y]);
        g.ret(&[s], None);
        let plan = Plan::build(&module_of("main", g, Mode::Prefill), Mode::Prefill).unwrap();
        for (batch, seq) in [(2u64, 3u64), (5, 40)] {
            let t = Traffic::of(&plan, Bindings { batch, seq, cache: 0 }).unwrap();
            let rows = (batch * seq) as f64;
            let [mm, sl] = &t.launches[..] else { panic!("{:?}", t.launches) };
            // x, w and y whole, in f32.
            assert_eq!(mm.bytes, (rows * 4.0 + 32.0 + rows * 8.0) * 4.0);
            // One 64-column tile along n, ⌈rows/64⌉ tiles of 64 rows along m (or of 8 rows,
            // the skinny form, at 16 rows or fewer), k = 4: padding is counted, and only
            // the form that runs.
            let tile = if rows <= 16.0 { 8.0 } else { 64.0 };
            assert_eq!(mm.flops, 2.0 * tile * 64.0 * 4.0 * (rows / tile).ceil());
            // The slice reads its window of y and writes it.
            assert_eq!((sl.bytes, sl.flops), (2.0 * rows * 3.0 * 4.0, 0.0));
            assert_eq!(t.total_bytes(), mm.bytes + sl.bytes);
            assert_eq!((mm.calls, mm.node.as_str(), sl.node.as_str()), (1, "%2 matmul", "%3 slice"));
        }
    }

    /// A layer body called three times counts three times.
    #[test]
    fn a_layer_body_counts_once_per_call() {
        let mut layer = Function::new("layer");
        let sig = {
            let g = &mut layer.graph;
            let x = g.input(0, "x", f32t([Dim::B, Dim::S, n(4)]), None).into();
            let w = g.param("w", f32t([n(4), n(4)]), None).into();
            let y = op(g, Op::MatMul, &[x, w]);
            g.ret(&[y], None);
            g.signature()
        };
        let mut main = Function::new("main");
        {
            let g = &mut main.graph;
            let mut x: Value = g.input(0, "x", f32t([Dim::B, Dim::S, n(4)]), None).into();
            for l in 0..3 {
                x = g.call("layer", Some(l), &sig, &[x], None).unwrap().out(0);
            }
            g.ret(&[x], None);
        }
        let mut m = Module::new();
        m.add_function(layer);
        m.add_function(main);
        m.set_entry(Mode::Prefill, "main");
        let t = Traffic::of(&Plan::build(&m, Mode::Prefill).unwrap(), Bindings { batch: 1, seq: 1, cache: 0 }).unwrap();
        let [mm] = &t.launches[..] else { panic!("{:?}", t.launches) };
        assert_eq!((mm.function.as_str(), mm.calls), ("layer", 3));
        assert_eq!(mm.bytes, 3.0 * (4.0 + 16.0 + 4.0) * 4.0);
    }

    #[test]
    fn uniform_routing_reaches_the_expected_experts() {
        assert_eq!(expert_fraction(256, 8, 1), 8.0 / 256.0);
        assert_eq!(expert_fraction(256, 8, 0), 0.0);
        let f = expert_fraction(256, 8, 64);
        assert!((f - (1.0 - (248.0f64 / 256.0).powi(64))).abs() < 1e-12, "{f}");
        // Every expert chosen by every token.
        assert_eq!(expert_fraction(4, 4, 3), 1.0);
        // A Monte Carlo estimate agrees: 64 tokens each pick 8 distinct of 256.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let trials = 2000;
        let mut reached = 0usize;
        for _ in 0..trials {
            let mut hit = [false; 256];
            for _ in 0..64 {
                let mut picked = Vec::new();
                while picked.len() < 8 {
                    let e = (next() % 256) as usize;
                    if !picked.contains(&e) {
                        picked.push(e);
                    }
                }
                picked.into_iter().for_each(|e| hit[e] = true);
            }
            reached += hit.iter().filter(|&&h| h).count();
        }
        let mc = reached as f64 / (trials * 256) as f64;
        assert!((mc - f).abs() < 0.005, "Monte Carlo {mc}, formula {f}");
    }

    /// The ideal agrees with `dsc stats`, which is computed another way: one token touches
    /// the active parameters (one embedding row), and does the FLOPs of one token at its
    /// context.
    #[test]
    fn the_ideal_of_one_token_is_the_active_model() {
        for file in ["tiny_v3.dsc", "tiny_llama.dsc", "tiny_moe.dsc"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny").join(file);
            let spec = dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()));
            let m = &spec.model;
            let elem = m.dtype.bytes() as f64;
            let st = stats(m, 17);
            let one = step_ideal(m, false, 1, 16, 1);
            let row = if m.tie_embeddings { st.params.embedding } else { m.hidden as u128 };
            assert_eq!(one.weight_bytes, (st.params.active - st.params.embedding + row) as f64 * elem, "{file}");
            assert_eq!(one.flops, st.flops.per_token as f64, "{file}");
            let kv = *st.kv_cache.bytes_per_token.get(m.dtype.name()).unwrap() as f64;
            assert_eq!((one.kv_read_bytes, one.kv_write_bytes), (16.0 * kv, kv), "{file}");
            // Enough tokens reach every expert: all weights but the unused embedding rows.
            let many = step_ideal(m, false, 1 << 20, 0, 1);
            let all = (st.params.total - st.params.embedding) as f64 + (m.vocab as f64 * m.hidden as f64);
            assert!((many.weight_bytes / elem - all).abs() < 1e-6 * all, "{file}: {} vs {all}", many.weight_bytes / elem);
            // Prefill of s tokens: s tokens of matmuls, attention over 1..=s positions.
            let s = 9u64;
            let pre = step_ideal(m, false, 2, 0, s);
            let attn: f64 = (1..=s).map(|c| stats(m, c).flops.attention as f64).sum();
            assert!((pre.flops - 2.0 * (s as f64 * st.flops.matmul as f64 + attn)).abs() < 1e-6 * pre.flops, "{file}");
        }
    }

    #[test]
    fn devices_parse() {
        assert_eq!(Device::parse("H200").unwrap().bytes_per_s, 4.8e12);
        let d = Device::parse("2000, 500").unwrap();
        assert_eq!((d.bytes_per_s, d.flops_per_s), (2e12, 5e14));
        assert_eq!(d.seconds(2e12, 1e14), 1.0);
        assert!(Device::parse("a100").unwrap_err().contains("expected h100, h200 or `GB/s,TFLOP/s`"));
        assert!(Device::parse("0,5").unwrap_err().contains("positive"));
    }
}
