//! Quantities with explicit units, as they appear in configs and on the command line.
//!
//! A bare number is never a duration or a size: `"250ms"`, `"2h"`, `"64MiB"` say what they
//! mean, so a config cannot silently read seconds as milliseconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a quantity string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

/// A duration written with units: `"250ms"`, `"30s"`, `"2h"`, `"1h30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

/// A size in bytes written with units: `"512B"`, `"64KiB"`, `"64MiB"`, `"1GiB"`, `"10MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

const DURATION_UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
    ("d", 86_400 * 1_000_000_000),
];

const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("kB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

/// Splits `"12.5ms3s"` into `[("12.5", "ms"), ("3", "s")]`.
fn number_unit_pairs(s: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut pairs = Vec::new();
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty value".into());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return Err(format!("expected a number at `{rest}`"));
        }
        let (num, after) = rest.split_at(num_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        pairs.push((num, unit.trim()));
        rest = next.trim_start();
    }
    Ok(pairs)
}

fn parse_number(num: &str) -> Result<f64, String> {
    let clean: String = num.chars().filter(|&c| c != '_').collect();
    clean
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| format!("`{num}` is not a non-negative number"))
}

impl FromStr for HumanDuration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected =
            "expected a duration with units, like \"250ms\", \"30s\", \"2h\" or \"1h30m\"";
        let pairs = number_unit_pairs(s).map_err(|e| UnitError(format!("{e}: {expected}")))?;
        let mut total_ns: u128 = 0;
        for (num, unit) in pairs {
            if unit.is_empty() {
                return Err(UnitError(format!("`{s}` has no unit: {expected}")));
            }
            let scale = DURATION_UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, scale)| *scale)
                .ok_or_else(|| UnitError(format!("unknown duration unit `{unit}`: {expected}")))?;
            let value = parse_number(num).map_err(|e| UnitError(format!("{e}: {expected}")))?;
            let ns = value * scale as f64;
            if ns > u64::MAX as f64 {
                return Err(UnitError(format!("`{s}` is too long a duration")));
            }
            total_ns = total_ns.saturating_add(ns.round() as u128);
        }
        let ns = u64::try_from(total_ns)
            .map_err(|_| UnitError(format!("`{s}` is too long a duration")))?;
        Ok(HumanDuration(Duration::from_nanos(ns)))
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected =
            "expected a size with units, like \"512B\", \"64KiB\", \"64MiB\" or \"1GiB\"";
        let pairs = number_unit_pairs(s).map_err(|e| UnitError(format!("{e}: {expected}")))?;
        let [(num, unit)] = pairs.as_slice() else {
            return Err(UnitError(format!("`{s}`: {expected}")));
        };
        if unit.is_empty() {
            return Err(UnitError(format!("`{s}` has no unit: {expected}")));
        }
        let scale = SIZE_UNITS
            .iter()
            .find(|(name, _)| name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(|| UnitError(format!("unknown size unit `{unit}`: {expected}")))?;
        let value = parse_number(num).map_err(|e| UnitError(format!("{e}: {expected}")))?;
        let bytes = value * scale as f64;
        if bytes > u64::MAX as f64 {
            return Err(UnitError(format!("`{s}` is too large")));
        }
        if bytes.fract() != 0.0 {
            return Err(UnitError(format!("`{s}` is not a whole number of bytes")));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        // Largest unit that divides exactly, so the printed value parses back unchanged.
        for (name, scale) in DURATION_UNITS.iter().rev() {
            if *name == "µs" {
                continue;
            }
            if ns != 0 && ns.is_multiple_of(*scale) {
                return write!(f, "{}{}", ns / scale, name);
            }
        }
        write!(f, "{ns}ns")
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, scale) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 != 0 && self.0.is_multiple_of(scale) {
                return write!(f, "{}{}", self.0 / scale, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        HumanDuration(Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        HumanDuration(Duration::from_millis(ms))
    }
}

impl ByteSize {
    pub const fn kib(n: u64) -> Self {
        ByteSize(n << 10)
    }
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
    pub const fn gib(n: u64) -> Self {
        ByteSize(n << 30)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("10us"), Ok(Duration::from_micros(10)));
        assert!(d("30").is_err(), "a bare number has no unit");
        assert!(d("").is_err());
        assert!(d("5 parsecs").is_err());
        assert!(d("-5s").is_err());
        assert!(d("99999999999999999999h").is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        let b = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(b("64MiB"), Ok(64 << 20));
        assert_eq!(b("1GiB"), Ok(1 << 30));
        assert_eq!(b("512B"), Ok(512));
        assert_eq!(b("10MB"), Ok(10_000_000));
        assert_eq!(b("1.5KiB"), Ok(1536));
        assert!(b("64").is_err(), "a bare number has no unit");
        assert!(b("1.3B").is_err());
        assert!(b("3 elephants").is_err());
        assert!(b("1MiB2KiB").is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["250ms", "2h", "90m", "7ns", "1d"] {
            let d: HumanDuration = s.parse().unwrap();
            assert_eq!(d.to_string().parse::<HumanDuration>().unwrap(), d);
        }
        for s in ["64MiB", "1GiB", "1000B", "3KiB"] {
            let b: ByteSize = s.parse().unwrap();
            assert_eq!(b.to_string(), s);
        }
    }
}
