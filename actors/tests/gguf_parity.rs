//! Parity with transformers on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF), loaded by
//! `policy::gguf` and run by `policy::model::Llama`, against the numbers transformers gives for
//! the same file (`tests/parity/smollm2.json`, written by `tests/parity/smollm2_transformers.py`):
//! logits on a plain prompt, tokenizer ids, chat-template ids (the model's own template and a
//! Hermes-style tool-use template with tools), and greedy decoding with the KV cache.
//!
//! The model file is not committed: `tests/fetch-models.sh` puts it in `target/models/`. Without
//! it these tests fail (they do not skip), saying so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use klong_actors::policy::chat::{ChatMessage, ChatTemplate, Role};
use klong_actors::policy::gguf::{self, GgufError, GgufModel};
use klong_actors::policy::model::{KvCache, Llama, LlamaConfig};
use klong_actors::policy::tokenizer::{Tokenizer, TokenizerError};
use klong_actors::policy::toolcall::ToolCallRequest;
use serde_json::Value;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const TOLERANCE: f32 = 1e-3;

fn model_path() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target").join("models").join(MODEL_FILE);
    assert!(
        path.is_file(),
        "{} is missing: run tests/fetch-models.sh (from the repository root)",
        path.display()
    );
    path
}

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/smollm2.json");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&bytes).expect("fixture is JSON")
    })
}

/// The model, loaded once for the tests of this binary.
struct Loaded {
    config: LlamaConfig,
    tensors: BTreeMap<String, (Vec<usize>, DType)>,
    tokenizer: Tokenizer,
    llama: Llama,
}

fn model() -> &'static Loaded {
    static MODEL: OnceLock<Loaded> = OnceLock::new();
    MODEL.get_or_init(|| {
        let start = std::time::Instant::now();
        let GgufModel {
            config,
            tensors,
            tokenizer,
        } = gguf::load(&model_path(), &Device::Cpu).expect("the GGUF loads");
        let loaded = start.elapsed();
        let summary = tensors
            .iter()
            .map(|(k, t)| (k.clone(), (t.dims().to_vec(), t.dtype())))
            .collect();
        let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &Device::Cpu);
        let llama = Llama::new(&config, vb).expect("Llama over the GGUF tensors");
        eprintln!(
            "gguf::load {loaded:.2?}, with Llama::new {:.2?}",
            start.elapsed()
        );
        Loaded {
            config,
            tensors: summary,
            tokenizer: Tokenizer::Hf(Box::new(tokenizer)),
            llama,
        }
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("an id")).expect("a u32 id"))
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a float list")
        .iter()
        .map(|x| x.as_f64().expect("a float") as f32)
        .collect()
}

#[test]
fn config_matches_smollm2() {
    let m = model();
    let c = &m.config;
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (49152, 576, 1536, 30)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_kv_heads(), c.head_dim()),
        (9, 3, 64)
    );
    assert_eq!(c.rope_theta, 100_000.0);
    assert_eq!(c.rms_norm_eps, f64::from(1e-5f32));
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings && !c.attention_bias && !c.use_qk_norm);
    assert!(!m.tensors.contains_key("lm_head.weight"));
    // 30 layers x 9 tensors + embeddings + final norm.
    assert_eq!(m.tensors.len(), 30 * 9 + 2);
    assert!(m.tensors.values().all(|(_, dtype)| *dtype == DType::F32));
    assert_eq!(
        m.tensors["model.layers.0.self_attn.k_proj.weight"].0,
        vec![192, 576]
    );
}

#[test]
fn logits_match_transformers() {
    let llama = &model().llama;
    let plain = &fixture()["plain"];
    let prompt = ids(&plain["ids"]);
    let t = prompt.len();
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let start = std::time::Instant::now();
    let logits = llama.forward(&input, None, None).unwrap(); // [1, T, V]
    eprintln!("forward over {t} tokens: {:.2?}", start.elapsed());
    let logits = logits.squeeze(0).unwrap();
    let lse: Vec<f32> = logits
        .exp()
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .log()
        .unwrap()
        .to_vec1()
        .unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let fixed = ids(&plain["fixed_ids"]);
    let positions = plain["positions"].as_array().unwrap();
    assert_eq!(positions.len(), t);
    let (mut max_diff, mut compared) = (0f32, 0usize);
    let mut worst = String::new();
    for (pos, (row, want)) in rows.iter().zip(positions).enumerate() {
        let top_ids = ids(&want["top_ids"]);
        let top_logits = floats(&want["top_logits"]);
        let pairs = top_ids
            .iter()
            .zip(&top_logits)
            .chain(fixed.iter().zip(&floats(&want["fixed_logits"])))
            .map(|(id, l)| (*id, *l))
            .collect::<Vec<_>>();
        for (id, l) in pairs {
            let d = (row[id as usize] - l).abs();
            compared += 1;
            if d > max_diff {
                max_diff = d;
                worst = format!("position {pos}, id {id}: ours {} vs {l}", row[id as usize]);
            }
        }
        let d = (lse[pos] - want["logsumexp"].as_f64().unwrap() as f32).abs();
        compared += 1;
        if d > max_diff {
            max_diff = d;
            worst = format!(
                "position {pos}, logsumexp: ours {} vs {}",
                lse[pos], want["logsumexp"]
            );
        }
        // The arg max is transformers' too.
        let argmax = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        assert_eq!(argmax, top_ids[0], "arg max at position {pos}");
    }
    eprintln!("logits: max abs diff {max_diff:.3e} over {compared} values ({worst})");
    assert!(
        max_diff <= TOLERANCE,
        "max abs logit diff {max_diff} > {TOLERANCE} ({worst})"
    );
}

