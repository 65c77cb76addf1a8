//! AdamW, the learning-rate schedule, gradient clipping and accumulation, and the export /
//! import of weights and optimizer state as named tensors (what checkpoints store).
//!
//! Gradients are held as `Grads`: one optional tensor per parameter, in the optimizer's
//! parameter order. candle's `GradStore` is keyed by tensor id and cannot be built empty from
//! outside, so summing micro-batches and clipping work on this plain form instead.

use std::collections::BTreeMap;

use candle_core::{
    backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var,
};
use candle_nn::VarMap;
use rayon::prelude::*;

use crate::policy::fused;

/// Named-tensor key of the step count in an export.
pub const STEP_KEY: &str = "optim.step";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// PyTorch's AdamW defaults.
    fn default() -> Self {
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One gradient (or none) per optimizer parameter, in `AdamW::names()` order.
#[derive(Debug, Clone)]
pub struct Grads(pub Vec<Option<Tensor>>);

/// AdamW (Loshchilov & Hutter) as PyTorch computes it: decoupled weight decay
/// `θ ← θ(1 − lr·wd)`, then `θ ← θ − lr · m̂ / (√v̂ + eps)` with bias-corrected moments.
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Var>,
    v: Vec<Var>,
    step: u64,
    pub hp: AdamWParams,
}

impl AdamW {
    /// Over named variables; sorted by name so that the order (and exports) are stable.
    pub fn new(mut params: Vec<(String, Var)>, hp: AdamWParams) -> Result<Self> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |v: &Var| Var::zeros(v.shape(), v.dtype(), v.device());
        let m = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<_>>()?;
        Ok(AdamW {
            params,
            m,
            v,
            step: 0,
            hp,
        })
    }

    /// Over every variable of a `VarMap` (named by their HF names).
    pub fn from_varmap(vm: &VarMap, hp: AdamWParams) -> Result<Self> {
        let data = vm
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
        let params = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        drop(data);
        Self::new(params, hp)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|(n, _)| n.as_str())
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.params.iter().map(|(_, v)| v)
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.hp.lr = lr;
    }

    /// The gradients of this optimizer's parameters out of a backward pass.
    pub fn grads_from(&self, store: &GradStore) -> Grads {
        Grads(
            self.params
                .iter()
                .map(|(_, v)| store.get(v.as_tensor()).cloned())
                .collect(),
        )
    }

    /// One update. Parameters without a gradient are left alone (moments included), as
    /// PyTorch does for parameters whose `.grad` is None.
    pub fn step(&mut self, grads: &Grads) -> Result<()> {
        if grads.0.len() != self.params.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.0.len(),
                self.params.len()
            );
        }
        self.step += 1;
        let AdamWParams {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.hp;
        let t = self.step as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        for (((_, p), (m, v)), g) in self
            .params
            .iter()
            .zip(self.m.iter().zip(&self.v))
            .zip(&grads.0)
        {
            let Some(g) = g else { continue };
            let g = g.to_dtype(p.dtype())?;
            if fused::supported(p.as_tensor(), fused::Kind::AdamW) {
                match p.dtype() {
                    DType::F32 => fused_adamw::<f32>(p, m, v, &g, &self.hp, bc1, bc2)?,
                    _ => fused_adamw::<f64>(p, m, v, &g, &self.hp, bc1, bc2)?,
                }
                continue;
            }
            let m_new = ((m.as_tensor() * beta1)? + (&g * (1.0 - beta1))?)?;
            let v_new = ((v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((&v_new / bc2)?.sqrt()? + eps)?;
            let upd = ((&m_new / bc1)? / denom)?;
            let decayed = (p.as_tensor() * (1.0 - lr * weight_decay))?;
            p.set(&(decayed - (upd * lr)?)?)?;
            m.set(&m_new)?;
            v.set(&v_new)?;
        }
        Ok(())
    }

    /// Weights by name, moments as `optim.m.<name>` / `optim.v.<name>`, and the step count
    /// (`optim.step`, an i64 scalar). Copies, so later steps do not change an export.
    pub fn export(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for ((name, p), (m, v)) in self.params.iter().zip(self.m.iter().zip(&self.v)) {
            out.insert(name.clone(), p.as_tensor().copy()?);
            out.insert(format!("optim.m.{name}"), m.as_tensor().copy()?);
            out.insert(format!("optim.v.{name}"), v.as_tensor().copy()?);
        }
        let step = i64::try_from(self.step).map_err(candle_core::Error::wrap)?;
        let device = self
            .params
            .first()
            .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
        out.insert(STEP_KEY.to_string(), Tensor::new(step, &device)?);
        Ok(out)
    }

    /// Restores an `export`. Every parameter must be present with its shape; extra names are
    /// an error too (a checkpoint of another model should not load half-way silently).
    /// Nothing is changed unless everything checks out.
    pub fn import(&mut self, named: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |key: &str, like: &Var| -> Result<Tensor> {
            let t = named
                .get(key)
                .ok_or_else(|| candle_core::Error::msg(format!("missing tensor {key}")))?;
            if t.dims() != like.dims() {
                candle_core::bail!(
                    "tensor {key}: shape {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                );
            }
            t.to_dtype(like.dtype())
        };
        let mut staged = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            staged.push((
                get(name, p)?,
                get(&format!("optim.m.{name}"), p)?,
                get(&format!("optim.v.{name}"), p)?,
            ));
        }
        let step = named
            .get(STEP_KEY)
            .ok_or_else(|| candle_core::Error::msg(format!("missing tensor {STEP_KEY}")))?
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()?;
        let step = u64::try_from(step).map_err(candle_core::Error::wrap)?;
        if named.len() != 3 * self.params.len() + 1 {
            candle_core::bail!(
                "{} tensors given, expected {} (unknown names present)",
                named.len(),
                3 * self.params.len() + 1
            );
        }
        for (((_, p), (m, v)), (tp, tm, tv)) in self
            .params
            .iter()
            .zip(self.m.iter().zip(&self.v))
            .zip(staged)
        {
            p.set(&tp)?;
            m.set(&tm)?;
            v.set(&tv)?;
        }
        self.step = step;
        Ok(())
    }
}

/// One AdamW update of one parameter, in place (CPU f32/f64), with the same operations in the
/// same order as the tensor path of `AdamW::step`: three passes (first moment, second moment,
/// parameter) that write into the tensors' own storage. A pass that built new parameter and
/// moment vectors (zeroed first) and copied them in with `Var::set` moved ~1.6x the bytes.
fn fused_adamw<T: fused::Real>(
    p: &Var,
    m: &Var,
    v: &Var,
    g: &Tensor,
    hp: &AdamWParams,
    bc1: f64,
    bc2: f64,
) -> Result<()> {
    let c = |x: f64| T::from_f64(x);
    let g = g.contiguous()?;
    m.as_tensor().inplace_op2(
        &g,
        &Moment {
            keep: c(hp.beta1),
            take: c(1.0 - hp.beta1),
            square: false,
        },
    )?;
    v.as_tensor().inplace_op2(
        &g,
        &Moment {
            keep: c(hp.beta2),
            take: c(1.0 - hp.beta2),
            square: true,
        },
    )?;
    p.as_tensor().inplace_op3(
        m.as_tensor(),
        v.as_tensor(),
        &Update {
            decay: c(1.0 - hp.lr * hp.weight_decay),
            lr: c(hp.lr),
            inv_bc1: c(1.0 / bc1),
            inv_bc2: c(1.0 / bc2),
            eps: c(hp.eps),
        },
    )
}

/// Elements per parallel chunk of an in-place update.
const CHUNK: usize = 1 << 14;

/// A contiguous CPU tensor's elements, for writing in place.
fn data_mut<'a, T: fused::Real>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut T::storage_mut(s)?[a..b]),
        None => candle_core::bail!("AdamW: non-contiguous parameter or moment"),
    }
}

