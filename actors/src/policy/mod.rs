//! The policy: the model that acts (and, through the learner, trains).

pub mod actor;
pub(crate) mod aligned;
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod attention_block;
pub mod chat;
pub mod decode;
#[cfg(target_arch = "x86_64")]
pub(crate) mod decoder_stack;
pub(crate) mod flash;
pub(crate) mod fused;
pub mod generate;
pub mod gguf;
pub mod local;
pub mod model;
pub(crate) mod pages;
pub mod pretrained;
pub mod sampling;
pub(crate) mod skinny;
pub(crate) mod swiglu;
pub mod tokenizer;
pub mod toolcall;
pub(crate) mod vexp;
pub(crate) mod wide;

/// Runs `f` on a thread of the compute pool (rayon's global pool, where candle's and the
/// fused kernels' parallel loops run). A parallel loop started from outside the pool blocks
/// its caller until a pool thread wakes, does the work and wakes the caller back; started from
/// a pool thread, it works on its own share at once and the other threads steal the rest.
/// Decoding and every training step (the learner's SFT and RL steps, the model bench) run
/// here: model R's training step has a few hundred parallel loops, and started from the
/// caller's thread they cost ~1,800 context switches per step; on the pool ~370, and the step
/// is ~4% shorter (`benches/peer/README.md`, session 26).
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// `n` deterministic values in [-0.5, 0.5) from a multiplicative hash of the index (for the
/// unit tests).
#[cfg(test)]
pub(crate) fn hashed_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            h as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// The largest absolute difference between two tensors of one shape (for the unit tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

/// What the CPU products of a training step run on here (for reports: it decides most of a
/// step's time): AMX tiles where the CPU exposes them and they are not switched off
/// (`KLONGD_FUSED_OFF=amx`), else gemm's AVX-512 or AVX2 f32 kernels.
pub fn cpu_products() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if fused::enabled(fused::Kind::Amx) && amx::available() {
            return "AMX bf16 tiles (f32-accurate)";
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512 f32";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "AVX2 f32";
        }
    }
    "portable f32"
}

/// A device's name as a config or a flag gives it: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
/// In a config it is that string, checked by [`DeviceName::parse`] as it is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceName {
    #[default]
    Cpu,
    Cuda(usize),
}

impl TryFrom<String> for DeviceName {
    type Error = String;
    fn try_from(name: String) -> Result<DeviceName, String> {
        DeviceName::parse(&name)
    }
}

impl From<DeviceName> for String {
    fn from(name: DeviceName) -> String {
        name.to_string()
    }
}

impl DeviceName {
    /// Parses a name. Without the `cuda` feature a CUDA name is an error that says so, never a
    /// silent fall back to CPU.
    pub fn parse(name: &str) -> Result<DeviceName, String> {
        let parsed = match name {
            "cpu" => DeviceName::Cpu,
            "cuda" => DeviceName::Cuda(0),
            _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceName::Cuda(n),
                _ => {
                    return Err(format!(
                        "device {name:?}: expected cpu, cuda or cuda:N (N a GPU index)"
                    ))
                }
            },
        };
        if parsed != DeviceName::Cpu && !candle_core::utils::cuda_is_available() {
            return Err(format!(
                "device {name:?}: this klongd was built without the `cuda` feature \
                 (cargo build --release --features cuda)"
            ));
        }
        Ok(parsed)
    }

    /// Opens the device (for CUDA: its context and streams; fails where there is no such GPU).
    pub fn open(self) -> Result<candle_core::Device, String> {
        match self {
            DeviceName::Cpu => Ok(candle_core::Device::Cpu),
            DeviceName::Cuda(n) => {
                candle_core::Device::new_cuda(n).map_err(|e| format!("device cuda:{n}: {e}"))
            }
        }
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceName::Cpu => write!(f, "cpu"),
            DeviceName::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device a model runs on, from its name ([`DeviceName::parse`], then `open`).
pub fn device(name: &str) -> Result<candle_core::Device, String> {
    DeviceName::parse(name)?.open()
}

/// What a policy is shown: the tokens that fit its context (what a token-level policy reads)
/// and the whole conversation as messages (what a text-level teacher reads).
pub struct PolicyContext<'a> {
    pub tokens: &'a [u32],
    pub messages: &'a [chat::ChatMessage],
}

/// Something that acts: one completion for one context. Backends: [`local::LocalPolicy`] (the
/// candle model) and the scripted expert (`environment::expert_policy`); the actor runtime
/// batches many episodes' requests into one forward pass.
pub trait Policy {
    /// Samples a completion; `params.max_new_tokens` bounds it.
    fn act(
        &mut self,
        context: &PolicyContext,
        params: &sampling::SamplingParams,
    ) -> Result<generate::Completion, generate::GenerateError>;
    /// The version of the weights `act` uses (recorded with every action).
    fn version(&self) -> u64;
    /// The model's context length in tokens.
    fn context(&self) -> usize;
}
