//! Pretrained model files: loading a Hugging Face folder or a GGUF file into one model, and
//! saving a model as a Hugging Face folder that transformers loads back.
//!
//! An HF folder is `config.json`, the weights as `model.safetensors` or as shards named by
//! `model.safetensors.index.json`, and the tokenizer files (`tokenizer.json`,
//! `tokenizer_config.json`, optionally `generation_config.json`). Weights stored in bf16 or f16
//! are widened to f32: training on CPU is f32, and f32 master weights are what mixed
//! precision keeps too.
//!
//! Loading is strict in both directions: a tensor the model needs and the files lack is an
//! error naming it, and so is a tensor the files hold that the model would not use (a model
//! that is not what the config says it is must not load "mostly").

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};
use thiserror::Error;

use super::gguf;
use super::model::{Llama, LlamaConfig};
use super::tokenizer::{ByteTokenizer, Tokenizer, TokenizerError};

/// Bounds on what a folder may name, so a hostile index cannot make the loader open
/// thousands of files or a config allocate absurd tensors before any check runs.
const MAX_SHARDS: usize = 4096;
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum PretrainedError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: model_type {model_type:?} is not supported (llama, qwen2, qwen3 are)")]
    UnsupportedModelType { path: PathBuf, model_type: String },
    #[error("{path}: {message}")]
    UnsupportedFeature { path: PathBuf, message: String },
    #[error("{path}: no weights (neither model.safetensors nor model.safetensors.index.json)")]
    NoWeights { path: PathBuf },
    #[error("{path}: tensor {name} appears in two shards")]
    DuplicateTensor { path: PathBuf, name: String },
    #[error("{path}: the model needs tensor {name}, which the files do not hold")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: the files hold {count} tensor(s) the model does not use, e.g. {example}")]
    UnusedTensors {
        path: PathBuf,
        count: usize,
        example: String,
    },
    #[error("{path}: invalid config: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
}

/// A model's files, loaded: configuration, f32 weights under HF names, tokenizer.
#[derive(Debug)]
pub struct Pretrained {
    pub config: LlamaConfig,
    pub weights: BTreeMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    /// Where it came from, for messages.
    pub source: PathBuf,
}

