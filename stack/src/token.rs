//! `token set`: the registration token goes from stdin to a SecureString, never through
//! argv, the environment or a file.

use crate::describe;
use anyhow::bail;
use std::io::{BufRead, IsTerminal, Write};

/// The token read from `input`: the first line, trimmed. Refuses an empty token and one
/// with inner whitespace (a paste of two things).
pub fn read_token(input: &mut impl BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    input.read_line(&mut line)?;
    let token = line.trim();
    if token.is_empty() {
        bail!("no token on stdin: pipe it in (e.g. `agent-fleet token set < token.txt`) or paste it at the prompt");
    }
    if token.chars().any(char::is_whitespace) {
        bail!("the token read from stdin contains whitespace; a registration token is one word — check what was pasted");
    }
    Ok(token.to_string())
}

/// Reads the token from the terminal without echo, or from piped stdin.
pub fn read_token_from_stdin() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return read_token(&mut stdin.lock());
    }
    eprint!("registration token (input hidden, Enter to finish): ");
    let _ = std::io::stderr().flush();
    let fd = std::io::stdin();
    let saved = nix::sys::termios::tcgetattr(&fd).ok();
    if let Some(saved) = &saved {
        let mut quiet = saved.clone();
        quiet
            .local_flags
            .remove(nix::sys::termios::LocalFlags::ECHO);
        let _ = nix::sys::termios::tcsetattr(&fd, nix::sys::termios::SetArg::TCSANOW, &quiet);
    }
    let token = read_token(&mut stdin.lock());
    if let Some(saved) = &saved {
        let _ = nix::sys::termios::tcsetattr(&fd, nix::sys::termios::SetArg::TCSANOW, saved);
    }
    eprintln!();
    token
}

/// Stores (or rotates) the token; returns the parameter's new version.
pub async fn store(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    kms_key: &str,
    token: &str,
) -> anyhow::Result<i64> {
    let out = ssm
        .put_parameter()
        .name(name)
        .value(token)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .key_id(kms_key)
        .overwrite(true)
        .description("Semaphore agent type registration token (agent-fleet)")
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot store the token in {name} (KMS key {kms_key}): {}",
                describe(&e)
            )
        })?;
    Ok(out.version())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_first_line_trimmed() {
        let mut input = std::io::Cursor::new("  abc123\nignored\n");
        assert_eq!(read_token(&mut input).ok().as_deref(), Some("abc123"));
    }

    #[test]
    fn refuses_empty_and_two_words() {
        for bad in ["", "\n", "   \n", "abc def\n"] {
            let mut input = std::io::Cursor::new(bad);
            assert!(read_token(&mut input).is_err(), "{bad:?} was accepted");
        }
    }
}
