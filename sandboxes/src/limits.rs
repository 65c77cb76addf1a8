//! What a tool call and an episode may consume, and the typed names of those limits.
//!
//! Every limit has a finite default that is safe for untrusted code: a runaway call ends by
//! itself within [`CallLimits::default`]'s wall time (10 s), cannot grow past 512 MiB of
//! linear memory, and cannot write more than 64 MiB or create more than 1,000 files.

use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// Limits of one tool call. A `bash` pipeline shares one set across all of its stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallLimits {
    /// Wall-clock time, enforced by epoch interruption.
    #[serde(deserialize_with = "positive::duration")]
    pub wall_time: HumanDuration,
    /// WebAssembly fuel (about one unit per executed instruction).
    #[serde(deserialize_with = "positive::count")]
    pub fuel: u64,
    /// Linear memory of the guest instance.
    #[serde(deserialize_with = "positive::size")]
    pub memory: ByteSize,
    /// Elements across the guest's tables.
    #[serde(deserialize_with = "positive::count32")]
    pub table_elements: u32,
    /// Bytes of stdout kept; the call is stopped when the guest writes more.
    #[serde(deserialize_with = "positive::size")]
    pub stdout: ByteSize,
    /// Bytes of stderr kept; the call is stopped when the guest writes more.
    #[serde(deserialize_with = "positive::size")]
    pub stderr: ByteSize,
    /// Bytes the call may write into files of the episode directory.
    #[serde(deserialize_with = "positive::size")]
    pub written_bytes: ByteSize,
    /// Files, directories and links the call may create in the episode directory.
    #[serde(deserialize_with = "positive::count")]
    pub files_created: u64,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            wall_time: HumanDuration::from_secs(10),
            fuel: 20_000_000_000,
            memory: ByteSize::mib(512),
            table_elements: 100_000,
            stdout: ByteSize::mib(1),
            stderr: ByteSize::kib(256),
            written_bytes: ByteSize::mib(64),
            files_created: 1_000,
        }
    }
}

/// Totals across all calls of one episode. This is what enforces an RL stage's timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EpisodeBudget {
    /// Wall-clock time spent inside tool calls.
    #[serde(deserialize_with = "positive::duration")]
    pub wall_time: HumanDuration,
    /// Fuel consumed by all calls.
    #[serde(deserialize_with = "positive::count")]
    pub fuel: u64,
    /// Bytes written into episode files by all calls.
    #[serde(deserialize_with = "positive::size")]
    pub written_bytes: ByteSize,
    /// Files, directories and links created by all calls.
    #[serde(deserialize_with = "positive::count")]
    pub files_created: u64,
}

impl Default for EpisodeBudget {
    fn default() -> Self {
        EpisodeBudget {
            wall_time: HumanDuration::from_secs(2 * 3600),
            fuel: 10_000_000_000_000,
            written_bytes: ByteSize::gib(1),
            files_created: 20_000,
        }
    }
}

/// A limit that stopped (or refused) a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    WallTime,
    Fuel,
    Memory,
    TableElements,
    Stdout,
    Stderr,
    WrittenBytes,
    FilesCreated,
    EpisodeWallTime,
    EpisodeFuel,
    EpisodeWrittenBytes,
    EpisodeFilesCreated,
}

impl Limit {
    /// The name used in configs, outcomes and observations.
    pub fn name(self) -> &'static str {
        match self {
            Limit::WallTime => "call wall_time",
            Limit::Fuel => "call fuel",
            Limit::Memory => "call memory",
            Limit::TableElements => "call table_elements",
            Limit::Stdout => "call stdout",
            Limit::Stderr => "call stderr",
            Limit::WrittenBytes => "call written_bytes",
            Limit::FilesCreated => "call files_created",
            Limit::EpisodeWallTime => "episode wall_time",
            Limit::EpisodeFuel => "episode fuel",
            Limit::EpisodeWrittenBytes => "episode written_bytes",
            Limit::EpisodeFilesCreated => "episode files_created",
        }
    }

    /// Whether, once hit, no further call of the episode can run: its wall time or fuel is
    /// spent. (A spent write or file budget only stops calls that write or create.)
    pub fn ends_episode(self) -> bool {
        matches!(self, Limit::EpisodeWallTime | Limit::EpisodeFuel)
    }

    /// Whether this limit belongs to the episode's budget rather than the call's.
    pub fn is_episode(self) -> bool {
        matches!(
            self,
            Limit::EpisodeWallTime
                | Limit::EpisodeFuel
                | Limit::EpisodeWrittenBytes
                | Limit::EpisodeFilesCreated
        )
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a call (or an episode so far) consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub wall_time_us: u64,
    pub fuel: u64,
    pub written_bytes: u64,
    pub files_created: u64,
    /// Peak linear memory of the largest instance (bytes).
    pub peak_memory: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.wall_time_us = self.wall_time_us.saturating_add(other.wall_time_us);
        self.fuel = self.fuel.saturating_add(other.fuel);
        self.written_bytes = self.written_bytes.saturating_add(other.written_bytes);
        self.files_created = self.files_created.saturating_add(other.files_created);
        self.peak_memory = self.peak_memory.max(other.peak_memory);
    }
}

