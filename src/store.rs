//! The run's durable state: a sled database in the run directory, plus content-addressed files
//! for what sled would not make durable.
//!
//! sled 0.34 keeps values over ~128 KiB in blob files that it never fsyncs (design.md §13): they
//! survive a process crash, not a power loss. So every value above [`INLINE_MAX`] — checkpoint
//! tensors, long trajectories — is written as a file named by its SHA-256 (temp file, fsync,
//! rename, fsync of the directory), and sled holds a small pointer to it. Reading a pointer
//! verifies the hash, so a damaged file is an error, never silently wrong state.
//!
//! A checkpoint becomes visible by one atomic switch: its tensors file is written and synced
//! first, then the `manifest` key is replaced and the database flushed. A crash before the
//! switch leaves the previous checkpoint in place; resume never sees half a checkpoint.
//!
//! Key space (all UTF-8):
//! - `meta/config_hash`: the hash of the config the run was started with;
//! - `manifest`: the current checkpoint's [`Manifest`] (JSON);
//! - `traj/<stage>/<id>`: scored trajectories (opaque bytes: the caller's encoding);
//! - `metrics/latest`: the last metrics record (JSON).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Values up to this size live in sled itself; larger ones become content-addressed files.
pub const INLINE_MAX: usize = 64 * 1024;
/// Tensors files of superseded checkpoints kept for inspection; older ones are removed.
pub const KEEP_CHECKPOINTS: usize = 2;

const DB_DIR: &str = "state.sled";
const BLOB_DIR: &str = "blobs";
const MANIFEST_KEY: &str = "manifest";
const CONFIG_HASH_KEY: &str = "meta/config_hash";
const HISTORY_PREFIX: &str = "manifest-history/";

/// A value's first byte says where it lives.
const TAG_INLINE: u8 = 0;
const TAG_BLOB: u8 = 1;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run database {path}: {source}")]
    Db { path: PathBuf, source: sled::Error },
    #[error("run database: key {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("{path}: content hash {found} does not match the recorded {expected}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("checkpoint tensors {path}: {source}")]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
}

/// A pointer to a content-addressed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub sha256: String,
    pub bytes: u64,
}

/// The current checkpoint: what the run had durably finished when it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Increases by one per checkpoint.
    pub seq: u64,
    /// The trainer's state besides tensors (stage cursor, learner step, RNG and data
    /// cursors): opaque here, owned by the stage runner.
    pub state: serde_json::Value,
    /// Weights and optimizer moments as one safetensors file.
    pub tensors: BlobRef,
}

pub struct RunStore {
    db: sled::Db,
    db_path: PathBuf,
    blobs: PathBuf,
}

impl RunStore {
    /// Opens (creating if needed) the store of `run_dir`. The caller holds the run's lock.
    pub fn open(run_dir: &Path) -> Result<Self, StoreError> {
        let db_path = run_dir.join(DB_DIR);
        let db = sled::Config::new()
            .path(&db_path)
            .open()
            .map_err(|source| StoreError::Db {
                path: db_path.clone(),
                source,
            })?;
        let blobs = run_dir.join(BLOB_DIR);
        std::fs::create_dir_all(&blobs).map_err(|source| StoreError::Io {
            path: blobs.clone(),
            source,
        })?;
        Ok(RunStore { db, db_path, blobs })
    }

