//! GitHub's SSH host keys, so that a job's `git clone git@github.com:…` and Semaphore's
//! `checkout` do not stop at host-key verification.
//!
//! - **Where they are kept**: the runtime config's `known_hosts_parameter`, an SSM String
//!   parameter the template creates with [`PLACEHOLDER`] ("no keys yet"). Its value is a
//!   known_hosts file: a [`STAMP`] comment line with the time GitHub last confirmed the set
//!   and where from, then one `github.com <algorithm> <key>` line per key.
//! - **Who refreshes them**: the leader ([`crate::scaler::host_keys`]), from GitHub's meta
//!   API (`github_meta_url`, its `ssh_keys`), once a day.
//! - **Who uses them**: every agent instance, before its agent starts ([`install`]): the
//!   parameter's keys, or, while it holds none or cannot be read, the file the AMI was
//!   baked with ([`DEFAULT_FALLBACK`], written from `/meta` at build time). They are added
//!   to the agent user's `~/.ssh/known_hosts` (`--known-hosts-file`): lines already there
//!   are kept, none is written twice; `.ssh` is created 0700, the file is 0644, both owned
//!   by the agent user.
//!
//! Why the fetch time lives in the value rather than in the parameter's `LastModifiedDate`:
//! it says when GitHub last confirmed the keys, which is what the refresh policy needs, and
//! the one `GetParameter` both roles already make reads it (no `DescribeParameters`, which
//! IAM cannot scope to one parameter). ssh ignores `#` lines, so the value is a valid
//! known_hosts file as it is.
//!
//! A key is taken only when its algorithm is one ssh knows for host keys ([`ALGORITHMS`])
//! and its body is base64 of an SSH public-key blob naming that same algorithm; an answer
//! is taken only when every key in it is, there are 1 to [`MAX_KEYS`], and the value fits a
//! Standard parameter ([`MAX_VALUE_BYTES`]).

use crate::aws::ssm::ParameterStore;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The host the keys are for.
pub const HOST: &str = "github.com";
/// The template's initial value of the parameter: no keys yet.
pub const PLACEHOLDER: &str = "none";
/// The comment line that opens the parameter's value: `<STAMP><RFC 3339 time> from <url>`.
pub const STAMP: &str = "# agent-fleet: github.com host keys fetched ";
/// The file the AMI carries from build time (bootstrap/provision.sh writes it).
pub const DEFAULT_FALLBACK: &str = "/usr/local/share/agent-fleet/github_known_hosts";
/// Host-key algorithms ssh knows (GitHub publishes the first, second and fifth).
pub const ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];
/// Most keys taken from one answer (GitHub publishes three).
pub const MAX_KEYS: usize = 10;
/// Longest key body, in base64 characters (an 8192-bit RSA key is about 1 400).
pub const MAX_KEY_CHARS: usize = 2048;
/// A Standard-tier SSM parameter holds at most 4 KB.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Longest the boot waits for the parameter before using the AMI's file.
pub const READ_BOUND: Duration = Duration::from_secs(3);

/// One host key: `<algorithm> <base64 body>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    pub algorithm: String,
    pub body: String,
}

impl HostKey {
    /// `<algorithm> <body>` (a trailing comment is dropped), checked as the module says.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut words = s.split_whitespace();
        let (Some(algorithm), Some(body)) = (words.next(), words.next()) else {
            return Err("is not `<algorithm> <base64 key>`".into());
        };
        if !ALGORITHMS.contains(&algorithm) {
            return Err(format!(
                "has algorithm {algorithm:?}, not a known host-key algorithm"
            ));
        }
        if body.len() > MAX_KEY_CHARS {
            return Err(format!(
                "has a key of {} characters (at most {MAX_KEY_CHARS})",
                body.len()
            ));
        }
        let base64 = body.len() % 4 == 0
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
        let blob = base64
            .then(|| aws_smithy_types::base64::decode(body).ok())
            .flatten()
            .ok_or("has a key that is not base64")?;
        // An SSH public-key blob starts with its algorithm's name (uint32 length, bytes).
        let named = blob
            .get(..4)
            .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
            .and_then(|n| blob.get(4..4 + n));
        if named != Some(algorithm.as_bytes()) {
            return Err(format!("has a key that is not an {algorithm} public key"));
        }
        Ok(Self {
            algorithm: algorithm.to_string(),
            body: body.to_string(),
        })
    }

    /// Its known_hosts line.
    pub fn line(&self) -> String {
        format!("{HOST} {} {}", self.algorithm, self.body)
    }
}

