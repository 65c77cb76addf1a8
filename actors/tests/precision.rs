//! Mixed precision (bf16 compute, f32 master weights) on CPU: the same code the `cuda` feature
//! runs on a GPU. Gradients agree with f32 ones to bf16 accuracy, and training follows the
//! same loss curve as f32 training.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use klong_actors::learner::optim::{AdamW, AdamWParams};
use klong_actors::learner::precision::MixedPrecision;
use klong_actors::policy::model::{Llama, LlamaConfig};

fn config() -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(64);
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    cfg.max_position_embeddings = 1024;
    cfg
}

fn fill(vm: &VarMap, seed: u64) {
    common::fill(vm, seed, (0.3, 0.1), &Device::Cpu);
}

/// The copy task, 4 rows of 8 + 8 tokens.
fn loss(model: &Llama, step: u64) -> Tensor {
    common::copy_loss(model, step, (4, 8), &Device::Cpu)
}

#[test]
fn bf16_gradients_match_f32_gradients() {
    let cfg = config();
    let master = VarMap::new();
    let f32_model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(&master, DType::F32, &Device::Cpu),
    )
    .unwrap();
    fill(&master, 1);
    let opt = AdamW::from_varmap(&master, AdamWParams::default()).unwrap();
    let mp = MixedPrecision::new(&master, DType::BF16).unwrap();
    let bf16_model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(mp.compute(), DType::BF16, &Device::Cpu),
    )
    .unwrap();

    let g32 = opt.grads_from(&f32_model.backward(&loss(&f32_model, 0)).unwrap());
    let g16 = mp
        .master_grads(&bf16_model.backward(&loss(&bf16_model, 0)).unwrap(), &opt)
        .unwrap();
    let flat = |g: &klong_actors::learner::optim::Grads| -> Vec<f32> {
        g.0.iter()
            .flat_map(|t| {
                let t = t.as_ref().expect("every weight has a gradient");
                assert_eq!(t.dtype(), DType::F32);
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    };
    let (a, b) = (flat(&g32), flat(&g16));
    let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cos = dot / (na * nb);
    eprintln!("cosine(f32 grads, bf16 grads) = {cos}, norms {na} / {nb}");
    assert!(cos > 0.99, "bf16 gradients diverge from f32: cosine {cos}");
    assert!((na / nb - 1.0).abs() < 0.05, "norms {na} vs {nb}");
}

/// Trains 40 steps from the same start, f32 throughout or bf16 compute over f32 masters;
/// returns the held-out loss before and after.
fn train(mixed: bool) -> (f32, f32) {
    let cfg = config();
    let master = VarMap::new();
    let f32_model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(&master, DType::F32, &Device::Cpu),
    )
    .unwrap();
    fill(&master, 2);
    let mp = MixedPrecision::new(&master, DType::BF16).unwrap();
    let bf16_model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(mp.compute(), DType::BF16, &Device::Cpu),
    )
    .unwrap();
    let (model, precision) = if mixed {
        (&bf16_model, Some(&mp))
    } else {
        (&f32_model, None)
    };
    common::train_copy_task(model, &master, precision, ((4, 8), 40), &Device::Cpu)
}

#[test]
fn bf16_training_with_f32_masters_follows_f32_training() {
    let (first32, last32) = train(false);
    let (first16, last16) = train(true);
    eprintln!("f32: {first32} -> {last32}; bf16 compute: {first16} -> {last16}");
    assert!(
        last32 < 0.92 * first32,
        "f32 training: {first32} -> {last32}"
    );
    assert!(
        last16 < 0.92 * first16,
        "bf16 training: {first16} -> {last16}"
    );
    assert!(
        (last16 - last32).abs() < 0.1 * (first32 - last32),
        "bf16 {last16} vs f32 {last32}"
    );
}

#[test]
fn f32_compute_is_refused() {
    let master = VarMap::new();
    assert!(MixedPrecision::new(&master, DType::F32).is_err());
}