/// A moment's update in place: `m = m·keep + g·take`, or `v = v·keep + g·g·take`.
struct Moment<T> {
    keep: T,
    take: T,
    square: bool,
}

impl<T: fused::Real> InplaceOp2 for Moment<T> {
    fn name(&self) -> &'static str {
        "klong-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<()> {
        let m = data_mut::<T>(dst, dst_l)?;
        let g = fused::slice::<T>(g, g_l)?;
        if g.len() != m.len() {
            candle_core::bail!("gradient of {} elements for {}", g.len(), m.len());
        }
        let (keep, take, square) = (self.keep, self.take, self.square);
        // Elementwise, so the split among threads changes no result.
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                let pairs = m.iter_mut().zip(g);
                if square {
                    pairs.for_each(|(m, &gi)| *m = *m * keep + gi * gi * take);
                } else {
                    pairs.for_each(|(m, &gi)| *m = *m * keep + gi * take);
                }
            });
        Ok(())
    }
}

/// The parameter's update in place from its new moments:
/// `p = p·decay − lr · (m·inv_bc1) / (√(v·inv_bc2) + eps)`.
struct Update<T> {
    decay: T,
    lr: T,
    inv_bc1: T,
    inv_bc2: T,
    eps: T,
}

impl<T: fused::Real> InplaceOp3 for Update<T> {
    fn name(&self) -> &'static str {
        "klong-adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<()> {
        let p = data_mut::<T>(dst, dst_l)?;
        let (m, v) = (fused::slice::<T>(m, m_l)?, fused::slice::<T>(v, v_l)?);
        if m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!(
                "moments of {} and {} elements for {}",
                m.len(),
                v.len(),
                p.len()
            );
        }
        let Update {
            decay,
            lr,
            inv_bc1,
            inv_bc2,
            eps,
        } = *self;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &mi), &vi) in p.iter_mut().zip(m).zip(v) {
                    let denom = (vi * inv_bc2).sqrt() + eps;
                    let upd = mi * inv_bc1 / denom;
                    *p = *p * decay - upd * lr;
                }
            });
        Ok(())
    }
}

