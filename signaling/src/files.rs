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
    fn unwritable_dir_is_named() {
        let err = ensure_writable_dir(Path::new("/proc/cocoon-test"), "data dir").unwrap_err();
        assert!(format!("{err:#}").contains("/proc/cocoon-test"), "{err:#}");
    }
}
