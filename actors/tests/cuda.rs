//! The `cuda` feature on a GPU: the model's forward, KV-cache decode, sampling and bf16
//! training with f32 master weights on `cuda:0`, each against the CPU's f32 path.
//!
//! Built only with `--features cuda`, and such a build's tests need a GPU: without one they
//! fail, saying so (they do not skip). CI builds without the feature; `tests/cuda/run.sh` runs
//! them on a GPU machine (see the README).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use common::max_abs_diff;
use klong_actors::learner::precision::MixedPrecision;
use klong_actors::policy::generate::generate;
use klong_actors::policy::model::{KvCache, Llama, LlamaConfig};
use klong_actors::policy::sampling::SamplingParams;
use klong_actors::policy::tokenizer::{ByteTokenizer, Tokenizer};

fn gpu() -> Device {
    Device::new_cuda(0).unwrap_or_else(|e| panic!("these tests need a GPU (cuda:0): {e}"))
}

fn config() -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE);
    cfg.hidden_size = 64;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    cfg.intermediate_size = 128;
    cfg.max_position_embeddings = 256;
    cfg
}

/// The same f32 model on `device`, from `seed`.
fn model(seed: u64, device: &Device) -> (VarMap, Llama) {
    let vm = VarMap::new();
    let m = Llama::new(&config(), VarBuilder::from_varmap(&vm, DType::F32, device)).unwrap();
    common::fill(&vm, seed, (0.2, 0.1), device);
    (vm, m)
}

fn ids(rows: &[Vec<u32>], device: &Device) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), t), device).unwrap()
}

fn rows() -> Vec<Vec<u32>> {
    (0..3)
        .map(|r| {
            (0..40)
                .map(|i| ((i * 13 + r * 7) % 250) as u32 + 3)
                .collect()
        })
        .collect()
}

#[test]
fn the_gpu_forward_is_the_cpu_forward() {
    let (cpu, gpu) = (Device::Cpu, gpu());
    let (_, on_cpu) = model(1, &cpu);
    let (_, on_gpu) = model(1, &gpu);
    // Row 1 left-padded by 5: pads are masked as keys on both devices.
    let mask: Vec<f32> = (0..3)
        .flat_map(|r| (0..40).map(move |i| if r == 1 && i < 5 { 0.0 } else { 1.0 }))
        .collect();
    let mask_c = Tensor::from_vec(mask.clone(), (3, 40), &cpu).unwrap();
    let mask_g = Tensor::from_vec(mask, (3, 40), &gpu).unwrap();
    let a = on_cpu
        .forward(&ids(&rows(), &cpu), Some(&mask_c), None)
        .unwrap();
    let b = on_gpu
        .forward(&ids(&rows(), &gpu), Some(&mask_g), None)
        .unwrap();
    assert!(
        b.device().is_cuda(),
        "the GPU model ran on {:?}",
        b.device()
    );
    let d = max_abs_diff(&a, &b);
    eprintln!("logits, CPU vs GPU: max abs diff {d}");
    assert!(d < 1e-3, "logits differ by {d}");
}

#[test]
fn kv_cache_decode_on_the_gpu_is_the_full_forward() {
    let gpu = gpu();
    let (_, m) = model(2, &gpu);
    let all = rows();
    let full = m.forward(&ids(&all, &gpu), None, None).unwrap();
    let mut cache = KvCache::new();
    let prompt: Vec<Vec<u32>> = all.iter().map(|r| r[..32].to_vec()).collect();
    let mut last = m
        .forward(&ids(&prompt, &gpu), None, Some(&mut cache))
        .unwrap();
    for i in 32..40 {
        let d = max_abs_diff(
            &last.narrow(1, last.dim(1).unwrap() - 1, 1).unwrap(),
            &full.narrow(1, i - 1, 1).unwrap(),
        );
        assert!(d < 1e-3, "position {}: cached decode differs by {d}", i - 1);
        let step: Vec<Vec<u32>> = all.iter().map(|r| vec![r[i]]).collect();
        last = m
            .forward(&ids(&step, &gpu), None, Some(&mut cache))
            .unwrap();
    }
}

