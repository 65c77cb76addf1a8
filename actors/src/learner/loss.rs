//! Token-level losses. Log-softmax is composed from basic ops (max-subtracted log-sum-exp) so
//! that gradients flow on CPU in candle 0.11 (its fused softmax has no backward there).

use candle_core::{DType, Result, Tensor, D};

/// Log-softmax over the last dimension. The max is detached: the result does not depend on
/// it, and it keeps `max` (whose backward picks one element) out of the graph.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    // CPU f32/f64: one fused pass forward and one backward (same values, max-subtracted).
    if crate::policy::fused::supported(logits, crate::policy::fused::Kind::LogSoftmax) {
        return crate::policy::fused::log_softmax(logits);
    }
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let z = logits.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    z.broadcast_sub(&lse)
}

/// Log-probability of each target under `logits`: `[B, T, V]`, `[B, T]` (u32) -> `[B, T]`.
/// For PPO ratios and KL terms.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    if targets.dims() != [b, t] {
        candle_core::bail!("targets shape {:?} != logits [{b}, {t}, _]", targets.dims());
    }
    // CPU f32/f64: one node, one pass each way (the same values as the composed path).
    if crate::policy::fused::supported(logits, crate::policy::fused::Kind::TokenLogprobs) {
        return crate::policy::fused::token_logprobs(logits, targets);
    }
    let idx = targets
        .to_dtype(DType::U32)?
        .contiguous()?
        .unsqueeze(D::Minus1)?;
    log_softmax(logits)?
        .gather(&idx, D::Minus1)?
        .squeeze(D::Minus1)
}

/// Mean cross-entropy over the tokens where `mask` (`[B, T]`, 1 = counted) is nonzero.
/// Returns the scalar loss and the number of counted tokens (so that gradient accumulation
/// can weight micro-batches by tokens). With no counted token the loss is 0, not NaN.
pub fn masked_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, usize)> {
    let lp = token_logprobs(logits, targets)?;
    let mask = mask.to_dtype(lp.dtype())?;
    if mask.dims() != lp.dims() {
        candle_core::bail!("mask shape {:?} != targets {:?}", mask.dims(), lp.dims());
    }
    let count = mask
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .filter(|v| **v != 0.0)
        .count();
    let total = (lp * mask)?.sum_all()?.neg()?;
    Ok(((total / count.max(1) as f64)?, count))
}
