//! Supervised fine-tuning on sub-trajectories: packing into batches by token budget, and one
//! optimizer step over micro-batches (masked cross-entropy, gradient accumulation, clipping,
//! AdamW).
//!
//! The loss of a step is the mean over *all* its target tokens, whatever micro-batch (or lane,
//! `lanes`) they fall in: each lane's mean loss is weighted by its share of the step's
//! targets, so the gradient equals that of one big batch (tested).

use candle_core::{DType, Device, Tensor};
use thiserror::Error;

use super::lanes;
use super::loss::masked_cross_entropy;
use super::optim::{clip_grad_norm, AdamW, GradAccumulator, Grads};
use super::precision::MixedPrecision;
use super::split::SubTrajectory;
use crate::policy::model::Llama;

#[derive(Debug, Error)]
pub enum SftError {
    #[error(
        "sub-trajectory {trajectory}#{window} has {len} tokens, more than the batch budget of \
         {budget} tokens"
    )]
    TooLong {
        trajectory: String,
        window: usize,
        len: usize,
        budget: usize,
    },
    #[error("sub-trajectory {trajectory}#{window}: loss mask of {mask} for {len} tokens")]
    Malformed {
        trajectory: String,
        window: usize,
        mask: usize,
        len: usize,
    },
    #[error("a step needs at least one target token")]
    NoTargets,
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

