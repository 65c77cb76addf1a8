//! One policy-gradient step on judged rollouts (design §6): the PPO clipped surrogate over
//! every target token, plus `beta` times the KL to a frozen reference model.
//!
//! Per target token `t` of a rollout with advantage `A` (its group-normalised reward, carried
//! by every sub-trajectory of the rollout):
//!
//! ```text
//! ratio_t = exp(logp_t - behaviour_t)
//! pg_t    = -min(ratio_t * A, clamp(ratio_t, 1 - eps, 1 + eps) * A)
//! kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (the "k3" estimator, >= 0)
//! loss    = mean over all the step's target tokens of (pg_t + beta * kl_t)
//! ```
//!
//! `behaviour_t` is the logprob recorded when the token was sampled; `logp` and `ref` are
//! computed here from logits divided by the sampling temperature, so that all three are
//! logprobs of the same distribution (the policy samples with temperature only: no top-k or
//! top-p, which would make the recorded logprobs those of a truncated distribution). The mean
//! is over tokens, not rollouts (a long rollout weighs by its length, as in DAPO), and over the
//! whole step whatever micro-batch a token falls in, so accumulation equals one big batch.

use candle_core::{DType, Device, Tensor, D};
use thiserror::Error;

use super::lanes;
use super::loss::log_softmax;
use super::optim::{clip_grad_norm, global_grad_norm, AdamW, GradAccumulator};
use super::precision::MixedPrecision;
use super::sft::{MicroBatch, SftError};
use super::split::SubTrajectory;
use crate::policy::model::Llama;

#[derive(Debug, Error)]
pub enum RlError {
    #[error(
        "sub-trajectory {trajectory}#{window} has no behaviour logprobs (imported data cannot be \
         trained on with a policy gradient)"
    )]
    NoLogprobs { trajectory: String, window: usize },
    #[error("sub-trajectory {trajectory}#{window} has no advantage")]
    NoAdvantage { trajectory: String, window: usize },
    #[error("the sampling temperature must be > 0 for a policy gradient, got {0}")]
    Temperature(f64),
    #[error(transparent)]
    Batch(#[from] SftError),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

/// Bound on `|logp - behaviour|` and `|ref - logp|` before `exp` (e^20 ~ 5e8).
const MAX_LOG_RATIO: f64 = 20.0;

/// The step's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RlHyper {
    /// PPO clip range: ratios outside `[1 - eps, 1 + eps]` stop pulling.
    pub clip_eps: f64,
    /// Weight of the KL to the reference; 0 skips the reference forward pass.
    pub kl_beta: f64,
    /// The temperature the rollouts were sampled at.
    pub temperature: f64,
}

/// What one policy-gradient step did (means over the step's target tokens).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RlStepStats {
    /// The loss minimised: `pg + beta * kl`.
    pub loss: f64,
    /// The clipped surrogate term.
    pub pg_loss: f64,
    /// KL(policy || reference), k3 estimate; 0 when `beta` is 0 (not computed).
    pub kl: f64,
    /// Share of tokens whose ratio was outside the clip range.
    pub clip_fraction: f64,
    /// Mean importance ratio (1 when the data is on-policy and the forward passes agree).
    pub ratio: f64,
    /// Mean entropy of the policy's next-token distribution at the targets.
    pub entropy: f64,
    pub targets: usize,
    /// Tokens fed through the model, padding excluded.
    pub tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

/// Sums over one micro-batch's target tokens (the caller divides by the step's targets).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TermSums {
    pub pg: f64,
    pub kl: f64,
    pub clipped: usize,
    pub ratio: f64,
    pub targets: usize,
}

