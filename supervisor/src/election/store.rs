//! The one storage primitive the election needs, with SSM Parameter Store's semantics.

use crate::aws::Retry;
use std::future::Future;
use std::time::Duration;

/// What `create` (PutParameter with `Overwrite=false`) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// This call created the parameter: the caller owns the term.
    Won { version: u64 },
    /// Someone else created it first (SSM: `ParameterAlreadyExists`).
    AlreadyExists,
}

/// A failed store call. One variant per SSM operation, plus the caller's own deadline.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("PutParameter {name}: {detail}")]
    Put {
        name: String,
        retry: Retry,
        detail: String,
    },
    #[error("GetParameter {name}: {detail}")]
    Get {
        name: String,
        retry: Retry,
        detail: String,
    },
    #[error("DeleteParameter {name}: {detail}")]
    Delete {
        name: String,
        retry: Retry,
        detail: String,
    },
    #[error("GetParametersByPath {path}: {detail}")]
    List {
        path: String,
        retry: Retry,
        detail: String,
    },
    /// The call did not answer within the election's deadline; its effect is unknown.
    #[error("{operation} {name}: no answer within {after:?}")]
    Timeout {
        operation: &'static str,
        name: String,
        after: Duration,
    },
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Put { retry, .. }
            | Self::Get { retry, .. }
            | Self::Delete { retry, .. }
            | Self::List { retry, .. } => *retry == Retry::Transient,
            Self::Timeout { .. } => true,
        }
    }
}

/// A narrow view of SSM Parameter Store: plain String parameters with versions.
///
/// Versions start at 1 and grow by one on every write, as SSM's do; a parameter deleted
/// and written again starts over at 1. Implementations do not bound their calls in time:
/// the elector owns the deadlines (a renew counts only if it answered within its own).
pub trait LeaseStore: Send + Sync + 'static {
    /// PutParameter `Overwrite=false`: `Won { version: 1 }` or `AlreadyExists`.
    fn create(
        &self,
        name: &str,
        value: &str,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send;

    /// PutParameter `Overwrite=true` (creates a missing parameter); returns the new version.
    fn overwrite(
        &self,
        name: &str,
        value: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// GetParameter: the value and version, `None` if the parameter does not exist.
    fn get(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<(String, u64)>, StoreError>> + Send;

    /// DeleteParameter; a missing parameter is not an error.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// GetParametersByPath (all pages, not recursive): the largest numeric last path
    /// component directly under `prefix`, `None` if there is none.
    fn latest_term(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;
}

/// The term number a parameter name under `prefix` stands for, if it is one: the
/// inverse of [`term_name`]. `term_of("/agent-fleet/s1/leader",
/// "/agent-fleet/s1/leader/0000000042") == Some(42)`; names with anything but digits
/// after `<prefix>/` are not terms.
pub fn term_of(prefix: &str, name: &str) -> Option<u64> {
    let last = name.strip_prefix(prefix)?.strip_prefix('/')?;
    if last.is_empty() || !last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    last.parse().ok()
}

/// `<prefix>/<term, zero-padded to 10>`: names sort in term order.
pub fn term_name(prefix: &str, term: u64) -> String {
    format!("{prefix}/{term:010}")
}
