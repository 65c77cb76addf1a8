//! A decoder layer's MLP half with its norm and residual, `x + down(silu(gate(n)) · up(n))`
//! for `n = rms_norm(x)`, as one graph node, for f32 training and prefill on CPU.
//!
//! Composed, the same is six nodes (the norm, gate, up, their product, down, the residual
//! add), and candle's backward gives every node's input a gradient of its own: it zeroes a
//! tensor, then adds the op's gradient into it (`GradStore::or_insert` + `add`). In model R's
//! training step those zeroings and adds over `[rows, ffn]` activations, and the fresh
//! allocations each one takes, were ~15% of the time, on one thread. Here the backward runs
//! the three products' gradients straight into buffers of its own, computes the gate's and
//! up's gradients in one pass over the forward's pre-activations (overwriting them: the
//! forward's state is the backward's working space), and hands candle only the three
//! gradients it asks for: x's, the stacked weight's and down's. The stacked weight is gate's
//! and up's rows and, as its last row, the norm's weight (`[2F + 1, K]`): an op takes at most
//! three operands.
//!
//! The products are gemm's, as candle's: gate and up run as one product against the two
//! weights stacked, so their outputs and the input's gradient are sums over other blocks than
//! the composed path's, and the results agree with it to rounding, not to the bit
//! (`the_fused_mlp_is_the_composed_one`). Every sum runs in a fixed order, so runs repeat
//! exactly.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::fused::{self, gemm_into, gemm_new, Mat};
use super::wide;

/// What the forward leaves for the backward: the normalized input (`[M, K]`), the gate and up
/// pre-activations (`[M, 2F]`, a row's gate then its up) and the product `silu(gate) · up`
/// (`[M, F]`).
pub(crate) struct Saved {
    normed: Vec<f32>,
    gate_up: Vec<f32>,
    hidden: Vec<f32>,
}

/// The op: x `[.., K]`, gate, up and the norm's weight stacked `[2F + 1, K]`, down `[K, F]`
/// -> `[.., K]`.
pub(crate) struct SwiGlu {
    /// The norm's epsilon.
    eps: f64,
    saved: fused::ForwardState<Saved>,
}

/// `(M, K, F)` from the operands' shapes.
fn dims(x: &[usize], gate_up: &[usize], down: &[usize]) -> Result<(usize, usize, usize)> {
    let k = x.last().copied().unwrap_or(0);
    let ok = match (gate_up, down) {
        ([f2, kg], [kd, f]) => *kg == k && *kd == k && *f2 == 2 * *f + 1 && k > 0,
        _ => false,
    };
    if !ok {
        candle_core::bail!(
            "klong-swiglu: x {x:?}, gate/up {gate_up:?} and down {down:?} do not agree"
        );
    }
    let f = down[1];
    Ok((x.iter().product::<usize>() / k, k, f))
}

/// Rows of the `[M, 2F]` pre-activations handed to one elementwise unit.
const ROWS_PER_UNIT: usize = 8;

impl SwiGlu {
    /// An op with the norm's epsilon.
    pub(crate) fn new(eps: f64) -> SwiGlu {
        SwiGlu {
            eps,
            saved: fused::ForwardState::new("klong-swiglu"),
        }
    }

