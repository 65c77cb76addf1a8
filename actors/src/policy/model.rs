//! The Llama-family decoder that every policy and learner runs: token embedding, RMSNorm, RoPE
//! (with Llama-3 frequency scaling), grouped-query attention with a causal mask, SwiGLU MLP,
//! and the variants' options (tied embeddings, Qwen2 attention biases, Qwen3 q/k norms).
//!
//! One `forward` serves training (full sequences, gradients through a `VarMap`) and inference
//! (a `KvCache`, incremental decode, left-padded batches). Tensor names are Hugging Face's, so
//! a `VarBuilder` over safetensors loads HF checkpoints unchanged.
//!
//! Norms and softmax are composed from basic tensor ops on purpose: in candle 0.11 the fused
//! `candle_nn::RmsNorm` and `softmax_last_dim` have no backward pass on CPU, so a model built on
//! them trains silently wrong (see design.md §13; the finite-difference test guards this).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// Llama-3 style RoPE frequency scaling (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    #[serde(default = "default_low_freq_factor")]
    pub low_freq_factor: f64,
    #[serde(default = "default_high_freq_factor")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max_pos")]
    pub original_max_position_embeddings: usize,
    /// HF writes "llama3"; other kinds (linear, dynamic, yarn) are not supported and are
    /// refused by `LlamaConfig::validate` rather than silently treated as Llama-3.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "type")]
    pub rope_type: Option<String>,
}

fn default_low_freq_factor() -> f64 {
    1.0
}
fn default_high_freq_factor() -> f64 {
    4.0
}
fn default_original_max_pos() -> usize {
    8192
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

/// A model's configuration, with the field names of Hugging Face's `config.json` (Llama,
/// Qwen2, Qwen3, SmolLM2). Unknown fields are ignored so real config files parse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in older Llama configs, where it equals `num_attention_heads` (no GQA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Qwen3 sets it explicitly (it need not be hidden_size / heads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2: biases on q/k/v projections (never on o_proj).
    #[serde(default)]
    pub attention_bias: bool,
    /// Qwen3: RMSNorm over each head's q and k (`self_attn.q_norm` / `k_norm` weights). HF
    /// derives this from `model_type: qwen3`; the loader sets it from there, and it is
    /// written out under this name.
    #[serde(default)]
    pub use_qk_norm: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// HF allows a single id or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<EosTokenId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EosTokenId {
    One(u32),
    Many(Vec<u32>),
}

impl LlamaConfig {
    /// A tiny configuration for tests and from-scratch experiments.
    pub fn tiny(vocab_size: usize) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            attention_bias: false,
            use_qk_norm: false,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Cross-field checks, so a bad config fails here with a message, not as a shape error
    /// deep inside a forward pass.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let pos = |v: usize, name: &str| {
            if v == 0 {
                Err(format!("{name} must be positive"))
            } else {
                Ok(())
            }
        };
        pos(self.vocab_size, "vocab_size")?;
        pos(self.hidden_size, "hidden_size")?;
        pos(self.intermediate_size, "intermediate_size")?;
        pos(self.num_attention_heads, "num_attention_heads")?;
        pos(self.num_kv_heads(), "num_key_value_heads")?;
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return Err(format!("head_dim ({hd}) must be positive and even (RoPE)"));
        }
        if self.head_dim.is_none() && hd * self.num_attention_heads != self.hidden_size {
            return Err(format!(
                "hidden_size ({}) is not divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if let Some(s) = &self.rope_scaling {
            match s.rope_type.as_deref() {
                None | Some("llama3") => {}
                Some(other) => return Err(format!("rope_scaling type {other:?} is not supported")),
            }
            if s.low_freq_factor >= s.high_freq_factor {
                return Err("rope_scaling: low_freq_factor must be < high_freq_factor".into());
            }
        }
        Ok(())
    }

    /// RoPE inverse frequencies, with Llama-3 scaling when configured (the same piecewise
    /// rule as transformers' `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

/// Additive mask value for keys a query must not see. Finite (not -inf) so that a query row
/// with no visible key (a pad position in a left-padded batch) gives a uniform distribution
/// instead of NaN; such rows are never read.
const MASKED: f32 = -1e9;

/// RMSNorm composed from basic ops (the fused one has no gradient in candle 0.11 CPU).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(RmsNorm { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::supported(x, fused::Kind::RmsNorm) && self.weight.dtype() == x.dtype() {
            return fused::rms_norm(x, &self.weight, self.eps);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight)
    }
}

