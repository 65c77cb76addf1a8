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
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight)
    }
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

    /// x: [B, T, hidden]; mask: [B, 1, T, S] additive; cache: this layer's (k, v).
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
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
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
        let positions =
            Tensor::from_vec(positions, (b, t, 1), &self.device)?.to_dtype(self.dtype)?;
        let mask = Tensor::from_vec(mask, (b, 1, t, s), &self.device)?.to_dtype(self.dtype)?;
        let inv_freq = Tensor::new(self.inv_freq.as_slice(), &self.device)?
            .to_dtype(self.dtype)?
            .reshape((1, 1, self.inv_freq.len()))?;
        let freqs = positions.broadcast_mul(&inv_freq)?; // [B, T, D/2]
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?; // [B, 1, T, D]
        let (cos, sin) = (emb.cos()?, emb.sin()?);

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
        x.broadcast_matmul(&self.lm_head.t()?)
    }
}
