//! The value of a term parameter: who holds it and how the fleet should watch it.
//!
//! ```json
//! {"holder":"i-0abc#5f1e…","seq":42,"lease_ms":20000,"renew_deadline_ms":12000,
//!  "released":false,"standbys":["i-0def","i-0123"],"follower_poll_ms":960000}
//! ```
//!
//! Every key is required and typed; keys this version does not know are ignored, so a
//! newer supervisor can add some during a rolling upgrade.

use serde::Deserialize;
use std::time::Duration;

/// Longest lease or poll interval a record may advertise; anything longer is a bug or
/// garbage, and would overflow instants.
const MAX_ADVERTISED_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Record {
    /// `<instance-id>#<nonce>`: the process that created the term.
    pub holder: String,
    /// Grows by one on every write of the holder; the version is the heartbeat, this only
    /// makes every write differ.
    pub seq: u64,
    /// How long the holder's version may stay unchanged before others take over.
    pub lease_ms: u64,
    pub renew_deadline_ms: u64,
    /// The holder stopped leading and gave the term up: take over at once.
    pub released: bool,
    /// Instance ids that should poll every retry (a few; the rest poll slowly).
    pub standbys: Vec<String>,
    /// How often everyone else polls, chosen by the holder from the fleet size.
    pub follower_poll_ms: u64,
}

impl Record {
    /// Strict parse; the error is a short description for a log line.
    pub fn parse(value: &str) -> Result<Self, String> {
        let r: Record = serde_json::from_str(value).map_err(|e| e.to_string())?;
        if r.holder.is_empty() {
            return Err("empty holder".into());
        }
        for (key, ms) in [
            ("lease_ms", r.lease_ms),
            ("renew_deadline_ms", r.renew_deadline_ms),
            ("follower_poll_ms", r.follower_poll_ms),
        ] {
            if ms == 0 || ms > MAX_ADVERTISED_MS {
                return Err(format!("{key} {ms} outside 1..={MAX_ADVERTISED_MS}"));
            }
        }
        Ok(r)
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({
            "holder": self.holder,
            "seq": self.seq,
            "lease_ms": self.lease_ms,
            "renew_deadline_ms": self.renew_deadline_ms,
            "released": self.released,
            "standbys": self.standbys,
            "follower_poll_ms": self.follower_poll_ms,
        })
        .to_string()
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    pub fn follower_poll(&self) -> Duration {
        Duration::from_millis(self.follower_poll_ms)
    }

    /// The instance id part of `holder`.
    pub fn holder_instance(&self) -> &str {
        instance_of(&self.holder)
    }
}

pub(crate) fn instance_of(holder: &str) -> &str {
    holder.split_once('#').map_or(holder, |(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            holder: "i-0abc#00ff".into(),
            seq: 7,
            lease_ms: 20_000,
            renew_deadline_ms: 12_000,
            released: false,
            standbys: vec!["i-1".into(), "i-2".into()],
            follower_poll_ms: 60_000,
        }
    }

    #[test]
    fn round_trips_and_tolerates_unknown_keys() {
        let r = sample();
        assert_eq!(Record::parse(&r.to_json()).expect("ok"), r);
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("ok");
        v["priority"] = serde_json::json!(3);
        assert_eq!(Record::parse(&v.to_string()).expect("ok"), r);
        assert_eq!(r.holder_instance(), "i-0abc");
    }

    #[test]
    fn missing_or_mistyped_keys_are_refused() {
        let good: serde_json::Value = serde_json::from_str(&sample().to_json()).expect("ok");
        for key in [
            "holder",
            "seq",
            "lease_ms",
            "renew_deadline_ms",
            "released",
            "standbys",
            "follower_poll_ms",
        ] {
            let mut v = good.clone();
            v.as_object_mut().expect("ok").remove(key);
            assert!(Record::parse(&v.to_string()).is_err(), "without {key}");
            let mut v = good.clone();
            v[key] = serde_json::json!({"x": 1});
            assert!(Record::parse(&v.to_string()).is_err(), "mistyped {key}");
        }
        for (key, bad) in [("lease_ms", 0u64), ("follower_poll_ms", u64::MAX)] {
            let mut v = good.clone();
            v[key] = serde_json::json!(bad);
            assert!(Record::parse(&v.to_string()).is_err(), "{key}={bad}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let good = sample().to_json();
        let mut inputs: Vec<String> = vec![
            String::new(),
            "null".into(),
            "[]".into(),
            "{}".into(),
            "\u{0}".into(),
            "{\"holder\":".into(),
            "{\"holder\":\"\",\"seq\":1}".into(),
            "{\"seq\":-1}".into(),
            "{\"lease_ms\":1e400}".into(),
            "x".repeat(10_000),
            "[".repeat(10_000),
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            // Truncations, byte flips and random bytes of a valid record.
            let mut b = good.clone().into_bytes();
            match rng.u8(0..3) {
                0 => b.truncate(rng.usize(0..b.len())),
                1 => {
                    for _ in 0..rng.usize(1..4) {
                        let i = rng.usize(0..b.len());
                        b[i] = rng.u8(..);
                    }
                }
                _ => b = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect(),
            }
            inputs.push(String::from_utf8_lossy(&b).into_owned());
        }
        let mut accepted = 0;
        for input in &inputs {
            if let Ok(r) = Record::parse(input) {
                accepted += 1;
                assert!(r.lease_ms > 0 && !r.holder.is_empty());
            }
        }
        assert!(accepted < inputs.len() / 2);
    }
}