    /// `x + down(silu(gate(n)) · up(n))` `[M, K]` over the operands' data (x `[M, K]`, gate,
    /// up and the norm's weight stacked `[2F + 1, K]`, down `[K, F]`), and what its backward
    /// needs.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        w_stacked: &[f32],
        w_down: &[f32],
        (m, k, f): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Saved)> {
        if x.len() != m * k || w_stacked.len() != (2 * f + 1) * k || w_down.len() != k * f {
            candle_core::bail!("klong-swiglu: operands' data do not match [{m}, {k}] and {f}");
        }
        let (w_gu, w_norm) = w_stacked.split_at(2 * f * k);
        let normed = fused::rms_forward(x, w_norm, self.eps);
        // [M, K] · [K, 2F]: both pre-activations in one product.
        let gate_up = gemm_new(m, k, 2 * f, Mat::rows(&normed, k), Mat::transposed(w_gu, k))?;
        let (hidden, _) = fused::written(m * f, f, |first, out| {
            wide::run(SiluRows {
                gate_up: &gate_up,
                f,
                first,
                out,
            })
        });
        // x + [M, F] · [F, K]
        let mut out = fused::copied(x);
        let product = (m, f, k);
        gemm_into(
            &mut out,
            true,
            product,
            Mat::rows(&hidden, f),
            Mat::transposed(w_down, f),
        )?;
        Ok((
            out,
            Saved {
                normed,
                gate_up,
                hidden,
            },
        ))
    }

    /// The gradients of x, of the stacked gate/up/norm weight and of down from the forward's
    /// state and the output's gradient `g` `[M, K]`.
    pub(crate) fn backward(
        &self,
        saved: Saved,
        x: &[f32],
        w_stacked: &[f32],
        w_down: &[f32],
        g: &[f32],
        (m, k, f): (usize, usize, usize),
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let Saved {
            normed,
            gate_up: mut d_gate_up,
            hidden,
        } = saved;
        if d_gate_up.len() != m * 2 * f || hidden.len() != m * f || normed.len() != m * k {
            candle_core::bail!("klong-swiglu: the forward's state is not [{m}, 2·{f}]");
        }
        if x.len() != m * k
            || g.len() != m * k
            || w_stacked.len() != (2 * f + 1) * k
            || w_down.len() != k * f
        {
            candle_core::bail!("klong-swiglu: backward operands do not match [{m}, {k}] and {f}");
        }
        let (w_gu, w_norm) = w_stacked.split_at(2 * f * k);
        // d down [K, F] = gᵀ · hidden
        let d_down = gemm_new(k, m, f, Mat::transposed(g, k), Mat::rows(&hidden, f))?;
        // d hidden [M, F] = g · down, into hidden's memory (now spent).
        let mut d_hidden = hidden;
        gemm_into(
            &mut d_hidden,
            false,
            (m, k, f),
            Mat::rows(g, k),
            Mat::rows(w_down, f),
        )?;
        // The pre-activations become their gradients, row by row.
        fused::par_rows(&mut d_gate_up, 2 * f * ROWS_PER_UNIT, |unit, rows| {
            wide::run(SiluGradRows {
                rows,
                d_hidden: &d_hidden,
                f,
                first: unit * ROWS_PER_UNIT,
            })
        });
        // d (gate; up) [2F, K] = d_gate_upᵀ · normed
        let mut d_w_gu = gemm_new(
            2 * f,
            m,
            k,
            Mat::transposed(&d_gate_up, 2 * f),
            Mat::rows(&normed, k),
        )?;
        // d normed [M, K] = d_gate_up · (gate; up), into normed's memory.
        let mut d_normed = normed;
        gemm_into(
            &mut d_normed,
            false,
            (m, 2 * f, k),
            Mat::rows(&d_gate_up, 2 * f),
            Mat::rows(w_gu, k),
        )?;
        let norm = (w_norm, self.eps);
        let (dx, d_norm) = fused::pre_norm_residual_backward(x, norm, &d_normed, g);
        d_w_gu.extend_from_slice(&d_norm);
        Ok((dx, d_w_gu, d_down))
    }
}

impl CustomOp3 for SwiGlu {
    fn name(&self) -> &'static str {
        "klong-swiglu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        gate_up: &CpuStorage,
        lgu: &Layout,
        down: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mkf = dims(lx.dims(), lgu.dims(), ld.dims())?;
        let x = fused::slice::<f32>(x, lx)?;
        let w_stacked = fused::slice::<f32>(gate_up, lgu)?;
        let w_down = fused::slice::<f32>(down, ld)?;
        let (out, saved) = self.forward(x, w_stacked, w_down, mkf)?;
        self.saved.put(saved)?;
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mkf = dims(x.dims(), gate_up.dims(), down.dims())?;
        let saved = self.saved.take()?;
        let (dx, d_w_gu, d_down) =
            fused::with_f32s([x, gate_up, down, g], |[x, w_stacked, w_down, g]| {
                self.backward(saved, x, w_stacked, w_down, g, mkf)
            })?;
        Ok((
            fused::like(dx, x)?,
            fused::like(d_w_gu, gate_up)?,
            fused::like(d_down, down)?,
        ))
    }
}

