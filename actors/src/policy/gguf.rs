//! GGUF model files (llama.cpp's format): the model dequantized to f32 under Hugging Face
//! tensor names, its configuration, and its tokenizer, all from the file's metadata.
//!
//! The conversion follows what transformers does when it loads a GGUF
//! (`from_pretrained(dir, gguf_file=...)`), so that both give the same weights and the same token
//! ids (`actors/tests/gguf_parity.rs` holds the two together):
//!
//! - Configuration: `{arch}.embedding_length`, `.block_count`, `.feed_forward_length`,
//!   `.attention.head_count[_kv]`, `.attention.layer_norm_rms_epsilon`, `.rope.freq_base`,
//!   `.context_length` (f32 metadata is widened as is: 1e-5 stored as f32 reads 9.99999974e-6,
//!   as in transformers). Embeddings are tied when the file has no `output.weight`.
//! - Weights: `blk.N.attn_q` -> `model.layers.N.self_attn.q_proj` and so on. For the `llama`
//!   architecture llama.cpp's converter permutes the rows of the q and k projections, per head,
//!   from Hugging Face's rotate-half RoPE layout to GPT-J's interleaved one (`[d0 d1 ... | dh ...]`
//!   becomes `[d0 dh d1 dh+1 ...]`); that is undone here as transformers' `LlamaTensorProcessor`
//!   does (rows viewed as `[heads, 2, head_dim/2]` on the HF side, `[heads, head_dim/2, 2]` on the
//!   GGUF side; k uses the kv-head count). `qwen2`/`qwen3` files are not permuted (their HF models
//!   already use llama.cpp's NEOX RoPE).
//! - Tokenizer: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is rebuilt as transformers'
//!   GGUF converter rebuilds it: GPT-2's byte-level pre-tokenizer and decoder (or a split regex
//!   chosen by `tokenizer.ggml.pre`), control tokens (type 3) as special added tokens,
//!   user-defined ones (type 4) as plain added tokens, BOS/EOS from the post-processor only when
//!   `tokenizer.ggml.add_bos_token` / `add_eos_token` say so. SentencePiece ("llama") and other
//!   tokenizer models are refused with [`GgufError::UnsupportedTokenizer`].
//!
//! Malformed files are errors, never panics: the parser runs under `catch_unwind` as a last
//! line of defence (candle's reader divides by `general.alignment`, which a file may set to 0).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value as GValue};
use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};
use thiserror::Error;

use super::model::{EosTokenId, LlamaConfig, RopeScaling};
use super::tokenizer::HfTokenizer;

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid GGUF file: {message}")]
    BadFormat { path: PathBuf, message: String },
    #[error("{path}: architecture {arch:?} is not supported (supported: llama, qwen2, qwen3)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: metadata key {key} is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key {key}: {message}")]
    BadMetadata {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error(
        "{path}: tokenizer model {model:?} is not supported (supported: \"gpt2\", byte-level BPE)"
    )]
    UnsupportedTokenizer { path: PathBuf, model: String },
    #[error("{path}: building the tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: tensor {name} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} is not part of a {arch} model")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        arch: String,
    },
    #[error("{path}: tensor {name}: {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{path}: invalid model configuration: {message}")]
    Config { path: PathBuf, message: String },
}

/// A GGUF model: configuration, f32 tensors under Hugging Face names, and tokenizer.
#[derive(Debug)]
pub struct GgufModel {
    pub config: LlamaConfig,
    /// Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...), dequantized to f32, on
    /// the device given to [`load`]. No `lm_head.weight` when the embeddings are tied.
    pub tensors: BTreeMap<String, Tensor>,
    pub tokenizer: HfTokenizer,
}