/// Groups sub-trajectories into micro-batches of at most `budget` tokens each, counting
/// padding (rows x the longest row). Rows of similar length go together (sorted by length,
/// ties by position), so little is padding; the batches' order is then shuffled with `seed`,
/// so training does not see short windows first. Deterministic for a seed.
pub fn pack_batches(
    subs: &[SubTrajectory],
    budget: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, SftError> {
    let mut order: Vec<usize> = (0..subs.len()).collect();
    for (i, s) in subs.iter().enumerate() {
        if s.loss_mask.len() != s.tokens.len() {
            return Err(SftError::Malformed {
                trajectory: s.trajectory.clone(),
                window: s.window,
                mask: s.loss_mask.len(),
                len: s.tokens.len(),
            });
        }
        if s.len() > budget {
            return Err(SftError::TooLong {
                trajectory: subs[i].trajectory.clone(),
                window: subs[i].window,
                len: s.len(),
                budget,
            });
        }
    }
    order.sort_by_key(|&i| (subs[i].len(), i));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending: the newcomer is the longest row of the batch.
        let longest = subs[i].len();
        if !current.is_empty() && (current.len() + 1) * longest > budget {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    shuffle(&mut batches, seed);
    Ok(batches)
}

/// Fisher-Yates with splitmix64: the same seed gives the same order everywhere.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// A micro-batch as tensors: inputs `[B, T-1]`, targets `[B, T-1]`, the loss mask over
/// targets and the attention mask, right-padded.
pub struct MicroBatch {
    pub input: Tensor,
    pub target: Tensor,
    pub loss_mask: Tensor,
    pub attention: Tensor,
    pub targets: usize,
}

impl MicroBatch {
    pub fn new(rows: &[&SubTrajectory], device: &Device) -> Result<Self, SftError> {
        let width = rows.iter().map(|s| s.len()).max().unwrap_or(1).max(2) - 1;
        let b = rows.len();
        let (mut input, mut target) = (vec![0u32; b * width], vec![0u32; b * width]);
        let (mut loss, mut attention) = (vec![0f32; b * width], vec![0f32; b * width]);
        let mut targets = 0;
        for (r, s) in rows.iter().enumerate() {
            let n = s.len().saturating_sub(1);
            for i in 0..n {
                let at = r * width + i;
                input[at] = s.tokens[i];
                target[at] = s.tokens[i + 1];
                attention[at] = 1.0;
                if s.loss_mask[i + 1] {
                    loss[at] = 1.0;
                    targets += 1;
                }
            }
        }
        Ok(MicroBatch {
            input: Tensor::from_vec(input, (b, width), device)?,
            target: Tensor::from_vec(target, (b, width), device)?,
            loss_mask: Tensor::from_vec(loss, (b, width), device)?,
            attention: Tensor::from_vec(attention, (b, width), device)?,
            targets,
        })
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepStats {
    /// Mean cross-entropy over the step's target tokens.
    pub loss: f64,
    /// Target tokens (those carrying loss).
    pub targets: usize,
    /// All tokens fed through the model, padding excluded.
    pub tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

/// A step's summed gradients, before clipping and the update.
pub struct SftGradients {
    /// One per optimizer parameter (`AdamW::names()` order): the gradient of the mean
    /// cross-entropy over all the step's target tokens.
    pub grads: Grads,
    /// That mean cross-entropy.
    pub loss: f64,
    /// Target tokens (those carrying loss).
    pub targets: usize,
    /// All tokens fed through the model, padding excluded.
    pub tokens: usize,
}

/// The gradients of one step over `micro` (sub-trajectory groups from [`pack_batches`]):
/// forward, masked cross-entropy and backward per micro-batch, each micro-batch's rows in two
/// lanes on CPU (`lanes`), gradients accumulated with each lane's share of the step's targets.
/// Logits are cast to f32 before the loss. With `precision`, the model computes over its
/// compute copies and the gradients are those of the f32 masters `opt` holds.
///
/// Call it on the compute pool ([`crate::policy::on_compute_pool`]), as the learner does.
pub fn sft_gradients(
    model: &Llama,
    opt: &AdamW,
    precision: Option<&MixedPrecision>,
    micro: &[Vec<&SubTrajectory>],
) -> Result<SftGradients, SftError> {
    let device = model.device().clone();
    // Every lane's batch first: a malformed row fails the step before any compute.
    let batches: Vec<Vec<MicroBatch>> = micro
        .iter()
        .map(|rows| {
            lanes::lanes(rows, |s| s.len(), &device)
                .into_iter()
                .map(|lane| MicroBatch::new(lane, &device))
                .collect::<Result<_, _>>()
        })
        .collect::<Result<_, _>>()?;
    let total: usize = batches.iter().flatten().map(|b| b.targets).sum();
    if total == 0 {
        return Err(SftError::NoTargets);
    }
    let tokens: usize = micro
        .iter()
        .flat_map(|rows| rows.iter().map(|s| s.len().saturating_sub(1)))
        .sum();
    let mut acc = GradAccumulator::new(opt.names().count());
    let mut loss_sum = 0.0;
    for lanes in &batches {
        let results = lanes::run(model, lanes, |model, b| -> Result<_, SftError> {
            if b.targets == 0 {
                return Ok(None);
            }
            let logits = model
                .forward(&b.input, Some(&b.attention), None)?
                .to_dtype(DType::F32)?;
            let (loss, count) = masked_cross_entropy(&logits, &b.target, &b.loss_mask)?;
            let loss_value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            // Weighted by the lane's share of the step's targets before the backward, so the
            // gradients come out weighted and are summed as they are.
            let share = count as f64 / total as f64;
            let store = model.backward(&(loss * share)?)?;
            let grads = match precision {
                Some(mp) => mp.master_grads(&store, opt)?,
                None => opt.grads_from(&store),
            };
            Ok(Some((grads, loss_value * share)))
        });
        for result in results {
            let Some((grads, loss)) = result? else {
                continue;
            };
            loss_sum += loss;
            acc.add(&grads, 1.0)?;
        }
    }
    Ok(SftGradients {
        grads: acc.finish(),
        loss: loss_sum,
        targets: total,
        tokens,
    })
}

/// One optimizer step over `micro`: the gradients of [`sft_gradients`], clipped to
/// `max_grad_norm` (if > 0), then AdamW at `lr`. With `precision`, the optimizer holds the f32
/// masters and the model's compute copies are re-synced after the update.
///
/// Call it on the compute pool ([`crate::policy::on_compute_pool`]), as the learner does.
pub fn sft_step(
    model: &Llama,
    opt: &mut AdamW,
    precision: Option<&MixedPrecision>,
    micro: &[Vec<&SubTrajectory>],
    lr: f64,
    max_grad_norm: f64,
) -> Result<StepStats, SftError> {
    let SftGradients {
        mut grads,
        loss,
        targets,
        tokens,
    } = sft_gradients(model, opt, precision, micro)?;
    let grad_norm = if max_grad_norm > 0.0 {
        clip_grad_norm(&mut grads, max_grad_norm)?
    } else {
        super::optim::global_grad_norm(&grads)?
    };
    opt.set_lr(lr);
    opt.step(&grads)?;
    if let Some(mp) = precision {
        mp.sync()?;
    }
    Ok(StepStats {
        loss,
        targets,
        tokens,
        grad_norm,
        lr,
    })
}
