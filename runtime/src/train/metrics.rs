//! What a run reports: `RUN_DIR/metrics.jsonl`, a progress display, and `RUN_DIR/loss.svg`.
//!
//! `metrics.jsonl` has one JSON object per step, appended and flushed as the step ends:
//!
//! | key | meaning |
//! | --- | --- |
//! | `step` | optimizer step, from 1 |
//! | `loss` | the batch's loss before the update (the objective's `loss` term, else its value) |
//! | `objective` | the value differentiated, when it is not `loss` (aux and MTP terms added) |
//! | `grad_norm` | the global gradient norm before clipping |
//! | `lr` | the learning rate of the update |
//! | `tokens` | target tokens in the batch |
//! | `tokens_per_s` | target tokens per second of the step (objective and optimizer) |
//! | `mtp_loss`, `aux_loss`, … | the objective's other terms, under their names |
//! | `load_balance` | MoE only: `{"L": max_load / mean_load}` per layer L with a selection bias, from the tokens routed in the step (1 is perfect balance, `E` all tokens on one expert) |
//!
//! A resumed run first cuts the file after the step it resumes from, so every step
//! appears once. The progress display is an indicatif bar (step, loss, tokens/s, ETA)
//! when stderr is a terminal, one plain line per step otherwise.

use super::TrainError;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

pub const METRICS: &str = "metrics.jsonl";
pub const PLOT: &str = "loss.svg";

/// One step's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub objective: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// The objective's terms other than `loss`.
    pub terms: Vec<(String, f64)>,
    /// Layer → max load / mean load.
    pub load_balance: BTreeMap<u64, f64>,
}

impl StepMetrics {
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("step".into(), self.step.into());
        m.insert("loss".into(), num(self.loss));
        if self.objective != self.loss {
            m.insert("objective".into(), num(self.objective));
        }
        m.insert("grad_norm".into(), num(self.grad_norm));
        m.insert("lr".into(), num(self.lr));
        m.insert("tokens".into(), self.tokens.into());
        m.insert("tokens_per_s".into(), num(self.tokens_per_s));
        for (k, v) in &self.terms {
            m.insert(k.clone(), num(*v));
        }
        if !self.load_balance.is_empty() {
            let lb: Map<String, Value> = self.load_balance.iter().map(|(l, r)| (l.to_string(), num(*r))).collect();
            m.insert("load_balance".into(), Value::Object(lb));
        }
        Value::Object(m)
    }
}

/// JSON has no NaN or infinity: those are written as null (a diverged step stays visible).
fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// max / mean of one layer's expert loads; `None` when nothing was routed.
pub fn balance_ratio(loads: &[f64]) -> Option<f64> {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    (mean > 0.0).then(|| loads.iter().cloned().fold(f64::MIN, f64::max) / mean)
}

/// `metrics.jsonl`, open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `run_dir/metrics.jsonl`: empty for a new run; for a run resumed after step
    /// `k`, without the lines of steps after `k` (rewritten atomically).
    pub fn open(run_dir: &Path, resumed_at: Option<u64>) -> Result<MetricsLog, TrainError> {
        MetricsLog::open_named(run_dir, METRICS, resumed_at)
    }

    /// [`MetricsLog::open`] for another file of JSON lines with `step`.
    pub fn open_named(run_dir: &Path, name: &str, resumed_at: Option<u64>) -> Result<MetricsLog, TrainError> {
        let path = run_dir.join(name);
        let kept = match (resumed_at, path.is_file()) {
            (Some(k), true) => {
                let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
                let mut kept = String::new();
                for line in text.lines() {
                    let step = serde_json::from_str::<Value>(line).ok().and_then(|v| v.get("step").and_then(Value::as_u64));
                    match step {
                        Some(s) if s <= k => {
                            kept.push_str(line);
                            kept.push('\n');
                        }
                        // A later step, or a line cut short by a crash: the rest goes.
                        _ => break,
                    }
                }
                kept
            }
            _ => String::new(),
        };
        crate::output::write_output(&path, kept.as_bytes()).map_err(TrainError::invalid)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(|e| TrainError::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    pub fn append(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        self.append_json(&m.to_json())
    }

    /// One line of any JSON object (it must have `step`, or a resume drops it).
    pub fn append_json(&mut self, v: &Value) -> Result<(), TrainError> {
        let line = format!("{v}\n");
        self.file.write_all(line.as_bytes()).and_then(|()| self.file.flush()).map_err(|e| TrainError::io(&self.path, e))
    }
}

/// (step, loss, lr) of every line of a metrics file.
pub fn read_curve(path: &Path) -> Result<Vec<(u64, f64, f64)>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value =
            serde_json::from_str(line).map_err(|e| TrainError::invalid(format!("{}:{}: not valid JSON: {e}", path.display(), i + 1)))?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        if let (Some(s), Some(loss), Some(lr)) = (v.get("step").and_then(Value::as_u64), f("loss"), f("lr")) {
            out.push((s, loss, lr));
        }
    }
    Ok(out)
}

/// Writes `run_dir/loss.svg` (atomically): the loss over the steps, and the learning rate
/// below it.
pub fn plot(run_dir: &Path, curve: &[(u64, f64, f64)]) -> Result<(), TrainError> {
    let loss: Vec<(u64, f64)> = curve.iter().map(|c| (c.0, c.1)).collect();
    let lr: Vec<(u64, f64)> = curve.iter().map(|c| (c.0, c.2)).collect();
    plot_panels(&run_dir.join(PLOT), &[("loss", loss), ("learning rate", lr)])
}