/// The per-token loss of the module docs, summed over `mask` (`[B, T]`, 1 = target), as a
/// tensor (for the gradient) and as numbers (for metrics). `logp` carries the gradient;
/// `behaviour`, `advantage` and `reference` are constants. With no reference the KL term is 0.
pub fn ppo_terms(
    logp: &Tensor,
    behaviour: &Tensor,
    advantage: &Tensor,
    reference: Option<&Tensor>,
    mask: &Tensor,
    clip_eps: f64,
    kl_beta: f64,
) -> candle_core::Result<(Tensor, TermSums)> {
    // Masked first: at a non-target position (an observation, padding) the logprobs are not
    // comparable and their difference could overflow `exp` into inf, and inf x 0 is NaN. The
    // clamp keeps a far-off-policy token finite (it is clipped out of the gradient anyway).
    let mask = &mask.to_dtype(logp.dtype())?;
    let log_ratio = ((logp - behaviour)? * mask)?.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)?;
    let ratio = log_ratio.exp()?;
    let unclipped = (&ratio * advantage)?;
    let clipped = (ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)? * advantage)?;
    let pg = unclipped.minimum(&clipped)?.neg()?;
    let mut per_token = pg.clone();
    let kl = match reference {
        Some(r) => {
            let d = ((r - logp)? * mask)?.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)?;
            let kl = ((d.exp()? - &d)? - 1.0)?;
            if kl_beta != 0.0 {
                per_token = (per_token + (&kl * kl_beta)?)?;
            }
            Some(kl)
        }
        None => None,
    };
    let loss_sum = (per_token * mask)?.sum_all()?;
    let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let (m, r, p) = (host(mask)?, host(&ratio)?, host(&pg)?);
    let k = kl.as_ref().map(host).transpose()?;
    let mut sums = TermSums::default();
    for i in 0..m.len() {
        if m[i] == 0.0 {
            continue;
        }
        sums.targets += 1;
        sums.pg += f64::from(p[i]);
        sums.ratio += f64::from(r[i]);
        if (f64::from(r[i]) - 1.0).abs() > clip_eps {
            sums.clipped += 1;
        }
        if let Some(k) = &k {
            sums.kl += f64::from(k[i]);
        }
    }
    Ok((loss_sum, sums))
}

/// A micro-batch with what the policy gradient needs beside the tokens: the behaviour
/// logprobs and the advantages, aligned with the targets (`[B, T-1]`).
struct RlBatch {
    base: MicroBatch,
    behaviour: Tensor,
    advantage: Tensor,
}

impl RlBatch {
    fn new(rows: &[&SubTrajectory], device: &Device) -> Result<Self, RlError> {
        let base = MicroBatch::new(rows, device)?;
        let (b, width) = base.input.dims2()?;
        let (mut behaviour, mut advantage) = (vec![0f32; b * width], vec![0f32; b * width]);
        for (r, s) in rows.iter().enumerate() {
            let lp = s
                .behaviour_logprobs
                .as_ref()
                .ok_or_else(|| RlError::NoLogprobs {
                    trajectory: s.trajectory.clone(),
                    window: s.window,
                })?;
            let a = s.advantage.ok_or_else(|| RlError::NoAdvantage {
                trajectory: s.trajectory.clone(),
                window: s.window,
            })?;
            if lp.len() != s.tokens.len() {
                return Err(SftError::Malformed {
                    trajectory: s.trajectory.clone(),
                    window: s.window,
                    mask: lp.len(),
                    len: s.tokens.len(),
                }
                .into());
            }
            for i in 0..s.len().saturating_sub(1) {
                behaviour[r * width + i] = lp[i + 1];
                advantage[r * width + i] = a;
            }
        }
        Ok(RlBatch {
            base,
            behaviour: Tensor::from_vec(behaviour, (b, width), device)?,
            advantage: Tensor::from_vec(advantage, (b, width), device)?,
        })
    }
}

/// Logprobs of `target` under `model` at `temperature`, and the full log-distribution.
fn logprobs(
    model: &Llama,
    batch: &MicroBatch,
    temperature: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let logits = model
        .forward(&batch.input, Some(&batch.attention), None)?
        .to_dtype(DType::F32)?;
    let logits = if temperature == 1.0 {
        logits
    } else {
        (logits / temperature)?
    };
    let all = log_softmax(&logits)?;
    let idx = batch.target.contiguous()?.unsqueeze(D::Minus1)?;
    let lp = all.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?;
    Ok((lp, all))
}

