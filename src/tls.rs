//! TLS for outgoing `wss://` connections: the system's roots plus an
//! operator-supplied CA file.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A client TLS configuration trusting the system's roots and, when given,
/// every certificate in `ca_file` (PEM).
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::debug!(%err, "skipping a system certificate");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(ca_file) = ca_file {
        let certs = CertificateDer::pem_file_iter(ca_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("cannot read CA certificates from {}", ca_file.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{} holds no PEM certificate",
            ca_file.display()
        );
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("unusable CA certificate in {}", ca_file.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
