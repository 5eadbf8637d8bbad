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
    /// The listing went on past [`MAX_LIST_PAGES`] pages. Terms are not listed in order,
    /// so the largest seen so far may not be the latest, and following it could make a
    /// second leader: the candidate learns nothing rather than something wrong.
    #[error("GetParametersByPath {path}: more than {MAX_LIST_PAGES} pages of 10 parameters; fix: delete the old terms under {path} (the election keeps at most three; keep the newest two) and anything else there, or set election.prefix to a path of its own")]
    ListTooLong { path: String },
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
            Self::ListTooLong { .. } => false,
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

    /// GetParametersByPath (not recursive, pages of 10): the largest term ([`term_of`])
    /// directly under `prefix`, `None` if there is none; [`StoreError::ListTooLong`] if
    /// the listing goes on past [`MAX_LIST_PAGES`] pages.
    fn latest_term(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;
}

/// How many pages (of 10 parameters, SSM's largest) a start-up listing reads at most.
///
/// The prefix normally holds two or three terms (the winner of N deletes N-2); a term is
/// left behind only when a winner dies before it deletes its N-2. 20 pages leave room for
/// ~200 such leftovers while bounding what a start-up costs — a whole fleet booting at
/// once lists together — and what junk under the prefix can make it cost.
pub const MAX_LIST_PAGES: usize = 20;

/// The largest term, 9,999,999,999: names are zero-padded to 10 digits so they sort in
/// term order, and a name with more digits is not a term ([`term_of`]). At one failover a
/// second the fleet would reach it in 317 years; only a parameter written by hand can.
pub const MAX_TERM: u64 = 9_999_999_999;

/// The term after `term`, `None` past [`MAX_TERM`]: term arithmetic never wraps.
pub fn next_term(term: u64) -> Option<u64> {
    term.checked_add(1).filter(|t| *t <= MAX_TERM)
}

/// The term number a parameter name under `prefix` stands for, if it is one: the
/// inverse of [`term_name`]. `term_of("/agent-fleet/s1/leader",
/// "/agent-fleet/s1/leader/0000000042") == Some(42)`; names with anything but 1-10
/// digits after `<prefix>/` are not terms (so none is above [`MAX_TERM`]).
pub fn term_of(prefix: &str, name: &str) -> Option<u64> {
    let last = name.strip_prefix(prefix)?.strip_prefix('/')?;
    if last.is_empty() || last.len() > 10 || !last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    last.parse().ok()
}

/// `<prefix>/<term, zero-padded to 10>`: names sort in term order. `term` is at most
/// [`MAX_TERM`] (see [`next_term`]).
pub fn term_name(prefix: &str, term: u64) -> String {
    format!("{prefix}/{term:010}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_have_at_most_ten_digits() {
        let p = "/agent-fleet/s1/leader";
        assert_eq!(term_of(p, &term_name(p, 42)), Some(42));
        assert_eq!(term_of(p, &format!("{p}/7")), Some(7));
        assert_eq!(term_of(p, &term_name(p, MAX_TERM)), Some(MAX_TERM));
        for bad in [
            "10000000000".to_string(),
            "00000000001".to_string(),
            u64::MAX.to_string(),
            format!("{}0", u64::MAX),
            "99999999999999999999999".to_string(),
            String::new(),
            "-1".to_string(),
            "+1".to_string(),
            "1 ".to_string(),
            "0000000001/x".to_string(),
        ] {
            assert_eq!(term_of(p, &format!("{p}/{bad}")), None, "{bad:?}");
        }
        assert_eq!(term_of(p, "/agent-fleet/s1/leader0000000001"), None);
        assert_eq!(term_of(p, "/other/0000000001"), None);
    }

    #[test]
    fn term_arithmetic_stops_at_the_largest_term() {
        assert_eq!(next_term(0), Some(1));
        assert_eq!(next_term(MAX_TERM - 1), Some(MAX_TERM));
        assert_eq!(next_term(MAX_TERM), None);
        assert_eq!(next_term(u64::MAX), None);
        assert_eq!(term_name("/p", MAX_TERM), "/p/9999999999");
    }
}
