//! The value of a term parameter: who holds it and how the fleet should watch it.
//!
//! ```json
//! {"holder":"i-0abc#5f1e…","seq":42,"lease_ms":20000,"renew_deadline_ms":12000,
//!  "released":false,"standbys":["i-0def","i-0123"],"follower_poll_ms":960000,
//!  "decision":{"at_unix_ms":1767225600000,"action":"raised","queued":3,"running":1,
//!              "target":4,"desired_before":1,"desired_after":4}}
//! ```
//!
//! Every key is required and typed, except `decision`: keys this version does not know
//! are ignored, so a newer supervisor can add some during a rolling upgrade. `decision`
//! is what an operator reads (`agent-fleet status`); it never decides anything, so a
//! missing or unreadable one is `None` rather than a reason to refuse the record.
//!
//! To find the record an operator wants: list `<prefix>/*` (e.g.
//! `/agent-fleet/<stack>/leader`), keep the names [`term_of`](super::term_of) accepts,
//! read the largest term's parameter and [`Record::parse`] it.

use super::elector::MAX_FOLLOWER_POLL;
use crate::config::MAX_ELECTION_TIMING;
use crate::scaler::Decision;
use serde::{Deserialize, Deserializer};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Record {
    /// `<instance-id>#<nonce>`: the process that created the term.
    pub holder: String,
    /// Grows by one on every write of the holder; the version is the heartbeat, this only
    /// makes every write differ.
    pub seq: u64,
    /// How long the holder's version may stay unchanged before others take over, as
    /// written; a reader waits at most [`MAX_ELECTION_TIMING`] ([`Record::lease`]).
    pub lease_ms: u64,
    pub renew_deadline_ms: u64,
    /// The holder stopped leading and gave the term up: take over at once.
    pub released: bool,
    /// Instance ids that should poll every retry (a few; the rest poll slowly).
    pub standbys: Vec<String>,
    /// How often everyone else polls, chosen by the holder from the fleet size; a reader
    /// polls at least every [`MAX_FOLLOWER_POLL`] ([`Record::follower_poll`]).
    pub follower_poll_ms: u64,
    /// The holder's scaler's latest decision, if it has made one (informational).
    #[serde(default, deserialize_with = "lenient")]
    pub decision: Option<Decision>,
}

/// `decision` as a `Decision` if it reads as one, else `None`: an informational field
/// must never make a lease record unreadable.
fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decision>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