/// One optimizer step on `micro` (groups of sub-trajectories, each with behaviour logprobs
/// and an advantage): the loss of the module docs, gradients accumulated over micro-batches
/// (each micro-batch's rows in two lanes on CPU, `lanes`), clipped to `max_grad_norm` where
/// it is positive, AdamW at `lr`. With `precision`, the model computes over its compute
/// copies, the gradients are those of the f32 masters `opt` holds, and the copies are re-synced
/// after the update (as in [`super::sft::sft_step`]). Call it on the compute pool
/// ([`crate::policy::on_compute_pool`]), as the learner does.
#[allow(clippy::too_many_arguments)]
pub fn rl_step(
    model: &Llama,
    reference: Option<&Llama>,
    opt: &mut AdamW,
    precision: Option<&MixedPrecision>,
    micro: &[Vec<&SubTrajectory>],
    hp: &RlHyper,
    lr: f64,
    max_grad_norm: f64,
) -> Result<RlStepStats, RlError> {
    if !(hp.temperature > 0.0 && hp.temperature.is_finite()) {
        return Err(RlError::Temperature(hp.temperature));
    }
    let device = model.device().clone();
    // Every lane's batch first: a malformed row fails the step before any compute.
    let batches: Vec<Vec<RlBatch>> = micro
        .iter()
        .map(|rows| {
            lanes::lanes(rows, |s| s.len(), &device)
                .into_iter()
                .map(|lane| RlBatch::new(lane, &device))
                .collect::<Result<_, _>>()
        })
        .collect::<Result<_, _>>()?;
    let total: usize = batches.iter().flatten().map(|b| b.base.targets).sum();
    if total == 0 {
        return Err(SftError::NoTargets.into());
    }
    let tokens: usize = micro
        .iter()
        .flat_map(|rows| rows.iter().map(|s| s.len().saturating_sub(1)))
        .sum();
    let reference = if hp.kl_beta != 0.0 { reference } else { None };
    let mut acc = GradAccumulator::new(opt.names().count());
    let mut sums = TermSums::default();
    let mut entropy = 0.0;
    let opt_ref = &*opt;
    for lanes in &batches {
        let results = lanes::run(model, lanes, |model, b| -> Result<_, RlError> {
            if b.base.targets == 0 {
                return Ok(None);
            }
            let (lp, all) = logprobs(model, &b.base, hp.temperature)?;
            let ref_lp = match reference {
                Some(r) => Some(logprobs(r, &b.base, hp.temperature)?.0.detach()),
                None => None,
            };
            let (loss_sum, s) = ppo_terms(
                &lp,
                &b.behaviour,
                &b.advantage,
                ref_lp.as_ref(),
                &b.base.loss_mask,
                hp.clip_eps,
                hp.kl_beta,
            )?;
            // Entropy at the targets, from the same distribution, outside the graph.
            let all = all.detach();
            let h = (all.exp()? * &all)?.sum(D::Minus1)?.neg()?;
            let entropy = f64::from((h * &b.base.loss_mask)?.sum_all()?.to_scalar::<f32>()?);
            let loss = (loss_sum / total as f64)?;
            let store = model.backward(&loss)?;
            let grads = match precision {
                Some(mp) => mp.master_grads(&store, opt_ref)?,
                None => opt_ref.grads_from(&store),
            };
            Ok(Some((grads, s, entropy)))
        });
        for result in results {
            let Some((grads, s, h)) = result? else {
                continue;
            };
            entropy += h;
            sums.pg += s.pg;
            sums.kl += s.kl;
            sums.clipped += s.clipped;
            sums.ratio += s.ratio;
            sums.targets += s.targets;
            acc.add(&grads, 1.0)?;
        }
    }
    let mut grads = acc.finish();
    let grad_norm = if max_grad_norm > 0.0 {
        clip_grad_norm(&mut grads, max_grad_norm)?
    } else {
        global_grad_norm(&grads)?
    };
    opt.set_lr(lr);
    opt.step(&grads)?;
    if let Some(mp) = precision {
        mp.sync()?;
    }
    let n = total as f64;
    let kl_used = if reference.is_some() {
        sums.kl / n
    } else {
        0.0
    };
    Ok(RlStepStats {
        loss: sums.pg / n + hp.kl_beta * kl_used,
        pg_loss: sums.pg / n,
        kl: kl_used,
        clip_fraction: sums.clipped as f64 / n,
        ratio: sums.ratio / n,
        entropy: entropy / n,
        targets: total,
        tokens,
        grad_norm,
        lr,
    })
}