/// Why an answer of the meta API was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("not the meta API's JSON: {0}")]
    Json(String),
    #[error("no ssh_keys array of strings")]
    NoKeys,
    #[error("{0} ssh_keys (at most {MAX_KEYS})")]
    TooMany(usize),
    #[error("ssh_keys[{index}] {problem}")]
    Key { index: usize, problem: String },
    #[error("the keys take about {0} bytes, more than a Standard SSM parameter holds ({MAX_VALUE_BYTES})")]
    TooLarge(usize),
}

/// The keys of a meta API answer (`{"ssh_keys": ["ssh-ed25519 AAAA…", …], …}`): all of
/// them valid, or an error.
pub fn parse_meta(body: &[u8]) -> Result<Vec<HostKey>, MetaError> {
    #[derive(serde::Deserialize)]
    struct Meta {
        ssh_keys: Option<Vec<String>>,
    }
    let meta: Meta = serde_json::from_slice(body).map_err(|e| {
        MetaError::Json(
            e.to_string()
                .split(" at line ")
                .next()
                .unwrap_or("")
                .to_string(),
        )
    })?;
    let keys = meta
        .ssh_keys
        .filter(|k| !k.is_empty())
        .ok_or(MetaError::NoKeys)?;
    if keys.len() > MAX_KEYS {
        return Err(MetaError::TooMany(keys.len()));
    }
    let keys = keys
        .iter()
        .enumerate()
        .map(|(index, k)| HostKey::parse(k).map_err(|problem| MetaError::Key { index, problem }))
        .collect::<Result<Vec<_>, _>>()?;
    // 256: room for the stamp line's URL.
    let size = render(&keys, SystemTime::now(), "").len() + 256;
    if size > MAX_VALUE_BYTES {
        return Err(MetaError::TooLarge(size));
    }
    Ok(keys)
}

/// The parameter's value for `keys` fetched at `at` from `source`.
pub fn render(keys: &[HostKey], at: SystemTime, source: &str) -> String {
    let at = aws_smithy_types::DateTime::from(at)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default();
    let mut v = format!("{STAMP}{at} from {source}\n");
    for k in keys {
        v.push_str(&k.line());
        v.push('\n');
    }
    v
}

/// What a parameter value (or the AMI's file) holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    /// When GitHub last confirmed the keys (the [`STAMP`] line), if said.
    pub fetched_at: Option<SystemTime>,
    pub keys: Vec<HostKey>,
}

/// Reads a known_hosts text: the [`STAMP`] line and the valid `github.com` key lines;
/// anything else (the [`PLACEHOLDER`], other hosts, broken lines) is skipped.
pub fn parse_stored(value: &str) -> Stored {
    let mut s = Stored::default();
    for line in value.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix(STAMP) {
            let at = rest.split_whitespace().next().unwrap_or_default();
            s.fetched_at = aws_smithy_types::DateTime::from_str(
                at,
                aws_smithy_types::date_time::Format::DateTime,
            )
            .ok()
            .and_then(|t| SystemTime::try_from(t).ok());
        } else if let Some(key) = line.strip_prefix(HOST).and_then(|r| {
            r.starts_with(char::is_whitespace)
                .then(|| HostKey::parse(r).ok())
                .flatten()
        }) {
            if !s.keys.contains(&key) {
                s.keys.push(key);
            }
        }
    }
    s
}

/// `existing` with the lines of `keys` it lacks appended; `None` when it has them all.
/// Lines are compared by their words, so spacing differences do not duplicate a key.
pub fn merge(existing: &str, keys: &[HostKey]) -> Option<String> {
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let have: Vec<Vec<String>> = existing.lines().map(words).collect();
    let missing: Vec<String> = keys
        .iter()
        .map(HostKey::line)
        .filter(|l| !have.contains(&words(l)))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut out = existing.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for l in missing {
        out.push_str(&l);
        out.push('\n');
    }
    Some(out)
}

