//! A decoder layer's attention half (the input norm, the q/k/v projections, RoPE, causal
//! attention, the output projection and the residual add) as one graph node, for f32
//! forwards without a KV cache on CPU: training steps and the learner's logprobs. The same
//! forward, as a plain function that keeps no state, fills an empty inference cache from a
//! prompt (`prefill`).
//!
//! Composed, the same is nine nodes (the norm, three projections split into heads, two RoPEs,
//! the attention, the output projection, the add), and candle's backward zeroes a gradient for
//! each node's input before adding the op's gradient into it (see `swiglu`). Here the three
//! projections are one product against the weights stacked, the heads are roped straight into
//! the attention kernels' layout, and the backward hands candle only x's and the two weights'
//! gradients. The stacked weight is q's, k's and v's rows and, as its last row, the norm's
//! weight (`[(H + 2·Hkv)·D + 1, K]`): an op takes at most three operands. The attention itself
//! is `flash`'s kernels, unchanged.
//!
//! The stacked product sums over other blocks than three separate ones, so results agree with
//! the composed path to rounding, not to the bit (`the_fused_attention_is_the_composed_one`);
//! every sum runs in a fixed order, so runs repeat exactly.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::aligned::AlignedFloats;
use super::flash::{self, KeyMask};
use super::fused::{self, gemm_into, gemm_new, Mat};

/// Query heads, kv heads and the head dimension.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

impl Heads {
    /// Outputs of the stacked q/k/v product: `(H + 2·Hkv)·D`.
    fn qkv(&self) -> usize {
        (self.q + 2 * self.kv) * self.dim
    }

    /// The attention scale folded into the queries' RoPE, rounded from f64 as the composed
    /// path's `fused::rope` rounds it.
    fn scale(&self) -> f32 {
        (1.0 / (self.dim as f64).sqrt()) as f32
    }
}

/// What the forward leaves for the backward: the normalized input `[B·T, K]`, the roped,
/// pre-scaled queries `[B, Hkv, R, D]`, the roped keys and the values `[B, Hkv, T, D]` (the
/// kernels' operands), the kernels' state (each query row's score max and inverse normalizer,
/// `[B, T, H, 2]`) and the rows the output projection read (`[B·T, H·D]`), which the
/// attention's backward reads too.
pub(crate) struct Saved {
    normed: Vec<f32>,
    /// The kernels' operands, on cache lines (see `aligned`).
    q: AlignedFloats,
    k: AlignedFloats,
    v: AlignedFloats,
    state: Vec<f32>,
    rows: Vec<f32>,
}

/// The op: x `[B, T, K]`, q/k/v and the norm's weight stacked `[(H + 2·Hkv)·D + 1, K]`, o
/// `[K, H·D]` -> `[B, T, K]`.
pub(crate) struct AttentionBlock {
    heads: Heads,
    /// The norm's epsilon.
    eps: f64,
    mask: Arc<KeyMask>,
    /// RoPE's `[B, T, D]` angles.
    cos: Vec<f32>,
    sin: Vec<f32>,
    saved: fused::ForwardState<Saved>,
}

impl AttentionBlock {
    /// `(B, T, K)` of the operands, checked against the heads, the angles and the mask.
    pub(crate) fn dims(
        &self,
        x: &[usize],
        qkv: &[usize],
        o: &[usize],
    ) -> Result<(usize, usize, usize)> {
        let h = self.heads;
        let (&[b, t, k], &[n, kq], &[ko, no]) = (x, qkv, o) else {
            candle_core::bail!(
                "klong-attention: x {x:?}, q/k/v {qkv:?}, o {o:?} are not 3-D, 2-D, 2-D"
            );
        };
        if n != h.qkv() + 1 || kq != k || ko != k || no != h.q * h.dim || k == 0 {
            candle_core::bail!(
                "klong-attention: x {x:?}, q/k/v {qkv:?} and o {o:?} do not agree with {h:?}"
            );
        }
        if self.cos.len() != b * t * h.dim || self.sin.len() != self.cos.len() {
            candle_core::bail!("klong-attention: RoPE angles are not [{b}, {t}, {}]", h.dim);
        }
        Ok((b, t, k))
    }