#[test]
fn tokenizer_ids_match_transformers() {
    let tok = &model().tokenizer;
    let plain = &fixture()["plain"];
    assert_eq!(
        tok.encode(plain["text"].as_str().unwrap(), true).unwrap(),
        ids(&plain["ids"])
    );
    for probe in fixture()["tokenizer_probes"].as_array().unwrap() {
        let text = probe["text"].as_str().unwrap();
        let want = ids(&probe["ids"]);
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        // Byte-level BPE decodes back to the text.
        assert_eq!(tok.decode(&want).unwrap(), text, "decode {text:?}");
    }
    let special = &fixture()["special"];
    assert_eq!(
        tok.vocab_size() as u64,
        special["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(tok.bos_token(), special["bos_token"].as_str());
    assert_eq!(tok.eos_token(), special["eos_token"].as_str());
}

/// The fixture's conversation as the crate's messages.
fn messages() -> Vec<ChatMessage> {
    fixture()["chat"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role: Role = serde_json::from_value(m["role"].clone()).unwrap();
            let content = m["content"].as_str().unwrap().to_string();
            match role {
                Role::System => ChatMessage::system(content),
                Role::User => ChatMessage::user(content),
                Role::Assistant => {
                    let calls: Vec<ToolCallRequest> =
                        serde_json::from_value(m["tool_calls"].clone()).unwrap();
                    ChatMessage::assistant(content, calls)
                }
                Role::Tool => ChatMessage::tool(m["name"].as_str().unwrap(), content),
            }
        })
        .collect()
}

#[test]
fn chat_template_ids_match_transformers() {
    let tok = &model().tokenizer;
    let chat = &fixture()["chat"];
    let msgs = messages();

    // The model's own template (from the GGUF metadata).
    let own = ChatTemplate::for_tokenizer(tok, false).unwrap();
    let text = own.render(&msgs, &[], true).unwrap();
    assert_eq!(text, chat["own_template"]["text"].as_str().unwrap());
    assert_eq!(
        tok.encode(&text, false).unwrap(),
        ids(&chat["own_template"]["ids"])
    );

    // A Hermes-style tool-use template, with tools rendered through `tojson`.
    let tt = &chat["tool_template"];
    let template = ChatTemplate::from_jinja(
        tt["template"].as_str().unwrap(),
        tok.bos_token(),
        tok.eos_token(),
    )
    .unwrap();
    let tools = tt["tools"].as_array().unwrap().clone();
    let text = template.render(&msgs, &tools, true).unwrap();
    assert_eq!(text, tt["text"].as_str().unwrap());
    assert_eq!(tok.encode(&text, false).unwrap(), ids(&tt["ids"]));
}

#[test]
fn greedy_decode_with_kv_cache_matches_transformers() {
    let llama = &model().llama;
    let tok = &model().tokenizer;
    let prompt = ids(&fixture()["chat"]["own_template"]["ids"]);
    let want = ids(&fixture()["greedy"]["tokens"]);
    let eos = tok.eos_ids();
    let mut cache = KvCache::new();
    let mut next = prompt;
    let mut got = Vec::new();
    let start = std::time::Instant::now();
    while got.len() < want.len() {
        let input = Tensor::new(next.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = llama.forward(&input, None, Some(&mut cache)).unwrap();
        let last = logits.squeeze(0).unwrap().get(next.len() - 1).unwrap();
        let id = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        got.push(id);
        if eos.contains(&id) {
            break;
        }
        next = vec![id];
    }
    eprintln!("greedy: {} tokens in {:.2?}", got.len(), start.elapsed());
    assert_eq!(got, want, "greedy tokens {:?}", tok.decode(&got));
}

#[test]
fn tokenizer_only_load_from_gguf_path() {
    let tok = Tokenizer::load(&model_path()).expect("Tokenizer::load accepts a .gguf");
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.eos_ids(), vec![2]);
    assert_eq!(tok.vocab_size(), 49152);
    // No BOS is added (tokenizer.ggml.add_bos_token = false), as transformers.
    assert_eq!(
        tok.encode("Hello", true).unwrap(),
        tok.encode("Hello", false).unwrap()
    );
    // The model's chat template comes with it.
    assert!(ChatTemplate::for_tokenizer(&tok, false).is_ok());
}

/// Writes a minimal GGUF v3 file: the given metadata (key, type, raw value bytes) and no tensors.
fn gguf_bytes(kvs: &[(&str, u32, Vec<u8>)], tensor_count: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&tensor_count.to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, ty, v) in kvs {
        b.extend_from_slice(&(k.len() as u64).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(v);
    }
    b
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

#[test]
fn bad_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let load_err = |p: &Path| match gguf::load(p, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e,
    };

    // Missing file.
    let e = load_err(&dir.path().join("absent.gguf"));
    assert!(matches!(e, GgufError::Io { .. }), "{e}");
    assert!(matches!(
        Tokenizer::load(&dir.path().join("absent.gguf")),
        Err(TokenizerError::Gguf(GgufError::Io { .. }))
    ));

    // Garbage, empty, and a header cut short.
    for (name, bytes) in [
        ("garbage.gguf", b"this is not a gguf file at all".to_vec()),
        ("empty.gguf", Vec::new()),
        ("short.gguf", b"GGUF\x03\x00".to_vec()),
    ] {
        let e = load_err(&write(name, &bytes));
        assert!(matches!(e, GgufError::BadFormat { .. }), "{name}: {e}");
    }

    // The real file cut short: in the header, in the token list, in the tensor directory (the
    // data starts at byte 1_785_664), and in the tensor data.
    let real = std::fs::read(model_path()).unwrap();
    for (cut, in_data) in [
        (100usize, false),
        (1_000_000, false),
        (1_780_000, false),
        (1_786_000, true),
    ] {
        let p = write("truncated.gguf", &real[..cut]);
        let e = load_err(&p);
        if in_data {
            assert!(matches!(e, GgufError::Tensor { .. }), "cut at {cut}: {e}");
            // The tokenizer alone needs no tensor data.
            assert!(gguf::load_tokenizer(&p).is_ok());
        } else {
            assert!(
                matches!(e, GgufError::BadFormat { .. }),
                "cut at {cut}: {e}"
            );
        }
    }

    // Alignment 0 would divide by zero in the parser.
    let p = write(
        "align0.gguf",
        &gguf_bytes(&[("general.alignment", 4, 0u32.to_le_bytes().to_vec())], 0),
    );
    let e = load_err(&p);
    assert!(matches!(e, GgufError::BadFormat { .. }), "{e}");

    // Well-formed files with the wrong contents: typed errors naming what is wrong.
    let arch = |a: &str| ("general.architecture", 8u32, gguf_str(a));
    let e = load_err(&write("noarch.gguf", &gguf_bytes(&[], 0)));
    assert!(
        matches!(&e, GgufError::MissingKey { key, .. } if key == "general.architecture"),
        "{e}"
    );
    let e = load_err(&write("gpt2.gguf", &gguf_bytes(&[arch("gpt2")], 0)));
    assert!(
        matches!(&e, GgufError::UnsupportedArchitecture { arch, .. } if arch == "gpt2"),
        "{e}"
    );
    let e = load_err(&write("llama.gguf", &gguf_bytes(&[arch("llama")], 0)));
    assert!(matches!(e, GgufError::MissingKey { .. }), "{e}");
    let e = load_err(&write(
        "wrongtype.gguf",
        &gguf_bytes(
            &[
                arch("llama"),
                ("llama.embedding_length", 8, gguf_str("wide")),
            ],
            0,
        ),
    ));
    assert!(
        matches!(&e, GgufError::BadMetadata { key, .. } if key == "llama.embedding_length"),
        "{e}"
    );
    let spm = gguf_bytes(
        &[
            arch("llama"),
            ("tokenizer.ggml.model", 8, gguf_str("llama")),
        ],
        0,
    );
    let e = gguf::load_tokenizer(&write("spm.gguf", &spm)).unwrap_err();
    assert!(
        matches!(&e, GgufError::UnsupportedTokenizer { model, .. } if model == "llama"),
        "{e}"
    );
    // Errors name the file.
    assert!(e.to_string().contains("spm.gguf"), "{e}");
}