/// Loads the whole model: configuration, every tensor (dequantized to f32 on `device`), and the
/// tokenizer.
pub fn load(path: &Path, device: &Device) -> Result<GgufModel, GgufError> {
    let (content, mut reader) = read_content(path)?;
    let meta = Meta {
        path,
        map: &content.metadata,
    };
    let arch = meta.architecture()?;
    let mut config = config_from(&meta, &arch, &content.tensor_infos)?;
    let invalid = |message: String| GgufError::Config {
        path: path.to_path_buf(),
        message,
    };
    config.validate().map_err(invalid)?;
    let tokenizer = tokenizer_from(&meta)?;
    // The embedding decides the vocabulary the model can index; the tokenizer may be smaller.
    if let Some(info) = content.tensor_infos.get("token_embd.weight") {
        if let [rows, _] = info.shape.dims() {
            if *rows != config.vocab_size {
                return Err(invalid(format!(
                    "vocab_size is {} but token_embd.weight has {rows} rows",
                    config.vocab_size
                )));
            }
        }
    }
    let expected = super::pretrained::expected_tensors(&config);
    // Fail on a missing tensor before dequantizing anything.
    let present: std::collections::BTreeSet<String> = content
        .tensor_infos
        .keys()
        .filter_map(|n| hf_name(n))
        .collect();
    if let Some(missing) = expected.keys().find(|k| !present.contains(*k)) {
        return Err(GgufError::MissingTensor {
            path: path.to_path_buf(),
            name: missing.clone(),
        });
    }
    let mut tensors = BTreeMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gguf_name in names {
        let info = &content.tensor_infos[gguf_name];
        let tensor_err = |message: String| GgufError::Tensor {
            path: path.to_path_buf(),
            name: gguf_name.clone(),
            message,
        };
        if gguf_name == "rope_freqs.weight" {
            // Llama-3.1-style RoPE scaling, stored as per-frequency divisors.
            let factors = read_f32(&mut reader, &content, info, &Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| tensor_err(e.to_string()))?;
            config.rope_scaling =
                Some(rope_scaling_from_factors(&config, &factors).map_err(invalid)?);
            continue;
        }
        let Some(hf) = hf_name(gguf_name) else {
            return Err(GgufError::UnexpectedTensor {
                path: path.to_path_buf(),
                name: gguf_name.clone(),
                arch: arch.clone(),
            });
        };
        let Some(shape) = expected.get(&hf) else {
            return Err(GgufError::UnexpectedTensor {
                path: path.to_path_buf(),
                name: gguf_name.clone(),
                arch: arch.clone(),
            });
        };
        if info.shape.dims() != shape.as_slice() {
            return Err(tensor_err(format!(
                "shape {:?} (Hugging Face order) but the configuration implies {shape:?}",
                info.shape.dims()
            )));
        }
        let mut t = read_f32(&mut reader, &content, info, &Device::Cpu)
            .map_err(|e| tensor_err(e.to_string()))?;
        if arch == "llama" {
            if gguf_name.contains(".attn_q.") {
                t = unpermute_rope_rows(&t, config.num_attention_heads)
                    .map_err(|e| tensor_err(e.to_string()))?;
            } else if gguf_name.contains(".attn_k.") {
                t = unpermute_rope_rows(&t, config.num_kv_heads())
                    .map_err(|e| tensor_err(e.to_string()))?;
            }
        }
        let t = t.to_device(device).map_err(|e| tensor_err(e.to_string()))?;
        tensors.insert(hf, t);
    }
    config.validate().map_err(invalid)?;
    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
    })
}

/// Only the tokenizer, from the metadata (no tensor data is read).
pub fn load_tokenizer(path: &Path) -> Result<HfTokenizer, GgufError> {
    let (content, _) = read_content(path)?;
    tokenizer_from(&Meta {
        path,
        map: &content.metadata,
    })
}