/// Where the keys an instance wrote came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Parameter(String),
    AmiFile(PathBuf),
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub source: Source,
    pub keys: usize,
    /// Whether the file changed (false: it had every key already).
    pub written: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no GitHub host keys: {0}")]
    NoKeys(String),
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
}

/// The agent user's known_hosts, its owner, and where the keys come from.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
}

impl Target {
    /// `~<user>/.ssh/known_hosts` (getpwnam), or `path` when given; owned by `user`.
    pub fn for_user(user: &str, path: Option<&Path>) -> Result<Self, String> {
        let u = nix::unistd::User::from_name(user)
            .map_err(|e| format!("looking up the agent user {user}: {e}"))?
            .ok_or_else(|| format!("the agent user {user} does not exist"))?;
        Ok(Self {
            path: path
                .map(Path::to_path_buf)
                .unwrap_or_else(|| u.dir.join(".ssh").join("known_hosts")),
            uid: u.uid,
            gid: u.gid,
        })
    }
}

/// Reads the keys (the parameter within [`READ_BOUND`], else the AMI's file at `fallback`)
/// and adds them to `target`. Never fails the boot: the caller logs the error as a warning.
pub async fn install<S: ParameterStore>(
    ssm: &S,
    parameter: Option<&str>,
    fallback: &Path,
    target: &Target,
) -> Result<Installed, InstallError> {
    let mut why_not = String::new();
    let mut found = None;
    if let Some(name) = parameter {
        match tokio::time::timeout(READ_BOUND, ssm.get(name)).await {
            Ok(Ok(p)) => {
                let stored = parse_stored(&p.value);
                if stored.keys.is_empty() {
                    why_not = format!("parameter {name} holds none yet");
                } else {
                    found = Some((Source::Parameter(name.to_string()), stored.keys));
                }
            }
            Ok(Err(e)) => why_not = e.to_string(),
            Err(_) => why_not = format!("parameter {name} not read within {READ_BOUND:?}"),
        }
    } else {
        why_not = "the runtime config names no known_hosts_parameter".into();
    }
    let (source, keys) = match found {
        Some(f) => f,
        None => {
            let file = std::fs::read_to_string(fallback).unwrap_or_default();
            let keys = parse_stored(&file).keys;
            if keys.is_empty() {
                return Err(InstallError::NoKeys(format!(
                    "{why_not}, and the AMI's {} has none",
                    fallback.display()
                )));
            }
            tracing::info!(reason = %why_not, "GitHub host keys from the AMI's file");
            (Source::AmiFile(fallback.to_path_buf()), keys)
        }
    };
    let written = write(target, &keys)?;
    Ok(Installed {
        source,
        keys: keys.len(),
        written,
    })
}

/// The boot's step: [`install`] for the agent user, said in one line. A failure is a
/// warning, never a reason to keep the agent from starting: a fleet whose jobs clone over
/// HTTPS does not need the keys, and the ones that do fail visibly at host-key verification.
pub async fn for_agent<S: ParameterStore>(
    ssm: S,
    parameter: Option<String>,
    fallback: PathBuf,
    user: String,
    path: Option<PathBuf>,
) {
    let target = match Target::for_user(&user, path.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "GitHub host keys not written: {e}; the agent starts anyway");
            return;
        }
    };
    match install(&ssm, parameter.as_deref(), &fallback, &target).await {
        Ok(done) => tracing::info!(
            path = %target.path.display(),
            keys = done.keys,
            source = %match &done.source {
                Source::Parameter(p) => format!("parameter {p}"),
                Source::AmiFile(f) => format!("the AMI's {}", f.display()),
            },
            written = done.written,
            "GitHub host keys in the agent user's known_hosts"
        ),
        Err(e) => tracing::warn!(
            path = %target.path.display(),
            error = %e,
            "GitHub host keys not written: {e}; the agent starts anyway (SSH clones from github.com will stop at host-key verification)"
        ),
    }
}