impl Pretrained {
    /// Loads an HF folder or a `.gguf` file (by extension) onto `device`, weights as f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self, PretrainedError> {
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf {
            // `gguf::load` checks the tensors against the config itself.
            let g = gguf::load(path, device)?;
            return Ok(Pretrained {
                config: g.config,
                weights: g.tensors,
                tokenizer: Tokenizer::Hf(Box::new(g.tokenizer)),
                source: path.to_path_buf(),
            });
        }
        let p = {
            let config = read_hf_config(&path.join("config.json"))?;
            let weights = read_safetensors(path, device)?;
            let tokenizer = read_tokenizer(path)?;
            Pretrained {
                config,
                weights,
                tokenizer,
                source: path.to_path_buf(),
            }
        };
        p.check_tensors()?;
        Ok(p)
    }

    /// The exact set of tensors the model reads, with shapes, checked against the weights.
    fn check_tensors(&self) -> Result<(), PretrainedError> {
        let expected = expected_tensors(&self.config);
        for (name, shape) in &expected {
            let t = self
                .weights
                .get(name)
                .ok_or_else(|| PretrainedError::MissingTensor {
                    path: self.source.clone(),
                    name: name.clone(),
                })?;
            if t.dims() != shape.as_slice() {
                return Err(PretrainedError::ShapeMismatch {
                    path: self.source.clone(),
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.dims().to_vec(),
                });
            }
        }
        // HF checkpoints of older versions carry RoPE buffers; they are derived, not learned.
        let unused: Vec<&String> = self
            .weights
            .keys()
            .filter(|k| !expected.contains_key(*k) && !k.ends_with("rotary_emb.inv_freq"))
            .collect();
        // A tied checkpoint may still store lm_head.weight (equal to the embedding); accept it.
        let unused: Vec<&String> = unused
            .into_iter()
            .filter(|k| !(self.config.tie_word_embeddings && k.as_str() == "lm_head.weight"))
            .collect();
        if let Some(first) = unused.first() {
            return Err(PretrainedError::UnusedTensors {
                path: self.source.clone(),
                count: unused.len(),
                example: (*first).clone(),
            });
        }
        Ok(())
    }

    /// A trainable model: every weight becomes a `Var` of the returned map (which the optimizer
    /// and `save_hf` take).
    pub fn trainable(&self) -> Result<(VarMap, Llama), PretrainedError> {
        let vm = VarMap::new();
        {
            let data = vm.data();
            let mut data = data.lock().map_err(|_| PretrainedError::Tensor {
                path: self.source.clone(),
                source: candle_core::Error::msg("VarMap lock poisoned"),
            })?;
            for (name, t) in &self.weights {
                let var = Var::from_tensor(t).map_err(|source| PretrainedError::Tensor {
                    path: self.source.clone(),
                    source,
                })?;
                data.insert(name.clone(), var);
            }
        }
        let device = self.device();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &device);
        let model = Llama::new(&self.config, vb).map_err(|source| PretrainedError::Tensor {
            path: self.source.clone(),
            source,
        })?;
        Ok((vm, model))
    }

    /// A model over the loaded tensors, tracking no gradients (generation, reference policies).
    pub fn frozen(&self) -> Result<Llama, PretrainedError> {
        let device = self.device();
        let map: HashMap<String, Tensor> = self
            .weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Llama::from_tensors(&self.config, map, &device).map_err(|source| PretrainedError::Tensor {
            path: self.source.clone(),
            source,
        })
    }

    fn device(&self) -> Device {
        self.weights
            .values()
            .next()
            .map_or(Device::Cpu, |t| t.device().clone())
    }
}

/// Every tensor name the model reads for `cfg`, with its shape (mirrors `Llama::new`).
pub fn expected_tensors(cfg: &LlamaConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let hd = cfg.head_dim();
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_kv_heads() * hd);
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), vec![v, h]);
    }
    for i in 0..cfg.num_hidden_layers {
        let l = format!("model.layers.{i}");
        let mut put = |name: &str, shape: Vec<usize>| m.insert(format!("{l}.{name}"), shape);
        put("input_layernorm.weight", vec![h]);
        put("post_attention_layernorm.weight", vec![h]);
        put("self_attn.q_proj.weight", vec![q, h]);
        put("self_attn.k_proj.weight", vec![kv, h]);
        put("self_attn.v_proj.weight", vec![kv, h]);
        put("self_attn.o_proj.weight", vec![h, q]);
        if cfg.attention_bias {
            put("self_attn.q_proj.bias", vec![q]);
            put("self_attn.k_proj.bias", vec![kv]);
            put("self_attn.v_proj.bias", vec![kv]);
        }
        if cfg.use_qk_norm {
            put("self_attn.q_norm.weight", vec![hd]);
            put("self_attn.k_norm.weight", vec![hd]);
        }
        put("mlp.gate_proj.weight", vec![f, h]);
        put("mlp.up_proj.weight", vec![f, h]);
        put("mlp.down_proj.weight", vec![h, f]);
    }
    m
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, PretrainedError> {
    let io = |source| PretrainedError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > max {
        return Err(PretrainedError::Parse {
            path: path.to_path_buf(),
            message: format!("{len} bytes, more than the {max} a config may have"),
        });
    }
    std::fs::read(path).map_err(io)
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value, PretrainedError> {
    serde_json::from_slice(bytes).map_err(|e| PretrainedError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads `config.json`, deriving what HF derives from `model_type` and refusing what this
/// model does not implement (rather than loading it and computing something else).
pub fn read_hf_config(path: &Path) -> Result<LlamaConfig, PretrainedError> {
    let bytes = read_bounded(path, MAX_CONFIG_BYTES)?;
    let raw = parse_json(path, &bytes)?;
    let model_type = raw
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("llama")
        .to_string();
    let mut cfg: LlamaConfig = {
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de).map_err(|e| PretrainedError::Parse {
            path: path.to_path_buf(),
            message: format!("field `{}`: {}", e.path(), e.inner()),
        })?
    };
    let unsupported = |message: String| PretrainedError::UnsupportedFeature {
        path: path.to_path_buf(),
        message,
    };
    let flag = |key: &str| raw.get(key).and_then(Value::as_bool).unwrap_or(false);
    match model_type.as_str() {
        "llama" => {
            // HF Llama's attention_bias puts a bias on o_proj too, which this model lacks.
            if cfg.attention_bias {
                return Err(unsupported(
                    "llama with attention_bias (a bias on o_proj) is not implemented".into(),
                ));
            }
            if flag("mlp_bias") {
                return Err(unsupported("mlp_bias is not implemented".into()));
            }
        }
        "qwen2" => {
            cfg.attention_bias = true;
            if flag("use_sliding_window") {
                return Err(unsupported(
                    "sliding-window attention is not implemented".into(),
                ));
            }
        }
        "qwen3" => {
            if cfg.attention_bias {
                return Err(unsupported(
                    "qwen3 with attention_bias (a bias on o_proj) is not implemented".into(),
                ));
            }
            cfg.use_qk_norm = true;
            if flag("use_sliding_window") {
                return Err(unsupported(
                    "sliding-window attention is not implemented".into(),
                ));
            }
        }
        other => {
            return Err(PretrainedError::UnsupportedModelType {
                path: path.to_path_buf(),
                model_type: other.to_string(),
            })
        }
    }
    if let Some(act) = raw.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(unsupported(format!(
                "hidden_act {act:?} (only silu is implemented)"
            )));
        }
    }
    cfg.validate()
        .map_err(|message| PretrainedError::InvalidConfig {
            path: path.to_path_buf(),
            message,
        })?;
    Ok(cfg)
}

