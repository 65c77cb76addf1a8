//! Trajectory splitting (design §5): one long trajectory -> sub-trajectories that each fit a
//! context of `L` tokens, for SFT and for the RL loss alike.
//!
//! # Modes
//!
//! - [`SplitMode::Split`] (KLong's): every window is the pinned prefix (the trajectory's own,
//!   or as [`Pin`] says), untruncated, then `overlap` tokens carried over from just before the
//!   window's own tokens (context only, no loss), then the window's own turns, as many whole
//!   turns as fit. History between the prefix and the carried tokens is dropped. Every assistant token of the trajectory is a
//!   target in exactly one window; prompts and observations never are. Assistant turns inside
//!   the prefix are targets in the first window only.
//! - [`SplitMode::Truncate`] (baseline): the first `L` tokens; assistant tokens past them are
//!   never targets (each is a target *at most* once).
//! - [`SplitMode::Sliding`] (baseline): the same packing with no pinned prefix: the prefix's
//!   turns are ordinary turns that later windows drop like any other history.
//!
//! # Packing rules (Split and Sliding)
//!
//! - A turn that fits in the room left is taken whole. A turn that does not fit closes the
//!   window, unless it could not fit in any window (longer than `L - prefix - overlap`) or the
//!   window has nothing of its own yet: then it is cut, and the window takes as much of it as
//!   fits; the rest continues the next window. An assistant turn cut this way still has each
//!   of its tokens as a target exactly once.
//! - Trailing prompt/observation tokens at the end of a window are moved to the next window
//!   (they predict nothing in this one), so a window's own tokens end with an assistant token
//!   where it has one, and the next window reads the observation (and the framing that opens
//!   the next assistant turn) whole.
//! - A window with no target is not emitted (it teaches nothing): a trajectory without
//!   assistant tokens gives no sub-trajectories. Window indices count emitted windows.
//! - Targets and next-token prediction: a target at position `i` is predicted from positions
//!   `< i`, so position 0 of a window is never a target. With a pinned prefix, position 0 is
//!   the prefix's first token; without one (Sliding, or an empty prefix), at least one token is
//!   carried over (`overlap` is raised to 1), and [`Trajectory::validate`] refuses trajectories
//!   whose first token is an assistant token.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::trajectory::{Trajectory, TrajectoryError, Turn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SplitMode {
    /// Pinned prefix + overlap + own turns (KLong).
    #[default]
    Split,
    /// The first `context` tokens only.
    Truncate,
    /// Windows without a pinned prefix.
    Sliding,
}

/// Which leading turns are pinned in every window (Split mode).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Pin {
    /// The trajectory's own prefix ([`Trajectory::prefix`]).
    #[default]
    Recorded,
    /// The first `K` turns, counted across prefix and body (fewer when there are fewer).
    FirstTurns(usize),
    /// Every turn up to and including the first whose tokens contain this token sequence (a
    /// marker that ends the pinned part, e.g. the end of the paper-reading phase).
    ThroughMarker(Vec<u32>),
}

/// Splitting parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitConfig {
    /// `L`: the most tokens in one sub-trajectory.
    pub context: usize,
    pub mode: SplitMode,
    /// Tokens carried over from before a window's own tokens, as context (Split, Sliding).
    pub overlap: usize,
    /// The pinned prefix (Split mode; the other modes pin nothing).
    #[serde(default)]
    pub pin: Pin,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum SplitError {
    #[error(
        "context {0} is too small: a window needs at least 2 tokens (one to predict from, one \
         target)"
    )]
    ContextTooSmall(usize),
    #[error(
        "overlap {overlap} leaves no room for a window's own tokens in a context of {context} \
         (it must be at most context - 2)"
    )]
    OverlapTooLarge { overlap: usize, context: usize },
    #[error(
        "trajectory {id}: the pinned prefix is {prefix} tokens; with {overlap} tokens of overlap \
         and one token of its own a window needs {}, more than the context {context}",
        prefix + overlap + 1
    )]
    PrefixTooLong {
        id: String,
        prefix: usize,
        overlap: usize,
        context: usize,
    },
    #[error("trajectory {id}: no turn contains the pin marker {marker:?}")]
    MarkerNotFound { id: String, marker: Vec<u32> },
    #[error("trajectory {id}: {source}")]
    Invalid { id: String, source: TrajectoryError },
}

impl SplitConfig {
    pub fn new(context: usize, mode: SplitMode, overlap: usize) -> Self {
        SplitConfig {
            context,
            mode,
            overlap,
            pin: Pin::Recorded,
        }
    }

    /// The same, with another pinned prefix.
    pub fn with_pin(self, pin: Pin) -> Self {
        SplitConfig { pin, ..self }
    }

    /// Checks what does not depend on a trajectory: `context >= 2`, and for Split and Sliding
    /// `overlap <= context - 2`.
    pub fn validate(&self) -> Result<(), SplitError> {
        if self.context < 2 {
            return Err(SplitError::ContextTooSmall(self.context));
        }
        if self.mode != SplitMode::Truncate && self.overlap + 2 > self.context {
            return Err(SplitError::OverlapTooLarge {
                overlap: self.overlap,
                context: self.context,
            });
        }
        Ok(())
    }
}

