//! SSM Parameter Store: the runtime config and the registration token.

use super::{classify, describe, Retry};
use std::future::Future;

/// A parameter's value and whether it was stored encrypted.
#[derive(Clone, PartialEq, Eq)]
pub struct Parameter {
    pub value: String,
    pub secure: bool,
}

impl std::fmt::Debug for Parameter {
    // Never print the value: it may be the registration token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parameter")
            .field("value", &"<redacted>")
            .field("secure", &self.secure)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SsmError {
    #[error("SSM parameter {name} does not exist")]
    NotFound { name: String },
    #[error("GetParameter {name}: {detail}")]
    GetParameter {
        name: String,
        retry: Retry,
        detail: String,
    },
    #[error("PutParameter {name}: {detail}")]
    PutParameter {
        name: String,
        retry: Retry,
        detail: String,
    },
}

impl SsmError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::GetParameter {
                retry: Retry::Transient,
                ..
            }
        )
    }
}

pub trait ParameterStore: Send + Sync {
    /// Reads a parameter, decrypting SecureStrings.
    fn get(&self, name: &str) -> impl Future<Output = Result<Parameter, SsmError>> + Send;
}

/// Writing a plain String parameter (the leader's host keys, [`crate::known_hosts`]).
pub trait ParameterWriter: Send + Sync {
    /// Overwrites `name` with `value` (type String, Standard tier).
    fn put_string(
        &self,
        name: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), SsmError>> + Send;
}

#[derive(Clone)]
pub struct SdkParameterStore {
    client: aws_sdk_ssm::Client,
}

impl SdkParameterStore {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            client: aws_sdk_ssm::Client::new(config),
        }
    }
}

impl ParameterStore for SdkParameterStore {
    async fn get(&self, name: &str) -> Result<Parameter, SsmError> {
        let out = self
            .client
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await;
        match out {
            Ok(out) => {
                let p = out.parameter();
                Ok(Parameter {
                    value: p.and_then(|p| p.value()).unwrap_or_default().to_string(),
                    secure: p.and_then(|p| p.r#type())
                        == Some(&aws_sdk_ssm::types::ParameterType::SecureString),
                })
            }
            Err(e) if super::code(&e) == Some("ParameterNotFound") => Err(SsmError::NotFound {
                name: name.to_string(),
            }),
            Err(e) => Err(SsmError::GetParameter {
                name: name.to_string(),
                retry: classify(&e),
                detail: describe(&e),
            }),
        }
    }
}

impl ParameterWriter for SdkParameterStore {
    async fn put_string(&self, name: &str, value: &str) -> Result<(), SsmError> {
        self.client
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| SsmError::PutParameter {
                name: name.to_string(),
                retry: classify(&e),
                detail: describe(&e),
            })
    }
}
