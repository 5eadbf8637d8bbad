//! The job role as a [`CredentialSource`]: `AssumeRole` for an hour, or for the 15 minutes
//! every role allows once the role refused an hour.

use super::CredentialSource;
use crate::aws::query::QueryError;
use crate::aws::sts::{session_name, SessionCredentials, Sts, MIN_SESSION};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The session asked for first. A role's `MaxSessionDuration` is one hour by default, so
/// this needs no change to the role; clients refresh well within it.
pub const SESSION: Duration = Duration::from_secs(3600);

/// The stack's job role, assumed with the instance profile's credentials.
pub struct JobRole<S> {
    sts: S,
    role_arn: String,
    session_name: String,
    /// The session length asked for, in seconds: [`SESSION`] until the role refuses it
    /// with `ValidationError`, [`MIN_SESSION`] from then on.
    session_secs: AtomicU64,
}

impl<S: Sts> JobRole<S> {
    /// `role_arn` assumed through `sts`, the session named after `instance_id`.
    pub fn new(sts: S, role_arn: &str, instance_id: &str) -> JobRole<S> {
        JobRole {
            sts,
            role_arn: role_arn.to_string(),
            session_name: session_name(instance_id),
            session_secs: AtomicU64::new(SESSION.as_secs()),
        }
    }

    pub fn role_arn(&self) -> &str {
        &self.role_arn
    }
}

impl<S: Sts + 'static> CredentialSource for JobRole<S> {
    async fn fetch(&self) -> Result<SessionCredentials, QueryError> {
        let asked = Duration::from_secs(self.session_secs.load(Ordering::Relaxed));
        let first = self
            .sts
            .assume_role(&self.role_arn, &self.session_name, asked)
            .await;
        match first {
            // "The requested DurationSeconds exceeds the MaxSessionDuration set for this
            // role" (or the one-hour cap of a chained role).
            Err(e) if e.code() == Some("ValidationError") && asked > MIN_SESSION => {
                tracing::warn!(
                    role_arn = %self.role_arn,
                    asked_secs = asked.as_secs(),
                    error = %e,
                    "the job role refused the session length; asking for {} s from now on (fix: raise the role's MaxSessionDuration)",
                    MIN_SESSION.as_secs()
                );
                self.session_secs
                    .store(MIN_SESSION.as_secs(), Ordering::Relaxed);
                self.sts
                    .assume_role(&self.role_arn, &self.session_name, MIN_SESSION)
                    .await
            }
            other => other,
        }
    }
}