    /// The kernels' dims: queries `[B, Hkv, n_rep·T, D]`, keys `[B, Hkv, T, D]`.
    fn flash_dims(&self, b: usize, t: usize) -> Result<(usize, usize, usize, flash::Dims)> {
        let h = self.heads;
        let n_rep = h.q / h.kv;
        flash::operand_dims(
            &self.mask,
            &[b, h.kv, n_rep * t, h.dim],
            &[b, h.kv, t, h.dim],
        )
    }

    /// `x + o(attention(rope(q, k, v of norm(x))))` `[B·T, K]` over the operands' data (x
    /// `[B·T, K]`, the stacked q/k/v and norm weights, o), and what its backward needs.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        w_stacked: &[f32],
        w_o: &[f32],
        (b, t, k): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Saved)> {
        let dims = self.flash_dims(b, t)?;
        let (n, hd) = (self.heads.qkv(), self.heads.q * self.heads.dim);
        let m = b * t;
        if x.len() != m * k || w_stacked.len() != (n + 1) * k || w_o.len() != k * hd {
            candle_core::bail!("klong-attention: operands' data do not match [{b}, {t}, {k}]");
        }
        let (w_qkv, w_norm) = w_stacked.split_at(n * k);
        let normed = fused::rms_forward(x, w_norm, self.eps);
        let projected = gemm_new(m, k, n, Mat::rows(&normed, k), Mat::transposed(w_qkv, k))?;
        let [q, kk, v] = self.split_heads(&projected, (b, t));
        drop(projected);
        let (state, rows) = flash::forward_rows(&self.mask, dims, (&q, &kk, &v));
        // x + rows · oᵀ
        let mut out = fused::copied(x);
        gemm_into(
            &mut out,
            true,
            (m, hd, k),
            Mat::rows(&rows, hd),
            Mat::transposed(w_o, hd),
        )?;
        let saved = Saved {
            normed,
            q,
            k: kk,
            v,
            state,
            rows,
        };
        Ok((out, saved))
    }

    /// The gradients of x, of the stacked q/k/v/norm weight and of o from the forward's state
    /// and the output's gradient `g` `[B·T, K]`.
    pub(crate) fn backward(
        &self,
        saved: Saved,
        x: &[f32],
        w_stacked: &[f32],
        w_o: &[f32],
        g: &[f32],
        (b, t, k): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let dims = self.flash_dims(b, t)?;
        let (n, hd, m) = (self.heads.qkv(), self.heads.q * self.heads.dim, b * t);
        let Saved {
            normed,
            q,
            k: kk,
            v,
            state,
            rows,
        } = saved;
        if rows.len() != m * hd || normed.len() != m * k {
            candle_core::bail!("klong-attention: the forward's rows are not [{m}, {hd}]");
        }
        if x.len() != m * k
            || g.len() != m * k
            || w_stacked.len() != (n + 1) * k
            || w_o.len() != k * hd
        {
            candle_core::bail!("klong-attention: backward operands do not match [{b}, {t}, {k}]");
        }
        let (w_qkv, w_norm) = w_stacked.split_at(n * k);
        // d o [K, H·D] = gᵀ · rows
        let d_o = gemm_new(k, m, hd, Mat::transposed(g, k), Mat::rows(&rows, hd))?;
        // d rows [M, H·D] = g · o
        let d_rows = gemm_new(m, k, hd, Mat::rows(g, k), Mat::rows(w_o, hd))?;
        let operands = (&q[..], &kk[..], &v[..]);
        let rows = (&rows[..], &d_rows[..]);
        let (dq, dk, dv) = flash::backward_rows(&self.mask, dims, operands, &state, rows)?;
        let d_proj = self.merge_heads([&dq, &dk, &dv], (b, t));
        // d (q; k; v) [N, K] = d_projᵀ · normed
        let mut d_qkv = gemm_new(n, m, k, Mat::transposed(&d_proj, n), Mat::rows(&normed, k))?;
        // d normed [M, K] = d_proj · (q; k; v), into normed's memory.
        let mut d_normed = normed;
        gemm_into(
            &mut d_normed,
            false,
            (m, n, k),
            Mat::rows(&d_proj, n),
            Mat::rows(w_qkv, k),
        )?;
        let norm = (w_norm, self.eps);
        let (dx, d_norm) = fused::pre_norm_residual_backward(x, norm, &d_normed, g);
        d_qkv.extend_from_slice(&d_norm);
        Ok((dx, d_qkv, d_o))
    }

    /// The projections' rows `[B·T, (H + 2·Hkv)·D]` -> roped queries (times `scale`) `[B,
    /// Hkv, n_rep·T, D]` (query head `g·n_rep + j` of position t is row `j·T + t` of group g:
    /// HF's repeat_kv order), roped keys and values `[B, Hkv, T, D]`.
    fn split_heads(&self, qkv: &[f32], (b, t): (usize, usize)) -> [AlignedFloats; 3] {
        let Heads { q: hq, kv, dim: d } = self.heads;
        let n_rep = hq / kv;
        let (n, nq, nkv) = (self.heads.qkv(), hq * d, kv * d);
        let scale = self.heads.scale();
        // Each output written once, in order, without zeroing it first: `f(bi, g, i, row)`
        // makes row i (of `rows_per_pair`) of pair (batch row bi, kv head g), `d` floats. The
        // closure is a type parameter, not `dyn`: it is called once per 32 floats, and inlined
        // it costs no call and no per-row division into (pair, i).
        fn heads<F: Fn(usize, usize, usize, &mut [f32]) + Sync>(
            (b, kv, d): (usize, usize, usize),
            rows_per_pair: usize,
            f: F,
        ) -> AlignedFloats {
            let per_pair = rows_per_pair * d;
            fused::written_aligned(b * kv * per_pair, per_pair, |p0, out| {
                let mut row = vec![0f32; d];
                for pair in p0..p0 + out.len() / per_pair.max(1) {
                    let (bi, g) = (pair / kv, pair % kv);
                    for i in 0..rows_per_pair {
                        f(bi, g, i, &mut row);
                        out.extend(&row);
                    }
                }
            })
            .0
        }
        let angles = |bi: usize, ti: usize| {
            let a = (bi * t + ti) * d;
            (&self.cos[a..a + d], &self.sin[a..a + d])
        };
        let sizes = (b, kv, d);
        // Query row `j·t + ti` of pair (bi, g): head g·n_rep + j of position ti.
        let q = heads(sizes, n_rep * t, |bi, g, i, dst| {
            let (j, ti) = (i / t, i % t);
            let src = (bi * t + ti) * n + (g * n_rep + j) * d;
            let (c, s) = angles(bi, ti);
            fused::rope_vec(&qkv[src..src + d], c, s, scale, dst);
        });
        let k = heads(sizes, t, |bi, g, ti, dst| {
            let src = (bi * t + ti) * n + nq + g * d;
            let (c, s) = angles(bi, ti);
            fused::rope_vec(&qkv[src..src + d], c, s, 1.0, dst);
        });
        let v = heads(sizes, t, |bi, g, ti, dst| {
            let src = (bi * t + ti) * n + nq + nkv + g * d;
            dst.copy_from_slice(&qkv[src..src + d]);
        });
        [q, k, v]
    }

    /// The transpose of `split_heads`: the gradients of the queries, keys and values back to
    /// the projections' rows `[B·T, (H + 2·Hkv)·D]`.
    fn merge_heads(&self, [dq, dk, dv]: [&[f32]; 3], (b, t): (usize, usize)) -> Vec<f32> {
        let Heads { q: hq, kv, dim: d } = self.heads;
        let n_rep = hq / kv;
        let n = self.heads.qkv();
        let scale = self.heads.scale();
        // Each row written once, in column order (the query heads, the keys, the values),
        // without zeroing it first.
        let (out, _) = fused::written(b * t * n, n, |r0, rows| {
            let mut head = vec![0f32; d];
            for r in r0..r0 + rows.len() / n.max(1) {
                let (bi, ti) = (r / t, r % t);
                let at = (bi * t + ti) * d;
                let (c, s) = (&self.cos[at..at + d], &self.sin[at..at + d]);
                for g in 0..kv {
                    let pair = bi * kv + g;
                    for j in 0..n_rep {
                        let src = (pair * n_rep * t + j * t + ti) * d;
                        fused::rope_vec_t(&dq[src..src + d], c, s, scale, &mut head);
                        rows.extend(&head);
                    }
                }
                for g in 0..kv {
                    let src = ((bi * kv + g) * t + ti) * d;
                    fused::rope_vec_t(&dk[src..src + d], c, s, 1.0, &mut head);
                    rows.extend(&head);
                }
                for g in 0..kv {
                    let src = ((bi * kv + g) * t + ti) * d;
                    rows.extend(&dv[src..src + d]);
                }
            }
        });
        out
    }
}