/// Global L2 norm of all gradients (computed in f64 on the host).
pub fn global_grad_norm(grads: &Grads) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.0.iter().flatten() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales all gradients so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, applied only when it is < 1).
/// Returns the norm before clipping, which training logs.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.0.iter_mut().flatten() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

/// Sums gradients over micro-batches, each scaled (e.g. by its share of the batch's tokens),
/// so that the accumulated gradient equals the one of the whole batch.
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n_params: usize) -> Self {
        GradAccumulator {
            sums: vec![None; n_params],
        }
    }

    pub fn add(&mut self, grads: &Grads, scale: f64) -> Result<()> {
        if grads.0.len() != self.sums.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.0.len(),
                self.sums.len()
            );
        }
        for (s, g) in self.sums.iter_mut().zip(&grads.0) {
            let Some(g) = g else { continue };
            // A scale of 1 (gradients weighted in the loss already) costs no pass.
            let g = if scale == 1.0 {
                g.clone()
            } else {
                (g * scale)?
            };
            *s = Some(match s.take() {
                Some(prev) => (prev + g)?,
                None => g,
            });
        }
        Ok(())
    }

    pub fn finish(self) -> Grads {
        Grads(self.sums)
    }
}

/// Linear warmup then cosine decay to `min_ratio · peak_lr` at `total_steps` (constant after).
/// `lr(s)` is the rate of update number `s` (0-based); warmup gives `peak · (s+1)/warmup`, so
/// the first update is not wasted at lr 0 and step `warmup − 1` reaches the peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_ratio: f64,
}

impl LrSchedule {
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        self.peak_lr * (self.min_ratio + (1.0 - self.min_ratio) * cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place update gives, bit for bit, PyTorch's AdamW formulas evaluated in f32 in
    /// the tensor path's order, over a parameter of several parallel chunks and two steps;
    /// a parameter without a gradient keeps its value and moments.
    #[test]
    fn in_place_update_is_the_formula_to_the_bit() {
        let n = 2 * CHUNK + 123;
        let start = crate::policy::hashed_values(n, 1);
        let p = Var::from_vec(start.clone(), n, &Device::Cpu).expect("p");
        let idle = Var::from_vec(vec![0.5f32; 3], 3, &Device::Cpu).expect("idle");
        let hp = AdamWParams {
            lr: 0.01,
            weight_decay: 0.1,
            ..AdamWParams::default()
        };
        let mut opt = AdamW::new(
            vec![("p".into(), p.clone()), ("q".into(), idle.clone())],
            hp,
        )
        .expect("opt");
        let (mut want, mut m, mut v) = (start, vec![0f32; n], vec![0f32; n]);
        for t in 1..=2 {
            let g = crate::policy::hashed_values(n, 10 + t);
            let grad = Tensor::from_vec(g.clone(), n, &Device::Cpu).expect("g");
            opt.step(&Grads(vec![Some(grad), None])).expect("step");
            let (bc1, bc2) = (1.0 - hp.beta1.powi(t as i32), 1.0 - hp.beta2.powi(t as i32));
            let f = |x: f64| x as f32;
            for i in 0..n {
                m[i] = m[i] * f(hp.beta1) + g[i] * f(1.0 - hp.beta1);
                v[i] = v[i] * f(hp.beta2) + g[i] * g[i] * f(1.0 - hp.beta2);
                let denom = (v[i] * f(1.0 / bc2)).sqrt() + f(hp.eps);
                let upd = m[i] * f(1.0 / bc1) / denom;
                want[i] = want[i] * f(1.0 - hp.lr * hp.weight_decay) - upd * f(hp.lr);
            }
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let got = p.as_tensor().to_vec1::<f32>().expect("p");
        assert_eq!(bits(&got), bits(&want), "parameter");
        let export = opt.export().expect("export");
        let moment = |k: &str| export[k].to_vec1::<f32>().expect("moment");
        assert_eq!(bits(&moment("optim.m.p")), bits(&m), "first moment");
        assert_eq!(bits(&moment("optim.v.p")), bits(&v), "second moment");
        assert_eq!(idle.as_tensor().to_vec1::<f32>().expect("q"), vec![0.5; 3]);
        assert_eq!(moment("optim.m.q"), vec![0.0; 3]);
    }
}
