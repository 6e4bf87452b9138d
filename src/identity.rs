//! The worker's identity on disk: `<data>/.secret` and `<data>/.device_id`.
//!
//! The secret comes from `COCOON_SECRET` (refused if weak), else the secret
//! file (replaced if weak), else a new 48-character secret saved with mode
//! 0600. The device id is what the server derived at the first registration;
//! sending it back on every later registration is the anti-theft check.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cocoon_signaling::files::{read_trimmed, write_private};
use cocoon_signaling::identity::{GENERATED_SECRET_LEN, check_secret_strength, generate_secret};
use cocoon_signaling::protocol::{DeviceId, Secret};

const SECRET_FILE: &str = ".secret";
const DEVICE_ID_FILE: &str = ".device_id";

/// Where the secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    /// `COCOON_SECRET` or `--secret`.
    Configured,
    /// The secret file.
    File,
    /// Generated now.
    Generated,
}

/// A worker's secret and, after the first registration, its device id.
#[derive(Debug)]
pub struct Identity {
    /// The secret.
    pub secret: Secret,
    /// Where it came from.
    pub source: SecretSource,
    /// The saved device id, if any.
    pub device_id: Option<DeviceId>,
    device_id_path: PathBuf,
}

impl Identity {
    /// Loads or creates the identity, printing the spec's start-up lines.
    pub fn load(data_dir: &Path, configured: Option<Secret>) -> anyhow::Result<Self> {
        let secret_path = data_dir.join(SECRET_FILE);
        let (secret, source) = match configured {
            Some(secret) => {
                check_secret_strength(secret.expose())
                    .map_err(|weak| anyhow::anyhow!("COCOON_SECRET is too weak: {weak}"))?;
                println!("🔑 Using the secret from COCOON_SECRET");
                (secret, SecretSource::Configured)
            }
            None => load_or_generate(&secret_path)?,
        };
        let device_id_path = data_dir.join(DEVICE_ID_FILE);
        let device_id = match source {
            // A new secret makes any saved id meaningless.
            SecretSource::Generated => {
                remove_if_present(&device_id_path)?;
                None
            }
            _ => read_trimmed(&device_id_path)?
                .filter(|id| !id.is_empty())
                .map(DeviceId::new),
        };
        if device_id.is_some() {
            println!(
                "📱 Loaded existing device ID from {}",
                device_id_path.display()
            );
        }
        Ok(Self {
            secret,
            source,
            device_id,
            device_id_path,
        })
    }

    /// Saves the id the server confirmed, if it is new.
    pub fn confirm(&mut self, device_id: DeviceId) -> anyhow::Result<()> {
        if self.device_id.as_ref() == Some(&device_id) {
            return Ok(());
        }
        write_private(&self.device_id_path, device_id.as_str().as_bytes())?;
        println!(
            "💾 Saved device ID to {} for reconnection verification",
            self.device_id_path.display()
        );
        self.device_id = Some(device_id);
        Ok(())
    }

    /// Where the device id is saved.
    pub fn device_id_path(&self) -> &Path {
        &self.device_id_path
    }
}

fn load_or_generate(path: &Path) -> anyhow::Result<(Secret, SecretSource)> {
    if let Some(existing) = read_trimmed(path)? {
        match check_secret_strength(&existing) {
            Ok(()) => {
                println!("🔑 Loaded existing secret from {}", path.display());
                return Ok((Secret::new(existing), SecretSource::File));
            }
            Err(weak) => {
                tracing::warn!(path = %path.display(), reason = %weak, "saved secret is weak; replacing it");
            }
        }
    }
    let secret = generate_secret();
    println!(
        "🆕 Generated new strong secret ({GENERATED_SECRET_LEN} characters, {} bits entropy)",
        GENERATED_SECRET_LEN * 6
    );
    write_private(path, secret.expose().as_bytes())?;
    println!(
        "💾 Saved secret to {} for persistent sessions",
        path.display()
    );
    Ok((secret, SecretSource::Generated))
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("cannot remove stale {}", path.display())),
    }
}

/// Refuses to go on when the device id file exists but cannot be trusted.
pub fn explain_mismatch(identity: &Identity) -> anyhow::Error {
    let path = identity.device_id_path().display();
    let hint = match identity.source {
        SecretSource::Configured => format!(
            " If you changed COCOON_SECRET on purpose, delete {path} to register as a new device."
        ),
        _ => String::new(),
    };
    anyhow::anyhow!(
        "the server rejected the saved device id in {path}: it does not match this secret.{hint}"
    )
}

/// Fails with a clear message when the data dir cannot hold the identity.
pub fn check_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    if let Err(err) = cocoon_signaling::files::ensure_writable_dir(data_dir, "data dir") {
        bail!("{err:#} (or set COCOON_DATA_DIR)");
    }
    cocoon_signaling::files::remove_stale_temps(data_dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_file_secret_is_replaced_and_stale_id_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SECRET_FILE), "short").unwrap();
        std::fs::write(dir.path().join(DEVICE_ID_FILE), "stale").unwrap();
        let identity = Identity::load(dir.path(), None).unwrap();
        assert_eq!(identity.source, SecretSource::Generated);
        assert_eq!(identity.secret.expose().len(), GENERATED_SECRET_LEN);
        assert_eq!(identity.device_id, None);
        assert!(!dir.path().join(DEVICE_ID_FILE).exists());
    }

    #[test]
    fn weak_configured_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::load(dir.path(), Some(Secret::new("password"))).unwrap_err();
        assert!(
            err.to_string().contains("COCOON_SECRET is too weak"),
            "{err}"
        );
        assert!(
            !err.to_string().contains("password\""),
            "the secret itself is not echoed"
        );
    }
}