/// Reads the header, metadata and tensor directory.
fn read_content(path: &Path) -> Result<(Content, BufReader<File>), GgufError> {
    let file = File::open(path).map_err(|source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let bad = |message: String| GgufError::BadFormat {
        path: path.to_path_buf(),
        message,
    };
    // candle 0.11's reader divides by an integer `general.alignment`: refuse 0 before it runs.
    if scan_alignment(&mut reader) == Some(0) {
        return Err(bad("general.alignment is 0".into()));
    }
    reader
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let content = catch_unwind(AssertUnwindSafe(|| Content::read(&mut reader)))
        .map_err(|p| bad(format!("the GGUF parser failed: {}", panic_message(&p))))?
        .map_err(|e| bad(e.to_string()))?;
    Ok((content, reader))
}

/// The value of `general.alignment` when the file sets it as an integer of the types candle's
/// reader divides by; `None` when it does not, or when the header does not read (candle's
/// reader then says why). Skims the metadata without keeping it.
fn scan_alignment<R: Read>(r: &mut R) -> Option<i64> {
    fn bytes<const N: usize, R: Read>(r: &mut R) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        r.read_exact(&mut b).ok()?;
        Some(b)
    }
    fn skip<R: Read>(r: &mut R, n: u64) -> Option<()> {
        let copied = std::io::copy(&mut r.take(n), &mut std::io::sink()).ok()?;
        (copied == n).then_some(())
    }
    fn len<R: Read>(r: &mut R, wide: bool) -> Option<u64> {
        if wide {
            bytes::<8, _>(r).map(u64::from_le_bytes)
        } else {
            bytes::<4, _>(r).map(|b| u64::from(u32::from_le_bytes(b)))
        }
    }
    fn fixed_size(ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    fn skip_value<R: Read>(r: &mut R, ty: u32, wide: bool, depth: usize) -> Option<()> {
        if let Some(n) = fixed_size(ty) {
            return skip(r, n);
        }
        match ty {
            8 => {
                let n = len(r, wide)?;
                skip(r, n)
            }
            9 if depth < 8 => {
                let elem = u32::from_le_bytes(bytes::<4, _>(r)?);
                let count = len(r, wide)?;
                match fixed_size(elem) {
                    Some(size) => skip(r, count.checked_mul(size)?),
                    None => (0..count).try_for_each(|_| skip_value(r, elem, wide, depth + 1)),
                }
            }
            _ => None,
        }
    }
    if &bytes::<4, _>(r)? != b"GGUF" {
        return None;
    }
    let wide = match u32::from_le_bytes(bytes::<4, _>(r)?) {
        1 => false,
        2 | 3 => true,
        _ => return None,
    };
    let _tensors = len(r, wide)?;
    let kvs = len(r, wide)?;
    for _ in 0..kvs {
        let key_len = len(r, wide)?;
        let is_alignment = key_len == 17 && {
            let key = bytes::<17, _>(r)?;
            &key == b"general.alignment"
        };
        if key_len != 17 {
            skip(r, key_len)?;
        }
        let ty = u32::from_le_bytes(bytes::<4, _>(r)?);
        if is_alignment {
            return match ty {
                0 => bytes::<1, _>(r).map(|b| i64::from(b[0])),
                1 => bytes::<1, _>(r).map(|b| i64::from(b[0] as i8)),
                2 => bytes::<2, _>(r).map(|b| i64::from(u16::from_le_bytes(b))),
                3 => bytes::<2, _>(r).map(|b| i64::from(i16::from_le_bytes(b))),
                4 => bytes::<4, _>(r).map(|b| i64::from(u32::from_le_bytes(b))),
                5 => bytes::<4, _>(r).map(|b| i64::from(i32::from_le_bytes(b))),
                _ => None,
            };
        }
        skip_value(r, ty, wide, 0)?;
    }
    None
}

fn read_f32<R: Read + Seek>(
    reader: &mut R,
    content: &Content,
    info: &TensorInfo,
    device: &Device,
) -> candle_core::Result<Tensor> {
    catch_unwind(AssertUnwindSafe(|| {
        info.read(reader, content.tensor_data_offset, device)?
            .dequantize(device)
    }))
    .unwrap_or_else(|p| {
        Err(candle_core::Error::msg(format!(
            "reading the tensor failed: {}",
            panic_message(&p)
        )))
    })
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

/// Undoes llama.cpp's `LlamaModel.permute` on the rows of a q or k projection (or its bias):
/// GGUF rows `[heads, head_dim/2, 2]` back to HF rows `[heads, 2, head_dim/2]`.
fn unpermute_rope_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_head == 0 || rows == 0 || rows % (2 * n_head) != 0 {
        candle_core::bail!("{rows} rows do not split into {n_head} heads of even size");
    }
    let half = rows / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The Hugging Face name of a GGUF tensor, for the names a Llama/Qwen2/Qwen3 model has.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || layer.len() > 6 {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// Typed access to the metadata, with errors that name the file and the key.
struct Meta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, GValue>,
}

impl Meta<'_> {
    fn bad(&self, key: &str, message: impl Into<String>) -> GgufError {
        GgufError::BadMetadata {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        }
    }

    fn architecture(&self) -> Result<String, GgufError> {
        let key = "general.architecture";
        self.str(key)?
            .map(str::to_string)
            .ok_or_else(|| self.missing(key))
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, GgufError> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        value_u64(v)
            .map(Some)
            .ok_or_else(|| self.bad(key, format!("expected a non-negative integer, found {v:?}")))
    }

    fn usize_req(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.uint(key)?.ok_or_else(|| self.missing(key))?;
        usize::try_from(v).map_err(|_| self.bad(key, format!("{v} is too large")))
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, GgufError> {
        self.uint(key)?
            .map(|v| usize::try_from(v).map_err(|_| self.bad(key, format!("{v} is too large"))))
            .transpose()
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.uint(key)?
            .map(|v| u32::try_from(v).map_err(|_| self.bad(key, format!("{v} is too large"))))
            .transpose()
    }

    fn float(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(GValue::F32(x)) => Ok(Some(f64::from(*x))),
            Some(GValue::F64(x)) => Ok(Some(*x)),
            Some(v) => value_u64(v)
                .map(|n| Some(n as f64))
                .ok_or_else(|| self.bad(key, format!("expected a number, found {v:?}"))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, format!("expected a bool, found {v:?}"))),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(
                key,
                format!("expected a string, found a {:?}", v.value_type()),
            )),
        }
    }

    fn str_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(GValue::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    GValue::String(s) => Ok(s.as_str()),
                    other => Err(self.bad(
                        key,
                        format!("item {i} is a {:?}, not a string", other.value_type()),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.bad(
                key,
                format!("expected an array, found a {:?}", v.value_type()),
            )),
        }
    }

    fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(GValue::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    value_i64(v).ok_or_else(|| {
                        self.bad(
                            key,
                            format!("item {i} is a {:?}, not an integer", v.value_type()),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.bad(
                key,
                format!("expected an array, found a {:?}", v.value_type()),
            )),
        }
    }
}