/// Adds `keys` to the target file (see [`merge`]). The directory is created 0700 when it is
/// missing; neither it nor the file may be a symlink (root would otherwise write, or copy
/// what it reads, wherever the link points). Written to a temporary file and renamed.
pub fn write(target: &Target, keys: &[HostKey]) -> Result<bool, InstallError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = &target.path;
    let fail = |problem: String| InstallError::File {
        path: path.clone(),
        problem,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| fail("has no directory".into()))?;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(fail(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
            std::os::unix::fs::chown(dir, Some(target.uid.as_raw()), Some(target.gid.as_raw()))
                .map_err(|e| fail(format!("chown {}: {e}", dir.display())))?;
        }
        Err(e) => return Err(fail(e.to_string())),
    }
    let existing = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?,
        Ok(_) => return Err(fail("is not a regular file; left alone".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(fail(e.to_string())),
    };
    let Some(text) = merge(&existing, keys) else {
        return Ok(false);
    };
    let tmp = dir.join(".known_hosts.agent-fleet");
    let _ = std::fs::remove_file(&tmp);
    std::fs::write(&tmp, text).map_err(|e| fail(format!("writing {}: {e}", tmp.display())))?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .and_then(|()| {
            std::os::unix::fs::chown(&tmp, Some(target.uid.as_raw()), Some(target.gid.as_raw()))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e.to_string()));
    }
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::aws::ssm::{Parameter, SsmError};

    /// An SSH blob for `alg` with `extra` bytes after the name, as base64.
    pub fn key(alg: &str, extra: usize) -> String {
        let mut blob = (alg.len() as u32).to_be_bytes().to_vec();
        blob.extend_from_slice(alg.as_bytes());
        blob.extend(std::iter::repeat_n(7u8, extra));
        format!("{alg} {}", aws_smithy_types::base64::encode(blob))
    }

    pub fn github() -> Vec<String> {
        vec![
            key("ssh-ed25519", 36),
            key("ecdsa-sha2-nistp256", 90),
            key("ssh-rsa", 400),
        ]
    }

    pub fn meta(keys: &[String]) -> Vec<u8> {
        serde_json::json!({"verifiable_password_authentication": false, "ssh_keys": keys, "web": ["192.30.252.0/22"]})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn githubs_three_keys_are_taken_and_rendered_as_github_com_lines_with_the_fetch_time() {
        let keys = parse_meta(&meta(&github())).expect("valid");
        assert_eq!(
            keys.iter()
                .map(|k| k.algorithm.as_str())
                .collect::<Vec<_>>(),
            ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"]
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let value = render(&keys, at, "https://api.github.com/meta");
        assert!(
            value.starts_with(
                "# agent-fleet: github.com host keys fetched 2027-01-15T08:00:00Z from https://api.github.com/meta\n"
            ),
            "{value}"
        );
        assert_eq!(
            value
                .lines()
                .filter(|l| l.starts_with("github.com ssh-"))
                .count(),
            2
        );
        let back = parse_stored(&value);
        assert_eq!(back.fetched_at, Some(at));
        assert_eq!(back.keys, keys);
    }

    #[test]
    fn an_answer_with_any_bad_key_is_refused_whole() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "JSON"),
            (b"<html>rate limited</html>".to_vec(), "JSON"),
            (br#"{"ssh_keys": []}"#.to_vec(), "no ssh_keys"),
            (br#"{"web": []}"#.to_vec(), "no ssh_keys"),
            (br#"{"ssh_keys": "ssh-ed25519 AAAA"}"#.to_vec(), "JSON"),
            (
                meta(&[key("ssh-dss", 40)]),
                "not a known host-key algorithm",
            ),
            (
                meta(&[github()[0].clone(), "ssh-ed25519 not*base64".into()]),
                "not base64",
            ),
            (
                meta(&["ssh-ed25519".into()]),
                "is not `<algorithm> <base64 key>`",
            ),
            // A valid blob of another algorithm under this name.
            (
                meta(&[key("ssh-rsa", 40).replace("ssh-rsa", "ssh-ed25519")]),
                "not an ssh-ed25519 public key",
            ),
            (meta(&[key("ssh-rsa", 3000)]), "characters"),
            (meta(&vec![github()[0].clone(); 11]), "at most 10"),
            (
                meta(&vec![key("ssh-rsa", 1000); 5]),
                "Standard SSM parameter",
            ),
        ];
        for (body, why) in cases {
            let e = parse_meta(&body).expect_err(why).to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn the_placeholder_and_foreign_lines_hold_no_keys() {
        assert_eq!(parse_stored(PLACEHOLDER), Stored::default());
        let text = format!(
            "gitlab.com {}\ngithub.com ssh-ed25519 broken\n# a comment\n{HOST} {}\n",
            github()[0],
            github()[1]
        );
        let s = parse_stored(&text);
        assert_eq!(s.fetched_at, None);
        assert_eq!(s.keys.len(), 1);
        assert_eq!(s.keys[0].algorithm, "ecdsa-sha2-nistp256");
    }

    #[test]
    fn merging_keeps_existing_lines_and_never_duplicates() {
        let keys: Vec<HostKey> = github()
            .iter()
            .map(|k| HostKey::parse(k).expect("k"))
            .collect();
        let mine = format!(
            "gitlab.example ssh-ed25519 AAAA\ngithub.com   {}",
            github()[0]
        );
        let merged = merge(&mine, &keys).expect("two missing");
        assert!(
            merged.starts_with("gitlab.example ssh-ed25519 AAAA\n"),
            "{merged}"
        );
        assert_eq!(merged.lines().count(), 4, "{merged}");
        assert_eq!(merge(&merged, &keys), None, "nothing left to add");
        assert_eq!(merge("", &keys).expect("all").lines().count(), 3);
    }

    struct OneParameter(Result<String, ()>);
    impl ParameterStore for OneParameter {
        async fn get(&self, name: &str) -> Result<Parameter, SsmError> {
            match &self.0 {
                Ok(v) => Ok(Parameter {
                    value: v.clone(),
                    secure: false,
                }),
                Err(()) => Err(SsmError::NotFound { name: name.into() }),
            }
        }
    }

    fn own_target(dir: &Path) -> Target {
        Target {
            path: dir.join(".ssh").join("known_hosts"),
            uid: nix::unistd::geteuid(),
            gid: nix::unistd::getegid(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch");
        d
    }

    #[tokio::test]
    async fn an_instance_writes_the_parameters_keys_into_a_fresh_ssh_dir_0700_file_0644() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("fresh");
        let value = render(
            &github()
                .iter()
                .map(|k| HostKey::parse(k).expect("k"))
                .collect::<Vec<_>>(),
            SystemTime::now(),
            "u",
        );
        let t = own_target(&dir);
        let done = install(&OneParameter(Ok(value)), Some("/p"), &dir.join("none"), &t)
            .await
            .expect("installed");
        assert_eq!(
            done,
            Installed {
                source: Source::Parameter("/p".into()),
                keys: 3,
                written: true
            }
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(".ssh")), 0o700);
        assert_eq!(mode(&t.path), 0o644);
        let text = std::fs::read_to_string(&t.path).expect("read");
        assert!(text.lines().all(|l| l.starts_with("github.com ")), "{text}");
        assert!(
            !text.contains('#'),
            "the stamp stays in the parameter: {text}"
        );
        let again = install(
            &OneParameter(Ok(text.clone())),
            Some("/p"),
            &dir.join("none"),
            &t,
        )
        .await
        .expect("installed");
        assert!(!again.written);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_placeholder_or_an_unreadable_parameter_falls_back_to_the_amis_file() {
        let dir = scratch("fallback");
        let ami = dir.join("github_known_hosts");
        std::fs::write(&ami, format!("{HOST} {}\n", github()[0])).expect("ami file");
        let t = own_target(&dir);
        for ssm in [OneParameter(Ok(PLACEHOLDER.into())), OneParameter(Err(()))] {
            let done = install(&ssm, Some("/p"), &ami, &t)
                .await
                .expect("installed");
            assert_eq!((done.source, done.keys), (Source::AmiFile(ami.clone()), 1));
        }
        let none = install(
            &OneParameter(Ok(PLACEHOLDER.into())),
            Some("/p"),
            &dir.join("x"),
            &t,
        )
        .await
        .expect_err("no keys anywhere")
        .to_string();
        assert!(
            none.contains("holds none yet") && none.contains("has none"),
            "{none}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_symlinked_known_hosts_is_left_alone() {
        let dir = scratch("symlink");
        std::fs::create_dir_all(dir.join(".ssh")).expect("dir");
        std::fs::write(dir.join("secret"), "root only").expect("secret");
        std::os::unix::fs::symlink(dir.join("secret"), dir.join(".ssh/known_hosts")).expect("ln");
        let keys = vec![HostKey::parse(&github()[0]).expect("k")];
        let e = write(&own_target(&dir), &keys)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.join("secret")).expect("r"),
            "root only"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