#[test]
fn sampling_on_the_gpu_is_seeded_and_greedy_is_the_cpus() {
    let (cpu, gpu) = (Device::Cpu, gpu());
    let (_, on_cpu) = model(3, &cpu);
    let (_, on_gpu) = model(3, &gpu);
    let tok = Tokenizer::Byte(ByteTokenizer);
    let prompts = vec![tok.encode("<|im_start|>user\nhello", false).unwrap()];
    let sampled = SamplingParams {
        temperature: 0.9,
        max_new_tokens: 24,
        seed: 11,
        ..SamplingParams::default()
    };
    let a = generate(&on_gpu, &tok, &prompts, std::slice::from_ref(&sampled), &[]).unwrap();
    let b = generate(&on_gpu, &tok, &prompts, std::slice::from_ref(&sampled), &[]).unwrap();
    assert_eq!(a[0].tokens, b[0].tokens, "same seed, other tokens");
    assert_eq!(a[0].tokens.len(), 24);
    assert!(a[0].logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    let greedy = SamplingParams {
        max_new_tokens: 16,
        ..SamplingParams::greedy()
    };
    let g = generate(&on_gpu, &tok, &prompts, std::slice::from_ref(&greedy), &[]).unwrap();
    let c = generate(&on_cpu, &tok, &prompts, std::slice::from_ref(&greedy), &[]).unwrap();
    assert_eq!(g[0].tokens, c[0].tokens, "greedy tokens, GPU vs CPU");
}

/// 60 AdamW steps of the copy task from the same start: f32, or bf16 compute over f32
/// masters, on `device`. Returns the held-out loss before and after.
fn train(device: &Device, mixed: bool) -> (f32, f32) {
    let (master, f32_model) = model(4, device);
    let mp = MixedPrecision::new(&master, DType::BF16).unwrap();
    let bf16_model = Llama::new(
        &config(),
        VarBuilder::from_varmap(mp.compute(), DType::BF16, device),
    )
    .unwrap();
    let (m, precision) = if mixed {
        (&bf16_model, Some(&mp))
    } else {
        (&f32_model, None)
    };
    common::train_copy_task(m, &master, precision, ((8, 16), 60), device)
}

#[test]
fn bf16_training_on_the_gpu_follows_f32_training_on_the_cpu() {
    let gpu = gpu();
    let (first32, last32) = train(&Device::Cpu, false);
    let (first16, last16) = train(&gpu, true);
    eprintln!("CPU f32: {first32} -> {last32}; GPU bf16 over f32 masters: {first16} -> {last16}");
    assert!(
        (first16 - first32).abs() < 0.02 * first32,
        "start {first16} vs {first32}"
    );
    assert!(
        last32 < 0.9 * first32,
        "f32 training: {first32} -> {last32}"
    );
    assert!(
        last16 < 0.9 * first16,
        "bf16 training: {first16} -> {last16}"
    );
    assert!(
        (last16 - last32).abs() < 0.15 * (first32 - last32),
        "GPU bf16 {last16} vs CPU f32 {last32}"
    );
}

#[test]
fn the_gpu_logits_of_a_bf16_model_stay_near_f32() {
    let gpu = gpu();
    let (master, f32_model) = model(5, &gpu);
    let mp = MixedPrecision::new(&master, DType::BF16).unwrap();
    let bf16_model = Llama::new(
        &config(),
        VarBuilder::from_varmap(mp.compute(), DType::BF16, &gpu),
    )
    .unwrap();
    let x = ids(&rows(), &gpu);
    let a = f32_model.forward(&x, None, None).unwrap();
    let b = bf16_model.forward(&x, None, None).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let pa = candle_nn::ops::softmax_last_dim(&a).unwrap();
    let pb = candle_nn::ops::softmax_last_dim(&b.to_dtype(DType::F32).unwrap()).unwrap();
    let d = max_abs_diff(&pa, &pb);
    let agree = a
        .argmax(D::Minus1)
        .unwrap()
        .eq(&b.to_dtype(DType::F32).unwrap().argmax(D::Minus1).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("bf16 vs f32 on the GPU: probabilities within {d}, argmax agrees at {agree}");
    assert!(d < 0.05, "probabilities differ by {d}");
    assert!(agree > 0.9, "argmax agrees at only {agree}");
}