/// The limits one call actually runs under: the call's own limits, narrowed by what is left of
/// the episode's budget, each remembering which of the two it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub wall_time: (std::time::Duration, Limit),
    pub fuel: (u64, Limit),
    pub written_bytes: (u64, Limit),
    pub files_created: (u64, Limit),
}

impl Effective {
    /// Narrows `call` by the remainder of `budget` after `used`. Returns the first exhausted
    /// episode limit instead when nothing is left to run with.
    pub fn narrow(
        call: &CallLimits,
        budget: &EpisodeBudget,
        used: &Usage,
    ) -> Result<Effective, Limit> {
        let wall_left = budget
            .wall_time
            .0
            .saturating_sub(std::time::Duration::from_micros(used.wall_time_us));
        let fuel_left = budget.fuel.saturating_sub(used.fuel);
        let bytes_left = budget.written_bytes.0.saturating_sub(used.written_bytes);
        let files_left = budget.files_created.saturating_sub(used.files_created);
        if wall_left.is_zero() {
            return Err(Limit::EpisodeWallTime);
        }
        if fuel_left == 0 {
            return Err(Limit::EpisodeFuel);
        }
        fn pick<T: PartialOrd>(
            call: T,
            call_limit: Limit,
            left: T,
            episode_limit: Limit,
        ) -> (T, Limit) {
            if left < call {
                (left, episode_limit)
            } else {
                (call, call_limit)
            }
        }
        Ok(Effective {
            wall_time: pick(
                call.wall_time.0,
                Limit::WallTime,
                wall_left,
                Limit::EpisodeWallTime,
            ),
            fuel: pick(call.fuel, Limit::Fuel, fuel_left, Limit::EpisodeFuel),
            written_bytes: pick(
                call.written_bytes.0,
                Limit::WrittenBytes,
                bytes_left,
                Limit::EpisodeWrittenBytes,
            ),
            files_created: pick(
                call.files_created,
                Limit::FilesCreated,
                files_left,
                Limit::EpisodeFilesCreated,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_names_the_binding_limit() {
        let call = CallLimits::default();
        let budget = EpisodeBudget {
            fuel: 100,
            ..EpisodeBudget::default()
        };
        let used = Usage {
            fuel: 40,
            ..Usage::default()
        };
        let eff = Effective::narrow(&call, &budget, &used).unwrap();
        assert_eq!(eff.fuel, (60, Limit::EpisodeFuel));
        assert_eq!(eff.wall_time.1, Limit::WallTime);
        let spent = Usage {
            fuel: 100,
            ..Usage::default()
        };
        assert_eq!(
            Effective::narrow(&call, &budget, &spent),
            Err(Limit::EpisodeFuel)
        );
    }
}

/// Deserializers that reject zero: a limit of zero would make every call fail, which is never
/// what a config means.
pub mod positive {
    use serde::{Deserialize, Deserializer};

    use crate::units::{ByteSize, HumanDuration};

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
        let v = HumanDuration::deserialize(d)?;
        if v.0.is_zero() {
            return Err(serde::de::Error::custom(
                "expected a positive duration, like \"10s\"",
            ));
        }
        Ok(v)
    }

    pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        let v = ByteSize::deserialize(d)?;
        if v.0 == 0 {
            return Err(serde::de::Error::custom(
                "expected a positive size, like \"64MiB\"",
            ));
        }
        Ok(v)
    }

    pub fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let v = u64::deserialize(d)?;
        if v == 0 {
            return Err(serde::de::Error::custom("expected a positive integer"));
        }
        Ok(v)
    }

    pub fn count32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let v = u32::deserialize(d)?;
        if v == 0 {
            return Err(serde::de::Error::custom("expected a positive integer"));
        }
        Ok(v)
    }
}