/// The folder's weights: one `model.safetensors`, or the shards its index names. (A run's
/// stage models are such folders: RL reads its reference from the last Sft stage's.)
pub fn read_safetensors(
    dir: &Path,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>, PretrainedError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let bytes = read_bounded(&index, 64 << 20)?;
        let v = parse_json(&index, &bytes)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| PretrainedError::Parse {
                path: index.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| PretrainedError::Parse {
                path: index.clone(),
                message: format!("weight_map[{name:?}] is not a file name"),
            })?;
            // Shard names are plain file names in the folder: never a path out of it.
            if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
                return Err(PretrainedError::Parse {
                    path: index.clone(),
                    message: format!("weight_map[{name:?}] = {file:?} is not a file name"),
                });
            }
            shards.insert(file.to_string());
        }
        if shards.len() > MAX_SHARDS {
            return Err(PretrainedError::Parse {
                path: index.clone(),
                message: format!("{} shards, more than {MAX_SHARDS}", shards.len()),
            });
        }
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else if single.exists() {
        vec![single]
    } else {
        return Err(PretrainedError::NoWeights {
            path: dir.to_path_buf(),
        });
    };
    let mut out = BTreeMap::new();
    for file in files {
        let tensors = candle_core::safetensors::load(&file, device).map_err(|source| {
            PretrainedError::Tensor {
                path: file.clone(),
                source,
            }
        })?;
        for (name, t) in tensors {
            let t = if t.dtype() == DType::F32 {
                t
            } else {
                t.to_dtype(DType::F32)
                    .map_err(|source| PretrainedError::Tensor {
                        path: file.clone(),
                        source,
                    })?
            };
            if out.insert(name.clone(), t).is_some() {
                return Err(PretrainedError::DuplicateTensor { path: file, name });
            }
        }
    }
    Ok(out)
}