impl CustomOp3 for AttentionBlock {
    fn name(&self) -> &'static str {
        "klong-attention"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        qkv: &CpuStorage,
        lqkv: &Layout,
        o: &CpuStorage,
        lo: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(lx.dims(), lqkv.dims(), lo.dims())?;
        let (x, qkv, o) = (
            fused::slice::<f32>(x, lx)?,
            fused::slice::<f32>(qkv, lqkv)?,
            fused::slice::<f32>(o, lo)?,
        );
        let (out, saved) = self.forward(x, qkv, o, dims)?;
        self.saved.put(saved)?;
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        qkv: &Tensor,
        o: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let btk = self.dims(x.dims(), qkv.dims(), o.dims())?;
        let saved = self.saved.take()?;
        let (dx, d_qkv, d_o) = fused::with_f32s([x, qkv, o, g], |[x, w_stacked, w_o, g]| {
            self.backward(saved, x, w_stacked, w_o, g, btk)
        })?;
        Ok((
            fused::like(dx, x)?,
            fused::like(d_qkv, qkv)?,
            fused::like(d_o, o)?,
        ))
    }
}

/// The op for these operands, or `None` where it does not serve them: x `[B, T, K]` f32 on a
/// CPU with the attention kernels, norm `[K]`, q/k/v and o weights `[H·D, K]`, `[Hkv·D, K]`
/// (twice) and `[K, H·D]`, cos/sin `[B, T, D]`, and a mask with no past keys.
pub(crate) fn op(
    x: &Tensor,
    (norm, eps): (&Tensor, f64),
    [wq, wk, wv, wo]: [&Tensor; 4],
    heads: Heads,
    (cos, sin): (&Tensor, &Tensor),
    mask: &Arc<KeyMask>,
) -> Result<Option<AttentionBlock>> {
    let tensors = [x, norm, wq, wk, wv, wo, cos, sin];
    let served = fused::supported(x, fused::Kind::AttentionBlock)
        && flash::serves(x)
        && tensors
            .iter()
            .all(|w| w.dtype() == DType::F32 && w.device().is_cpu())
        && heads.kv > 0
        && heads.q.is_multiple_of(heads.kv)
        && heads.dim.is_multiple_of(8)
        && mask.past() == 0;
    if !served {
        return Ok(None);
    }
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    Ok(Some(AttentionBlock {
        heads,
        eps,
        mask: mask.clone(),
        cos: flat(cos)?,
        sin: flat(sin)?,
        saved: fused::ForwardState::new("klong-attention"),
    }))
}

