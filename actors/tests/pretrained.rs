//! HF folders: save then load gives identical logits (Llama, Qwen2 and Qwen3 variants); sharded
//! checkpoints load through their index; bad folders fail with errors that name the problem;
//! and an export loads in transformers with the same logits (against a fixture written by
//! `actors/tests/parity/tiny_export_transformers.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use klong_actors::policy::model::{Llama, LlamaConfig};
use klong_actors::policy::pretrained::{save_hf, Pretrained, PretrainedError};
use klong_actors::policy::tokenizer::{ByteTokenizer, Tokenizer};
use serde_json::Value;

/// splitmix64: deterministic weights on every run and platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The three variants the exporter must get right; the fixture names them the same way.
fn variant(name: &str) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE);
    cfg.hidden_size = 32;
    cfg.intermediate_size = 48;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    cfg.rope_theta = 5000.0;
    cfg.rms_norm_eps = 1e-5;
    match name {
        "llama" => {}
        "llama_tied" => cfg.tie_word_embeddings = true,
        "qwen2" => cfg.attention_bias = true,
        "qwen3" => {
            cfg.use_qk_norm = true;
            cfg.head_dim = Some(12);
        }
        other => panic!("no variant {other}"),
    }
    cfg
}

const VARIANTS: [&str; 4] = ["llama", "llama_tied", "qwen2", "qwen3"];

/// Deterministic weights: matrices uniform * 0.2, norm weights around 1, biases small.
fn weights(cfg: &LlamaConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = Rng(seed);
    klong_actors::policy::pretrained::expected_tensors(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = if name.ends_with("norm.weight") {
                (0..n).map(|_| 1.0 + 0.2 * rng.sym()).collect()
            } else if name.ends_with(".bias") {
                (0..n).map(|_| 0.2 * rng.sym()).collect()
            } else {
                (0..n).map(|_| 0.2 * rng.sym()).collect()
            };
            let t = Tensor::from_vec(vals, shape, &Device::Cpu).unwrap();
            (name, t)
        })
        .collect()
}

fn model_over(cfg: &LlamaConfig, w: &BTreeMap<String, Tensor>) -> Llama {
    let map = w.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    Llama::new(cfg, VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)).unwrap()
}

/// The ids every logits comparison uses (the fixture stores the same).
const PROBE: [u32; 12] = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 257];

