//! One retry policy for the calls the daemon retries on its own: a number of attempts, a
//! first delay that doubles up to a cap, and ±20 % jitter, so that a fleet-wide fault
//! (throttling at a scale-up, an SSM brown-out) does not make every instance retry in step.
//!
//! What counts as retryable stays with the caller (throttling and 5xx for most calls; a
//! lifecycle action that is not pending yet, briefly, for `CompleteLifecycleAction`).

use std::future::Future;
use std::time::Duration;

/// Attempts and delays of one kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    /// The delay before the second attempt; it doubles after each further failure.
    pub first_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
}

/// A delay spread by ±20 %.
pub fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(0.8 + fastrand::f64() * 0.4)
}

impl RetryPolicy {
    /// The delay (before jitter) after failed attempt `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(16);
        self.first_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay)
    }

    /// Runs `call` until it succeeds, fails with an error `retryable` rejects, or the
    /// attempts are used up. `on_retry(attempt, error, delay)` is called before each wait
    /// (for the caller's log line). Returns the last result and the attempts made.
    pub async fn run<T, E, F, Fut>(
        &self,
        mut call: F,
        retryable: impl Fn(&E) -> bool,
        mut on_retry: impl FnMut(u32, &E, Duration),
    ) -> (Result<T, E>, u32)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let attempts = self.attempts.max(1);
        let mut attempt = 1;
        loop {
            match call().await {
                Err(e) if attempt < attempts && retryable(&e) => {
                    let delay = jitter(self.delay_after(attempt));
                    on_retry(attempt, &e, delay);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return (other, attempt),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const POLICY: RetryPolicy = RetryPolicy {
        attempts: 4,
        first_delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(1),
    };

    #[test]
    fn delays_double_up_to_the_cap() {
        let d: Vec<_> = (1..=4).map(|a| POLICY.delay_after(a)).collect();
        assert_eq!(
            d,
            [500, 1000, 1000, 1000].map(Duration::from_millis).to_vec()
        );
        assert_eq!(
            POLICY.delay_after(u32::MAX),
            POLICY.max_delay,
            "no overflow"
        );
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(8) && j <= Duration::from_secs(12),
                "{j:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_what_is_retryable_until_the_attempts_run_out() {
        let calls = AtomicU32::new(0);
        let mut waits = vec![];
        let (r, n) = POLICY
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>("throttled")
                },
                |_| true,
                |_, _, d| waits.push(d),
            )
            .await;
        assert_eq!((r, n), (Err("throttled"), 4));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(waits.len(), 3);

        let (r, n) = POLICY
            .run(
                || async { Err::<(), _>("denied") },
                |e| *e != "denied",
                |_, _, _| {},
            )
            .await;
        assert_eq!(
            (r, n),
            (Err("denied"), 1),
            "a permanent refusal is not retried"
        );

        let tries = AtomicU32::new(0);
        let (r, n) = POLICY
            .run(
                || async {
                    if tries.fetch_add(1, Ordering::SeqCst) < 2 {
                        Err("throttled")
                    } else {
                        Ok(7)
                    }
                },
                |_| true,
                |_, _, _| {},
            )
            .await;
        assert_eq!((r, n), (Ok(7), 3));
    }
}