/// q's, k's and v's weights and the norm's stacked `[(H + 2·Hkv)·D + 1, K]` (a `cat` node,
/// whose backward splits their gradient).
pub(crate) fn stacked(norm: &Tensor, [wq, wk, wv]: [&Tensor; 3]) -> Result<Tensor> {
    Tensor::cat(&[wq, wk, wv, &norm.reshape((1, ()))?], 0)
}

/// The op for these operands and the q/k/v and norm weights stacked, or `None` where it does
/// not serve them (see `op`).
fn op_for(
    x: &Tensor,
    norm: (&Tensor, f64),
    weights: [&Tensor; 4],
    heads: Heads,
    angles: (&Tensor, &Tensor),
    mask: &Arc<KeyMask>,
) -> Result<Option<(AttentionBlock, Tensor)>> {
    let Some(op) = op(x, norm, weights, heads, angles, mask)? else {
        return Ok(None);
    };
    let [wq, wk, wv, _] = weights;
    Ok(Some((op, stacked(norm.0, [wq, wk, wv])?)))
}

/// `x + attention(rms_norm(x; norm, eps))` as one node, or `None` where this op does not serve
/// it (then the caller composes it; see `op_for` for what it serves: no KV cache).
pub(crate) fn block(
    x: &Tensor,
    norm: (&Tensor, f64),
    weights: [&Tensor; 4],
    heads: Heads,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Arc<KeyMask>,
) -> Result<Option<Tensor>> {
    let Some((op, stacked)) = op_for(x, norm, weights, heads, (cos, sin), mask)? else {
        return Ok(None);
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &stacked,
        &weights[3].contiguous()?,
        op,
    )?))
}

