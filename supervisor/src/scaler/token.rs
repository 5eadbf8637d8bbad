//! Where the scaler gets the registration token, and gets it again after a 401
//! (token rotation: `agent-fleet token set` writes a new value to SSM).

use super::semaphore::Token;
use crate::aws::ssm::ParameterStore;
use crate::config::Settings;
use std::future::Future;
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the registration token from SSM parameter {parameter}: {detail}")]
    Read { parameter: String, detail: String },
    #[error("SSM parameter {parameter} (the registration token) is empty; fix: store the agent type's token with `agent-fleet token set`")]
    Empty { parameter: String },
}

/// Reads the registration token, fresh, on each call.
pub trait TokenSource: Send + Sync {
    fn fetch(&self) -> impl Future<Output = Result<Token, TokenError>> + Send;
}

/// The token parameter in SSM; its name follows the live settings, so a redeploy that
/// renames it applies without a restart.
pub struct SsmTokenSource<P> {
    ssm: P,
    settings: watch::Receiver<Settings>,
}

impl<P: ParameterStore> SsmTokenSource<P> {
    pub fn new(ssm: P, settings: watch::Receiver<Settings>) -> Self {
        Self { ssm, settings }
    }
}

impl<P: ParameterStore> TokenSource for SsmTokenSource<P> {
    async fn fetch(&self) -> Result<Token, TokenError> {
        let parameter = self.settings.borrow().token_parameter.clone();
        let p = self
            .ssm
            .get(&parameter)
            .await
            .map_err(|e| TokenError::Read {
                parameter: parameter.clone(),
                detail: e.to_string(),
            })?;
        let value = p.value.trim();
        if value.is_empty() {
            return Err(TokenError::Empty { parameter });
        }
        Ok(Token::new(value))
    }
}
