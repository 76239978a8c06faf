//! The content-addressed store under `<data_dir>/oci`:
//!
//! ```text
//! oci/blobs/sha256/<hex>   manifests, configs and wasm layers, read-only, named by sha256
//! oci/refs/<escaped ref>   one file per pulled reference holding its manifest digest
//! oci/tmp/                 partial downloads (renamed into blobs/ once verified)
//! ```
//!
//! Blobs are written to `tmp/`, fsynced, verified against their digest and
//! renamed into place, so a blob path either does not exist or holds the full,
//! verified content. Every pod using a digest uses the same file.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::OciError;
use crate::manifest::Manifest;

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of a well-formed `sha256:<64 lowercase hex>` digest.
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

/// The state of one blob on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobState {
    Missing,
    /// Present and its content hashes to its name.
    Verified {
        size: u64,
    },
    /// Present but its content hashes to `actual`: it has been removed.
    Corrupt {
        actual: String,
    },
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Digests whose blobs were deleted.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Number of blobs kept.
    pub kept: usize,
    /// References whose manifests were deleted (a later pull fetches them again).
    pub refs_removed: Vec<String>,
}

/// The content-addressed store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Open (creating) the store under `<data_dir>/oci`.
    pub fn open(data_dir: &Path) -> Result<Store, OciError> {
        let root = data_dir.join("oci");
        for d in ["blobs/sha256", "refs", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| OciError::io(&p, e))?;
        }
        Ok(Store { root })
    }

    /// The store's root directory (`<data_dir>/oci`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it exists). A
    /// malformed digest maps to a path that never exists.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        match digest_hex(digest) {
            Some(hex) => self.root.join("blobs/sha256").join(hex),
            None => self.root.join("blobs/sha256/invalid-digest"),
        }
    }

    /// Hash the blob on disk; remove it if it does not match its name.
    pub fn check_blob(&self, digest: &str) -> Result<BlobState, OciError> {
        let path = self.blob_path(digest);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BlobState::Missing),
            Err(e) => return Err(OciError::io(&path, e)),
        };
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| OciError::io(&path, e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            h.update(&buf[..n]);
        }
        let actual = format!("sha256:{}", hex::encode(h.finalize()));
        if actual == digest {
            Ok(BlobState::Verified { size })
        } else {
            tracing::warn!(%digest, %actual, path = %path.display(), "stored blob is corrupt; removing it");
            let _ = std::fs::remove_file(&path);
            Ok(BlobState::Corrupt { actual })
        }
    }

    /// Read a blob into memory after verifying it (for manifests and configs).
    pub fn read_verified(&self, digest: &str) -> Result<Option<Vec<u8>>, OciError> {
        let path = self.blob_path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OciError::io(&path, e)),
        };
        if sha256_digest(&bytes) != digest {
            tracing::warn!(%digest, path = %path.display(), "stored blob is corrupt; removing it");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Store bytes whose digest must be `digest` (atomically).
    pub fn put_bytes(&self, digest: &str, bytes: &[u8]) -> Result<PathBuf, OciError> {
        let mut w = self.writer()?;
        w.write(bytes)?;
        w.commit(digest, Some(bytes.len() as u64), "blob")
    }

    /// Start writing a blob of unknown content to a temp file.
    pub fn writer(&self) -> Result<BlobWriter, OciError> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!(
            "{}-{}-{nanos}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.root.join("tmp").join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| OciError::io(&path, e))?;
        Ok(BlobWriter {
            store: self.clone(),
            path,
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        let mut name = String::with_capacity(reference.len() * 2);
        for b in reference.bytes() {
            if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_' {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        self.root.join("refs").join(name)
    }

    /// Record that `reference` (its normalized `Display` form) resolved to `manifest_digest`.
    pub fn set_ref(&self, reference: &str, manifest_digest: &str) -> Result<(), OciError> {
        let path = self.ref_path(reference);
        let mut w = self.writer()?;
        w.write(format!("{manifest_digest}\n{reference}\n").as_bytes())?;
        w.persist_as(&path)
    }

    /// The manifest digest a reference last resolved to, if recorded.
    pub fn get_ref(&self, reference: &str) -> Result<Option<String>, OciError> {
        let path = self.ref_path(reference);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(s
                .lines()
                .next()
                .filter(|d| digest_hex(d).is_some())
                .map(str::to_string)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(OciError::io(&path, e)),
        }
    }

    /// Every recorded reference and its manifest digest.
    pub fn refs(&self) -> Result<BTreeMap<String, String>, OciError> {
        let dir = self.root.join("refs");
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(&dir).map_err(|e| OciError::io(&dir, e))? {
            let e = e.map_err(|e| OciError::io(&dir, e))?;
            if let Ok(s) = std::fs::read_to_string(e.path()) {
                let mut lines = s.lines();
                if let (Some(d), Some(r)) = (lines.next(), lines.next()) {
                    out.insert(r.to_string(), d.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Every stored blob digest.
    pub fn blobs(&self) -> Result<Vec<String>, OciError> {
        let dir = self.root.join("blobs/sha256");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| OciError::io(&dir, e))? {
            let e = e.map_err(|e| OciError::io(&dir, e))?;
            let d = format!("sha256:{}", e.file_name().to_string_lossy());
            if digest_hex(&d).is_some() {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Delete every blob not reachable from `keep`, and the references whose
    /// manifests go. `keep` may hold manifest or layer digests (what pods
    /// reference): a manifest is kept when it or any blob it names is kept, and
    /// a kept manifest keeps everything it names. Temp files older than an hour
    /// are removed too.
    ///
    /// Callers must include digests being pulled right now ([`crate::Client::gc`]
    /// does that for its own pulls).
    pub fn gc(&self, keep: &HashSet<String>) -> Result<GcReport, OciError> {
        let blobs = self.blobs()?;
        // manifest digest -> children
        let mut manifests: Vec<(String, Vec<String>)> = Vec::new();
        for d in &blobs {
            let path = self.blob_path(d);
            let is_json = std::fs::File::open(&path)
                .and_then(|mut f| {
                    let mut b = [0u8; 1];
                    f.read(&mut b).map(|n| n == 1 && b[0] == b'{')
                })
                .unwrap_or(false);
            let small = std::fs::metadata(&path)
                .map(|m| m.len() < 4 << 20)
                .unwrap_or(false);
            if is_json
                && small
                && let Ok(bytes) = std::fs::read(&path)
                && let Ok(m) = Manifest::parse(&bytes)
                && (m.config.is_some() || m.manifests.is_some())
            {
                manifests.push((d.clone(), m.children()));
            }
        }
        let mut kept: HashSet<String> = keep.clone();
        loop {
            let before = kept.len();
            for (m, children) in &manifests {
                if kept.contains(m) || children.iter().any(|c| kept.contains(c)) {
                    kept.insert(m.clone());
                    kept.extend(children.iter().cloned());
                }
            }
            if kept.len() == before {
                break;
            }
        }
        let mut report = GcReport::default();
        for d in &blobs {
            if kept.contains(d) {
                report.kept += 1;
                continue;
            }
            let path = self.blob_path(d);
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    report.freed_bytes += len;
                    report.removed.push(d.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(OciError::io(&path, e)),
            }
        }
        for (r, d) in self.refs()? {
            if !kept.contains(&d) {
                let _ = std::fs::remove_file(self.ref_path(&r));
                report.refs_removed.push(r);
            }
        }
        let tmp = self.root.join("tmp");
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(3600));
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        tracing::info!(
            removed = report.removed.len(),
            freed_bytes = report.freed_bytes,
            kept = report.kept,
            "store gc"
        );
        Ok(report)
    }
}

/// A blob being written: hashed as it is written, renamed into place by
/// [`BlobWriter::commit`] once verified. Dropped uncommitted, the temp file is removed.
pub struct BlobWriter {
    store: Store,
    path: PathBuf,
    file: Option<std::fs::File>,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    /// Append bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), OciError> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| OciError::io(&self.path, std::io::Error::other("writer closed")))?;
        f.write_all(bytes)
            .map_err(|e| OciError::io(&self.path, e))?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn sync_close(&mut self) -> Result<(), OciError> {
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(|e| OciError::io(&self.path, e))?;
        }
        Ok(())
    }

    fn persist_as(mut self, dest: &Path) -> Result<(), OciError> {
        self.sync_close()?;
        std::fs::rename(&self.path, dest).map_err(|e| OciError::io(dest, e))?;
        sync_dir(dest);
        Ok(())
    }

    /// Verify the content against `digest` (and `size` if known) and move it into
    /// `blobs/`. `what` names the blob in errors (e.g. "layer").
    pub fn commit(
        mut self,
        digest: &str,
        size: Option<u64>,
        what: &str,
    ) -> Result<PathBuf, OciError> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if actual != digest {
            return Err(OciError::DigestMismatch {
                reference: String::new(),
                what: what.to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        if let Some(want) = size
            && want != self.size
        {
            return Err(OciError::DigestMismatch {
                reference: String::new(),
                what: format!("{what} size"),
                expected: want.to_string(),
                actual: self.size.to_string(),
            });
        }
        self.sync_close()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o444));
        }
        let dest = self.store.blob_path(digest);
        std::fs::rename(&self.path, &dest).map_err(|e| OciError::io(&dest, e))?;
        sync_dir(&dest);
        Ok(dest)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful rename the temp path no longer exists; this is a no-op then.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn sync_dir(p: &Path) {
    if let Some(dir) = p.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_check_corrupt_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let layer = b"\0asm\x01\0\0\0".to_vec();
        let ld = sha256_digest(&layer);
        s.put_bytes(&ld, &layer).unwrap();
        assert_eq!(s.check_blob(&ld).unwrap(), BlobState::Verified { size: 8 });
        let (m, c) = crate::manifest::cncf_artifact(&crate::wasm::WasmKind::Module, &ld, 8);
        let (md, cd) = (sha256_digest(&m), sha256_digest(&c));
        s.put_bytes(&md, &m).unwrap();
        s.put_bytes(&cd, &c).unwrap();
        s.set_ref("r.io/m:v1", &md).unwrap();
        assert_eq!(s.get_ref("r.io/m:v1").unwrap(), Some(md.clone()));
        assert_eq!(s.get_ref("r.io/m:v2").unwrap(), None);
        let other = b"other".to_vec();
        let od = sha256_digest(&other);
        s.put_bytes(&od, &other).unwrap();
        // wrong digest refused, nothing left behind
        let e = s.put_bytes(&ld, b"nope").unwrap_err().to_string();
        assert!(e.contains("digest mismatch"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path().join("oci/tmp"))
                .unwrap()
                .count(),
            0
        );

        // keeping the layer keeps its manifest, config and ref; the stray blob goes
        let r = s.gc(&HashSet::from([ld.clone()])).unwrap();
        assert_eq!(r.removed, vec![od.clone()]);
        assert_eq!(r.kept, 3);
        assert!(r.refs_removed.is_empty());
        assert_eq!(s.get_ref("r.io/m:v1").unwrap(), Some(md.clone()));

        // corrupt the layer: detected and removed
        let p = s.blob_path(&ld);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::write(&p, b"\0asm\x01\0\0\x01").unwrap();
        assert!(matches!(
            s.check_blob(&ld).unwrap(),
            BlobState::Corrupt { .. }
        ));
        assert_eq!(s.check_blob(&ld).unwrap(), BlobState::Missing);

        // nothing kept: everything and the ref go
        let r = s.gc(&HashSet::new()).unwrap();
        assert_eq!(r.refs_removed, vec!["r.io/m:v1".to_string()]);
        assert!(s.blobs().unwrap().is_empty());
        assert_eq!(
            s.blob_path("../../etc/passwd"),
            dir.path().join("oci/blobs/sha256/invalid-digest")
        );
    }
}
