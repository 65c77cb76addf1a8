//! The policy: the model that acts (and, through the learner, trains).

pub mod chat;
pub(crate) mod fused;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod pretrained;
pub mod sampling;
pub mod tokenizer;
pub mod toolcall;

/// The device a model runs on, from its name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. Without
/// the `cuda` feature a CUDA name is an error that says so, never a silent fall back to CPU.
pub fn device(name: &str) -> Result<candle_core::Device, String> {
    let cuda = |n: usize| {
        if !candle_core::utils::cuda_is_available() {
            return Err(format!(
                "device {name:?}: this klongd was built without the `cuda` feature \
                 (cargo build --release --features cuda)"
            ));
        }
        candle_core::Device::new_cuda(n).map_err(|e| format!("device {name:?}: {e}"))
    };
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => cuda(0),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => Err(format!(
                "device {name:?}: expected cpu, cuda or cuda:N (N a GPU index)"
            )),
        },
    }
}
