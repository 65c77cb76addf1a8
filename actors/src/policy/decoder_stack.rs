//! All of a decoder's layers, each an attention half (`attention_block`) then an MLP half
//! (`swiglu`), as one graph node, for f32 forwards without a KV cache on CPU that a backward
//! may follow (training steps).
//!
//! Layer by layer, each half is its own node, and candle's backward zeroes a gradient buffer
//! for every node's input before adding the op's gradient into it: for the residual stream
//! that is a `[B·T, K]` memset (serial) and add per half, 4 MiB written and 12 MiB moved for
//! model R's training batch. Here the stream enters once: the halves' forwards and backwards
//! run back to back over the same functions the per-half ops call, so the results are those
//! of the per-half path to the bit (`the_stack_is_the_layers`). Measured: about 1% of model
//! R's step (steps alternating with and without it in one process, median of paired ratios
//! 0.989 and 0.987; session 28 in `benches/peer/README.md`).
//!
//! The operands: x `[B, T, K]`; every layer's weights but the MLP's down projection, stacked
//! (by a `cat` node, or outside the graph: below) `[L·(N + 1 + K + 2F + 1), K]` (per layer: q, k, v and the input norm's
//! weight as `attention_block` stacks them, o, then gate, up and the post-attention norm's
//! weight as `swiglu` stacks them; o's rows are K wide only where `H·D = K`, which `stack`
//! checks); the down projections stacked `[L·K, F]`.
//!
//! Where the stream x tracks gradients (training), the weights skip the graph: they are
//! stacked outside it (a copy on the compute pool's threads, not a `cat` node) and the
//! backward hands each weight's gradient, a view of its layer's stacked gradient, to a
//! [`WeightGradients`] that the model adds to the backward's gradient store
//! (`Llama::backward`). Through a `cat` node, candle's backward gives every one of the `9·L`
//! weights a zeroed gradient and adds its slice of the stacked one into it, serially: for
//! model R, two passes over 3.15M floats on one thread while the other waited, after the
//! stacked gradient itself was copied together from the layers'. Measured: ~2% of model R's
//! step (steps alternating with and without it in one process, medians of the paired ratios
//! 0.997-1.067 over six runs, median 1.018; session 31 in `benches/peer/README.md`). The
//! gradients are the same numbers either way (`the_stack_is_the_layers` checks both paths).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::attention_block::{self, AttentionBlock, Heads};
use super::flash::KeyMask;
use super::fused;
use super::model::WeightGradients;
use super::swiglu::{self, SwiGlu};

/// One layer's weights (HF layouts: a projection's weight is `[out, in]`).
pub(crate) struct LayerOperands<'a> {
    pub input_norm: &'a Tensor,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub o: &'a Tensor,
    pub post_norm: &'a Tensor,
    pub gate: &'a Tensor,
    pub up: &'a Tensor,
    pub down: &'a Tensor,
}

/// What one layer's forward leaves for the backward. The attention half's input is the op's
/// own operand for the first layer (`None`), the previous layer's output for the others.
struct LayerSaved {
    x: Option<Vec<f32>>,
    attention: attention_block::Saved,
    /// The attention half's output: the MLP half's input.
    mid: Vec<f32>,
    mlp: swiglu::Saved,
}

/// Where the op's weight gradients go when the weights skip the graph: the model's
/// [`WeightGradients`], with every layer's weights in the stacked operands' order (q, k, v,
/// the input norm, o, gate, up, the post-attention norm, then down).
struct Side {
    grads: Arc<WeightGradients>,
    weights: Vec<[Tensor; 9]>,
}

/// One layer's weight gradients: the attention half's stacked q/k/v/norm, o, the MLP half's
/// stacked gate/up/norm, down.
type LayerGrads = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// The op (see the module's comment for its operands).
struct DecoderStack {
    attention: AttentionBlock,
    mlp: SwiGlu,
    heads: Heads,
    layers: usize,
    /// The MLP's width F.
    ffn: usize,
    saved: fused::ForwardState<Vec<LayerSaved>>,
    /// `Some` where the weights skip the graph.
    side: Option<Side>,
}