/// A projection over the rows of x `[.., K]`, as one 2-D product `[rows, K] x [K, N]`: the
/// weight's gradient is then a single gemm over all rows, where candle's batched form computes
/// one per leading index and sums them.
fn linear_rows(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() <= 2 || !fused::enabled(fused::Kind::LinearRows) {
        return l.forward(x);
    }
    let k = dims[dims.len() - 1];
    let y = l.forward(&x.reshape(((), k))?)?;
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(y.dim(1)?);
    y.reshape(out)
}

/// HF init: weights normal(0, 0.02), biases 0. (When loading, the hints are ignored.)
fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )?;
    let b = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// Per-layer keys and values of the tokens seen so far, plus which of them are real tokens
/// (pads stay in the cache, masked, so that all rows keep one length).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// `key_mask[b][j]`: key j of row b is a real token.
    key_mask: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions (pads included).
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, |r| r.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real tokens seen by row `b`: the position of its next token.
    pub fn seen(&self, b: usize) -> usize {
        self.key_mask
            .get(b)
            .map_or(0, |r| r.iter().filter(|m| **m).count())
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// rotate_half as in HF Llama: the head dimension is split in halves, (x1, x2) -> (-x2, x1).
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// x: [B, H, T, D]; cos/sin: [B, 1, T, D].
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D], each kv head repeated for its query group
/// (the order of HF's `repeat_kv`).
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, h, s, d) = x.dims4()?;
    Tensor::cat(&vec![&x; n_rep], 2)?.reshape((b, h * n_rep, s, d))
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let hd = cfg.head_dim();
        let (h, hkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let bias = cfg.attention_bias;
        let (q_norm, k_norm) = if cfg.use_qk_norm {
            (
                Some(RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?),
                Some(RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            q_proj: linear(cfg.hidden_size, h * hd, bias, vb.pp("q_proj"))?,
            k_proj: linear(cfg.hidden_size, hkv * hd, bias, vb.pp("k_proj"))?,
            v_proj: linear(cfg.hidden_size, hkv * hd, bias, vb.pp("v_proj"))?,
            o_proj: linear(h * hd, cfg.hidden_size, false, vb.pp("o_proj"))?,
            q_norm,
            k_norm,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: hd,
        })
    }

    /// The CPU f32/f64 path: fused RoPE (scale folded into q), GQA without repeating k/v
    /// (each kv head's query group is one [n_rep·T, D] matrix), fused masked softmax.
    fn forward_fused(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let (h, hkv) = (self.n_heads, self.n_kv_heads);
        // [B, T, n, D]: the projection's own layout, no copy.
        let mut q = linear_rows(&self.q_proj, x)?.reshape((b, t, h, hd))?;
        let mut k = linear_rows(&self.k_proj, x)?.reshape((b, t, hkv, hd))?;
        let v = linear_rows(&self.v_proj, x)?
            .reshape((b, t, hkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let q = fused::rope(&q, cos, sin, scale)?; // [B, H, T, D], pre-scaled
        let k = fused::rope(&k, cos, sin, 1.0)?; // [B, Hkv, T, D]
        let (k, v) = match cache {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        let n_rep = h / hkv;
        // Query heads j·n_rep .. (j+1)·n_rep share kv head j (HF's repeat_kv order).
        let q = q.reshape((b, hkv, n_rep * t, hd))?;
        let att = q.matmul(&k.t()?)?; // [B, Hkv, n_rep·T, S]
        let att = fused::masked_softmax(&att, mask)?;
        let y = att.matmul(&v)?.reshape((b, h, t, hd))?;
        let y = y.transpose(1, 2)?.reshape((b, t, h * hd))?;
        linear_rows(&self.o_proj, &y)
    }

    /// x: [B, T, hidden]; cos/sin: [B, T, D]; mask: [B, 1, T, S] additive; cache: this
    /// layer's (k, v).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        if fused::supported(x, fused::Kind::Attention) {
            return self.forward_fused(x, cos, sin, mask, cache);
        }
        let (cos, sin) = (&cos.unsqueeze(1)?, &sin.unsqueeze(1)?);
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
        let mut q = heads(self.q_proj.forward(x)?, self.n_heads)?;
        let mut k = heads(self.k_proj.forward(x)?, self.n_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.n_kv_heads)?.contiguous()?;
        // Qwen3 normalizes each head before RoPE.
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        let q = apply_rope(&q.contiguous()?, cos, sin)?;
        let k = apply_rope(&k.contiguous()?, cos, sin)?;
        let (k, v) = match cache {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        let n_rep = self.n_heads / self.n_kv_heads;
        let k = repeat_kv(k, n_rep)?.contiguous()?;
        let v = repeat_kv(v, n_rep)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        // `softmax` (not `softmax_last_dim`): it backpropagates on CPU.
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let y = att.matmul(&v)?; // [B, H, T, D]
        let y = y.transpose(1, 2)?.reshape((b, t, self.n_heads * hd))?;
        self.o_proj.forward(&y)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: linear(h, i, false, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, false, vb.pp("up_proj"))?,
            down_proj: linear(i, h, false, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = linear_rows(&self.gate_proj, x)?;
        let up = linear_rows(&self.up_proj, x)?;
        let h = if fused::supported(&gate, fused::Kind::SiluMul) {
            fused::silu_mul(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        linear_rows(&self.down_proj, &h)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The decoder with its LM head.
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// `[V, hidden]`; the embedding matrix itself when tied.
    lm_head: Tensor,
    inv_freq: Vec<f64>,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Builds the model from `vb` under HF names. Over a `VarMap` this creates the variables
    /// (HF init); over loaded tensors it reads them.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let m = vb.pp("model");
        let emb = m.pp("embed_tokens").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            layers.push(Block {
                input_layernorm: RmsNorm::new(
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    l.pp("input_layernorm"),
                )?,
                self_attn: Attention::new(cfg, l.pp("self_attn"))?,
                post_attention_layernorm: RmsNorm::new(
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    l.pp("post_attention_layernorm"),
                )?,
                mlp: Mlp::new(cfg, l.pp("mlp"))?,
            });
        }
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            emb.clone()
        } else {
            vb.pp("lm_head").get_with_hints(
                (cfg.vocab_size, cfg.hidden_size),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed_tokens: Embedding::new(emb, cfg.hidden_size),
            layers,
            norm,
            lm_head,
            inv_freq: cfg.inv_freq(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[B, T, V]` for `input_ids` `[B, T]` (u32).
    ///
    /// `attention_mask` `[B, T]` (1 = token, 0 = pad; any numeric dtype) covers the new tokens
    /// only; the cache remembers earlier ones. Positions are per row: the count of real tokens
    /// before each token (cache included), so a left-padded row gets the same positions, and
    /// thus the same logits, as the sequence alone. Pads are masked as keys; their own outputs
    /// are meaningless. With a cache, new keys/values are appended to it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let new_mask: Vec<Vec<bool>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, t] {
                    candle_core::bail!(
                        "attention_mask shape {:?} != input_ids [{b}, {t}]",
                        m.dims()
                    );
                }
                m.to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v != 0.0).collect())
                    .collect()
            }
            None => vec![vec![true; t]; b],
        };
        let past: Vec<Vec<bool>> = match cache.as_deref() {
            Some(c) if !c.is_empty() => {
                if c.key_mask.len() != b {
                    candle_core::bail!("cache has batch {} but input has {b}", c.key_mask.len());
                }
                c.key_mask.clone()
            }
            _ => vec![Vec::new(); b],
        };
        let p = past.first().map_or(0, |r| r.len());
        let s = p + t;

        // Positions and the additive mask, built on the host: both are small ([B,T], [B,T,S]).
        let mut positions = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t * s);
        for (row_past, row_new) in past.iter().zip(&new_mask) {
            let keys: Vec<bool> = row_past.iter().chain(row_new).copied().collect();
            let mut seen = row_past.iter().filter(|m| **m).count();
            for (i, real) in row_new.iter().enumerate() {
                positions.push(seen as f32);
                if *real {
                    seen += 1;
                }
                let qi = p + i;
                mask.extend(
                    keys.iter()
                        .enumerate()
                        .map(|(j, k)| if *k && j <= qi { 0.0 } else { MASKED }),
                );
            }
        }
        // RoPE angles in f32 whatever the compute dtype (as HF does): bf16 holds integers
        // exactly only up to 256, so positions and angles in bf16 would be wrong past that.
        let angle_dtype = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let positions =
            Tensor::from_vec(positions, (b, t, 1), &self.device)?.to_dtype(angle_dtype)?;
        let mask = Tensor::from_vec(mask, (b, 1, t, s), &self.device)?.to_dtype(self.dtype)?;
        let inv_freq = Tensor::new(self.inv_freq.as_slice(), &self.device)?
            .to_dtype(angle_dtype)?
            .reshape((1, 1, self.inv_freq.len()))?;
        let freqs = positions.broadcast_mul(&inv_freq)?; // [B, T, D/2]
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?; // [B, T, D]
        let (cos, sin) = (
            emb.cos()?.to_dtype(self.dtype)?,
            emb.sin()?.to_dtype(self.dtype)?,
        );

        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = vec![None; self.layers.len()];
            }
        }
        let mut x = self.embed_tokens.forward(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = layer.input_layernorm.forward(&x)?;
            let h = layer.self_attn.forward(&h, &cos, &sin, &mask, slot)?;
            x = (x + h)?;
            let h = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x)?)?;
            x = (x + h)?;
        }
        if let Some(c) = cache {
            c.key_mask = past
                .into_iter()
                .zip(new_mask)
                .map(|(mut a, n)| {
                    a.extend(n);
                    a
                })
                .collect();
        }
        let x = self.norm.forward(&x)?;
        if fused::enabled(fused::Kind::LinearRows) {
            // One [B·T, hidden] x [hidden, V] product: its backward is one gemm per operand
            // instead of a batch of them plus a reduction over the batch.
            let (b, t, hd) = x.dims3()?;
            let y = x.reshape((b * t, hd))?.matmul(&self.lm_head.t()?)?;
            return y.reshape((b, t, self.cfg.vocab_size));
        }
        x.broadcast_matmul(&self.lm_head.t()?)
    }
}

/// Fused CPU kernels with hand-written backward passes, for the f32/f64 CPU paths of the
/// model and the loss: RMSNorm, RoPE (with the attention scale folded in), masked softmax,
/// SwiGLU's `silu(gate) * up`, and log-softmax. candle 0.11's own fused norm/softmax have no
/// CPU backward; these do, and the finite-difference tests check them. Other devices and
/// dtypes take the composed path (`fused::supported`).
pub(crate) mod fused {
    use candle_core::{
        CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
        WithDType,
    };
    use rayon::prelude::*;

    /// The fused kernels, each of which can be switched off for measurements and debugging
    /// with `KLONGD_FUSED_OFF` (a comma-separated list of these names, or `all`).
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Kind {
        RmsNorm,
        Attention,
        SiluMul,
        LogSoftmax,
        AdamW,
        LinearRows,
    }

    pub(crate) fn enabled(kind: Kind) -> bool {
        static OFF: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let off = OFF.get_or_init(|| {
            std::env::var("KLONGD_FUSED_OFF")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        });
        let name = match kind {
            Kind::RmsNorm => "rms_norm",
            Kind::Attention => "attention",
            Kind::SiluMul => "silu_mul",
            Kind::LogSoftmax => "log_softmax",
            Kind::AdamW => "adamw",
            Kind::LinearRows => "linear_rows",
        };
        !off.iter().any(|o| o == "all" || o == name)
    }

    /// Whether the fused kernel `kind` serves `t` (CPU, f32 or f64, not switched off).
    pub(crate) fn supported(t: &Tensor, kind: Kind) -> bool {
        t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && enabled(kind)
    }

    pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
        fn exp(self) -> Self;
        fn sqrt(self) -> Self;
        fn ln(self) -> Self;
        fn lowest() -> Self;
    }
    impl Real for f32 {
        fn exp(self) -> Self {
            f32::exp(self)
        }
        fn sqrt(self) -> Self {
            f32::sqrt(self)
        }
        fn ln(self) -> Self {
            f32::ln(self)
        }
        fn lowest() -> Self {
            f32::MIN
        }
    }
    impl Real for f64 {
        fn exp(self) -> Self {
            f64::exp(self)
        }
        fn sqrt(self) -> Self {
            f64::sqrt(self)
        }
        fn ln(self) -> Self {
            f64::ln(self)
        }
        fn lowest() -> Self {
            f64::MIN
        }
    }

    /// The contiguous slice of a CPU storage under `l`.
    fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
        let all = T::cpu_storage_as_slice(s)?;
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(&all[a..b]),
            None => candle_core::bail!("fused op: non-contiguous input"),
        }
    }

    /// Runs `f` over a tensor's contiguous CPU data.
    pub(crate) fn with_data<T: WithDType, R>(
        t: &Tensor,
        f: impl FnOnce(&[T]) -> Result<R>,
    ) -> Result<R> {
        let t = t.contiguous()?;
        let (st, l) = t.storage_and_layout();
        match &*st {
            Storage::Cpu(c) => f(slice::<T>(c, l)?),
            _ => candle_core::bail!("fused op: CPU tensors only"),
        }
    }

    /// Below this many elements an op runs on the calling thread alone.
    const PAR_MIN: usize = 1 << 15;

    /// Splits `out` (rows of `row` elements) into one contiguous run of rows per thread and
    /// calls `f(first_row, rows)` on each, in parallel.
    fn par_rows<T: Send>(out: &mut [T], row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        let rows = out.len() / row.max(1);
        let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
        if threads == 1 || out.len() < PAR_MIN {
            f(0, out);
            return;
        }
        let per = rows.div_ceil(threads);
        out.par_chunks_mut(per * row)
            .enumerate()
            .for_each(|(i, c)| f(i * per, c));
    }

    /// Dispatches on the dtype of a CPU storage to a generic body.
    macro_rules! dispatch {
        ($s:expr, $body:ident ( $($arg:expr),* )) => {
            match $s {
                CpuStorage::F32(_) => $body::<f32>($($arg),*),
                CpuStorage::F64(_) => $body::<f64>($($arg),*),
                _ => candle_core::bail!("fused op: f32/f64 only"),
            }
        };
    }

    // ---------------------------------------------------------------- RMSNorm

    /// `x / sqrt(mean(x²) + eps) * w` over the last dimension. x: [.., N], w: [N].
    pub(crate) struct RmsNorm {
        pub eps: f64,
    }

    fn rms_fwd<T: Real>(
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        eps: f64,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice::<T>(x, lx)?, slice::<T>(w, lw)?);
        let n = w.len();
        let eps = T::from_f64(eps);
        let nn = T::from_f64(n as f64);
        let mut out = vec![T::zero(); x.len()];
        par_rows(&mut out, n, |r0, out| {
            for (i, o) in out.chunks_mut(n).enumerate() {
                let xr = &x[(r0 + i) * n..(r0 + i + 1) * n];
                let mut ss = T::zero();
                for &v in xr {
                    ss += v * v;
                }
                let s = (ss / nn + eps).sqrt();
                for ((o, &v), &wv) in o.iter_mut().zip(xr).zip(w) {
                    *o = v / s * wv;
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
    }

    /// (dx, dw) for RMSNorm.
    fn rms_bwd<T: Real>(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let n = w.elem_count();
        let threads = candle_core::utils::get_num_threads().max(1);
        let (dx, dw) = with_data::<T, _>(x, |x| {
            with_data::<T, _>(w, |w| {
                with_data::<T, _>(g, |g| {
                    let eps = T::from_f64(eps);
                    let nn = T::from_f64(n as f64);
                    let mut dx = vec![T::zero(); x.len()];
                    let rows = x.len() / n;
                    let per = rows.div_ceil(threads).max(1);
                    // dw partial sums per chunk of rows, summed after.
                    let mut partial = vec![vec![T::zero(); n]; rows.div_ceil(per)];
                    let work = |r0: usize, dx: &mut [T], dw: &mut [T]| {
                        for (i, d) in dx.chunks_mut(n).enumerate() {
                            let r = r0 + i;
                            let (xr, gr) = (&x[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
                            let mut ss = T::zero();
                            let mut dot = T::zero();
                            for k in 0..n {
                                ss += xr[k] * xr[k];
                                dot += w[k] * gr[k] * xr[k];
                            }
                            let s = (ss / nn + eps).sqrt();
                            // d/dx_j of x_j / s: 1/s - x_j Σ(...) / (N s³).
                            let c = dot / (nn * s * s * s);
                            for k in 0..n {
                                d[k] = w[k] * gr[k] / s - xr[k] * c;
                                dw[k] += gr[k] * (xr[k] / s);
                            }
                        }
                    };
                    if threads == 1 || x.len() < PAR_MIN {
                        work(0, &mut dx, &mut partial[0]);
                    } else {
                        dx.par_chunks_mut(per * n)
                            .zip(partial.par_iter_mut())
                            .enumerate()
                            .for_each(|(i, (c, p))| work(i * per, c, p));
                    }
                    let mut dw = vec![T::zero(); n];
                    for p in &partial {
                        for (a, b) in dw.iter_mut().zip(p) {
                            *a += *b;
                        }
                    }
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            Tensor::from_vec(dx, x.shape(), x.device())?,
            Tensor::from_vec(dw, w.shape(), w.device())?,
        ))
    }

    impl CustomOp2 for RmsNorm {
        fn name(&self) -> &'static str {
            "klong-rms-norm"
        }
        fn cpu_fwd(
            &self,
            x: &CpuStorage,
            lx: &Layout,
            w: &CpuStorage,
            lw: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            dispatch!(x, rms_fwd(x, lx, w, lw, self.eps))
        }
        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _res: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (dx, dw) = match x.dtype() {
                DType::F32 => rms_bwd::<f32>(x, w, g, self.eps)?,
                DType::F64 => rms_bwd::<f64>(x, w, g, self.eps)?,
                dt => candle_core::bail!("klong-rms-norm: unsupported dtype {dt:?}"),
            };
            Ok((Some(dx), Some(dw)))
        }
    }

    pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
    }

    // ---------------------------------------------------------------- RoPE

    /// RoPE on x `[B, T, H, D]` (the projection's layout) with cos/sin `[B, T, D]`, times
    /// `scale`, written out as `[B, H, T, D]`: HF's `x·cos + rotate_half(x)·sin`.
    pub(crate) struct Rope {
        pub scale: f64,
    }

    /// One head vector: out = scale · (x·cos + rot(x)·sin), rot(x) = (-x2, x1).
    #[inline]
    fn rope_vec<T: Real>(x: &[T], c: &[T], s: &[T], scale: T, out: &mut [T]) {
        let h = x.len() / 2;
        for i in 0..h {
            out[i] = (x[i] * c[i] - x[i + h] * s[i]) * scale;
            out[i + h] = (x[i + h] * c[i + h] + x[i] * s[i + h]) * scale;
        }
    }

    /// The transpose of `rope_vec` (its gradient): dx = scale · (g·cos + rotᵀ(g·sin)).
    #[inline]
    fn rope_vec_t<T: Real>(g: &[T], c: &[T], s: &[T], scale: T, out: &mut [T]) {
        let h = g.len() / 2;
        for i in 0..h {
            out[i] = (g[i] * c[i] + g[i + h] * s[i + h]) * scale;
            out[i + h] = (g[i + h] * c[i + h] - g[i] * s[i]) * scale;
        }
    }

    fn rope_fwd<T: Real>(
        x: &CpuStorage,
        lx: &Layout,
        c: &CpuStorage,
        lc: &Layout,
        s: &CpuStorage,
        ls: &Layout,
        scale: f64,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, h, d) = lx.shape().dims4()?;
        let (x, c, s) = (slice::<T>(x, lx)?, slice::<T>(c, lc)?, slice::<T>(s, ls)?);
        let scale = T::from_f64(scale);
        let mut out = vec![T::zero(); x.len()];
        // Output rows are (b, h, t) vectors of d.
        par_rows(&mut out, t * d, |r0, out| {
            for (i, o) in out.chunks_mut(t * d).enumerate() {
                let (bi, hi) = ((r0 + i) / h, (r0 + i) % h);
                for ti in 0..t {
                    let xo = ((bi * t + ti) * h + hi) * d;
                    let co = (bi * t + ti) * d;
                    rope_vec(
                        &x[xo..xo + d],
                        &c[co..co + d],
                        &s[co..co + d],
                        scale,
                        &mut o[ti * d..(ti + 1) * d],
                    );
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), Shape::from((b, h, t, d))))
    }

    fn rope_bwd<T: Real>(
        g: &Tensor,
        c: &Tensor,
        s: &Tensor,
        shape: &Shape,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, t, h, d) = shape.dims4()?;
        let scale = T::from_f64(scale);
        let dx = with_data::<T, _>(g, |g| {
            with_data::<T, _>(c, |c| {
                with_data::<T, _>(s, |s| {
                    let mut dx = vec![T::zero(); g.len()];
                    // dx rows are (b, t) blocks of h·d; g is [B, H, T, D].
                    par_rows(&mut dx, h * d, |r0, dx| {
                        for (i, o) in dx.chunks_mut(h * d).enumerate() {
                            let (bi, ti) = ((r0 + i) / t, (r0 + i) % t);
                            let co = (bi * t + ti) * d;
                            for hi in 0..h {
                                let go = ((bi * h + hi) * t + ti) * d;
                                rope_vec_t(
                                    &g[go..go + d],
                                    &c[co..co + d],
                                    &s[co..co + d],
                                    scale,
                                    &mut o[hi * d..(hi + 1) * d],
                                );
                            }
                        }
                    });
                    Ok(dx)
                })
            })
        })?;
        let _ = b;
        Tensor::from_vec(dx, shape, g.device())
    }

    impl CustomOp3 for Rope {
        fn name(&self) -> &'static str {
            "klong-rope"
        }
        fn cpu_fwd(
            &self,
            x: &CpuStorage,
            lx: &Layout,
            c: &CpuStorage,
            lc: &Layout,
            s: &CpuStorage,
            ls: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            dispatch!(x, rope_fwd(x, lx, c, lc, s, ls, self.scale))
        }
        fn bwd(
            &self,
            x: &Tensor,
            c: &Tensor,
            s: &Tensor,
            _res: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            // cos/sin come from positions, which are constants.
            let dx = match x.dtype() {
                DType::F32 => rope_bwd::<f32>(g, c, s, x.shape(), self.scale)?,
                DType::F64 => rope_bwd::<f64>(g, c, s, x.shape(), self.scale)?,
                dt => candle_core::bail!("klong-rope: unsupported dtype {dt:?}"),
            };
            Ok((Some(dx), None, None))
        }
    }

    /// x `[B, T, H, D]`, cos/sin `[B, T, D]` -> `[B, H, T, D]`, scaled.
    pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
        x.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { scale })
    }

    // ---------------------------------------------------------------- masked softmax

    /// softmax(att + mask) over the last dimension. att: `[B, R, S]` viewed as rows of S
    /// (R rows per batch entry), mask `[B, T, S]` (additive); att row r of batch entry b takes
    /// mask row `r % T` (so att may be `[B, H, T, S]` or GQA's `[B, Hkv, n_rep·T, S]`).
    pub(crate) struct MaskedSoftmax;

    fn softmax_fwd<T: Real>(
        a: &CpuStorage,
        la: &Layout,
        m: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = lm.shape().dims();
        let (b, t, s) = (dims[0], dims[dims.len() - 2], dims[dims.len() - 1]);
        let (a, m) = (slice::<T>(a, la)?, slice::<T>(m, lm)?);
        let per_batch = a.len() / b.max(1);
        let half_masked = T::from_f64(f64::from(super::MASKED) / 2.0);
        let mut out = vec![T::zero(); a.len()];
        par_rows(&mut out, s, |r0, out| {
            for (i, o) in out.chunks_mut(s).enumerate() {
                let r = r0 + i;
                let (bi, ri) = (r * s / per_batch, (r * s % per_batch) / s);
                let mr = &m[(bi * t + ri % t) * s..(bi * t + ri % t + 1) * s];
                let ar = &a[r * s..(r + 1) * s];
                let mut mx = T::lowest();
                for ((o, &av), &mv) in o.iter_mut().zip(ar).zip(mr) {
                    let z = av + mv;
                    *o = z;
                    if z > mx {
                        mx = z;
                    }
                }
                let mut sum = T::zero();
                if mx > half_masked {
                    // Some key is visible: masked keys sit ~1e9 below the max, where exp is
                    // exactly 0, so they are set to 0 without computing it (causal rows skip
                    // half their exps, and glibc's slow underflow path).
                    for (o, &mv) in o.iter_mut().zip(mr) {
                        let e = if mv < half_masked {
                            T::zero()
                        } else {
                            (*o - mx).exp()
                        };
                        *o = e;
                        sum += e;
                    }
                } else {
                    for o in o.iter_mut() {
                        let e = (*o - mx).exp();
                        *o = e;
                        sum += e;
                    }
                }
                for o in o.iter_mut() {
                    *o /= sum;
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), la.shape().clone()))
    }

    /// dz = y ⊙ (g − Σ g⊙y), row-wise.
    fn softmax_bwd<T: Real>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let s = y.dim(candle_core::D::Minus1)?;
        let dz = with_data::<T, _>(y, |y| {
            with_data::<T, _>(g, |g| {
                let mut dz = vec![T::zero(); y.len()];
                par_rows(&mut dz, s, |r0, dz| {
                    for (i, d) in dz.chunks_mut(s).enumerate() {
                        let r = r0 + i;
                        let (yr, gr) = (&y[r * s..(r + 1) * s], &g[r * s..(r + 1) * s]);
                        let mut dot = T::zero();
                        for (&yv, &gv) in yr.iter().zip(gr) {
                            dot += yv * gv;
                        }
                        for ((d, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                            *d = yv * (gv - dot);
                        }
                    }
                });
                Ok(dz)
            })
        })?;
        Tensor::from_vec(dz, y.shape(), y.device())
    }

    impl CustomOp2 for MaskedSoftmax {
        fn name(&self) -> &'static str {
            "klong-masked-softmax"
        }
        fn cpu_fwd(
            &self,
            a: &CpuStorage,
            la: &Layout,
            m: &CpuStorage,
            lm: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            dispatch!(a, softmax_fwd(a, la, m, lm))
        }
        fn bwd(
            &self,
            a: &Tensor,
            _m: &Tensor,
            res: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            // The mask is a constant.
            let da = match a.dtype() {
                DType::F32 => softmax_bwd::<f32>(res, g)?,
                DType::F64 => softmax_bwd::<f64>(res, g)?,
                dt => candle_core::bail!("klong-masked-softmax: unsupported dtype {dt:?}"),
            };
            Ok((Some(da), None))
        }
    }

    /// softmax(att + mask) with att `[B, X, R, S]` and mask `[B, 1, T, S]`, `R` a multiple
    /// of `T` (see [`MaskedSoftmax`]).
    pub(crate) fn masked_softmax(att: &Tensor, mask: &Tensor) -> Result<Tensor> {
        att.contiguous()?
            .apply_op2(&mask.contiguous()?, MaskedSoftmax)
    }

    // ---------------------------------------------------------------- SwiGLU

    /// silu(gate) · up, elementwise.
    pub(crate) struct SiluMul;

    fn silu_mul_fwd<T: Real>(
        a: &CpuStorage,
        la: &Layout,
        u: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, u) = (slice::<T>(a, la)?, slice::<T>(u, lu)?);
        let mut out = vec![T::zero(); a.len()];
        let row = 1024.min(a.len().max(1));
        par_rows(&mut out, row, |r0, out| {
            let o0 = r0 * row;
            for (k, o) in out.iter_mut().enumerate() {
                let x = a[o0 + k];
                *o = x / (T::one() + (-x).exp()) * u[o0 + k];
            }
        });
        Ok((T::to_cpu_storage_owned(out), la.shape().clone()))
    }

    /// (d gate, d up): σ = sigmoid(a); d silu = σ(1 + a(1 − σ)).
    fn silu_mul_bwd<T: Real>(a: &Tensor, u: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = a.elem_count();
        let (da, du) = with_data::<T, _>(a, |a| {
            with_data::<T, _>(u, |u| {
                with_data::<T, _>(g, |g| {
                    let mut da = vec![T::zero(); n];
                    let mut du = vec![T::zero(); n];
                    let row = 1024.min(n).max(1);
                    par_rows(&mut da, row, |r0, out| {
                        let e0 = r0 * row;
                        for (k, o) in out.iter_mut().enumerate() {
                            let (x, i) = (a[e0 + k], e0 + k);
                            let sg = T::one() / (T::one() + (-x).exp());
                            *o = g[i] * u[i] * sg * (T::one() + x * (T::one() - sg));
                        }
                    });
                    par_rows(&mut du, row, |r0, out| {
                        let e0 = r0 * row;
                        for (k, o) in out.iter_mut().enumerate() {
                            let x = a[e0 + k];
                            *o = g[e0 + k] * (x / (T::one() + (-x).exp()));
                        }
                    });
                    Ok((da, du))
                })
            })
        })?;
        Ok((
            Tensor::from_vec(da, a.shape(), a.device())?,
            Tensor::from_vec(du, u.shape(), u.device())?,
        ))
    }

    impl CustomOp2 for SiluMul {
        fn name(&self) -> &'static str {
            "klong-silu-mul"
        }
        fn cpu_fwd(
            &self,
            a: &CpuStorage,
            la: &Layout,
            u: &CpuStorage,
            lu: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            dispatch!(a, silu_mul_fwd(a, la, u, lu))
        }
        fn bwd(
            &self,
            a: &Tensor,
            u: &Tensor,
            _res: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (da, du) = match a.dtype() {
                DType::F32 => silu_mul_bwd::<f32>(a, u, g)?,
                DType::F64 => silu_mul_bwd::<f64>(a, u, g)?,
                dt => candle_core::bail!("klong-silu-mul: unsupported dtype {dt:?}"),
            };
            Ok((Some(da), Some(du)))
        }
    }

    pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
    }

    // ---------------------------------------------------------------- log-softmax

    /// Log-softmax over the last dimension.
    pub(crate) struct LogSoftmax;

    fn log_softmax_fwd<T: Real>(x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = *lx.shape().dims().last().unwrap_or(&1);
        let x = slice::<T>(x, lx)?;
        let mut out = vec![T::zero(); x.len()];
        par_rows(&mut out, v, |r0, out| {
            for (i, o) in out.chunks_mut(v).enumerate() {
                let xr = &x[(r0 + i) * v..(r0 + i + 1) * v];
                let mut mx = T::lowest();
                for &z in xr {
                    if z > mx {
                        mx = z;
                    }
                }
                let mut sum = T::zero();
                for &z in xr {
                    sum += (z - mx).exp();
                }
                let lse = sum.ln();
                for (o, &z) in o.iter_mut().zip(xr) {
                    *o = (z - mx) - lse;
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
    }

    /// dz = g − softmax · Σ g, with softmax = exp(log-softmax).
    fn log_softmax_bwd<T: Real>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let v = y.dim(candle_core::D::Minus1)?;
        let dz = with_data::<T, _>(y, |y| {
            with_data::<T, _>(g, |g| {
                let mut dz = vec![T::zero(); y.len()];
                par_rows(&mut dz, v, |r0, dz| {
                    for (i, d) in dz.chunks_mut(v).enumerate() {
                        let r = r0 + i;
                        let (yr, gr) = (&y[r * v..(r + 1) * v], &g[r * v..(r + 1) * v]);
                        let mut sg = T::zero();
                        for &gv in gr {
                            sg += gv;
                        }
                        for ((d, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                            *d = gv - yv.exp() * sg;
                        }
                    }
                });
                Ok(dz)
            })
        })?;
        Tensor::from_vec(dz, y.shape(), y.device())
    }

    impl CustomOp1 for LogSoftmax {
        fn name(&self) -> &'static str {
            "klong-log-softmax"
        }
        fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
            dispatch!(x, log_softmax_fwd(x, lx))
        }
        fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
            let dz = match x.dtype() {
                DType::F32 => log_softmax_bwd::<f32>(res, g)?,
                DType::F64 => log_softmax_bwd::<f64>(res, g)?,
                dt => candle_core::bail!("klong-log-softmax: unsupported dtype {dt:?}"),
            };
            Ok(Some(dz))
        }
    }

    pub(crate) fn log_softmax(x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(LogSoftmax)
    }
}
