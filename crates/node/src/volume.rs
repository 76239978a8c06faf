//! Writing configMap and secret volumes the way the kubelet's atomic writer does, so that
//! neither a reader nor a hostile guest can make the agent (root) write anywhere else:
//!
//! ```text
//! <dir>/..2026_12_01_10_00_00.123456789/<files>   a new folder per update, created fresh
//! <dir>/..data -> ..2026_12_01_10_00_00.123456789 swapped by one rename(2)
//! <dir>/<top-level name> -> ..data/<top-level name>
//! ```
//!
//! Every file is created in a folder the agent has just made (`O_EXCL | O_NOFOLLOW`), so a
//! link planted anywhere is never followed; an update never writes into an existing path;
//! guests see these volumes read-only. Secrets are written with mode 0600 (configMaps 0644)
//! unless the volume's `defaultMode` or an item's `mode` says otherwise. All of it is blocking
//! file I/O: call it from a blocking task.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, symlink};
use std::path::{Component, Path, PathBuf};

/// One file of a volume: its path relative to the volume, bytes, and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFile {
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

const DATA: &str = "..data";

/// Whether `rel` is a relative path that stays in the volume (no `..`, no absolute part, and
/// not one of the writer's own `..` names).
pub fn safe_relative(rel: &str) -> bool {
    let p = Path::new(rel);
    !rel.is_empty()
        && !rel.starts_with("..")
        && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Replaces the contents of the volume at `dir` with `files`, atomically for readers.
pub fn write_atomic(dir: &Path, files: &[VolumeFile]) -> std::io::Result<()> {
    for f in files {
        if !safe_relative(&f.path) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("path {:?} must be relative and stay in the volume", f.path),
            ));
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    if std::fs::symlink_metadata(dir)?.file_type().is_symlink() {
        return Err(std::io::Error::other(format!(
            "{} is a link; refusing to write a volume through it",
            dir.display()
        )));
    }
    let stamp = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("..{}.{:09}", now.as_secs(), now.subsec_nanos())
    };
    let fresh = dir.join(&stamp);
    std::fs::DirBuilder::new().mode(0o755).create(&fresh)?;
    for f in files {
        let path = fresh.join(&f.path);
        if let Some(parent) = path.parent()
            && parent != fresh
        {
            // Inside the fresh folder: nothing here existed before this call.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(f.mode & 0o777)
            .custom_flags(libc_o_nofollow())
            .open(&path)?;
        out.write_all(&f.bytes)?;
        out.sync_all()?;
    }
    // Swap `..data` to the new folder in one rename.
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    symlink(&stamp, &tmp_link)?;
    let previous = std::fs::read_link(dir.join(DATA)).ok();
    std::fs::rename(&tmp_link, dir.join(DATA))?;
    // The names users see: one link per top-level entry.
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|f| Path::new(&f.path).components().next())
        .filter_map(|c| c.as_os_str().to_str().map(String::from))
        .collect();
    for top in &tops {
        let link = dir.join(top);
        match std::fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => {
                if std::fs::read_link(&link)? == Path::new(DATA).join(top) {
                    continue;
                }
                std::fs::remove_file(&link)?;
            }
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&link)?,
            Ok(_) => std::fs::remove_file(&link)?,
            Err(_) => {}
        }
        symlink(Path::new(DATA).join(top), &link)?;
    }
    // Names of the previous version that are gone now, and the previous folder.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            if name != DATA && name != stamp {
                remove_any(&entry.path())?;
            }
        } else if !tops.contains(&name) {
            remove_any(&entry.path())?;
        }
    }
    if let Some(prev) = previous
        && prev != Path::new(&stamp)
    {
        let _ = remove_any(&dir.join(prev));
    }
    Ok(())
}

fn remove_any(p: &PathBuf) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn libc_o_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Where secret volumes are written: a folder on tmpfs (`/dev/shm`) when the host has one, so
/// secrets never reach a disk; else `fallback`. Named after `data_dir` so that several agents
/// on one host keep apart.
pub fn secret_root(data_dir: &Path, fallback: PathBuf) -> PathBuf {
    use sha2::Digest;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let shm = Path::new("/dev/shm");
    let on_tmpfs = rustix::fs::statfs(shm).is_ok_and(|s| s.f_type == TMPFS_MAGIC);
    if !on_tmpfs {
        return fallback;
    }
    let id = sha2::Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    let dir = shm.join(format!("wasinode-{}", hex_prefix(&id)));
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
    {
        Ok(()) => dir,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "cannot use tmpfs for secret volumes: {e}");
            fallback
        }
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(path: &str, text: &str, mode: u32) -> VolumeFile {
        VolumeFile {
            path: path.into(),
            bytes: text.as_bytes().to_vec(),
            mode,
        }
    }

    #[test]
    fn updates_swap_atomically_and_follow_no_planted_link() -> std::io::Result<()> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("vol");
        let outside = root.path().join("outside.txt");
        std::fs::write(&outside, "untouched")?;
        write_atomic(
            &dir,
            &[file("a.txt", "one", 0o600), file("sub/b", "two", 0o644)],
        )?;
        assert_eq!(std::fs::read_to_string(dir.join("a.txt"))?, "one");
        assert_eq!(std::fs::read_to_string(dir.join("sub/b"))?, "two");
        let mode = std::fs::metadata(dir.join("a.txt"))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Links planted where the old writer wrote its temporary file and the file itself.
        symlink(&outside, dir.join("a.wasinode-tmp"))?;
        std::fs::remove_file(dir.join("a.txt"))?;
        symlink(&outside, dir.join("a.txt"))?;
        write_atomic(&dir, &[file("a.txt", "three", 0o600)])?;
        assert_eq!(std::fs::read_to_string(&outside)?, "untouched");
        assert_eq!(std::fs::read_to_string(dir.join("a.txt"))?, "three");
        assert!(
            !dir.join("sub").exists(),
            "a name gone from the data is removed"
        );
        assert!(!dir.join("a.wasinode-tmp").exists());
        let versions = std::fs::read_dir(&dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("..") && e.file_name() != DATA)
            .count();
        assert_eq!(versions, 1, "only the current version is kept");
        Ok(())
    }

    #[test]
    fn paths_that_leave_the_volume_are_refused() {
        for bad in ["../x", "/etc/x", "a/../../x", "..data", "..2026", ""] {
            assert!(!safe_relative(bad), "{bad}");
        }
        assert!(safe_relative("a/b.txt"));
        let root = tempfile::tempdir().expect("tempdir");
        assert!(write_atomic(root.path(), &[file("../x", "no", 0o600)]).is_err());
    }
}