/// SwiGLU's hidden rows `silu(gate) · up` of a run of rows from `first` on, into `out`, from
/// the pre-activations `[M, 2F]` (a [`wide::Kernel`]).
struct SiluRows<'a, 'b, 'c> {
    gate_up: &'a [f32],
    f: usize,
    first: usize,
    out: &'b mut fused::Fill<'c, f32>,
}

impl wide::Kernel for SiluRows<'_, '_, '_> {
    type Out = ();
    #[inline(always)]
    fn call(self) {
        let SiluRows {
            gate_up,
            f,
            first,
            out,
        } = self;
        let (mut e, mut h) = (Vec::with_capacity(f), vec![0f32; f]);
        for i in 0..out.len() / f.max(1) {
            let row = &gate_up[(first + i) * 2 * f..(first + i + 1) * 2 * f];
            fused::silu_mul_into(&row[..f], &row[f..], &mut e, &mut h);
            out.extend(&h);
        }
    }
}

/// SwiGLU's backward over a run of rows from `first` on: each row of pre-activations
/// `[2F]` becomes its gradient, from the hidden row's gradient (a [`wide::Kernel`]).
struct SiluGradRows<'a, 'b> {
    rows: &'a mut [f32],
    d_hidden: &'b [f32],
    f: usize,
    first: usize,
}

impl wide::Kernel for SiluGradRows<'_, '_> {
    type Out = ();
    #[inline(always)]
    fn call(self) {
        let SiluGradRows {
            rows,
            d_hidden,
            f,
            first,
        } = self;
        let mut e = Vec::with_capacity(f);
        for (i, row) in rows.chunks_exact_mut(2 * f).enumerate() {
            let dh = &d_hidden[(first + i) * f..(first + i + 1) * f];
            silu_mul_grads(row, dh, &mut e);
        }
    }
}

/// One row's `[gate; up]` (2F) overwritten by their gradients, from the hidden's gradient
/// `dh` (F): with σ = sigmoid(gate), d gate = dh · up · σ · (1 + gate · (1 − σ)) and
/// d up = dh · gate / (1 + exp(−gate)), the formulas (and operation order) of the composed
/// path's `silu_mul` backward. `e` is working space.
#[inline(always)]
fn silu_mul_grads(row: &mut [f32], dh: &[f32], e: &mut Vec<f32>) {
    let (gate, up) = row.split_at_mut(dh.len());
    e.clear();
    e.extend(gate.iter().map(|x| -*x));
    super::vexp::exp_in_place(e);
    for (((a, u), &g), &ex) in gate.iter_mut().zip(up.iter_mut()).zip(dh).zip(e.iter()) {
        let x = *a;
        let sg = 1.0 / (1.0 + ex);
        *a = g * *u * sg * (1.0 + x * (1.0 - sg));
        *u = g * (x / (1.0 + ex));
    }
}

/// Whether the fused MLP serves these operands (f32 on CPU, not switched off).
pub(crate) fn serves(x: &Tensor, weights: [&Tensor; 4]) -> bool {
    fused::supported(x, fused::Kind::SwiGlu)
        && x.dtype() == DType::F32
        && weights
            .iter()
            .all(|w| w.dtype() == DType::F32 && w.device().is_cpu())
}

/// `x + down(silu(n · gateᵀ) · (n · upᵀ))` for `n = rms_norm(x; norm, eps)`, x `[.., K]`,
/// norm `[K]`, gate and up `[F, K]`, down `[K, F]`, as one graph node (the weights stacked by
/// a `cat` node, whose backward splits their gradient).
pub(crate) fn block(
    x: &Tensor,
    (norm, eps): (&Tensor, f64),
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &stacked(norm, gate, up)?,
        &down.contiguous()?,
        SwiGlu::new(eps),
    )
}