/// A run of a sub-trajectory's tokens that come from one turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// The turn, counted across prefix and body ([`Trajectory::turn`]).
    pub turn: usize,
    /// The first token's offset within the turn.
    pub offset: usize,
    pub len: usize,
    /// Whether these tokens are targets here.
    pub loss: bool,
    /// The assistant turn's policy version.
    pub policy_version: Option<u64>,
}

/// One window of a trajectory, ready for the learner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubTrajectory {
    /// The source trajectory's id.
    pub trajectory: String,
    /// The window's index among the trajectory's sub-trajectories.
    pub window: usize,
    pub tokens: Vec<u32>,
    /// `loss_mask[i]`: token `i` is a target (predicted from tokens `< i`). Never at 0.
    pub loss_mask: Vec<bool>,
    /// The behaviour policy's logprob of each token, aligned with `tokens` (0 where not a
    /// target); `None` when some target has none (imported data).
    pub behaviour_logprobs: Option<Vec<f32>>,
    /// Where the tokens come from, in order; the lengths sum to `tokens.len()`.
    pub spans: Vec<Span>,
    /// Tokens of pinned prefix at the start (0 for Truncate and Sliding).
    pub prefix_len: usize,
    /// Prefix plus carried-over tokens: the window's own tokens start here.
    pub context_len: usize,
    /// The trajectory's reward, when judged.
    pub reward: Option<f64>,
    /// The rollout's advantage; the learner sets it (every window of a rollout gets the same).
    pub advantage: Option<f32>,
}

impl SubTrajectory {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// The number of targets.
    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }
    /// The lowest and highest policy version among the targets, when known.
    pub fn policy_versions(&self) -> Option<(u64, u64)> {
        let mut versions = self
            .spans
            .iter()
            .filter(|s| s.loss)
            .filter_map(|s| s.policy_version);
        let first = versions.next()?;
        Some(versions.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v))))
    }
}

/// Splits a trajectory as `config` says (see the module docs).
pub fn split(traj: &Trajectory, config: &SplitConfig) -> Result<Vec<SubTrajectory>, SplitError> {
    config.validate()?;
    traj.validate().map_err(|source| SplitError::Invalid {
        id: traj.id.clone(),
        source,
    })?;
    let flat = Flat::new(traj);
    match config.mode {
        SplitMode::Truncate => {
            let end = flat.total().min(config.context);
            let sub = flat.window(traj, 0, &[(0, end, true)], 0, 0);
            Ok(Vec::from_iter(sub.filter(|s| s.num_targets() > 0)))
        }
        SplitMode::Split => {
            let turns = pinned_turns(traj, &config.pin)?;
            pack(&flat, traj, config, flat.starts[turns])
        }
        SplitMode::Sliding => pack(&flat, traj, config, 0),
    }
}

/// The number of leading turns that `pin` pins.
fn pinned_turns(traj: &Trajectory, pin: &Pin) -> Result<usize, SplitError> {
    Ok(match pin {
        Pin::Recorded => traj.prefix.len(),
        Pin::FirstTurns(k) => (*k).min(traj.num_turns()),
        Pin::ThroughMarker(marker) => {
            let found = traj.all_turns().position(|t| {
                marker.is_empty() || t.tokens().windows(marker.len()).any(|w| w == marker)
            });
            found.ok_or_else(|| SplitError::MarkerNotFound {
                id: traj.id.clone(),
                marker: marker.clone(),
            })? + 1
        }
    })
}

/// Splits many trajectories; the first error stops.
pub fn split_all<'a>(
    trajectories: impl IntoIterator<Item = &'a Trajectory>,
    config: &SplitConfig,
) -> Result<Vec<SubTrajectory>, SplitError> {
    let mut out = Vec::new();
    for t in trajectories {
        out.extend(split(t, config)?);
    }
    Ok(out)
}

/// The trajectory's turns laid end to end.
struct Flat<'a> {
    turns: Vec<&'a Turn>,
    /// `starts[t]`: the position of turn `t`'s first token; `starts[n]` = total.
    starts: Vec<usize>,
    /// `loss_before[t]`: assistant tokens before turn `t`.
    loss_before: Vec<usize>,
}

impl<'a> Flat<'a> {
    fn new(traj: &'a Trajectory) -> Self {
        let turns: Vec<&Turn> = traj.all_turns().collect();
        let mut starts = Vec::with_capacity(turns.len() + 1);
        let mut loss_before = Vec::with_capacity(turns.len() + 1);
        let (mut pos, mut loss) = (0, 0);
        for t in &turns {
            starts.push(pos);
            loss_before.push(loss);
            pos += t.len();
            if t.is_assistant() {
                loss += t.len();
            }
        }
        starts.push(pos);
        loss_before.push(loss);
        Flat {
            turns,
            starts,
            loss_before,
        }
    }

    fn total(&self) -> usize {
        self.starts[self.turns.len()]
    }