fn logits(model: &Llama) -> Vec<Vec<f32>> {
    let ids = Tensor::new(&[PROBE], &Device::Cpu).unwrap();
    model
        .forward(&ids, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn save_then_load_gives_identical_logits() {
    for (i, name) in VARIANTS.iter().enumerate() {
        let cfg = variant(name);
        let w = weights(&cfg, 100 + i as u64);
        let before = logits(&model_over(&cfg, &w));
        let dir = tempfile::tempdir().unwrap();
        save_hf(dir.path(), &cfg, &w, Some(&Tokenizer::Byte(ByteTokenizer))).unwrap();
        let loaded = Pretrained::load(dir.path(), &Device::Cpu).unwrap();
        // The export spells out what HF would otherwise derive (head_dim, kv heads).
        let mut want = cfg.clone();
        want.head_dim = Some(cfg.head_dim());
        assert_eq!(loaded.config, want, "{name}: config round trip");
        assert!(matches!(loaded.tokenizer, Tokenizer::Byte(_)));
        let after = logits(&loaded.frozen().unwrap());
        assert_eq!(before, after, "{name}: logits differ after save + load");
        // The trainable form computes the same.
        let (vm, model) = loaded.trainable().unwrap();
        assert_eq!(vm.all_vars().len(), w.len());
        assert_eq!(logits(&model), before, "{name}: trainable");
    }
}

#[test]
fn sharded_checkpoint_loads_through_its_index() {
    let cfg = variant("llama");
    let w = weights(&cfg, 7);
    let dir = tempfile::tempdir().unwrap();
    save_hf(dir.path(), &cfg, &w, Some(&Tokenizer::Byte(ByteTokenizer))).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    // Two shards, split by name, as transformers writes them.
    let mut shard = [
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in w.iter().enumerate() {
        let k = i % 2;
        shard[k].insert(name.clone(), t.clone());
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        weight_map.insert(name.clone(), Value::String(file));
    }
    for (k, s) in shard.iter().enumerate() {
        let file = dir
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", k + 1));
        candle_core::safetensors::save(s, file).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let loaded = Pretrained::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(
        logits(&loaded.frozen().unwrap()),
        logits(&model_over(&cfg, &w))
    );
}

#[test]
fn bf16_checkpoints_widen_to_f32() {
    let cfg = variant("llama");
    let w = weights(&cfg, 9);
    let dir = tempfile::tempdir().unwrap();
    save_hf(dir.path(), &cfg, &w, Some(&Tokenizer::Byte(ByteTokenizer))).unwrap();
    let half: std::collections::HashMap<String, Tensor> = w
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, dir.path().join("model.safetensors")).unwrap();
    let loaded = Pretrained::load(dir.path(), &Device::Cpu).unwrap();
    for t in loaded.weights.values() {
        assert_eq!(t.dtype(), DType::F32);
    }
}

/// A saved folder, then `edit` applied to it; returns the load error.
fn load_error(edit: impl FnOnce(&Path)) -> PretrainedError {
    let cfg = variant("llama");
    let w = weights(&cfg, 3);
    let dir = tempfile::tempdir().unwrap();
    save_hf(dir.path(), &cfg, &w, Some(&Tokenizer::Byte(ByteTokenizer))).unwrap();
    edit(dir.path());
    Pretrained::load(dir.path(), &Device::Cpu).unwrap_err()
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&path, v.to_string()).unwrap();
}

fn rewrite_weights(dir: &Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    f(&mut w);
    candle_core::safetensors::save(&w, &path).unwrap();
}

#[test]
fn bad_folders_fail_with_errors_that_name_the_problem() {
    let e = load_error(|d| {
        rewrite_weights(d, |w| {
            w.remove("model.layers.1.mlp.up_proj.weight");
        })
    });
    assert!(
        e.to_string().contains("model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );

    let e = load_error(|d| {
        rewrite_weights(d, |w| {
            let t = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
            w.insert("model.layers.0.self_attn.o_proj.bias".into(), t);
        })
    });
    assert!(matches!(e, PretrainedError::UnusedTensors { .. }), "{e}");
    assert!(e.to_string().contains("o_proj.bias"), "{e}");

    let e = load_error(|d| {
        rewrite_weights(d, |w| {
            let t = Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap();
            w.insert("model.embed_tokens.weight".into(), t);
        })
    });
    assert!(matches!(e, PretrainedError::ShapeMismatch { .. }), "{e}");

    let e = load_error(|d| edit_config(d, |c| drop(c.insert("model_type".into(), "gpt2".into()))));
    assert!(e.to_string().contains("\"gpt2\""), "{e}");

    let e = load_error(|d| edit_config(d, |c| drop(c.insert("hidden_size".into(), "wide".into()))));
    assert!(e.to_string().contains("hidden_size"), "{e}");

    let e = load_error(|d| {
        edit_config(d, |c| {
            drop(c.insert("num_attention_heads".into(), 0.into()))
        })
    });
    assert!(matches!(e, PretrainedError::InvalidConfig { .. }), "{e}");

    let e = load_error(|d| edit_config(d, |c| drop(c.insert("hidden_act".into(), "gelu".into()))));
    assert!(e.to_string().contains("gelu"), "{e}");

    let e = load_error(|d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    assert!(matches!(e, PretrainedError::NoWeights { .. }), "{e}");

    // A shard name that leaves the folder is refused before anything is opened.
    let e = load_error(|d| {
        let index = serde_json::json!({"weight_map": {"model.norm.weight": "../x.safetensors"}});
        std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    });
    assert!(e.to_string().contains("../x.safetensors"), "{e}");

    let e =
        load_error(|d| std::fs::write(d.join("model.safetensors"), b"not safetensors").unwrap());
    assert!(matches!(e, PretrainedError::Tensor { .. }), "{e}");

    let e = load_error(|d| std::fs::write(d.join("config.json"), b"{").unwrap());
    assert!(e.to_string().contains("config.json"), "{e}");

    let e = load_error(|d| std::fs::remove_file(d.join("klong_tokenizer.json")).unwrap());
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Writes the exports the transformers script reads (`--ignored`: run it before the script,
/// see the script's header).
#[test]
#[ignore]
fn write_exports_for_transformers() {
    let out = workspace_root().join("target/parity/tiny_export");
    for (i, name) in VARIANTS.iter().enumerate() {
        let cfg = variant(name);
        let w = weights(&cfg, 100 + i as u64);
        save_hf(&out.join(name), &cfg, &w, None).unwrap();
    }
    let probe: Vec<u32> = PROBE.to_vec();
    std::fs::write(
        out.join("probe.json"),
        serde_json::to_string(&probe).unwrap(),
    )
    .unwrap();
}

/// The exports load in transformers and give the same logits there (fixture written by
/// transformers; the weights are regenerated here deterministically, so the fixture pins
/// exactly this model).
#[test]
fn export_loads_in_transformers_with_the_same_logits() {
    let path = workspace_root().join("actors/tests/parity/tiny_export.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let probe: Vec<u32> = serde_json::from_value(fixture["probe"].clone()).unwrap();
    assert_eq!(probe, PROBE);
    for (i, name) in VARIANTS.iter().enumerate() {
        let cfg = variant(name);
        let w = weights(&cfg, 100 + i as u64);
        let dir = tempfile::tempdir().unwrap();
        save_hf(dir.path(), &cfg, &w, Some(&Tokenizer::Byte(ByteTokenizer))).unwrap();
        let ours = logits(
            &Pretrained::load(dir.path(), &Device::Cpu)
                .unwrap()
                .frozen()
                .unwrap(),
        );
        let theirs: Vec<Vec<f32>> =
            serde_json::from_value(fixture["variants"][name]["logits"].clone()).unwrap();
        let d = max_diff(&ours, &theirs);
        eprintln!("{name}: max |ours - transformers| = {d:e}");
        assert!(d < 1e-5, "{name}: max abs logit diff {d} vs transformers");
    }
}

#[test]
fn trainable_weights_are_independent_of_the_loaded_ones() {
    // Training must not write through to the loaded tensors (a frozen reference model built
    // from the same Pretrained must stay the reference).
    let cfg = variant("llama");
    let w = weights(&cfg, 5);
    let dir = tempfile::tempdir().unwrap();
    save_hf(dir.path(), &cfg, &w, Some(&Tokenizer::Byte(ByteTokenizer))).unwrap();
    let loaded = Pretrained::load(dir.path(), &Device::Cpu).unwrap();
    let reference = loaded.frozen().unwrap();
    let before = logits(&reference);
    let (vm, _model) = loaded.trainable().unwrap();
    for var in vm.all_vars() {
        var.set(&var.zeros_like().unwrap()).unwrap();
    }
    assert_eq!(logits(&reference), before);
}
