//! S3: only the preflight check that the cache bucket is reachable.

use super::describe;

pub async fn head_bucket(config: &aws_config::SdkConfig, bucket: &str) -> Result<(), String> {
    aws_sdk_s3::Client::new(config)
        .head_bucket()
        .bucket(bucket)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| describe(&e))
}