/// Gate's, up's and the norm's weights stacked `[2F + 1, K]` (a `cat` node, whose backward
/// splits their gradient).
pub(crate) fn stacked(norm: &Tensor, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[gate, up, &norm.reshape((1, ()))?], 0)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use crate::policy::hashed_values as values;

    const EPS: f64 = 1e-5;

    /// The composed path: the fused norm, three products, silu, the residual add.
    fn composed(x: &Tensor, norm: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Tensor {
        let (b, t, k) = x.dims3().expect("dims");
        let normed = crate::policy::fused::rms_norm(x, norm, EPS).expect("norm");
        let rows = normed.reshape((b * t, k)).expect("rows");
        let g = rows.matmul(&gate.t().expect("t")).expect("gate");
        let u = rows.matmul(&up.t().expect("t")).expect("up");
        let h = (g.silu().expect("silu") * u).expect("h");
        h.matmul(&down.t().expect("t"))
            .and_then(|y| y.reshape((b, t, k)))
            .and_then(|y| x + y)
            .expect("down")
    }

    /// The one-node MLP half gives the composed path's output and the gradients of x and of
    /// every weight (the norm's too), to rounding (the products sum over other blocks), on
    /// shapes that are not multiples of any kernel's width.
    #[test]
    fn the_fused_mlp_is_the_composed_one() {
        let dev = Device::Cpu;
        let (b, t, k, f) = (3, 23, 40, 56);
        let var = |n: usize, seed: u32, shape: (usize, usize)| {
            Var::from_vec(values(n, seed), shape, &dev).expect("var")
        };
        let x = Var::from_vec(values(b * t * k, 1), (b, t, k), &dev).expect("x");
        let gate = var(f * k, 2, (f, k));
        let up = var(f * k, 3, (f, k));
        let down = var(k * f, 4, (k, f));
        let norm =
            Var::from_vec(values(k, 6).iter().map(|v| 1.0 + v).collect(), k, &dev).expect("norm");
        let g = Tensor::from_vec(values(b * t * k, 5), (b, t, k), &dev).expect("g");
        let run = |y: Tensor| {
            let grads = (&y * &g)
                .and_then(|p| p.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            let mut out = vec![y];
            for v in [&x, &norm, &gate, &up, &down] {
                out.push(grads.get(v.as_tensor()).expect("grad").clone());
            }
            out
        };
        let fused = super::block(x.as_tensor(), (&norm, EPS), &gate, &up, &down);
        let fused = run(fused.expect("fused"));
        let plain = run(composed(x.as_tensor(), &norm, &gate, &up, &down));
        for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
            let scale = b
                .abs()
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.max(0))
                .and_then(|t| t.to_scalar::<f32>())
                .expect("scale");
            let diff = crate::policy::max_abs_diff(a, b);
            assert!(scale > 0.0, "case {i}: all zero");
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "case {i}: {diff} against {scale}"
            );
        }
    }

    /// A second backward over one forward has no state to run on: an error, not a wrong
    /// gradient.
    #[test]
    fn a_second_backward_is_an_error() {
        let dev = Device::Cpu;
        let (k, f) = (8, 12);
        let x = Var::from_vec(values(4 * k, 1), (1, 4, k), &dev).expect("x");
        let w = |n, s, shape| Var::from_vec(values(n, s), shape, &dev).expect("w");
        let (gate, up, down) = (
            w(f * k, 2, (f, k)),
            w(f * k, 3, (f, k)),
            w(k * f, 4, (k, f)),
        );
        let norm = Tensor::ones(k, candle_core::DType::F32, &dev).expect("norm");
        let y = super::block(x.as_tensor(), (&norm, EPS), &gate, &up, &down).expect("mlp");
        let loss = y.sum_all().expect("sum");
        assert!(loss.backward().is_ok());
        let err = loss.backward().expect_err("second backward");
        assert!(err.to_string().contains("twice"), "{err}");
    }

    /// Shapes that do not agree are an error that names them.
    #[test]
    fn mismatched_weights_are_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &dev).expect("x");
        let gate = Tensor::zeros((12, 8), candle_core::DType::F32, &dev).expect("gate");
        let down = Tensor::zeros((8, 10), candle_core::DType::F32, &dev).expect("down");
        let norm = Tensor::ones(8, candle_core::DType::F32, &dev).expect("norm");
        let err = super::block(&x, (&norm, EPS), &gate, &gate, &down).expect_err("mismatch");
        assert!(err.to_string().contains("do not agree"), "{err}");
    }
}