    fn db_err(&self, source: sled::Error) -> StoreError {
        StoreError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    /// Writes `value` under `key` and makes it durable before returning.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let encoded = if value.len() <= INLINE_MAX {
            let mut v = Vec::with_capacity(value.len() + 1);
            v.push(TAG_INLINE);
            v.extend_from_slice(value);
            v
        } else {
            let r = self.write_blob(value)?;
            let mut v = vec![TAG_BLOB];
            v.extend(serde_json::to_vec(&r).map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                message: e.to_string(),
            })?);
            v
        };
        self.db
            .insert(key.as_bytes(), encoded)
            .map_err(|e| self.db_err(e))?;
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.db.get(key.as_bytes()).map_err(|e| self.db_err(e))? {
            None => Ok(None),
            Some(v) => self.decode(key, &v).map(Some),
        }
    }

    fn decode(&self, key: &str, v: &[u8]) -> Result<Vec<u8>, StoreError> {
        let corrupt = |message: String| StoreError::Corrupt {
            key: key.to_string(),
            message,
        };
        match v.split_first() {
            Some((&TAG_INLINE, rest)) => Ok(rest.to_vec()),
            Some((&TAG_BLOB, rest)) => {
                let r: BlobRef =
                    serde_json::from_slice(rest).map_err(|e| corrupt(e.to_string()))?;
                self.read_blob(&r)
            }
            Some((tag, _)) => Err(corrupt(format!("unknown value tag {tag}"))),
            None => Err(corrupt("empty value".into())),
        }
    }

    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let value = self.decode(&key, &v)?;
            out.push((key, value));
        }
        Ok(out)
    }

    pub fn config_hash(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(CONFIG_HASH_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_config_hash(&self, hash: &str) -> Result<(), StoreError> {
        self.put(CONFIG_HASH_KEY, hash.as_bytes())
    }

    /// The current checkpoint, if any.
    pub fn manifest(&self) -> Result<Option<Manifest>, StoreError> {
        match self.get(MANIFEST_KEY)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        key: MANIFEST_KEY.into(),
                        message: e.to_string(),
                    })
            }
        }
    }

    /// Writes a checkpoint: the tensors file first (durably), then the manifest switch. Older
    /// tensors files beyond [`KEEP_CHECKPOINTS`] are removed afterwards.
    pub fn commit_checkpoint(
        &self,
        state: serde_json::Value,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Manifest, StoreError> {
        let tmp = tempfile::Builder::new()
            .prefix(".ckpt-")
            .suffix(".safetensors")
            .tempfile_in(&self.blobs)
            .map_err(|source| StoreError::Io {
                path: self.blobs.clone(),
                source,
            })?;
        let cpu: std::collections::HashMap<&String, Tensor> = tensors
            .iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
            .collect::<candle_core::Result<_>>()
            .map_err(|source| StoreError::Tensor {
                path: tmp.path().to_path_buf(),
                source,
            })?;
        candle_core::safetensors::save(&cpu, tmp.path()).map_err(|source| StoreError::Tensor {
            path: tmp.path().to_path_buf(),
            source,
        })?;
        // Hash the file as written and rename it into place (no second copy).
        let bytes = std::fs::read(tmp.path()).map_err(|source| StoreError::Io {
            path: tmp.path().to_path_buf(),
            source,
        })?;
        let r = BlobRef {
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes: bytes.len() as u64,
        };
        drop(bytes);
        self.persist_blob(tmp, &r)?;
        let seq = self.manifest()?.map_or(1, |m| m.seq + 1);
        let manifest = Manifest {
            seq,
            state,
            tensors: r,
        };
        let json = serde_json::to_vec(&manifest).map_err(|e| StoreError::Corrupt {
            key: MANIFEST_KEY.into(),
            message: e.to_string(),
        })?;
        // History first (for garbage collection), then the switch itself.
        self.put(&format!("{HISTORY_PREFIX}{seq:020}"), &json)?;
        self.put(MANIFEST_KEY, &json)?;
        self.collect_garbage(seq)?;
        Ok(manifest)
    }

    /// The checkpoint's tensors, hash-verified, on `device`.
    pub fn load_tensors(
        &self,
        manifest: &Manifest,
        device: &Device,
    ) -> Result<BTreeMap<String, Tensor>, StoreError> {
        let bytes = self.read_blob(&manifest.tensors)?;
        let path = self.blob_path(&manifest.tensors.sha256);
        let map = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|source| StoreError::Tensor { path, source })?;
        Ok(map.into_iter().collect())
    }

    /// Removes tensors files of checkpoints older than the last [`KEEP_CHECKPOINTS`].
    fn collect_garbage(&self, current: u64) -> Result<(), StoreError> {
        let keep_from = current.saturating_sub(KEEP_CHECKPOINTS as u64 - 1);
        for (key, json) in self.scan(HISTORY_PREFIX)? {
            let Ok(m) = serde_json::from_slice::<Manifest>(&json) else {
                continue;
            };
            if m.seq >= keep_from {
                continue;
            }
            let still_used = self
                .scan(HISTORY_PREFIX)?
                .iter()
                .filter_map(|(_, j)| serde_json::from_slice::<Manifest>(j).ok())
                .any(|o| o.seq >= keep_from && o.tensors.sha256 == m.tensors.sha256);
            if !still_used {
                let path = self.blob_path(&m.tensors.sha256);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(StoreError::Io { path, source }),
                }
            }
            self.db.remove(key.as_bytes()).map_err(|e| self.db_err(e))?;
        }
        self.db.flush().map_err(|e| self.db_err(e))?;
        Ok(())
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// Writes `bytes` as a file named by its hash: temp file, fsync, rename, fsync the folder.
    /// An existing file of the same hash is reused (content addressing).
    fn write_blob(&self, bytes: &[u8]) -> Result<BlobRef, StoreError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let path = self.blob_path(&sha256);
        let r = BlobRef {
            sha256,
            bytes: bytes.len() as u64,
        };
        if path.exists() && self.read_blob(&r).is_ok() {
            return Ok(r);
        }
        let mut tmp =
            tempfile::NamedTempFile::new_in(&self.blobs).map_err(|source| StoreError::Io {
                path: self.blobs.clone(),
                source,
            })?;
        tmp.write_all(bytes).map_err(|source| StoreError::Io {
            path: tmp.path().to_path_buf(),
            source,
        })?;
        self.persist_blob(tmp, &r)?;
        Ok(r)
    }

    /// fsync `tmp`, rename it to the blob path of `r`, fsync the folder.
    fn persist_blob(&self, tmp: tempfile::NamedTempFile, r: &BlobRef) -> Result<(), StoreError> {
        let path = self.blob_path(&r.sha256);
        tmp.as_file().sync_all().map_err(|source| StoreError::Io {
            path: tmp.path().to_path_buf(),
            source,
        })?;
        tmp.persist(&path).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        std::fs::File::open(&self.blobs)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Io {
                path: self.blobs.clone(),
                source,
            })
    }

    fn read_blob(&self, r: &BlobRef) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(&r.sha256);
        let mut f = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let mut bytes = Vec::with_capacity(r.bytes as usize);
        f.read_to_end(&mut bytes).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let found = hex::encode(Sha256::digest(&bytes));
        if found != r.sha256 {
            return Err(StoreError::HashMismatch {
                path,
                expected: r.sha256.clone(),
                found,
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(v: f32) -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        m.insert(
            "w".to_string(),
            Tensor::from_vec(vec![v; 40_000], (200, 200), &Device::Cpu).unwrap(),
        );
        m.insert(
            "optim.step".to_string(),
            Tensor::new(&[7i64], &Device::Cpu).unwrap(),
        );
        m
    }

    #[test]
    fn small_and_large_values_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        {
            let s = RunStore::open(dir.path()).unwrap();
            s.put("traj/sft/a", b"small").unwrap();
            s.put("traj/sft/b", &big).unwrap();
            s.set_config_hash("abc").unwrap();
        }
        let s = RunStore::open(dir.path()).unwrap();
        assert_eq!(s.get("traj/sft/a").unwrap().unwrap(), b"small");
        assert_eq!(s.get("traj/sft/b").unwrap().unwrap(), big);
        assert_eq!(s.config_hash().unwrap().as_deref(), Some("abc"));
        let keys: Vec<String> = s
            .scan("traj/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["traj/sft/a", "traj/sft/b"]);
        assert!(s.get("nope").unwrap().is_none());
    }

    #[test]
    fn a_damaged_blob_is_an_error_not_wrong_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunStore::open(dir.path()).unwrap();
        let big = vec![7u8; INLINE_MAX + 1];
        s.put("k", &big).unwrap();
        let sha = hex::encode(Sha256::digest(&big));
        std::fs::write(dir.path().join(BLOB_DIR).join(&sha), b"garbage").unwrap();
        let e = s.get("k").unwrap_err();
        assert!(matches!(e, StoreError::HashMismatch { .. }), "{e}");
    }

    #[test]
    fn checkpoints_switch_atomically_and_old_files_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunStore::open(dir.path()).unwrap();
        assert!(s.manifest().unwrap().is_none());
        let mut shas = Vec::new();
        for step in 1..=4 {
            let m = s
                .commit_checkpoint(serde_json::json!({ "step": step }), &tensors(step as f32))
                .unwrap();
            assert_eq!(m.seq, step);
            shas.push(m.tensors.sha256.clone());
        }
        drop(s);
        let s = RunStore::open(dir.path()).unwrap();
        let m = s.manifest().unwrap().unwrap();
        assert_eq!(m.state["step"], 4);
        let t = s.load_tensors(&m, &Device::Cpu).unwrap();
        assert_eq!(
            t["w"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0],
            4.0
        );
        assert_eq!(t["optim.step"].to_vec1::<i64>().unwrap(), [7]);
        // Only the last KEEP_CHECKPOINTS tensors files remain.
        let blobs = dir.path().join(BLOB_DIR);
        for (i, sha) in shas.iter().enumerate() {
            let kept = i + KEEP_CHECKPOINTS >= shas.len();
            assert_eq!(blobs.join(sha).exists(), kept, "checkpoint {}", i + 1);
        }
    }
}