/// Group-normalised advantages (design §6): `(r - mean) / (std + 1e-6)` over one task's
/// rollouts, population std. A group whose rewards are all equal carries no signal: `None`
/// (its rollouts give no gradient, and the metrics count such groups).
pub fn group_advantages(rewards: &[f64]) -> Option<Vec<f64>> {
    if rewards.len() < 2 {
        return None;
    }
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt();
    if std < 1e-9 {
        return None;
    }
    Some(rewards.iter().map(|r| (r - mean) / (std + 1e-6)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_vec(v.to_vec(), (1, v.len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn advantages_are_group_normalised_and_equal_groups_give_none() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0]).unwrap();
        // mean 0.5, population std 0.5.
        for (x, want) in a.iter().zip([1.0, -1.0, -1.0, 1.0]) {
            assert!((x - want).abs() < 1e-5, "{a:?}");
        }
        let b = group_advantages(&[0.2, 0.5, 0.8]).unwrap();
        // mean 0.5, std sqrt(0.06) = 0.24495.
        assert!((b[0] + 0.3 / 0.244_949).abs() < 1e-4, "{b:?}");
        assert!(b[1].abs() < 1e-12);
        assert_eq!(group_advantages(&[0.3, 0.3, 0.3]), None);
        assert_eq!(group_advantages(&[1.0]), None);
    }

    #[test]
    fn terms_match_hand_computed_ratios_clipping_and_kl() {
        // Four tokens, eps 0.2. Token 3 is masked out.
        let behaviour = t(&[0.0, 0.0, 0.0, 0.0]);
        let ln = |x: f32| x.ln();
        // ratios 1.5, 0.5, 1.1, 9.0
        let logp = t(&[ln(1.5), ln(0.5), ln(1.1), ln(9.0)]);
        let adv = t(&[1.0, 1.0, -2.0, 5.0]);
        let reference = t(&[ln(1.5) + 0.1, ln(0.5), ln(1.1) - 0.2, 0.0]);
        let mask = t(&[1.0, 1.0, 1.0, 0.0]);
        let (loss, s) =
            ppo_terms(&logp, &behaviour, &adv, Some(&reference), &mask, 0.2, 0.5).unwrap();
        // pg: token 0: min(1.5, 1.2) = 1.2 -> -1.2; token 1: min(0.5, 0.8) = 0.5 -> -0.5;
        // token 2: A = -2: min(-2.2, -2.2) -> 2.2. Sum -1.2 - 0.5 + 2.2 = 0.5.
        assert!((s.pg - 0.5).abs() < 1e-5, "{s:?}");
        // kl: d = 0.1 -> e^0.1 - 0.1 - 1 = 0.0051709; d = 0 -> 0; d = -0.2 -> 0.0187308.
        let kl = (0.1f64.exp() - 1.1) + ((-0.2f64).exp() + 0.2 - 1.0);
        assert!((s.kl - kl).abs() < 1e-5, "{s:?}");
        assert_eq!(s.targets, 3);
        // |ratio - 1| > 0.2: tokens 0 and 1.
        assert_eq!(s.clipped, 2);
        assert!((s.ratio - 3.1).abs() < 1e-5);
        let l = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((l - (0.5 + 0.5 * kl)).abs() < 1e-5, "{l}");
    }

    #[test]
    fn gradient_flows_only_through_unclipped_tokens() {
        // d loss / d logp = -A * ratio where the unclipped branch is the minimum, else 0.
        let behaviour = t(&[0.0, 0.0, 0.0]);
        let ln = |x: f32| x.ln();
        let var = candle_core::Var::from_tensor(&t(&[ln(1.5), ln(0.9), ln(0.5)])).unwrap();
        let adv = t(&[1.0, 1.0, -1.0]);
        let mask = t(&[1.0, 1.0, 1.0]);
        let (loss, _) =
            ppo_terms(var.as_tensor(), &behaviour, &adv, None, &mask, 0.2, 0.0).unwrap();
        let g = grads_of(&loss, &var);
        // Token 0: ratio 1.5 > 1.2 with A > 0: clipped, no gradient. Token 1: inside, -0.9.
        // Token 2: ratio 0.5 < 0.8 with A < 0: clipped, no gradient.
        assert!(g[0].abs() < 1e-6, "{g:?}");
        assert!((g[1] + 0.9).abs() < 1e-5, "{g:?}");
        assert!(g[2].abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn masked_positions_cannot_poison_the_loss() {
        // A non-target position whose logprobs differ by 200 nats: exp would overflow f32.
        let logp = t(&[-0.5, -200.0]);
        let behaviour = t(&[-0.5, 0.0]);
        let reference = t(&[-0.5, 0.0]);
        let (loss, s) = ppo_terms(
            &logp,
            &behaviour,
            &t(&[1.0, 1.0]),
            Some(&reference),
            &t(&[1.0, 0.0]),
            0.2,
            0.1,
        )
        .unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        assert!(l.is_finite() && (l + 1.0).abs() < 1e-6, "{l}");
        assert_eq!(s.targets, 1);
        assert!(s.kl.abs() < 1e-12 && s.pg.is_finite());
    }

    #[test]
    fn kl_gradient_pulls_towards_the_reference() {
        // d kl / d logp = 1 - exp(ref - logp): positive when the policy is above the reference.
        let var = candle_core::Var::from_tensor(&t(&[-1.0])).unwrap();
        let reference = t(&[-2.0]);
        let zero = t(&[0.0]);
        let (loss, _) = ppo_terms(
            var.as_tensor(),
            &var.as_tensor().detach(),
            &zero,
            Some(&reference),
            &t(&[1.0]),
            0.2,
            1.0,
        )
        .unwrap();
        let g = f64::from(grads_of(&loss, &var)[0]);
        assert!((g - (1.0 - (-1.0f64).exp())).abs() < 1e-5, "{g}");
    }

    fn grads_of(loss: &Tensor, var: &candle_core::Var) -> Vec<f32> {
        let grads = loss.backward().unwrap();
        grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

#[cfg(test)]
mod precision_tests {
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::learner::optim::AdamWParams;
    use crate::learner::split::Span;
    use crate::policy::model::LlamaConfig;

    fn config() -> LlamaConfig {
        let mut cfg = LlamaConfig::tiny(64);
        cfg.hidden_size = 32;
        cfg.intermediate_size = 64;
        cfg.max_position_embeddings = 64;
        cfg
    }

    /// Every variable of `vm`, by name, as f32 values.
    fn values(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
        let mut out: Vec<(String, Vec<f32>)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| {
                let t = v.as_tensor().to_dtype(DType::F32).unwrap();
                (n.clone(), t.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A rollout of 24 tokens whose last 16 are targets, with behaviour logprobs and an
    /// advantage.
    fn rollout(advantage: f32) -> SubTrajectory {
        let tokens: Vec<u32> = (0..24).map(|i| (i * 7 % 60) as u32 + 2).collect();
        let loss_mask: Vec<bool> = (0..24).map(|i| i >= 8).collect();
        let behaviour: Vec<f32> = (0..24).map(|i| if i >= 8 { -4.1 } else { 0.0 }).collect();
        SubTrajectory {
            trajectory: "t".into(),
            window: 0,
            spans: vec![Span {
                turn: 0,
                offset: 0,
                len: tokens.len(),
                loss: true,
                policy_version: Some(0),
            }],
            tokens,
            loss_mask,
            behaviour_logprobs: Some(behaviour),
            prefix_len: 0,
            context_len: 0,
            reward: Some(1.0),
            advantage: Some(advantage),
        }
    }

    /// One RL step from the same weights, f32 throughout and in bf16 over f32 masters: the
    /// masters move the same way, stay f32, and the compute copies follow them.
    #[test]
    fn a_bf16_step_moves_the_f32_masters_as_an_f32_step_does() {
        let cfg = config();
        let (vm32, vm16) = (VarMap::new(), VarMap::new());
        let m32 = Llama::new(
            &cfg,
            VarBuilder::from_varmap(&vm32, DType::F32, &Device::Cpu),
        )
        .unwrap();
        Llama::new(
            &cfg,
            VarBuilder::from_varmap(&vm16, DType::F32, &Device::Cpu),
        )
        .unwrap();
        for (name, v) in vm32.data().lock().unwrap().iter() {
            let data = vm16.data().lock().unwrap();
            data[name].set(v.as_tensor()).unwrap();
        }
        let start = values(&vm32);
        let mp = MixedPrecision::new(&vm16, DType::BF16).unwrap();
        let m16 = Llama::new(
            &cfg,
            VarBuilder::from_varmap(mp.compute(), DType::BF16, &Device::Cpu),
        )
        .unwrap();
        let hp = RlHyper {
            clip_eps: 0.2,
            kl_beta: 0.0,
            temperature: 1.0,
        };
        let (a, b) = (rollout(1.0), rollout(-0.5));
        let micro = vec![vec![&a, &b]];
        // Adam's first step moves each weight by ~lr * sign(g), so weights whose gradient is
        // near zero flip with any rounding, and how many do depends on the host's f32 kernels
        // (a host with other kernels measured a cosine of 0.91). An eps far above every
        // gradient element makes the first update lr * g / (|g| + eps), proportional to the
        // gradient: the cosine then compares the two steps' directions, which is the claim.
        // No weight decay, which would move both runs alike and inflate the cosine.
        let adam = AdamWParams {
            eps: 1.0,
            weight_decay: 0.0,
            ..AdamWParams::default()
        };
        let mut opt32 = AdamW::from_varmap(&vm32, adam).unwrap();
        let mut opt16 = AdamW::from_varmap(&vm16, adam).unwrap();
        let s32 = rl_step(&m32, None, &mut opt32, None, &micro, &hp, 1e-3, 1.0).unwrap();
        let s16 = rl_step(&m16, None, &mut opt16, Some(&mp), &micro, &hp, 1e-3, 1.0).unwrap();
        assert!(
            (s32.loss - s16.loss).abs() < 0.02 * s32.loss.abs().max(1e-3),
            "loss f32 {} vs bf16 {}",
            s32.loss,
            s16.loss
        );
        let (after32, after16) = (values(&vm32), values(&vm16));
        let (mut dot, mut n32, mut n16) = (0f64, 0f64, 0f64);
        for ((s, a), b) in start.iter().zip(&after32).zip(&after16) {
            for ((x0, x32), x16) in s.1.iter().zip(&a.1).zip(&b.1) {
                let (d32, d16) = (f64::from(x32 - x0), f64::from(x16 - x0));
                dot += d32 * d16;
                n32 += d32 * d32;
                n16 += d16 * d16;
            }
        }
        let cos = dot / (n32.sqrt() * n16.sqrt());
        let ratio = (n16 / n32).sqrt();
        // Measured here: cosine 0.99997, length ratio 0.9993.
        assert!(n16 > 0.0 && cos > 0.99, "updates' cosine {cos}");
        assert!(
            (0.95..1.05).contains(&ratio),
            "updates' length ratio {ratio}"
        );
        for v in opt16.vars() {
            assert_eq!(v.dtype(), DType::F32, "masters stay f32");
        }
        // Synced: every compute copy is its master cast to bf16.
        for ((name, master), (_, copy)) in after16.iter().zip(values(mp.compute())) {
            let cast: Vec<f32> = Tensor::new(master.as_slice(), &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::BF16))
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1())
                .unwrap();
            assert_eq!(cast, copy, "{name} not re-synced");
        }
    }
}
