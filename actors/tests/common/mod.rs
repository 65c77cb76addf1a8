//! Helpers shared by the model's integration tests: seeded weights, the copy task, and
//! tensor comparison. Each test binary uses some of them.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use klong_actors::learner::loss::masked_cross_entropy;
use klong_actors::learner::optim::{AdamW, AdamWParams};
use klong_actors::learner::precision::MixedPrecision;
use klong_actors::policy::model::Llama;

/// Deterministic weights on `device` (candle's initialisers are not seeded): norms in
/// `1 ± norm_spread`, the rest in `±scale`, from an LCG over the variables sorted by name.
pub fn fill(vm: &VarMap, seed: u64, (scale, norm_spread): (f32, f32), device: &Device) {
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
                    1.0 + norm_spread * u
                } else {
                    scale * u
                }
            })
            .collect();
        var.set(&Tensor::from_vec(vals, var.shape(), device).unwrap())
            .unwrap();
    }
}

/// A batch of the copy task, `rows` rows of `x x` with `x` of `half` tokens in 2..62: the
/// input, the targets, and a loss mask over the second half.
pub fn copy_batch(step: u64, (rows, half): (usize, usize), device: &Device) -> [Tensor; 3] {
    let mut ids = Vec::new();
    let mut s = step.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..rows {
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
    let all = Tensor::from_vec(ids, (rows, t), device).unwrap();
    let input = all.narrow(1, 0, t - 1).unwrap();
    let target = all.narrow(1, 1, t - 1).unwrap();
    let mask: Vec<f32> = (0..rows)
        .flat_map(|_| (1..t).map(|i| if i >= half { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (rows, t - 1), device).unwrap();
    [input, target, mask]
}

/// The copy task's loss on batch `step` (logits cast to f32 first, as the learner does).
pub fn copy_loss(model: &Llama, step: u64, shape: (usize, usize), device: &Device) -> Tensor {
    let [input, target, mask] = copy_batch(step, shape, device);
    let logits = model
        .forward(&input, None, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    masked_cross_entropy(&logits, &target, &mask).unwrap().0
}

/// `steps` AdamW steps (lr 1e-2, no weight decay) of the copy task (`shape` as in
/// [`copy_batch`]) on `model`: built over the f32 `master` weights, or with `precision` over
/// its compute copies. Returns the held-out loss (batch 1000) before and after.
pub fn train_copy_task(
    model: &Llama,
    master: &VarMap,
    precision: Option<&MixedPrecision>,
    (shape, steps): ((usize, usize), u64),
    device: &Device,
) -> (f32, f32) {
    let hp = AdamWParams {
        lr: 1e-2,
        weight_decay: 0.0,
        ..AdamWParams::default()
    };
    let mut opt = AdamW::from_varmap(master, hp).unwrap();
    let first = copy_loss(model, 1000, shape, device)
        .to_scalar::<f32>()
        .unwrap();
    for step in 0..steps {
        let store = model
            .backward(&copy_loss(model, step, shape, device))
            .unwrap();
        let grads = match precision {
            Some(mp) => mp.master_grads(&store, &opt).unwrap(),
            None => opt.grads_from(&store),
        };
        opt.step(&grads).unwrap();
        if let Some(mp) = precision {
            mp.sync().unwrap();
        }
    }
    for v in opt.vars() {
        assert_eq!(v.dtype(), DType::F32, "masters stay f32");
        assert!(v.device().same_device(device), "masters on {device:?}");
    }
    let last = copy_loss(model, 1000, shape, device)
        .to_scalar::<f32>()
        .unwrap();
    (first, last)
}

/// The largest absolute difference of two tensors of one shape, on any devices and dtypes.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let f32_on_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    (f32_on_cpu(a) - f32_on_cpu(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
