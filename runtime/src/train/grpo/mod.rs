//! GRPO (Group Relative Policy Optimization, DeepSeekMath): the loss and its gradient with
//! respect to the policy's per-token log-probabilities (`loss`), the rule-based rewards that
//! score decoded completions (`reward`), the recipe (`recipe`), prompts, logged rollouts and
//! the policy's batch layout (`data`), and the loop that generates and trains with one
//! compiled model (`train`) and what runs its policy passes and update (`runner`).

pub mod data;
pub mod loss;
pub mod recipe;
pub mod reward;
mod runner;
pub mod train;

pub use loss::{
    advantages, grpo_loss, GrpoBatch, GrpoConfig, GrpoError, GrpoMetrics, GrpoOutput, ImportanceSamplingLevel, LossType, ScaleRewards,
};
pub use reward::{Reward, RewardError, RewardInput, RewardSpec};

/// "did you mean `x`?" for a name close to one of `known`, else the list of them: the hint
/// every unknown option name or field of this module gets.
pub(crate) fn suggest(got: &str, known: &[&str]) -> String {
    let best = known.iter().map(|k| (strsim::jaro_winkler(got, k), *k)).filter(|(s, _)| *s > 0.8).max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, k)) => format!("did you mean `{k}`?"),
        None => format!("expected one of {}", known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")),
    }
}