/// Where one layer's weights lie in the stacked operand, in elements: the attention half's
/// stacked q/k/v/norm, o, the MLP half's stacked gate/up/norm.
struct LayerSpans {
    attention: std::ops::Range<usize>,
    o: std::ops::Range<usize>,
    mlp: std::ops::Range<usize>,
}

impl DecoderStack {
    /// Rows of one layer in the stacked operand: `N + 1` (q, k, v, norm), `K` (o), `2F + 1`.
    fn rows_per_layer(&self, k: usize) -> usize {
        self.heads.q * self.heads.dim
            + 2 * self.heads.kv * self.heads.dim
            + 1
            + k
            + 2 * self.ffn
            + 1
    }

    fn spans(&self, layer: usize, k: usize) -> LayerSpans {
        let n = (self.heads.q + 2 * self.heads.kv) * self.heads.dim;
        let start = layer * self.rows_per_layer(k) * k;
        let o = start + (n + 1) * k;
        let mlp = o + k * k;
        LayerSpans {
            attention: start..o,
            o: o..mlp,
            mlp: mlp..mlp + (2 * self.ffn + 1) * k,
        }
    }

    /// `(B, T, K)` of the operands, checked against the heads, the layer count and F.
    fn dims(&self, x: &[usize], main: &[usize], down: &[usize]) -> Result<(usize, usize, usize)> {
        let (&[b, t, k], &[rows, km], &[rows_down, f]) = (x, main, down) else {
            candle_core::bail!(
                "klong-decoder-stack: x {x:?}, weights {main:?}, downs {down:?} are not 3-D, 2-D, 2-D"
            );
        };
        let n = (self.heads.q + 2 * self.heads.kv) * self.heads.dim;
        self.attention.dims(&[b, t, k], &[n + 1, k], &[k, k])?;
        if k == 0
            || km != k
            || self.heads.q * self.heads.dim != k
            || rows != self.layers * self.rows_per_layer(k)
            || rows_down != self.layers * k
            || f != self.ffn
        {
            candle_core::bail!(
                "klong-decoder-stack: x {x:?}, weights {main:?} and downs {down:?} do not agree \
                 with {} layers of {:?} and width {}",
                self.layers,
                self.heads,
                self.ffn
            );
        }
        Ok((b, t, k))
    }

    /// The last layer's output `[B·T, K]` and every layer's state.
    fn forward(
        &self,
        x: &[f32],
        main: &[f32],
        downs: &[f32],
        (b, t, k): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<LayerSaved>)> {
        let (m, f) = (b * t, self.ffn);
        let mut saved: Vec<LayerSaved> = Vec::with_capacity(self.layers);
        let mut input: Option<Vec<f32>> = None;
        for layer in 0..self.layers {
            let spans = self.spans(layer, k);
            let down = &downs[layer * k * f..(layer + 1) * k * f];
            let x_l = input.as_deref().unwrap_or(x);
            let (mid, attention) =
                self.attention
                    .forward(x_l, &main[spans.attention], &main[spans.o], (b, t, k))?;
            let (out, mlp) = self.mlp.forward(&mid, &main[spans.mlp], down, (m, k, f))?;
            saved.push(LayerSaved {
                x: input.replace(out),
                attention,
                mid,
                mlp,
            });
        }
        match input {
            Some(out) => Ok((out, saved)),
            None => candle_core::bail!("klong-decoder-stack: no layers"),
        }
    }

    /// The gradient of x and each layer's weight gradients, first layer first, from the
    /// layers' state and the output's gradient `g` `[B·T, K]`.
    fn backward(
        &self,
        saved: Vec<LayerSaved>,
        x: &[f32],
        main: &[f32],
        downs: &[f32],
        g: &[f32],
        (b, t, k): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<LayerGrads>)> {
        if saved.len() != self.layers {
            candle_core::bail!(
                "klong-decoder-stack: the forward's state is not {} layers",
                self.layers
            );
        }
        let (m, f) = (b * t, self.ffn);
        // Each layer's weight gradients, last layer first: concatenated in the operands'
        // order once all are known.
        let mut d_layers = Vec::with_capacity(self.layers);
        // The gradient flowing down: the output's for the last layer, then each layer's dx.
        let mut d: Option<Vec<f32>> = None;
        for (layer, state) in saved.into_iter().enumerate().rev() {
            let spans = self.spans(layer, k);
            let down = &downs[layer * k * f..(layer + 1) * k * f];
            let (d_mid, d_mlp, d_down) = self.mlp.backward(
                state.mlp,
                &state.mid,
                &main[spans.mlp],
                down,
                d.as_deref().unwrap_or(g),
                (m, k, f),
            )?;
            let x_l = state.x.as_deref().unwrap_or(x);
            let (dx, d_attention, d_o) = self.attention.backward(
                state.attention,
                x_l,
                &main[spans.attention],
                &main[spans.o],
                &d_mid,
                (b, t, k),
            )?;
            d = Some(dx);
            d_layers.push((d_attention, d_o, d_mlp, d_down));
        }
        d_layers.reverse();
        match d {
            Some(dx) => Ok((dx, d_layers)),
            None => candle_core::bail!("klong-decoder-stack: no layers"),
        }
    }