/// `block`'s output for a prompt's prefill into an empty KV cache, with the layer's roped keys
/// and values `[B, Hkv, T, D]` for the cache: no graph node and no state kept, for forwards
/// that nothing backpropagates through (the caller checks). `None` where `block` would be.
///
/// Against the composed half (eight nodes, each a fresh output): a 1,500-token prefill of
/// model R 4% faster at batch 1 and 8; the 8 x 16 prompt within noise.
pub(crate) fn prefill(
    x: &Tensor,
    norm: (&Tensor, f64),
    weights: [&Tensor; 4],
    heads: Heads,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Arc<KeyMask>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some((op, stacked)) = op_for(x, norm, weights, heads, (cos, sin), mask)? else {
        return Ok(None);
    };
    let (b, t, k) = op.dims(x.dims(), stacked.dims(), weights[3].dims())?;
    let (out, saved) = fused::with_data::<f32, _>(x, |x| {
        fused::with_data::<f32, _>(&stacked, |w| {
            fused::with_data::<f32, _>(weights[3], |o| op.forward(x, w, o, (b, t, k)))
        })
    })?;
    let dev = x.device();
    let kv = (b, heads.kv, t, heads.dim);
    Ok(Some((
        Tensor::from_vec(out, (b, t, k), dev)?,
        Tensor::from_slice(&saved.k, kv, dev)?,
        Tensor::from_slice(&saved.v, kv, dev)?,
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Tensor, Var};

    use super::super::flash::KeyMask;
    use super::super::{fused, max_abs_diff};
    use super::Heads;

    fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut v = crate::policy::hashed_values(n, seed);
        v.iter_mut().for_each(|x| *x *= scale);
        v
    }

    const EPS: f64 = 1e-5;

    /// The composed path: the fused norm, three projections, `fused::rope`, masked softmax
    /// attention over the dense additive mask, the output projection, the residual add.
    fn composed(
        x: &Tensor,
        norm: &Tensor,
        [wq, wk, wv, wo]: [&Tensor; 4],
        h: Heads,
        cos: &Tensor,
        sin: &Tensor,
        mask: &KeyMask,
    ) -> candle_core::Result<Tensor> {
        let (b, t, k) = x.dims3()?;
        let d = h.dim;
        let rows = fused::rms_norm(x, norm, EPS)?.reshape((b * t, k))?;
        let proj = |w: &Tensor, n: usize| rows.matmul(&w.t()?)?.reshape((b, t, n, d));
        let q = fused::rope(&proj(wq, h.q)?, cos, sin, 1.0 / (d as f64).sqrt())?;
        let kk = fused::rope(&proj(wk, h.kv)?, cos, sin, 1.0)?;
        let v = proj(wv, h.kv)?.transpose(1, 2)?.contiguous()?;
        let q = q.reshape((b, h.kv, h.q / h.kv * t, d))?;
        let (_, _, s) = mask.dims();
        let add = Tensor::from_vec(mask.additive(), (b, 1, t, s), &Device::Cpu)?;
        let att = fused::masked_softmax(&q.matmul(&kk.t()?)?, &add)?;
        let y = att
            .matmul(&v)?
            .reshape((b, h.q, t, d))?
            .transpose(1, 2)?
            .reshape((b * t, h.q * d))?;
        x + y.matmul(&wo.t()?)?.reshape((b, t, k))?
    }

    /// The one-node attention half gives the composed path's output and the gradients of x
    /// and of all five weights (the norm's too), to rounding: grouped heads (2 query heads per kv head), rows
    /// with right pads and with left pads (whose first queries see no key), and sizes that
    /// fill no kernel tile exactly.
    #[test]
    fn the_fused_attention_is_the_composed_one() {
        if !super::super::skinny::simd() {
            return; // the attention kernels need AVX2 and FMA
        }
        let dev = Device::Cpu;
        let h = Heads {
            q: 4,
            kv: 2,
            dim: 16,
        };
        let (b, t, k) = (3, 37, 24);
        let keys: Vec<Vec<bool>> = vec![
            vec![true; t],
            (0..t).map(|j| j < t - t / 3).collect(),
            (0..t).map(|j| j >= 4).collect(),
        ];
        let mask = Arc::new(KeyMask::new(&keys, 0).expect("mask"));
        let var = |n: usize, seed: u32, shape: (usize, usize)| {
            Var::from_vec(values(n, seed, 1.0), shape, &dev).expect("var")
        };
        let x = Var::from_vec(values(b * t * k, 1, 2.0), (b, t, k), &dev).expect("x");
        let wq = var(h.q * h.dim * k, 2, (h.q * h.dim, k));
        let wk = var(h.kv * h.dim * k, 3, (h.kv * h.dim, k));
        let wv = var(h.kv * h.dim * k, 4, (h.kv * h.dim, k));
        let wo = var(k * h.q * h.dim, 5, (k, h.q * h.dim));
        let norm = Var::from_vec(values(k, 8, 1.0).iter().map(|v| 1.0 + v).collect(), k, &dev)
            .expect("norm");
        let angles =
            Tensor::from_vec(values(b * t * h.dim, 6, 8.0), (b, t, h.dim), &dev).expect("angles");
        let (cos, sin) = (angles.cos().expect("cos"), angles.sin().expect("sin"));
        let g = Tensor::from_vec(values(b * t * k, 7, 1.0), (b, t, k), &dev).expect("g");
        let weights = [
            wq.as_tensor(),
            wk.as_tensor(),
            wv.as_tensor(),
            wo.as_tensor(),
        ];
        let run = |y: Tensor| {
            let grads = (&y * &g)
                .and_then(|p| p.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            let mut out = vec![y];
            for v in [&x, &norm, &wq, &wk, &wv, &wo] {
                out.push(grads.get(v.as_tensor()).expect("grad").clone());
            }
            out
        };
        let norm_eps = (norm.as_tensor(), EPS);
        let fused = super::block(x.as_tensor(), norm_eps, weights, h, &cos, &sin, &mask)
            .expect("op")
            .expect("served");
        let fused = run(fused);
        let plain = composed(x.as_tensor(), &norm, weights, h, &cos, &sin, &mask);
        let plain = run(plain.expect("plain"));
        for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
            let scale = b
                .abs()
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.max(0))
                .and_then(|t| t.to_scalar::<f32>())
                .expect("scale");
            let diff = max_abs_diff(a, b);
            assert!(scale > 0.0, "case {i}: all zero");
            assert!(
                diff <= 2e-5 * scale.max(1.0),
                "case {i}: {diff} against {scale}"
            );
        }
    }

    /// Past keys (a KV cache's) are not this op's: it declines them, and the caller composes.
    #[test]
    fn a_cache_is_declined() {
        let dev = Device::Cpu;
        let h = Heads {
            q: 2,
            kv: 1,
            dim: 8,
        };
        let keys = vec![vec![true; 6]];
        let mask = Arc::new(KeyMask::new(&keys, 2).expect("mask"));
        let x = Tensor::zeros((1, 4, 8), candle_core::DType::F32, &dev).expect("x");
        let w = Tensor::zeros((16, 8), candle_core::DType::F32, &dev).expect("w");
        let wk = Tensor::zeros((8, 8), candle_core::DType::F32, &dev).expect("wk");
        let wo = Tensor::zeros((8, 16), candle_core::DType::F32, &dev).expect("wo");
        let angles = Tensor::zeros((1, 4, 8), candle_core::DType::F32, &dev).expect("angles");
        let norm = Tensor::ones(8, candle_core::DType::F32, &dev).expect("norm");
        let weights = [&w, &wk, &wk, &wo];
        let got =
            super::block(&x, (&norm, EPS), weights, h, &angles, &angles, &mask).expect("no error");
        assert!(got.is_none());
    }
}
