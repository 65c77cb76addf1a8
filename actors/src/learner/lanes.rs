//! A micro-batch's rows in two lanes: on CPU, each lane's forward and backward run beside the
//! other's, each on a replica of the model ([`Llama::replica`]), and the lanes' gradients are
//! summed in lane order.
//!
//! Why: one forward and backward over the whole micro-batch shares every product and kernel
//! between the compute pool's threads, and each share ends in a wait for the slowest thread.
//! On model R's training step (2 threads) the threads were idle ~9% of the time, mostly
//! waiting for the other to finish its half of a product, and while one thread ran candle's
//! serial passes (a gradient's zeroing, an add) the other had nothing to do. Two lanes give
//! each thread a whole forward and backward of its own to work on, the kernels' own sharing
//! still there to take up a lane that finishes first. Measured in model R's step: 0.87-0.94x
//! the time of one lane (steps alternating in one process; `benches/peer/README.md`,
//! session 35). Four lanes of two rows were no better than two lanes of four.
//!
//! Always two lanes (where the rows allow), whatever the thread count, so that results do not
//! depend on it, as the kernels' split sums do not (`fused::gemm_new`). The split keeps the
//! rows' order and memory: the lanes hold the micro-batch's activations between them, as the
//! one lane did, so `batch_tokens` still bounds a step's memory. On a GPU there is one lane:
//! the kernels already fill it.

use candle_core::Device;

use crate::policy::model::Llama;

/// Where `lens` (a micro-batch's row lengths, in order) splits into two lanes: the first `k`
/// rows, then the rest, with `k` such that the larger lane's padded tokens (its rows times
/// its longest row: what its forward computes) are fewest, the smallest such `k` on ties.
/// `None` for fewer than two rows.
pub fn split_point(lens: &[usize]) -> Option<usize> {
    if lens.len() < 2 {
        return None;
    }
    let padded = |rows: &[usize]| rows.len() * rows.iter().copied().max().unwrap_or(0);
    (1..lens.len()).min_by_key(|&k| padded(&lens[..k]).max(padded(&lens[k..])))
}

/// The rows of each lane: two where `device` is the CPU and [`split_point`] splits them, else
/// one.
pub fn lanes<'r, T>(rows: &'r [T], len: impl Fn(&T) -> usize, device: &Device) -> Vec<&'r [T]> {
    let lens: Vec<usize> = rows.iter().map(len).collect();
    match split_point(&lens) {
        Some(k) if device.is_cpu() => {
            let (a, b) = rows.split_at(k);
            vec![a, b]
        }
        _ => vec![rows],
    }
}

/// `work` over each lane's batch (one per group of [`lanes`]), in the lanes' order: two side
/// by side on the compute pool, the second on a replica of `model`; one on `model` itself.
pub fn run<B: Sync, R: Send>(
    model: &Llama,
    batches: &[B],
    work: impl Fn(&Llama, &B) -> R + Sync,
) -> Vec<R> {
    match batches {
        [a, b] => {
            let replica = model.replica();
            let (ra, rb) = rayon::join(|| work(model, a), || work(&replica, b));
            vec![ra, rb]
        }
        // One lane (or, never from `lanes`, more): one after another on the model.
        _ => batches.iter().map(|b| work(model, b)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_balances_padded_tokens() {
        assert_eq!(split_point(&[]), None);
        assert_eq!(split_point(&[7]), None);
        assert_eq!(split_point(&[5, 5]), Some(1));
        assert_eq!(split_point(&[5, 5, 5, 5]), Some(2));
        // Odd counts: the smaller k on a tie.
        assert_eq!(split_point(&[4, 4, 4]), Some(1));
        // k = 3: lanes of 3 x 2 = 6 and 1 x 10 = 10 padded tokens; k = 2 gives 4 and 20.
        assert_eq!(split_point(&[2, 2, 2, 10]), Some(3));
        // Unsorted rows keep their order: [9] | [1, 1, 1] (9 and 3) beats [9, 1] | [1, 1].
        assert_eq!(split_point(&[9, 1, 1, 1]), Some(1));
    }

    #[test]
    fn lanes_keep_every_row_once_in_order() {
        let rows: Vec<usize> = vec![3, 3, 4, 4, 6];
        let cpu = lanes(&rows, |r| *r, &Device::Cpu);
        assert_eq!(cpu.len(), 2);
        assert_eq!(cpu.concat(), rows);
        assert_eq!(lanes(&rows[..1], |r| *r, &Device::Cpu), vec![&rows[..1]]);
    }
}