    /// The layers' weight gradients as the weights' own tensors: views of each half's stacked
    /// gradient, shaped as the weights they belong to (no copies).
    fn weight_grads(
        side: &Side,
        d_layers: Vec<LayerGrads>,
        k: usize,
        device: &candle_core::Device,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        if side.weights.len() != d_layers.len() {
            candle_core::bail!(
                "klong-decoder-stack: {} layers' gradients for {} layers' weights",
                d_layers.len(),
                side.weights.len()
            );
        }
        let mut out = Vec::with_capacity(9 * d_layers.len());
        for (weights, (d_attention, d_o, d_mlp, d_down)) in side.weights.iter().zip(d_layers) {
            let [q, kw, v, input_norm, o, gate, up, post_norm, down] = weights;
            // Each half's stacked gradient, rows of K, and its weights' rows in order.
            let halves: [(Vec<f32>, &[&Tensor]); 2] = [
                (d_attention, &[q, kw, v, input_norm]),
                (d_mlp, &[gate, up, post_norm]),
            ];
            for (stacked, parts) in halves {
                let rows = stacked.len() / k;
                let stacked = Tensor::from_vec(stacked, (rows, k), device)?;
                let mut at = 0;
                for w in parts {
                    let n = w.elem_count() / k;
                    out.push(((*w).clone(), stacked.narrow(0, at, n)?.reshape(w.shape())?));
                    at += n;
                }
                if at != rows {
                    candle_core::bail!("klong-decoder-stack: {rows} gradient rows for {at}");
                }
            }
            out.push((o.clone(), Tensor::from_vec(d_o, o.shape(), device)?));
            out.push((
                down.clone(),
                Tensor::from_vec(d_down, down.shape(), device)?,
            ));
        }
        Ok(out)
    }
}

/// The layers' weight gradients stacked as the op's operands are, `[L·rows, K]` and
/// `[L·K, F]` (for candle's `cat` backward).
fn stacked_grads(d_layers: Vec<LayerGrads>, main: usize, downs: usize) -> (Vec<f32>, Vec<f32>) {
    let mut d_main = Vec::with_capacity(main);
    let mut d_downs = Vec::with_capacity(downs);
    for (d_attention, d_o, d_mlp, d_down) in d_layers {
        d_main.extend_from_slice(&d_attention);
        d_main.extend_from_slice(&d_o);
        d_main.extend_from_slice(&d_mlp);
        d_downs.extend_from_slice(&d_down);
    }
    (d_main, d_downs)
}

impl CustomOp3 for DecoderStack {
    fn name(&self) -> &'static str {
        "klong-decoder-stack"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        main: &CpuStorage,
        lm: &Layout,
        downs: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(lx.dims(), lm.dims(), ld.dims())?;
        let (x, main, downs) = (
            fused::slice::<f32>(x, lx)?,
            fused::slice::<f32>(main, lm)?,
            fused::slice::<f32>(downs, ld)?,
        );
        let (out, saved) = self.forward(x, main, downs, dims)?;
        self.saved.put(saved)?;
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        main: &Tensor,
        downs: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(x.dims(), main.dims(), downs.dims())?;
        let saved = self.saved.take()?;
        let (dx, d_layers) = fused::with_f32s([x, main, downs, g], |[x, main, downs, g]| {
            self.backward(saved, x, main, downs, g, dims)
        })?;
        if let Some(side) = &self.side {
            let grads = Self::weight_grads(side, d_layers, dims.2, x.device())?;
            side.grads.deposit(grads)?;
            return Ok((fused::like(dx, x)?, None, None));
        }
        let (d_main, d_downs) = stacked_grads(d_layers, main.elem_count(), downs.elem_count());
        Ok((
            fused::like(dx, x)?,
            fused::like(d_main, main)?,
            fused::like(d_downs, downs)?,
        ))
    }
}

