//! [`LeaseStore`] on SSM Parameter Store: Standard-tier String parameters.
//!
//! IAM: `ssm:PutParameter`, `ssm:GetParameter`, `ssm:DeleteParameter` on
//! `<prefix>/*` and `ssm:GetParametersByPath` on `<prefix>`.

use super::store::{term_of, Created, LeaseStore, StoreError, MAX_LIST_PAGES};
use crate::aws::{classify, code, describe};
use aws_sdk_ssm::types::{ParameterTier, ParameterType};

#[derive(Clone)]
pub struct SsmLeaseStore {
    client: aws_sdk_ssm::Client,
}

impl SsmLeaseStore {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self::from_client(aws_sdk_ssm::Client::new(config))
    }

    pub fn from_client(client: aws_sdk_ssm::Client) -> Self {
        Self { client }
    }

    async fn put(&self, name: &str, value: &str, overwrite: bool) -> Result<u64, PutFailure> {
        let out = self
            .client
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(ParameterType::String)
            .tier(ParameterTier::Standard)
            .overwrite(overwrite)
            .send()
            .await;
        match out {
            Ok(out) => Ok(version(out.version())),
            Err(e) if !overwrite && code(&e) == Some("ParameterAlreadyExists") => {
                Err(PutFailure::AlreadyExists)
            }
            Err(e) => Err(PutFailure::Other(StoreError::Put {
                name: name.to_string(),
                retry: classify(&e),
                detail: describe(&e),
            })),
        }
    }
}

enum PutFailure {
    AlreadyExists,
    Other(StoreError),
}

/// SSM versions are positive `i64`s.
fn version(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl LeaseStore for SsmLeaseStore {
    async fn create(&self, name: &str, value: &str) -> Result<Created, StoreError> {
        match self.put(name, value, false).await {
            Ok(version) => Ok(Created::Won { version }),
            Err(PutFailure::AlreadyExists) => Ok(Created::AlreadyExists),
            Err(PutFailure::Other(e)) => Err(e),
        }
    }

    async fn overwrite(&self, name: &str, value: &str) -> Result<u64, StoreError> {
        match self.put(name, value, true).await {
            Ok(version) => Ok(version),
            Err(PutFailure::Other(e)) => Err(e),
            // Not asked for with Overwrite=true; report it rather than guess.
            Err(PutFailure::AlreadyExists) => Err(StoreError::Put {
                name: name.to_string(),
                retry: crate::aws::Retry::Transient,
                detail: "ParameterAlreadyExists despite Overwrite=true".into(),
            }),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<(String, u64)>, StoreError> {
        match self.client.get_parameter().name(name).send().await {
            Ok(out) => Ok(out.parameter().map(|p| {
                (
                    p.value().unwrap_or_default().to_string(),
                    version(p.version()),
                )
            })),
            Err(e) if code(&e) == Some("ParameterNotFound") => Ok(None),
            Err(e) => Err(StoreError::Get {
                name: name.to_string(),
                retry: classify(&e),
                detail: describe(&e),
            }),
        }
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        match self.client.delete_parameter().name(name).send().await {
            Ok(_) => Ok(()),
            Err(e) if code(&e) == Some("ParameterNotFound") => Ok(()),
            Err(e) => Err(StoreError::Delete {
                name: name.to_string(),
                retry: classify(&e),
                detail: describe(&e),
            }),
        }
    }

    async fn latest_term(&self, prefix: &str) -> Result<Option<u64>, StoreError> {
        let mut latest = None;
        let mut next: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let out = self
                .client
                .get_parameters_by_path()
                .path(prefix)
                .recursive(false)
                .max_results(10)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| StoreError::List {
                    path: prefix.to_string(),
                    retry: classify(&e),
                    detail: describe(&e),
                })?;
            let terms = out
                .parameters()
                .iter()
                .filter_map(|p| p.name().and_then(|n| term_of(prefix, n)));
            latest = latest.max(terms.max());
            match out.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => return Ok(latest),
            }
        }
        Err(StoreError::ListTooLong {
            path: prefix.to_string(),
        })
    }
}
