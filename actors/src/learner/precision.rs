//! Mixed precision: compute in bf16 (or f16), keep the master weights and optimizer moments
//! in f32.
//!
//! The model is built over a second `VarMap` of compute-dtype copies of the master weights.
//! A step is: `sync` (cast masters into the compute copies), forward and backward in the
//! compute dtype (cast the logits to f32 before the loss), `master_grads` (the compute
//! gradients widened to f32, in the optimizer's order), then `AdamW::step` on the masters. The
//! update is applied in f32, so small updates are not rounded away as they would be in bf16
//! weights; the model file never changes (`Llama` is dtype-generic).
//!
//! With an f32 compute dtype there is nothing to do: `new` refuses it, so that callers use the
//! masters directly instead of paying for a copy.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Var};
use candle_nn::VarMap;

use super::optim::{AdamW, Grads};

pub struct MixedPrecision {
    dtype: DType,
    /// Master (f32) and compute copy, by name, sorted by name.
    pairs: Vec<(String, Var, Var)>,
    compute: VarMap,
}

impl MixedPrecision {
    /// Compute-dtype copies of every variable of `master` (which must be f32).
    pub fn new(master: &VarMap, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::BF16 | DType::F16) {
            candle_core::bail!("mixed precision computes in bf16 or f16, not {dtype:?}");
        }
        let compute = VarMap::new();
        let mut pairs = Vec::new();
        {
            let masters = master
                .data()
                .lock()
                .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
            let mut copies = compute
                .data()
                .lock()
                .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
            for (name, m) in masters.iter() {
                if m.dtype() != DType::F32 {
                    candle_core::bail!("master weight {name} is {:?}, not f32", m.dtype());
                }
                let c = Var::from_tensor(&m.as_tensor().to_dtype(dtype)?)?;
                copies.insert(name.clone(), c.clone());
                pairs.push((name.clone(), m.clone(), c));
            }
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(MixedPrecision {
            dtype,
            pairs,
            compute,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The compute copies: build the model with
    /// `VarBuilder::from_varmap(mp.compute(), mp.dtype(), device)`.
    pub fn compute(&self) -> &VarMap {
        &self.compute
    }

    /// Casts the masters into the compute copies (after every optimizer step).
    pub fn sync(&self) -> Result<()> {
        for (_, master, copy) in &self.pairs {
            copy.set(&master.as_tensor().to_dtype(self.dtype)?)?;
        }
        Ok(())
    }

    /// The gradients of a backward pass through the compute copies, widened to f32, in the
    /// order of `opt`'s parameters (which must be the masters).
    pub fn master_grads(&self, store: &GradStore, opt: &AdamW) -> Result<Grads> {
        let mut out = Vec::new();
        for name in opt.names() {
            let i = self
                .pairs
                .binary_search_by(|p| p.0.as_str().cmp(name))
                .map_err(|_| {
                    candle_core::Error::msg(format!(
                        "optimizer parameter {name} has no compute copy"
                    ))
                })?;
            let g = match store.get(self.pairs[i].2.as_tensor()) {
                Some(g) => Some(g.to_dtype(DType::F32)?),
                None => None,
            };
            out.push(g);
        }
        Ok(Grads(out))
    }
}