/// The decoder's layers over x `[B, T, K]` as one node, or `None` where the op does not serve
/// them (the caller runs them layer by layer): no layers, nothing a backward could reach (x and
/// every weight untracked: without a backward, one layer's state at a time is all a forward
/// needs to hold), `H·D ≠ K`, or what `attention_block::op` and `swiglu::serves` decline.
/// Every norm takes `eps` (the caller checks that the layers' norms agree).
///
/// With `grads`, where x tracks gradients, the weights skip the graph and their gradients go
/// to `grads` (see the module's comment): an error if an earlier backward's are still pending
/// there (never added to a store, so its weights would have learned nothing from it).
pub(crate) fn stack(
    x: &Tensor,
    layers: &[LayerOperands<'_>],
    eps: f64,
    heads: Heads,
    angles: (&Tensor, &Tensor),
    mask: &Arc<KeyMask>,
    grads: Option<&Arc<WeightGradients>>,
) -> Result<Option<Tensor>> {
    let Some(first) = layers.first() else {
        return Ok(None);
    };
    let (_, _, k) = x.dims3()?;
    let (ffn, _) = first.gate.dims2()?;
    let tracked = x.track_op()
        || layers.iter().any(|l| {
            [
                l.input_norm,
                l.q,
                l.k,
                l.v,
                l.o,
                l.post_norm,
                l.gate,
                l.up,
                l.down,
            ]
            .iter()
            .any(|w| w.track_op())
        });
    let served = fused::supported(x, fused::Kind::DecoderStack)
        && x.dtype() == DType::F32
        && tracked
        && heads.q * heads.dim == k
        && layers.iter().all(|l| {
            swiglu::serves(x, [l.post_norm, l.gate, l.up, l.down])
                && [l.input_norm, l.q, l.k, l.v, l.o]
                    .iter()
                    .all(|w| w.dtype() == DType::F32 && w.device().is_cpu())
                && l.q.dims() == [heads.q * heads.dim, k]
                && l.k.dims() == [heads.kv * heads.dim, k]
                && l.v.dims() == [heads.kv * heads.dim, k]
                && l.gate.dims() == [ffn, k]
                && l.up.dims() == [ffn, k]
                && l.down.dims() == [k, ffn]
                && l.o.dims() == [k, k]
        });
    if !served {
        return Ok(None);
    }
    let weights = [first.q, first.k, first.v, first.o];
    let Some(attention) =
        attention_block::op(x, (first.input_norm, eps), weights, heads, angles, mask)?
    else {
        return Ok(None);
    };
    let mut parts = Vec::with_capacity(8 * layers.len());
    let mut norms = Vec::with_capacity(2 * layers.len());
    for l in layers {
        norms.push((
            l.input_norm.reshape((1, ()))?,
            l.post_norm.reshape((1, ()))?,
        ));
    }
    for (l, (input_norm, post_norm)) in layers.iter().zip(&norms) {
        parts.extend([l.q, l.k, l.v, input_norm, l.o, l.gate, l.up, post_norm]);
    }
    let downs: Vec<&Tensor> = layers.iter().map(|l| l.down).collect();
    let side = match grads {
        Some(grads) if x.track_op() && fused::enabled(fused::Kind::WeightGrads) => {
            if grads.is_pending()? {
                candle_core::bail!(
                    "klong-decoder-stack: an earlier backward's weight gradients were never \
                     added to its gradient store (backpropagate a model's loss with \
                     `Llama::backward`, not `Tensor::backward`)"
                );
            }
            let weights = layers
                .iter()
                .map(|l| {
                    [
                        l.q,
                        l.k,
                        l.v,
                        l.input_norm,
                        l.o,
                        l.gate,
                        l.up,
                        l.post_norm,
                        l.down,
                    ]
                    .map(Tensor::clone)
                })
                .collect();
            Some(Side {
                grads: Arc::clone(grads),
                weights,
            })
        }
        _ => None,
    };
    let (main, downs) = if side.is_some() {
        (rows_of(&parts, k)?, rows_of(&downs, ffn)?)
    } else {
        (Tensor::cat(&parts, 0)?, Tensor::cat(&downs, 0)?)
    };
    let op = DecoderStack {
        attention,
        mlp: SwiGlu::new(eps),
        heads,
        layers: layers.len(),
        ffn,
        saved: fused::ForwardState::new("klong-decoder-stack"),
        side,
    };
    Ok(Some(x.contiguous()?.apply_op3(&main, &downs, op)?))
}

/// `parts` (each contiguous rows of `width`), one after another, as a new `[rows, width]`
/// tensor outside the graph, copied by the compute pool's threads (candle's `cat` copies on
/// the calling thread alone).
fn rows_of(parts: &[&Tensor], width: usize) -> Result<Tensor> {
    let Some(device) = parts.first().map(|t| t.device().clone()) else {
        candle_core::bail!("klong-decoder-stack: no weights to stack");
    };
    let guards: Vec<_> = parts.iter().map(|t| t.storage_and_layout()).collect();
    let mut data: Vec<&[f32]> = Vec::with_capacity(parts.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(c) => data.push(fused::slice::<f32>(c, layout)?),
            _ => candle_core::bail!("klong-decoder-stack: CPU weights only"),
        }
    }
    if width == 0 || data.iter().any(|d| !d.len().is_multiple_of(width)) {
        candle_core::bail!("klong-decoder-stack: weights are not rows of {width}");
    }
    // Each part's first row in the whole.
    let firsts: Vec<usize> = data
        .iter()
        .scan(0, |at, d| {
            let first = *at;
            *at += d.len() / width;
            Some(first)
        })
        .collect();
    let n: usize = data.iter().map(|d| d.len()).sum();
    let (out, _) = fused::written(n, width, |first, fill| {
        let (mut row, end) = (first, first + fill.len() / width);
        // The last part starting at or before `row` holds it (empty parts start where the
        // next one does and are skipped), then each part after it while rows remain.
        let mut p = firsts.partition_point(|&f| f <= row).saturating_sub(1);
        while row < end {
            let (start, d) = (firsts[p], data[p]);
            let stop = (start + d.len() / width).min(end);
            fill.extend(&d[(row - start) * width..(stop - start) * width]);
            row = stop;
            p += 1;
        }
    });
    drop(guards);
    Tensor::from_vec(out, (n / width, width), &device)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Tensor, Var};

    use super::super::attention_block::{self, Heads};
    use super::super::flash::KeyMask;
    use super::super::model::WeightGradients;
    use super::super::swiglu;
    use super::LayerOperands;
    use crate::policy::hashed_values;

    const EPS: f64 = 1e-5;

    fn var(n: usize, seed: u32, scale: f32, shape: &[usize]) -> Var {
        let v = hashed_values(n, seed).iter().map(|x| x * scale).collect();
        Var::from_vec(v, shape, &Device::Cpu).expect("var")
    }

    /// A layer's nine weights, seeded by the layer.
    fn layer_vars(layer: u32, h: Heads, k: usize, f: usize) -> Vec<Var> {
        let (hq, hkv) = (h.q * h.dim, h.kv * h.dim);
        let s = 100 * layer;
        let norm = |seed: u32| {
            let v = hashed_values(k, seed)
                .iter()
                .map(|x| 1.0 + 0.2 * x)
                .collect();
            Var::from_vec(v, k, &Device::Cpu).expect("norm")
        };
        vec![
            norm(s + 1),
            var(hq * k, s + 2, 0.3, &[hq, k]),
            var(hkv * k, s + 3, 0.3, &[hkv, k]),
            var(hkv * k, s + 4, 0.3, &[hkv, k]),
            var(k * hq, s + 5, 0.3, &[k, hq]),
            norm(s + 6),
            var(f * k, s + 7, 0.3, &[f, k]),
            var(f * k, s + 8, 0.3, &[f, k]),
            var(k * f, s + 9, 0.3, &[k, f]),
        ]
    }

    fn operands(w: &[Var]) -> LayerOperands<'_> {
        LayerOperands {
            input_norm: w[0].as_tensor(),
            q: w[1].as_tensor(),
            k: w[2].as_tensor(),
            v: w[3].as_tensor(),
            o: w[4].as_tensor(),
            post_norm: w[5].as_tensor(),
            gate: w[6].as_tensor(),
            up: w[7].as_tensor(),
            down: w[8].as_tensor(),
        }
    }

    /// Three layers as one node give the per-half nodes' output and the gradients of x and of
    /// every weight, bit for bit: both run the same functions in the same order, and candle's
    /// per-node accumulation only adds each gradient to zero. Both ways the weights' gradients
    /// can leave the op: through the graph's `cat`, and handed past it (`WeightGradients`, as
    /// `Llama::backward` collects them). Grouped heads, a right-padded and a left-padded row,
    /// sizes that fill no kernel tile exactly.
    #[test]
    fn the_stack_is_the_layers() {
        if !super::super::skinny::simd() {
            return; // the attention kernels need AVX2 and FMA
        }
        let dev = Device::Cpu;
        let h = Heads {
            q: 4,
            kv: 2,
            dim: 8,
        };
        let (b, t, k, f) = (2, 21, 32, 40);
        let keys: Vec<Vec<bool>> = vec![
            (0..t).map(|j| j < t - 5).collect(),
            (0..t).map(|j| j >= 3).collect(),
        ];
        let mask = Arc::new(KeyMask::new(&keys, 0).expect("mask"));
        let x = var(b * t * k, 1, 2.0, &[b, t, k]);
        let layers: Vec<Vec<Var>> = (1..=3).map(|l| layer_vars(l, h, k, f)).collect();
        let angles = Tensor::from_vec(hashed_values(b * t * h.dim, 6), (b, t, h.dim), &dev)
            .and_then(|a| a * 8.0)
            .expect("angles");
        let (cos, sin) = (angles.cos().expect("cos"), angles.sin().expect("sin"));
        let g = Tensor::from_vec(hashed_values(b * t * k, 7), (b, t, k), &dev).expect("g");
        let run = |y: Tensor, side: Option<&WeightGradients>| {
            let mut grads = (&y * &g)
                .and_then(|p| p.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            if let Some(side) = side {
                let pending = side.take().expect("take");
                assert_eq!(pending.len(), 3 * 9, "one gradient per weight");
                WeightGradients::add_to(pending, &mut grads).expect("add");
            }
            let mut out = vec![y];
            for v in std::iter::once(&x).chain(layers.iter().flatten()) {
                out.push(grads.get(v.as_tensor()).expect("grad").clone());
            }
            out
        };
        let ops: Vec<LayerOperands> = layers.iter().map(|l| operands(l)).collect();
        let stacked = |grads: Option<&Arc<WeightGradients>>| {
            super::stack(x.as_tensor(), &ops, EPS, h, (&cos, &sin), &mask, grads)
                .expect("op")
                .expect("served")
        };
        let through_cat = run(stacked(None), None);
        let side = Arc::new(WeightGradients::default());
        let handed = run(stacked(Some(&side)), Some(&side));
        assert!(!side.is_pending().expect("pending"));
        let mut y = x.as_tensor().clone();
        for l in &ops {
            let weights = [l.q, l.k, l.v, l.o];
            let norm = (l.input_norm, EPS);
            y = attention_block::block(&y, norm, weights, h, &cos, &sin, &mask)
                .expect("attention")
                .expect("served");
            y = swiglu::block(&y, (l.post_norm, EPS), l.gate, l.up, l.down).expect("mlp");
        }
        let layered = run(y, None);
        assert_eq!(through_cat.len(), 2 + 3 * 9);
        for (path, stacked) in [("cat", &through_cat), ("handed", &handed)] {
            for (i, (a, b)) in stacked.iter().zip(&layered).enumerate() {
                assert_eq!(a.dims(), b.dims(), "{path} case {i}");
                let (a, b) = (
                    a.flatten_all().and_then(|a| a.to_vec1::<f32>()).expect("a"),
                    b.flatten_all().and_then(|b| b.to_vec1::<f32>()).expect("b"),
                );
                assert!(a.iter().any(|v| *v != 0.0), "{path} case {i}: all zero");
                assert_eq!(a, b, "{path} case {i}");
            }
        }
    }

    /// Gradients handed past the graph and never collected make the next training forward an
    /// error (its weights would otherwise have learned nothing from that backward), and a
    /// weight's gradient is added to one its store already holds.
    #[test]
    fn uncollected_weight_gradients_are_an_error() {
        if !super::super::skinny::simd() {
            return;
        }
        let dev = Device::Cpu;
        let h = Heads {
            q: 2,
            kv: 1,
            dim: 8,
        };
        let (b, t, k, f) = (1, 9, 16, 24);
        let mask = Arc::new(KeyMask::new(&[vec![true; t]], 0).expect("mask"));
        let angles = Tensor::zeros((b, t, h.dim), candle_core::DType::F32, &dev).expect("angles");
        let x = var(b * t * k, 1, 1.0, &[b, t, k]);
        let layer = layer_vars(1, h, k, f);
        let ops = [operands(&layer)];
        let side = Arc::new(WeightGradients::default());
        let forward = || {
            super::stack(
                x.as_tensor(),
                &ops,
                EPS,
                h,
                (&angles, &angles),
                &mask,
                Some(&side),
            )
        };
        let y = forward().expect("op").expect("served");
        let loss = y.sum_all().expect("loss");
        let mut store = loss.backward().expect("backward");
        assert!(side.is_pending().expect("pending"));
        let err = forward().expect_err("a forward over uncollected gradients");
        assert!(err.to_string().contains("Llama::backward"), "{err}");
        // Collected into a store that already holds a gradient for q: the two add.
        let q = layer[1].as_tensor();
        let ones = Tensor::ones(q.shape(), candle_core::DType::F32, &dev).expect("ones");
        store.insert(q, ones.clone());
        let pending = side.take().expect("take");
        let handed = pending
            .iter()
            .find(|(w, _)| w.id() == q.id())
            .map(|(_, g)| g.clone())
            .expect("q's gradient");
        WeightGradients::add_to(pending, &mut store).expect("add");
        let sum = store.get(q).expect("q");
        let want = (handed + ones).expect("sum");
        assert_eq!(super::super::max_abs_diff(sum, &want), 0.0);
        assert!(forward().expect("collected").is_some());
    }

    /// A forward nothing can backpropagate through, and layers whose heads are not K wide, are
    /// left to the per-layer path.
    #[test]
    fn untracked_or_narrow_layers_are_declined() {
        let dev = Device::Cpu;
        let (b, t, k, f) = (1, 20, 16, 24);
        let keys = vec![vec![true; t]];
        let mask = Arc::new(KeyMask::new(&keys, 0).expect("mask"));
        let angles = Tensor::zeros((b, t, 8), candle_core::DType::F32, &dev).expect("angles");
        let x = Tensor::ones((b, t, k), candle_core::DType::F32, &dev).expect("x");
        let full = Heads {
            q: 2,
            kv: 1,
            dim: 8,
        };
        let frozen: Vec<Tensor> = layer_vars(1, full, k, f)
            .iter()
            .map(|v| v.as_tensor().detach())
            .collect();
        let vars: Vec<&Tensor> = frozen.iter().collect();
        let ops = [LayerOperands {
            input_norm: vars[0],
            q: vars[1],
            k: vars[2],
            v: vars[3],
            o: vars[4],
            post_norm: vars[5],
            gate: vars[6],
            up: vars[7],
            down: vars[8],
        }];
        let got =
            super::stack(&x, &ops, EPS, full, (&angles, &angles), &mask, None).expect("no error");
        assert!(got.is_none(), "untracked");
        let narrow = Heads {
            q: 1,
            kv: 1,
            dim: 8,
        };
        let tracked = layer_vars(1, narrow, k, f);
        let ops = [operands(&tracked)];
        let got =
            super::stack(&x, &ops, EPS, narrow, (&angles, &angles), &mask, None).expect("no error");
        assert!(got.is_none(), "H·D = 8 against K = 16");
        let got =
            super::stack(&x, &[], EPS, full, (&angles, &angles), &mask, None).expect("no error");
        assert!(got.is_none(), "no layers");
    }
}
