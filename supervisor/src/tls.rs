//! TLS for our own HTTPS calls (Semaphore, CloudWatch): rustls with aws-lc-rs, the one
//! crypto provider already in the tree through the AWS SDK — no second one (ring) is
//! built. reqwest is built without a provider of its own, so the process-wide default
//! must be installed before any client is built.

/// Installs aws-lc-rs as rustls' process default. Idempotent; cheap after the first call.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only means another default was installed first, which is just as good.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}