fn value_i64(v: &GValue) -> Option<i64> {
    Some(match *v {
        GValue::U8(x) => x.into(),
        GValue::I8(x) => x.into(),
        GValue::U16(x) => x.into(),
        GValue::I16(x) => x.into(),
        GValue::U32(x) => x.into(),
        GValue::I32(x) => x.into(),
        GValue::U64(x) => i64::try_from(x).ok()?,
        GValue::I64(x) => x,
        _ => return None,
    })
}

fn value_u64(v: &GValue) -> Option<u64> {
    match *v {
        GValue::U64(x) => Some(x),
        _ => value_i64(v).and_then(|x| u64::try_from(x).ok()),
    }
}

/// `LlamaConfig` from the metadata, with transformers' key mapping (`GGUF_CONFIG_MAPPING`) and
/// the defaults of the HF config classes for keys a file leaves out.
fn config_from(
    meta: &Meta,
    arch: &str,
    tensors: &HashMap<String, TensorInfo>,
) -> Result<LlamaConfig, GgufError> {
    let (default_max_pos, head_dim_key) = match arch {
        "llama" => (2048, Some("rope.dimension_count")),
        "qwen2" => (32768, None),
        "qwen3" => (32768, Some("attention.key_length")),
        other => {
            return Err(GgufError::UnsupportedArchitecture {
                path: meta.path.to_path_buf(),
                arch: other.to_string(),
            })
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let scaling_key = k("rope.scaling.type");
    match meta.str(&scaling_key)? {
        None | Some("none") => {}
        Some(other) => {
            return Err(meta.bad(
                &scaling_key,
                format!("RoPE scaling {other:?} is not supported"),
            ))
        }
    }
    let hidden_size = meta.usize_req(&k("embedding_length"))?;
    let intermediate_size = meta.usize_req(&k("feed_forward_length"))?;
    let num_hidden_layers = meta.usize_req(&k("block_count"))?;
    let num_attention_heads = meta.usize_req(&k("attention.head_count"))?;
    // transformers: `{arch}.vocab_size`, else the length of the token list.
    let vocab_size = match meta.usize_opt(&k("vocab_size"))? {
        Some(v) => v,
        None => match meta.map.get("tokenizer.ggml.tokens") {
            Some(GValue::Array(tokens)) => tokens.len(),
            _ => return Err(meta.missing(&k("vocab_size"))),
        },
    };
    let eos = meta.u32_opt("tokenizer.ggml.eos_token_id")?;
    Ok(LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: meta.usize_opt(&k("attention.head_count_kv"))?,
        head_dim: match head_dim_key {
            Some(key) => meta.usize_opt(&k(key))?,
            None => None,
        },
        rms_norm_eps: meta
            .float(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-6),
        rope_theta: meta.float(&k("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: meta
            .usize_opt(&k("context_length"))?
            .unwrap_or(default_max_pos),
        tie_word_embeddings: !tensors.contains_key("output.weight"),
        attention_bias: tensors.contains_key("blk.0.attn_q.bias"),
        use_qk_norm: arch == "qwen3",
        bos_token_id: meta.u32_opt("tokenizer.ggml.bos_token_id")?,
        eos_token_id: eos.map(EosTokenId::One),
    })
}

/// llama.cpp stores Llama-3.1 RoPE scaling as `rope_freqs.weight`: one divisor per frequency.
/// transformers ignores that tensor; this loader instead recovers the `rope_scaling` block that
/// produces it (factor = the largest divisor; the usual low/high factors 1 and 4 and original
/// context 8192), and refuses the file when that does not reproduce the stored divisors.
fn rope_scaling_from_factors(cfg: &LlamaConfig, factors: &[f32]) -> Result<RopeScaling, String> {
    let hd = cfg.head_dim();
    if factors.len() != hd / 2 {
        return Err(format!(
            "rope_freqs.weight has {} values, expected head_dim / 2 = {}",
            factors.len(),
            hd / 2
        ));
    }
    let factor = factors.iter().copied().fold(f32::MIN, f32::max);
    let scaling = RopeScaling {
        factor: f64::from(factor),
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
        rope_type: Some("llama3".into()),
    };
    let plain = LlamaConfig {
        rope_scaling: None,
        ..cfg.clone()
    };
    let scaled = LlamaConfig {
        rope_scaling: Some(scaling.clone()),
        ..cfg.clone()
    };
    for ((b, s), f) in plain.inv_freq().iter().zip(scaled.inv_freq()).zip(factors) {
        let implied = b / s;
        if (implied - f64::from(*f)).abs() > 1e-3 * implied.abs().max(1.0) {
            return Err(format!(
                "rope_freqs.weight is not Llama-3 RoPE scaling with factor {factor} \
                 (a divisor {f} where {implied:.4} was expected)"
            ));
        }
    }
    Ok(scaling)
}

/// GPT-2's byte-to-unicode table (`bytes_to_unicode` in transformers).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            u32::from(b)
        } else {
            n += 1;
            255 + n
        };
        table[usize::from(b)] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    table
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// transformers' `GGUF_PRE_TOKENIZER_SPLITS`: the split regex for a `tokenizer.ggml.pre` value;
/// other values (SmolLM2's "smollm", GPT-2's "default", ...) keep GPT-2's byte-level regex.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// Control tokens (`tokenizer.ggml.token_type` 3) and user-defined ones (4).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The tokenizer transformers builds from the metadata (`convert_gguf_tokenizer` with
/// `byte_level_tokenizer`, then `TokenizersBackend`'s special tokens and post-processor), as a
/// `tokenizer.json` value, plus a `tokenizer_config.json`-like value for [`HfTokenizer`].
fn tokenizer_from(meta: &Meta) -> Result<HfTokenizer, GgufError> {
    let model_key = "tokenizer.ggml.model";
    let model = meta
        .str(model_key)?
        .ok_or_else(|| meta.missing(model_key))?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedTokenizer {
            path: meta.path.to_path_buf(),
            model: model.to_string(),
        });
    }
    let tokens_key = "tokenizer.ggml.tokens";
    let tokens = meta
        .str_array(tokens_key)?
        .ok_or_else(|| meta.missing(tokens_key))?;
    if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
        return Err(meta.bad(tokens_key, format!("{} tokens", tokens.len())));
    }
    let merges_key = "tokenizer.ggml.merges";
    let merges = meta
        .str_array(merges_key)?
        .ok_or_else(|| meta.missing(merges_key))?;
    let types_key = "tokenizer.ggml.token_type";
    let types = meta.int_array(types_key)?.unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(meta.bad(
            types_key,
            format!("{} types for {} tokens", types.len(), tokens.len()),
        ));
    }

    // The vocabulary, every token spelled in GPT-2's byte alphabet (a token already spelled so
    // is kept; another is re-spelled from its UTF-8 bytes). A repeated token keeps its last id.
    let spelling = bytes_to_unicode();
    let in_alphabet = |t: &str| t.chars().all(|c| spelling.contains(&c));
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        let key = if in_alphabet(token) {
            token.to_string()
        } else {
            token
                .bytes()
                .map(|b| spelling[usize::from(b)])
                .collect::<String>()
        };
        vocab.insert(key, json!(id));
    }
    let merges: Vec<Value> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split(' ').collect::<Vec<_>>().as_slice() {
            [a, b] => Ok(json!([a, b])),
            _ => Err(meta.bad(merges_key, format!("merge {i} ({m:?}) is not two tokens"))),
        })
        .collect::<Result<_, _>>()?;

    // Added tokens: control tokens (spelled in the byte alphabet) as special, user-defined ones
    // present in the vocabulary as plain; then the named special tokens and GPT2Tokenizer's
    // default "<|endoftext|>", when in the vocabulary, as special.
    let token_at = |key: &str| -> Result<Option<&str>, GgufError> {
        match meta.u32_opt(key)? {
            None => Ok(None),
            Some(id) => tokens.get(id as usize).copied().map(Some).ok_or_else(|| {
                meta.bad(key, format!("id {id} is past the {} tokens", tokens.len()))
            }),
        }
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;
    let unk = token_at("tokenizer.ggml.unknown_token_id")?;
    let pad = token_at("tokenizer.ggml.padding_token_id")?;
    let mut added: BTreeMap<u64, (String, bool)> = BTreeMap::new();
    for (token, ty) in tokens.iter().zip(&types) {
        let special = match *ty {
            TOKEN_CONTROL if in_alphabet(token) => true,
            TOKEN_USER_DEFINED => false,
            _ => continue,
        };
        if let Some(id) = vocab.get(*token).and_then(Value::as_u64) {
            added.entry(id).or_insert((token.to_string(), special));
        }
    }
    for token in [Some("<|endoftext|>"), bos, eos, unk, pad]
        .into_iter()
        .flatten()
    {
        if let Some(id) = vocab.get(token).and_then(Value::as_u64) {
            added
                .entry(id)
                .and_modify(|e| e.1 = true)
                .or_insert((token.to_string(), true));
        }
    }
    let added_tokens: Vec<Value> = added
        .iter()
        .map(|(id, (content, special))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": special})
        })
        .collect();

    let byte_level = |add_prefix_space: bool, use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let pre_tokenizer = match meta.str("tokenizer.ggml.pre")?.and_then(split_regex) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false, false),
        ]}),
        None => byte_level(false, true),
    };

    // TokenizersBackend.update_post_processor: BOS / EOS only when the flags say so.
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false) && bos.is_some();
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos.is_some();
    let piece =
        |token: &str, type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    for (side, type_id, list) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        if let (true, Some(b)) = (add_bos, bos) {
            list.push(piece(b, type_id));
        }
        list.push(seq(side, type_id));
        if let (true, Some(e)) = (add_eos, eos) {
            list.push(piece(e, type_id));
        }
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    for token in [
        add_bos.then_some(bos).flatten(),
        add_eos.then_some(eos).flatten(),
    ]
    .into_iter()
    .flatten()
    {
        let id = vocab.get(token).cloned().unwrap_or(Value::Null);
        specials.insert(
            token.to_string(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
    }

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": specials},
        "decoder": byte_level(true, true),
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let inner: tokenizers::Tokenizer =
        serde_json::from_value(tokenizer_json).map_err(|e| GgufError::Tokenizer {
            path: meta.path.to_path_buf(),
            message: e.to_string(),
        })?;

    let mut config =
        json!({"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad});
    let default_template = meta.str("tokenizer.chat_template")?;
    let tool_template = meta.str("tokenizer.chat_template.tool_use")?;
    config["chat_template"] = match (default_template, tool_template) {
        (d, Some(t)) => {
            let mut list = vec![json!({"name": "tool_use", "template": t})];
            if let Some(d) = d {
                list.insert(0, json!({"name": "default", "template": d}));
            }
            Value::Array(list)
        }
        (Some(d), None) => json!(d),
        (None, None) => Value::Null,
    };
    Ok(HfTokenizer::from_parts(inner, Some(&config), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.12.attn_output.weight",
                "model.layers.12.self_attn.o_proj.weight",
            ),
            ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_k_norm.weight",
                "model.layers.3.self_attn.k_norm.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(hf_name(g).as_deref(), Some(h), "{g}");
        }
        for g in [
            "blk.x.attn_q.weight",
            "blk.1.attn_q.scale",
            "blk..ffn_up.weight",
            "rope_freqs",
        ] {
            assert_eq!(hf_name(g), None, "{g}");
        }
    }

    /// llama.cpp's `permute` (HF -> GGUF) followed by ours is the identity, per head.
    #[test]
    fn rope_unpermute_inverts_llama_cpp_permute() {
        let (heads, hd, cols) = (3usize, 8usize, 2usize);
        let hf: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
        let hf = Tensor::from_vec(hf, (heads * hd, cols), &Device::Cpu).unwrap();
        // llama.cpp: w.reshape(n_head, 2, hd/2, *rest).swapaxes(1, 2).reshape(w.shape)
        let gguf = hf
            .reshape((heads, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, cols))
            .unwrap();
        // Row 1 of GGUF head 0 is HF row hd/2 (the interleaved layout).
        assert_eq!(
            gguf.get(1).unwrap().to_vec1::<f32>().unwrap(),
            hf.get(hd / 2).unwrap().to_vec1::<f32>().unwrap()
        );
        let back = unpermute_rope_rows(&gguf, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        assert!(unpermute_rope_rows(&gguf, 5).is_err());
    }

    #[test]
    fn rope_freqs_recover_llama3_scaling() {
        let mut cfg = LlamaConfig::tiny(32);
        cfg.hidden_size = 64 * 4;
        cfg.rope_theta = 500_000.0;
        let want = RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
            rope_type: Some("llama3".into()),
        };
        let scaled = LlamaConfig {
            rope_scaling: Some(want.clone()),
            ..cfg.clone()
        };
        let factors: Vec<f32> = cfg
            .inv_freq()
            .iter()
            .zip(scaled.inv_freq())
            .map(|(b, s)| (b / s) as f32)
            .collect();
        assert_eq!(rope_scaling_from_factors(&cfg, &factors), Ok(want));
        let mut wrong = factors.clone();
        wrong[0] = 2.0;
        assert!(rope_scaling_from_factors(&cfg, &wrong).is_err());
        assert!(rope_scaling_from_factors(&cfg, &factors[1..]).is_err());
    }

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[usize::from(b' ')], 'Ġ');
        assert_eq!(t[usize::from(b'\n')], 'Ċ');
        assert_eq!(t[usize::from(b'A')], 'A');
        assert_eq!(t[0], 'Ā');
        let mut all: Vec<char> = t.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 256);
    }
}