impl Record {
    /// Strict parse; the error is a short description for a log line.
    ///
    /// Durations must be positive but may be any `u64`: the accessors cap them, so an
    /// overlong one (a bug, an older version, a hand-written record) costs a bounded wait
    /// and keeps the rest of the record (`released`, `standbys`) usable.
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
            if ms == 0 {
                return Err(format!("{key} is 0"));
            }
        }
        Ok(r)
    }

    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "holder": self.holder,
            "seq": self.seq,
            "lease_ms": self.lease_ms,
            "renew_deadline_ms": self.renew_deadline_ms,
            "released": self.released,
            "standbys": self.standbys,
            "follower_poll_ms": self.follower_poll_ms,
        });
        if let (Some(d), Some(map)) = (&self.decision, v.as_object_mut()) {
            if let Ok(d) = serde_json::to_value(d) {
                map.insert("decision".into(), d);
            }
        }
        v.to_string()
    }

    /// The advertised lease, at most [`MAX_ELECTION_TIMING`]: no holder may configure a
    /// longer one, so a record that says more is wrong, and one bad record must not stall
    /// failover for longer than the longest valid lease.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms).min(MAX_ELECTION_TIMING)
    }

    /// `lease_ms` is beyond what [`Record::lease`] waits.
    pub fn lease_over_cap(&self) -> bool {
        Duration::from_millis(self.lease_ms) > MAX_ELECTION_TIMING
    }

    /// The advertised follower poll, at most [`MAX_FOLLOWER_POLL`] (what a holder ever
    /// computes).
    pub fn follower_poll(&self) -> Duration {
        Duration::from_millis(self.follower_poll_ms).min(MAX_FOLLOWER_POLL)
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
            decision: None,
        }
    }

    fn raised() -> Decision {
        Decision {
            queued: Some(3),
            running: Some(1),
            target: Some(4),
            desired_before: Some(1),
            desired_after: Some(4),
            ..Decision::new(
                std::time::UNIX_EPOCH + Duration::from_millis(1_767_225_600_123),
                "raised",
            )
        }
    }

    #[test]
    fn a_decision_round_trips_and_older_records_parse_without_one() {
        let r = Record {
            decision: Some(raised()),
            ..sample()
        };
        let json = r.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(
            v["decision"],
            serde_json::json!({"at_unix_ms": 1_767_225_600_123u64, "action": "raised",
                "queued": 3, "running": 1, "target": 4, "desired_before": 1, "desired_after": 4})
        );
        assert_eq!(Record::parse(&json).expect("ok"), r);
        assert_eq!(
            r.decision.as_ref().map(Decision::at),
            Some(std::time::UNIX_EPOCH + Duration::from_millis(1_767_225_600_123))
        );

        // What a supervisor without decisions writes, and reads.
        let old = r#"{"holder":"i-0abc#00ff","seq":7,"lease_ms":20000,"renew_deadline_ms":12000,
                      "released":false,"standbys":["i-1","i-2"],"follower_poll_ms":60000}"#;
        assert_eq!(Record::parse(old).expect("ok"), sample());
        assert!(!sample().to_json().contains("decision"));

        // A skipped poll: only what is known.
        let mut skipped = Decision::new(std::time::UNIX_EPOCH, "skipped");
        skipped.set_reason("x".repeat(500));
        let r = Record {
            decision: Some(skipped.clone()),
            ..sample()
        };
        let json = r.to_json();
        assert!(
            !json.contains("queued") && !json.contains("target"),
            "{json}"
        );
        assert_eq!(
            Record::parse(&json).expect("ok").decision,
            Some(skipped.clone())
        );
        let reason = skipped.reason.expect("reason");
        assert_eq!(reason.chars().count(), Decision::MAX_REASON_CHARS + 1);
        assert!(reason.ends_with('…'));
    }

    #[test]
    fn an_unreadable_decision_is_dropped_not_fatal() {
        let good: serde_json::Value = serde_json::from_str(&sample().to_json()).expect("ok");
        for junk in [
            serde_json::json!("raised"),
            serde_json::json!({"action": 3}),
            serde_json::json!({"at_unix_ms": -1, "action": "raised"}),
            serde_json::json!(null),
        ] {
            let mut v = good.clone();
            v["decision"] = junk.clone();
            assert_eq!(
                Record::parse(&v.to_string()).expect("ok"),
                sample(),
                "{junk}"
            );
        }
        let mut v = good;
        v["decision"] = serde_json::json!({"at_unix_ms": 5, "action": "resized", "zone": "b"});
        let d = Record::parse(&v.to_string())
            .expect("ok")
            .decision
            .expect("kept");
        assert_eq!((d.at_unix_ms, d.action.as_str()), (5, "resized"));
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
        for key in ["lease_ms", "renew_deadline_ms", "follower_poll_ms"] {
            for bad in [
                serde_json::json!(0),
                serde_json::json!(-1),
                serde_json::json!(1.5),
            ] {
                let mut v = good.clone();
                v[key] = bad.clone();
                assert!(Record::parse(&v.to_string()).is_err(), "{key}={bad}");
            }
        }
    }

    #[test]
    fn an_advertised_lease_is_capped_and_the_record_kept() {
        let cap = crate::config::MAX_ELECTION_TIMING_MS;
        for (lease_ms, waited_ms) in [
            (1, 1),
            (20_000, 20_000),
            (cap, cap),
            (cap + 1, cap),
            (24 * 3600 * 1000, cap),
            (u64::MAX, cap),
        ] {
            let r = Record {
                lease_ms,
                released: true,
                follower_poll_ms: u64::MAX,
                renew_deadline_ms: u64::MAX,
                ..sample()
            };
            let back = Record::parse(&r.to_json()).expect("kept");
            assert_eq!(back, r, "the raw value is what was written");
            assert_eq!(back.lease(), Duration::from_millis(waited_ms));
            assert_eq!(back.lease_over_cap(), lease_ms > cap);
            assert_eq!(back.follower_poll(), MAX_FOLLOWER_POLL);
            assert!(back.released);
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
                assert!(r.lease() <= MAX_ELECTION_TIMING);
                assert!(r.follower_poll() <= MAX_FOLLOWER_POLL);
            }
        }
        assert!(accepted < inputs.len() / 2);
    }
}