/// One series per panel, stacked, each over its steps: an SVG written atomically.
pub fn plot_panels(path: &Path, panels: &[(&str, Vec<(u64, f64)>)]) -> Result<(), TrainError> {
    let svg = render_svg(panels).map_err(|e| TrainError::invalid(format!("cannot draw {}: {e}", path.display())))?;
    crate::output::write_output(path, svg.as_bytes()).map_err(TrainError::invalid)
}

/// (step, value) of key `key` (a number, or `key.sub` inside an object) on every line of a
/// metrics file that has it.
pub fn read_series(path: &Path, key: &str) -> Result<Vec<(u64, f64)>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value =
            serde_json::from_str(line).map_err(|e| TrainError::invalid(format!("{}:{}: not valid JSON: {e}", path.display(), i + 1)))?;
        let x = key.split('.').try_fold(&v, |v, k| v.get(k)).and_then(Value::as_f64);
        if let (Some(s), Some(x)) = (v.get("step").and_then(Value::as_u64), x) {
            out.push((s, x));
        }
    }
    Ok(out)
}

fn render_svg(panels: &[(&str, Vec<(u64, f64)>)]) -> Result<String, Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    const COLORS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];
    let mut svg = String::new();
    {
        let height = 40 + 300 * panels.len() as u32;
        let root = SVGBackend::with_string(&mut svg, (900, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        let steps = panels.iter().flat_map(|p| p.1.iter().map(|c| c.0));
        let last = steps.clone().max().unwrap_or(1).max(2);
        let first = steps.min().unwrap_or(1).min(last - 1);
        for (i, ((name, series), area)) in panels.iter().zip(&areas).enumerate() {
            let (lo, hi) =
                series.iter().map(|c| c.1).filter(|y| y.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
            let (lo, hi) = if lo > hi {
                (0.0, 1.0)
            } else {
                let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
                (lo - pad, hi + pad)
            };
            let mut chart = ChartBuilder::on(area)
                .caption(*name, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(70)
                .build_cartesian_2d(first..last, lo..hi)?;
            chart.configure_mesh().x_desc("step").y_desc(*name).draw()?;
            let color = COLORS[i % COLORS.len()];
            chart.draw_series(LineSeries::new(series.iter().filter(|c| c.1.is_finite()).copied(), &color))?;
            if series.len() < 30 {
                chart.draw_series(series.iter().filter(|c| c.1.is_finite()).map(|&c| Circle::new(c, 3, color.filled())))?;
            }
        }
        root.present()?;
    }
    Ok(svg)
}

/// How steps are shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A bar on a terminal, plain lines otherwise.
    Auto,
    Plain,
    Quiet,
}

/// The progress display of one run.
pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    total: u64,
}

impl Progress {
    pub fn new(display: Display, done: u64, total: u64) -> Progress {
        let tty = display == Display::Auto && std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let b = ProgressBar::new(total);
            let style =
                ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]").expect("a valid template");
            b.set_style(style);
            b.set_position(done);
            b
        });
        Progress { plain: !tty && display != Display::Quiet, bar, total }
    }

    pub fn step(&self, m: &StepMetrics) {
        let msg = format!("loss {:.4}  grad_norm {:.3}  lr {:.3e}  {:.0} tok/s", m.loss, m.grad_norm, m.lr, m.tokens_per_s);
        self.show(m.step, msg);
    }

    /// Step `step` done, with `msg` beside the bar (or on its plain line).
    pub fn show(&self, step: u64, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
            b.set_position(step);
        } else if self.plain {
            eprintln!("step {step}/{}  {msg}", self.total);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss,
            objective: loss + 0.5,
            grad_norm: 2.0,
            lr: 1e-3 / step as f64,
            tokens: 10,
            tokens_per_s: 100.0,
            terms: vec![("aux_loss".into(), 0.5)],
            load_balance: BTreeMap::from([(3, 1.5)]),
        }
    }

    #[test]
    fn lines_append_and_resume_cuts_later_steps() {
        let dir = super::super::checkpoint::tests::scratch("metrics");
        let mut log = MetricsLog::open(&dir, None).unwrap();
        for s in 1..=4 {
            log.append(&m(s, 5.0 - s as f64)).unwrap();
        }
        let path = dir.join(METRICS);
        let text = std::fs::read_to_string(&path).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["step"], 1);
        assert_eq!((first["loss"].as_f64(), first["objective"].as_f64(), first["aux_loss"].as_f64()), (Some(4.0), Some(4.5), Some(0.5)));
        assert_eq!(first["load_balance"]["3"], 1.5);
        // A crash mid-line, then a resume from step 2.
        std::fs::write(&path, format!("{text}{{\"step\": 5, \"lo")).unwrap();
        let mut log = MetricsLog::open(&dir, Some(2)).unwrap();
        assert_eq!(read_curve(&path).unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2]);
        log.append(&m(3, 1.0)).unwrap();
        let curve = read_curve(&path).unwrap();
        assert_eq!(curve.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(), [(1, 4.0), (2, 3.0), (3, 1.0)]);

        plot(&dir, &curve).unwrap();
        let svg = std::fs::read_to_string(dir.join(PLOT)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("learning rate") && svg.contains("<polyline"), "{}", &svg[..200.min(svg.len())]);
        // One step only, or a NaN loss, still draws.
        plot(&dir, &[(1, f64::NAN, 1e-3)]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn balance_ratio_is_max_over_mean() {
        assert_eq!(balance_ratio(&[1.0, 1.0, 1.0, 1.0]), Some(1.0));
        assert_eq!(balance_ratio(&[4.0, 0.0, 0.0, 0.0]), Some(4.0));
        assert_eq!(balance_ratio(&[0.0, 0.0]), None);
        assert_eq!(num(f64::NAN), Value::Null);
    }
}
