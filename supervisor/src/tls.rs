//! TLS and the HTTP client for our own HTTPS calls (Semaphore, CloudWatch, EC2): rustls with aws-lc-rs, the one
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

/// The process's one HTTP client (Semaphore's `/metrics`, CloudWatch and EC2 Query calls):
/// one connection pool and one copy of the native root store, built on first use — an
/// instance that never leads and has nothing to publish builds none. Callers set their
/// own per-request timeouts. Redirects are never followed (the Semaphore token is only
/// ever sent to the configured endpoint).
pub fn shared_client() -> Result<reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            install_crypto_provider();
            reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(3))
                .user_agent(concat!("agent-fleet/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))
        })
        .clone()
}
