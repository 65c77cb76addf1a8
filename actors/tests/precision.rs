//! Mixed precision (bf16 compute, f32 master weights) on CPU: the same code the `cuda` feature
//! runs on a GPU. Gradients agree with f32 ones to bf16 accuracy, and training follows the
//! same loss curve as f32 training.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use klong_actors::learner::loss::masked_cross_entropy;
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
    let mut s = seed;
    let mut vars: Vec<_> = vm.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in vars {
        let vals: Vec<f32> = (0..var.elem_count())
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if name.ends_with("norm.weight") {
                    1.0 + 0.1 * u
                } else {
                    0.3 * u
                }
            })
            .collect();
        var.set(&Tensor::from_vec(vals, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

/// A batch of the copy task: `x x` where the second half repeats the first; loss on the
/// second half.
fn batch(step: u64) -> (Tensor, Tensor, Tensor) {
    let (b, half) = (4usize, 8usize);
    let mut ids = Vec::new();
    let mut s = step.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..b {
        let row: Vec<u32> = (0..half)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 60) as u32 + 2
            })
            .collect();
        ids.extend(row.iter().chain(row.iter()).copied());
    }
    let t = 2 * half;
    let all = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let input = all.narrow(1, 0, t - 1).unwrap();
    let target = all.narrow(1, 1, t - 1).unwrap();
    let mask: Vec<f32> = (0..b)
        .flat_map(|_| (1..t).map(|i| if i >= half { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t - 1), &Device::Cpu).unwrap();
    (input, target, mask)
}

fn loss(model: &Llama, step: u64) -> Tensor {
    let (input, target, mask) = batch(step);
    let logits = model
        .forward(&input, None, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    masked_cross_entropy(&logits, &target, &mask).unwrap().0
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
    let hp = AdamWParams {
        lr: 1e-2,
        weight_decay: 0.0,
        ..AdamWParams::default()
    };
    let mut opt = AdamW::from_varmap(&master, hp).unwrap();
    let mp = MixedPrecision::new(&master, DType::BF16).unwrap();
    let bf16_model = Llama::new(
        &cfg,
        VarBuilder::from_varmap(mp.compute(), DType::BF16, &Device::Cpu),
    )
    .unwrap();
    let model = if mixed { &bf16_model } else { &f32_model };
    let first = loss(model, 1000).to_scalar::<f32>().unwrap();
    for step in 0..40 {
        let store = model.backward(&loss(model, step)).unwrap();
        let grads = if mixed {
            mp.master_grads(&store, &opt).unwrap()
        } else {
            opt.grads_from(&store)
        };
        opt.step(&grads).unwrap();
        mp.sync().unwrap();
    }
    for v in opt.vars() {
        assert_eq!(v.dtype(), DType::F32, "masters stay f32");
    }
    (first, loss(model, 1000).to_scalar::<f32>().unwrap())
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
