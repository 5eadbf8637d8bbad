//! The Semaphore self-hosted agent API on the wire, as
//! `shared/reference/semaphore-agent.md` describes it: the bodies of `/register`,
//! `/sync`, `/jobs/{id}` and `/refresh`, the job payload and its logger, base64 and the
//! agent name rule. The fake hub ([`crate::hub`], which re-exports all of it) serves
//! these and the fake agent (`src/bin/agent/`) sends them; neither depends on the other.

use serde::{Deserialize, Serialize};

/// Base path of the agent API.
pub const API_BASE: &str = "/api/v1/self_hosted_agents";

/// Path of a job's log (the job payload's `logger.url`), as on the real server.
pub const LOGS_BASE: &str = "/api/v1/logs";

/// `POST /register` body (all fields optional on the wire).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RegisterRequest {
    pub name: String,
    pub version: String,
    pub pid: i64,
    pub os: String,
    pub arch: String,
    pub hostname: String,
    pub single_job: bool,
    /// Seconds (a Go `int` on the wire: the hub takes any integer, negative = 0).
    pub idle_timeout: i64,
    /// Seconds (a Go `int`: the real agent sends a negative value as configured; the
    /// hub takes any integer, negative = 0).
    pub interruption_grace_period: i64,
    pub job_id: String,
}

/// `POST /refresh` answer: a new token for the current job's log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefreshTokenResponse {
    pub token: String,
}

/// `POST /register` 201 answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub name: String,
    pub token: String,
}

/// `POST /sync` body. `interrupted_at` is unix seconds, 0 = not interrupted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncRequest {
    pub state: String,
    pub job_id: String,
    pub job_result: String,
    pub interrupted_at: i64,
}

/// `POST /sync` answer. `action` is one of `continue`, `run-job`, `stop-job`,
/// `wait-for-jobs`, `shutdown`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncResponse {
    pub action: String,
    pub job_id: String,
    pub shutdown_reason: String,
    pub next_sync_after: u64,
}

/// One command of a job payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub directive: String,
}

/// One env var of a job payload; `value` is base64 (standard alphabet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// `GET /jobs/{id}` answer, a subset of the real agent's `JobRequest`:
///
/// ```json
/// {"id":"<uuid>","job_id":"<uuid>","executor":"shell",
///  "commands":[{"directive":"echo hi"}],
///  "epilogue_always_commands":[],"epilogue_on_pass_commands":[],"epilogue_on_fail_commands":[],
///  "env_vars":[{"name":"SEMAPHORE_JOB_ID","value":"<base64>"},{"name":"K","value":"<base64 of V>"}],
///  "files":[]}
/// ```
///
/// `SEMAPHORE_JOB_ID` is always the first env var, followed by the spec's env.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobPayload {
    pub id: String,
    pub job_id: String,
    pub executor: String,
    pub commands: Vec<Command>,
    pub epilogue_always_commands: Vec<Command>,
    pub epilogue_on_pass_commands: Vec<Command>,
    pub epilogue_on_fail_commands: Vec<Command>,
    pub env_vars: Vec<EnvVar>,
    pub files: Vec<serde_json::Value>,
    /// Where the job's output goes (see "Job logs" in [`crate::hub`]).
    pub logger: Option<JobLogger>,
}

/// The `logger` of a job payload: push the job's output to `url` with
/// `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobLogger {
    pub method: String,
    pub url: String,
    pub token: String,
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, whitespace ignored).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for c in text.bytes() {
        if c == b'=' {
            break;
        }
        if c.is_ascii_whitespace() {
            continue;
        }
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

/// Agent name rule: 8–80 chars of `[a-zA-Z0-9-_/+]`, or an http(s) URL.
pub fn valid_agent_name(name: &str) -> bool {
    if name.starts_with("https://") || name.starts_with("http://") {
        return name.len() > "https://".len();
    }
    (8..=80).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "abcd", "hello=world", "ü€"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&e).as_deref(), Some(s.as_bytes()), "{s}");
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_decode("!!"), None);
    }

    #[test]
    fn agent_names() {
        assert!(valid_agent_name("agent-01"));
        assert!(valid_agent_name("a/b+c_d-e"));
        assert!(!valid_agent_name("short"));
        assert!(!valid_agent_name("has space in it"));
        assert!(!valid_agent_name(&"x".repeat(81)));
        assert!(valid_agent_name(
            "https://sts.amazonaws.com/?Action=GetCallerIdentity"
        ));
    }
}
