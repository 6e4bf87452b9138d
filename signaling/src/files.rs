//! Small files that must never be half-written: secrets, ids, keys.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Writes `contents` to `path` atomically with mode 0600: a temporary file in
/// the same directory, fsynced, then renamed over the target. A crash or a
/// full disk leaves either the old file or the new one, never a torn one.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Removes the temporary files of [`write_private`] calls that a process
/// killed mid-write left in `dir` (those of running processes stay), so
/// they do not pile up on a disk that may be full.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.rsplit_once(".tmp"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Makes an SQLite database private (mode 0600) before it is opened:
/// creates it so, or narrows an existing one and its WAL and shared-memory
/// files (SQLite gives those the database's mode). The data dir is 0700 only
/// when we created it; an operator's may be readable by others.
pub fn make_db_private(path: &Path) -> anyhow::Result<()> {
    let context = || format!("cannot make {} private", path.display());
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .with_context(context)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match fs::set_permissions(&name, fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(context),
        }
    }
    Ok(())
}

/// Reads a small text file, trimmed; `None` when it does not exist.
pub fn read_trimmed(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Creates `dir` (mode 0700 when new) and checks that files can be created in
/// it, so a read-only mount fails at start with a message that names it.
pub fn ensure_writable_dir(dir: &Path, what: &str) -> anyhow::Result<()> {
    let hint = || {
        format!(
            "the {what} {} is not writable; choose another with --data-dir",
            dir.display()
        )
    };
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(hint)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(hint)?;
    }
    let probe = dir.join(format!(".write-probe{}", std::process::id()));
    fs::write(&probe, b"").with_context(hint)?;
    fs::remove_file(&probe).with_context(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(read_trimmed(&path).unwrap().as_deref(), Some("two"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn only_dead_writers_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // No process has a pid this large (the kernel's limit is 2^22).
        let dead = dir.path().join(".secret.tmp4294967295");
        let ours = temp_path(&dir.path().join("health"));
        let other = dir.path().join("notes.tmpfile");
        for path in [&dead, &ours, &other] {
            fs::write(path, b"x").unwrap();
        }
        remove_stale_temps(dir.path());
        assert!(!dead.exists());
        assert!(ours.exists() && other.exists());
    }

    #[test]
    fn databases_are_made_private_with_their_wal_files() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("fresh.db");
        make_db_private(&fresh).unwrap();
        let old = dir.path().join("old.db");
        for name in ["old.db", "old.db-wal", "old.db-shm"] {
            let path = dir.path().join(name);
            fs::write(&path, b"").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        }
        make_db_private(&old).unwrap();
        for name in ["fresh.db", "old.db", "old.db-wal", "old.db-shm"] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn unwritable_dir_is_named() {
        let err = ensure_writable_dir(Path::new("/proc/cocoon-test"), "data dir").unwrap_err();
        assert!(format!("{err:#}").contains("/proc/cocoon-test"), "{err:#}");
    }
}