    /// The turn holding position `pos < total` (the non-empty one, past empty turns).
    fn turn_at(&self, pos: usize) -> usize {
        self.starts[..self.turns.len()].partition_point(|&s| s <= pos) - 1
    }

    /// Assistant tokens before position `pos`.
    fn loss_upto(&self, pos: usize) -> usize {
        if pos >= self.total() {
            return self.loss_before[self.turns.len()];
        }
        let t = self.turn_at(pos);
        let inside = if self.turns[t].is_assistant() {
            pos - self.starts[t]
        } else {
            0
        };
        self.loss_before[t] + inside
    }

    fn has_loss_in(&self, a: usize, b: usize) -> bool {
        a < b && self.loss_upto(b) > self.loss_upto(a)
    }

    /// A window from position ranges `(start, end, loss)`; `loss` lets assistant tokens of the
    /// range be targets. `None` when the ranges are empty.
    fn window(
        &self,
        traj: &Trajectory,
        index: usize,
        ranges: &[(usize, usize, bool)],
        prefix_len: usize,
        context_len: usize,
    ) -> Option<SubTrajectory> {
        let len: usize = ranges.iter().map(|(a, b, _)| b - a).sum();
        if len == 0 {
            return None;
        }
        let mut tokens = Vec::with_capacity(len);
        let mut loss_mask = Vec::with_capacity(len);
        let mut logprobs = Vec::with_capacity(len);
        let mut all_logprobs = true;
        let mut spans = Vec::new();
        for &(a, b, loss_ok) in ranges {
            let mut pos = a;
            while pos < b {
                let t = self.turn_at(pos);
                let end = b.min(self.starts[t + 1]);
                let offset = pos - self.starts[t];
                let n = end - pos;
                let turn = self.turns[t];
                let assistant = turn.as_assistant();
                let loss = loss_ok && assistant.is_some();
                tokens.extend_from_slice(&turn.tokens()[offset..offset + n]);
                loss_mask.extend(std::iter::repeat_n(loss, n));
                match assistant.and_then(|a| a.logprobs.as_ref()) {
                    Some(lp) if loss => logprobs.extend_from_slice(&lp[offset..offset + n]),
                    _ => {
                        all_logprobs &= !loss;
                        logprobs.extend(std::iter::repeat_n(0.0f32, n));
                    }
                }
                spans.push(Span {
                    turn: t,
                    offset,
                    len: n,
                    loss,
                    policy_version: assistant.and_then(|a| a.policy_version),
                });
                pos = end;
            }
        }
        Some(SubTrajectory {
            trajectory: traj.id.clone(),
            window: index,
            tokens,
            loss_mask,
            behaviour_logprobs: all_logprobs.then_some(logprobs),
            spans,
            prefix_len,
            context_len,
            reward: traj.outcome.as_ref().map(|j| j.reward),
            advantage: None,
        })
    }
}

/// Split (pinned = the prefix's length) and Sliding (pinned = 0).
fn pack(
    flat: &Flat,
    traj: &Trajectory,
    config: &SplitConfig,
    pinned: usize,
) -> Result<Vec<SubTrajectory>, SplitError> {
    let l = config.context;
    let n = flat.total();
    // Without a pinned prefix, carry at least one token so that no target is first.
    let carried = if pinned == 0 {
        config.overlap.max(1)
    } else {
        config.overlap
    };
    if pinned + carried + 1 > l {
        return Err(SplitError::PrefixTooLong {
            id: traj.id.clone(),
            prefix: pinned,
            overlap: carried,
            context: l,
        });
    }
    // The room for its own tokens of any window but the first.
    let fresh = l - pinned - carried;
    let prefix_has_loss = flat.has_loss_in(0, pinned);
    let mut out: Vec<SubTrajectory> = Vec::new();
    let mut s = pinned;
    loop {
        let first = s == pinned;
        // Nothing left to learn: no target after `s` (nor in the prefix, for the first window).
        if !(flat.has_loss_in(s, n) || first && prefix_has_loss) {
            break;
        }
        let c = carried.min(s - pinned);
        let budget = l - pinned - c;
        let mut e = s;
        while e < n {
            let t = flat.turn_at(e);
            let turn_end = flat.starts[t + 1];
            if turn_end - s <= budget {
                e = turn_end;
                continue;
            }
            if e == s || flat.turns[t].len() > fresh {
                e = s + budget;
            }
            break;
        }
        // Trailing context-only tokens predict nothing here: leave them to the next window.
        while e > s {
            let t = flat.turn_at(e - 1);
            let piece_start = flat.starts[t].max(s);
            if flat.turns[t].is_assistant() || !flat.has_loss_in(s, piece_start) {
                break;
            }
            e = piece_start;
        }
        // A window without targets (a stretch of a long observation) is not built at all.
        if flat.has_loss_in(s, e) || first && prefix_has_loss {
            let ranges = [(0, pinned, first), (s - c, s, false), (s, e, true)];
            out.extend(flat.window(traj, out.len(), &ranges, pinned, pinned + c));
        }
        if e >= n || e == s {
            break;
        }
        s = e;
    }
    Ok(out)
}