/// Writes `dir` as an HF folder: `model.safetensors` (f32), `config.json` with the
/// `model_type` and `architectures` transformers needs, and the tokenizer files when the
/// tokenizer is an HF one. Each file is written under a temporary name and renamed, so a crash
/// leaves either the old file or the new one.
pub fn save_hf(
    dir: &Path,
    config: &LlamaConfig,
    weights: &BTreeMap<String, Tensor>,
    tokenizer: Option<&Tokenizer>,
) -> Result<(), PretrainedError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PretrainedError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let expected = expected_tensors(config);
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for name in expected.keys() {
        let t = weights
            .get(name)
            .ok_or_else(|| PretrainedError::MissingTensor {
                path: dir.to_path_buf(),
                name: name.clone(),
            })?;
        let t = t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&Device::Cpu))
            .map_err(|source| PretrainedError::Tensor {
                path: dir.to_path_buf(),
                source,
            })?;
        out.insert(name.clone(), t);
    }
    let weights_path = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&out, &tmp).map_err(|source| PretrainedError::Tensor {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &weights_path).map_err(io(&weights_path))?;

    write_json(dir, "config.json", &hf_config_json(config))?;
    match tokenizer {
        Some(Tokenizer::Hf(h)) => {
            let path = dir.join("tokenizer.json");
            let tmp = dir.join("tokenizer.json.tmp");
            h.save_json(&tmp)?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            write_json(dir, "tokenizer_config.json", &h.config_json())?;
        }
        Some(Tokenizer::Byte(_)) => {
            write_json(dir, BYTE_TOKENIZER_FILE, &json!({ "kind": "byte" }))?;
        }
        None => {}
    }
    Ok(())
}

/// Marks a folder whose model uses the built-in byte-level tokenizer, which has no
/// `tokenizer.json` form (its ids are raw bytes, and its chat template is built in).
pub const BYTE_TOKENIZER_FILE: &str = "klong_tokenizer.json";

/// The folder's tokenizer: the byte-level one when the marker says so, else `tokenizer.json`.
fn read_tokenizer(dir: &Path) -> Result<Tokenizer, PretrainedError> {
    let marker = dir.join(BYTE_TOKENIZER_FILE);
    if marker.exists() {
        let bytes = read_bounded(&marker, MAX_CONFIG_BYTES)?;
        let v = parse_json(&marker, &bytes)?;
        return match v.get("kind").and_then(Value::as_str) {
            Some("byte") => Ok(Tokenizer::Byte(ByteTokenizer)),
            other => Err(PretrainedError::Parse {
                path: marker,
                message: format!("unknown tokenizer kind {other:?} (expected \"byte\")"),
            }),
        };
    }
    Ok(Tokenizer::load(dir)?)
}

/// `config.json` as transformers reads it: the model type follows the variant's options.
pub fn hf_config_json(config: &LlamaConfig) -> Value {
    let (model_type, arch) = if config.use_qk_norm {
        ("qwen3", "Qwen3ForCausalLM")
    } else if config.attention_bias {
        ("qwen2", "Qwen2ForCausalLM")
    } else {
        ("llama", "LlamaForCausalLM")
    };
    let mut v = serde_json::to_value(config).unwrap_or_else(|_| json!({}));
    if let Value::Object(o) = &mut v {
        // Derived from model_type on load; written out it would confuse transformers.
        o.remove("use_qk_norm");
        if model_type == "qwen2" {
            o.remove("attention_bias");
        }
        o.insert("model_type".into(), json!(model_type));
        o.insert("architectures".into(), json!([arch]));
        o.insert("hidden_act".into(), json!("silu"));
        o.insert("torch_dtype".into(), json!("float32"));
        let kv = config.num_kv_heads();
        o.insert("num_key_value_heads".into(), json!(kv));
        o.insert("head_dim".into(), json!(config.head_dim()));
    }
    v
}

fn write_json(dir: &Path, name: &str, v: &Value) -> Result<(), PretrainedError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let text = serde_json::to_string_pretty(v).map_err(|e| PretrainedError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(|source| PretrainedError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| PretrainedError::Io { path, source })
}
