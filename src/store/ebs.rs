//! `ebs://` store: [`EbsStore`], a [`BlockStore`] over the EBS direct APIs
//! (`aws-sdk-ebs`), reading one EBS snapshot.
//!
//! In: block indexes as keys (`"17"`). Out: the block's bytes followed by the
//! SHA-256 the answer carried in `x-amz-Checksum` (base64, decoded here), a
//! [`HashIn::Trailer`](crate::verify::HashIn::Trailer) object that the verify
//! stage checks like any other: this store never decides whether bytes are
//! good, it only brings the checksum along.
//!
//! `ListSnapshotBlocks` ([`EbsStore::list`]) gives the snapshot's layout
//! (`BlockSize`, `VolumeSize` in GiB), its stored blocks and a token per
//! block; `GetSnapshotBlock` needs the index and that token. Tokens expire
//! (`ExpiryTime`, seven days on AWS): a block whose token is about to expire,
//! or whose token the service refuses (`ValidationException`,
//! `INVALID_BLOCK_TOKEN`), is listed again from its index on (one page, one
//! relist at a time: a burst of refusals relists once), then fetched with
//! the fresh token. A restore that outlives its tokens goes on.
//!
//! Everything else is the S3 store's: SDK retries off (the fetch stage owns
//! the only retry loop), the same timeouts and body guards (`[s3]` keys, or a
//! `[[store]]` entry with `url = "ebs://"`), the same classification table
//! ([`classify_sdk_error`]: `RequestThrottledException` is a throttle, 5xx
//! transient, `ResourceNotFoundException` permanent). The store stack
//! ([`super::stack`]) puts the rate limit, adaptive concurrency, adaptive
//! rate and attempt deadline around it; its default rate limit is the APIs'
//! per-snapshot quota ([`default_options`]).
//!
//! Credentials, region and endpoint come from the standard AWS chain
//! (`AWS_PROFILE`, `AWS_REGION`, `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_EBS`,
//! SSO, IMDS) unless the options name them.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_ebs::Client;
use aws_sdk_ebs::config::{Region, StalledStreamProtectionConfig};
use aws_sdk_ebs::error::SdkError;
use aws_sdk_ebs::operation::get_snapshot_block::{GetSnapshotBlockError, GetSnapshotBlockOutput};
use aws_sdk_ebs::types::ValidationExceptionReason;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;

use super::s3::{S3Config, classify_sdk_error, read_body_then};
use super::{BlockStore, BoxFuture, StoreError, StoreOptions, StoreUrl};
use crate::block::BlockIndex;
use crate::verify::TRAILER_LEN_BYTES;

/// `GetSnapshotBlock` requests per second per snapshot, the EBS direct APIs'
/// default quota (AWS General Reference, "Amazon EBS endpoints and quotas";
/// the per-account quota is 5,000/s). One restore reads one snapshot, so
/// this is the binding one: the default rate limit of an `ebs://` store.
pub const GET_SNAPSHOT_BLOCK_PER_SNAPSHOT_PER_SEC: Option<NonZeroU32> = NonZeroU32::new(1_000);
/// `ListSnapshotBlocks` requests per second per account (same table). Lists
/// are few (one per 10,000 blocks, plus relists), paced here below it.
pub const LIST_SNAPSHOT_BLOCKS_PER_ACCOUNT_PER_SEC: u32 = 50;
/// The largest page `ListSnapshotBlocks` gives (`MaxResults` 100..=10000).
const LIST_PAGE_BLOCKS_MAX: i32 = 10_000;
/// A token this close to its expiry is renewed before it is used.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// At most this many list pages (10,000 blocks each): a 64 TiB volume of
/// 512 KiB blocks has 12,800 pages; a service that never stops paging is
/// refused.
const LIST_PAGES_MAX: usize = 1 << 16;

/// The options of an `ebs://` store before its `[[store]]` entry: `base`
/// with the per-snapshot quota as its request-rate limit (or the configured
/// limit, when that is lower).
pub fn default_options(base: &StoreOptions) -> StoreOptions {
    let mut options = base.clone();
    options.rate_limit.requests_per_sec =
        match (base.rate_limit.requests_per_sec, GET_SNAPSHOT_BLOCK_PER_SNAPSHOT_PER_SEC) {
            (Some(configured), Some(quota)) => Some(configured.min(quota)),
            (configured, quota) => configured.or(quota),
        };
    options
}

/// `snap-` and hex digits, at most 64 characters (the API's pattern).
pub fn valid_snapshot_id(id: &str) -> bool {
    id.len() <= 64
        && id.strip_prefix("snap-").is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One stored block's access token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    value: Arc<str>,
    expires: Option<SystemTime>,
}

/// What a listing found: the layout and the stored blocks, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub block_size_bytes: u32,
    pub volume_size_gib: u64,
    pub blocks: Vec<BlockIndex>,
}

/// One page of `ListSnapshotBlocks`.
struct Page {
    block_size_bytes: u32,
    volume_size_gib: u64,
    blocks: Vec<(BlockIndex, Token)>,
    next: Option<String>,
}

/// A [`BlockStore`] over one EBS snapshot. See the module docs.
#[derive(Debug)]
pub struct EbsStore {
    client: Client,
    snapshot_id: String,
    url: StoreUrl,
    config: S3Config,
    tokens: Mutex<HashMap<BlockIndex, Token>>,
    /// One relist at a time; a burst of refused tokens relists once.
    relisting: tokio::sync::Mutex<()>,
    /// When the last list request went out (the per-account list quota).
    last_list: tokio::sync::Mutex<Option<Instant>>,
}

impl EbsStore {
    /// Open `ebs://<snapshot_id>` with the standard AWS chain. No request is
    /// sent: a missing snapshot shows at [`list`](Self::list).
    pub async fn connect(snapshot_id: &str, config: &S3Config) -> Result<EbsStore, StoreError> {
        config.validate().map_err(StoreError::permanent)?;
        if !valid_snapshot_id(snapshot_id) {
            return Err(StoreError::permanent(format!("{snapshot_id:?} is not an EBS snapshot id (snap-<hex>)")));
        }
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_millis))
            .operation_attempt_timeout(Duration::from_millis(config.operation_attempt_timeout_millis))
            .operation_timeout(Duration::from_millis(config.operation_timeout_millis))
            .build();
        let region = match &config.region {
            Some(region) => aws_config::meta::region::RegionProviderChain::first_try(Region::new(region.clone())),
            None => aws_config::meta::region::RegionProviderChain::default_provider(),
        }
        .or_else(Region::from_static("us-east-1"));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(endpoint) = &config.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(profile) = &config.profile {
            loader = loader.profile_name(profile);
        }
        let client = Client::new(&loader.load().await);
        Ok(EbsStore {
            client,
            snapshot_id: snapshot_id.to_owned(),
            url: StoreUrl::Ebs { snapshot_id: snapshot_id.to_owned() },
            config: config.clone(),
            tokens: Mutex::new(HashMap::new()),
            relisting: tokio::sync::Mutex::new(()),
            last_list: tokio::sync::Mutex::new(None),
        })
    }

    /// List the whole snapshot, page by page; keep every block's token. A
    /// failed page is asked again after the sleep `retry` gives for its error
    /// (the caller's retry policy: fetch's bounds), or the listing fails with
    /// it when `retry` gives none. The blocks come back sorted and unique
    /// whatever order the service used.
    pub async fn list(
        &self,
        retry: &mut (dyn FnMut(&StoreError) -> Option<Duration> + Send),
    ) -> Result<Listing, StoreError> {
        let mut next: Option<String> = None;
        let mut listing: Option<Listing> = None;
        for _ in 0..LIST_PAGES_MAX {
            let page = self.list_page_retried(next.as_deref(), &mut *retry).await?;
            let listing = listing.get_or_insert_with(|| Listing {
                block_size_bytes: page.block_size_bytes,
                volume_size_gib: page.volume_size_gib,
                blocks: Vec::new(),
            });
            if (page.block_size_bytes, page.volume_size_gib) != (listing.block_size_bytes, listing.volume_size_gib) {
                return Err(StoreError::permanent(format!("{}: the pages disagree on the layout", self.url)));
            }
            listing.blocks.extend(page.blocks.iter().map(|(index, _)| *index));
            self.keep(page.blocks);
            next = page.next;
            if next.is_none() {
                let mut listing = listing.clone();
                listing.blocks.sort_unstable();
                listing.blocks.dedup();
                return Ok(listing);
            }
        }
        Err(StoreError::permanent(format!("{}: more than {LIST_PAGES_MAX} list pages", self.url)))
    }

    async fn list_page_retried(
        &self,
        next: Option<&str>,
        retry: &mut (dyn FnMut(&StoreError) -> Option<Duration> + Send),
    ) -> Result<Page, StoreError> {
        loop {
            let error = match self.list_page(None, next).await {
                Ok(page) => return Ok(page),
                Err(error) => error,
            };
            match retry(&error) {
                Some(sleep) => tokio::time::sleep(sleep).await,
                None => return Err(error),
            }
        }
    }

    /// One `ListSnapshotBlocks` request, paced under the account's quota.
    async fn list_page(&self, start: Option<BlockIndex>, next: Option<&str>) -> Result<Page, StoreError> {
        self.pace_list().await;
        let what = format!("ListSnapshotBlocks {}", self.url);
        let mut request =
            self.client.list_snapshot_blocks().snapshot_id(&self.snapshot_id).max_results(LIST_PAGE_BLOCKS_MAX);
        if let Some(next) = next {
            request = request.next_token(next);
        } else if let Some(start) = start {
            request = request.starting_block_index(i32::try_from(start).unwrap_or(i32::MAX));
        }
        let out = request.send().await.map_err(|e| explain_missing(classify_sdk_error(&what, &e), &self.url))?;
        let bad = |why: &str| StoreError::permanent(format!("{what}: {why}"));
        let block_size_bytes =
            out.block_size().and_then(|b| u32::try_from(b).ok()).ok_or_else(|| bad("no valid BlockSize"))?;
        let volume_size_gib = out
            .volume_size()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|&v| v > 0)
            .ok_or_else(|| bad("no valid VolumeSize"))?;
        let expires = out.expiry_time().and_then(|t| SystemTime::try_from(*t).ok());
        let mut blocks = Vec::with_capacity(out.blocks().len());
        for block in out.blocks() {
            let index = block
                .block_index()
                .and_then(|i| u64::try_from(i).ok())
                .ok_or_else(|| bad("a block without a valid BlockIndex"))?;
            let token = block.block_token().ok_or_else(|| bad("a block without a BlockToken"))?;
            blocks.push((index, Token { value: Arc::from(token), expires }));
        }
        Ok(Page { block_size_bytes, volume_size_gib, blocks, next: out.next_token().map(str::to_owned) })
    }

    async fn pace_list(&self) {
        let gap = Duration::from_secs(1) / LIST_SNAPSHOT_BLOCKS_PER_ACCOUNT_PER_SEC;
        let mut last = self.last_list.lock().await;
        if let Some(at) = *last {
            tokio::time::sleep_until((at + gap).into()).await;
        }
        *last = Some(Instant::now());
    }

    fn keep(&self, blocks: Vec<(BlockIndex, Token)>) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.extend(blocks);
    }

    fn token(&self, index: BlockIndex) -> Option<Token> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(&index).cloned()
    }

    /// List again from `index` on (one page), unless another task already
    /// replaced `stale` while this one waited its turn.
    async fn relist(&self, index: BlockIndex, stale: Option<&Token>) -> Result<(), StoreError> {
        let _turn = self.relisting.lock().await;
        if self.token(index).as_ref() != stale {
            return Ok(());
        }
        tracing::debug!(snapshot = %self.snapshot_id, block = index, "block token expired or refused: listing again");
        let page = self.list_page(Some(index), None).await?;
        self.keep(page.blocks);
        Ok(())
    }

    /// The block's token, renewed first when it is missing or about to
    /// expire.
    async fn fresh_token(&self, index: BlockIndex) -> Result<Token, StoreError> {
        let token = self.token(index);
        let expiring = token.as_ref().is_some_and(|t| {
            t.expires.is_some_and(|at| at.duration_since(SystemTime::now()).unwrap_or_default() < TOKEN_EXPIRY_MARGIN)
        });
        if token.is_none() || expiring {
            self.relist(index, token.as_ref()).await?;
        }
        self.token(index).ok_or_else(|| {
            StoreError::permanent(format!("{}: block {index} is not in the snapshot's block list", self.url))
        })
    }

    async fn get_block(&self, key: &str, len_max_bytes: u64) -> Result<Bytes, StoreError> {
        let index: BlockIndex = key
            .parse()
            .ok()
            .filter(|&i| i32::try_from(i).is_ok())
            .ok_or_else(|| StoreError::permanent(format!("{}: {key:?} is not a block index", self.url)))?;
        let what = format!("GetSnapshotBlock {}/{index}", self.url);
        let mut relisted = false;
        loop {
            let token = self.fresh_token(index).await?;
            let sent = self
                .client
                .get_snapshot_block()
                .snapshot_id(&self.snapshot_id)
                .block_index(index as i32)
                .block_token(&*token.value)
                .send()
                .await;
            match sent {
                Ok(out) => return self.read_block(&what, out, len_max_bytes).await,
                Err(e) if !relisted && token_refused(&e) => {
                    self.relist(index, Some(&token)).await?;
                    relisted = true;
                }
                Err(e) => return Err(explain_missing(classify_sdk_error(&what, &e), &self.url)),
            }
        }
    }

    /// The block's body under the body guards, with its checksum appended.
    async fn read_block(
        &self,
        what: &str,
        out: GetSnapshotBlockOutput,
        len_max_bytes: u64,
    ) -> Result<Bytes, StoreError> {
        let headers_at = Instant::now();
        let checksum = checksum_of(what, &out)?;
        let data_len_max = len_max_bytes.saturating_sub(TRAILER_LEN_BYTES as u64);
        let advertised = match out.data_length() {
            Some(len) if len < 0 => return Err(StoreError::transient(format!("{what}: negative x-amz-Data-Length"))),
            Some(len) if len as u64 > data_len_max => {
                return Err(StoreError::corrupt(format!(
                    "{what}: block is {len} bytes, more than the {data_len_max} expected (refused before reading)"
                )));
            }
            Some(len) => Some(len as u64),
            None => None,
        };
        let guard = self.config.body_guard(headers_at);
        read_body_then(what, out.block_data, advertised, data_len_max, guard, &checksum).await
    }
}

/// The decoded `x-amz-Checksum` of an answer: SHA-256, 32 bytes. An answer
/// without one cannot be verified and is refused as corrupt.
fn checksum_of(what: &str, out: &GetSnapshotBlockOutput) -> Result<[u8; TRAILER_LEN_BYTES], StoreError> {
    if let Some(algorithm) = out.checksum_algorithm()
        && algorithm.as_str() != "SHA256"
    {
        return Err(StoreError::corrupt(format!("{what}: checksum algorithm {} is not SHA256", algorithm.as_str())));
    }
    let encoded = out.checksum().ok_or_else(|| StoreError::corrupt(format!("{what}: no x-amz-Checksum header")))?;
    aws_smithy_types::base64::decode(encoded)
        .ok()
        .and_then(|bytes| <[u8; TRAILER_LEN_BYTES]>::try_from(bytes).ok())
        .ok_or_else(|| StoreError::corrupt(format!("{what}: x-amz-Checksum {encoded:?} is not a base64 SHA-256")))
}

/// Whether the service refused the block's token (expired or unknown).
fn token_refused<R>(e: &SdkError<GetSnapshotBlockError, R>) -> bool {
    matches!(
        e.as_service_error(),
        Some(GetSnapshotBlockError::ValidationException(v)) if v.reason() == Some(&ValidationExceptionReason::InvalidBlockToken)
    )
}

/// A missing snapshot's error, saying what to check.
fn explain_missing(error: StoreError, url: &StoreUrl) -> StoreError {
    if error.message.contains("ResourceNotFoundException") {
        let message = format!(
            "{url}: no such snapshot in this account and region (check the id, AWS_REGION and the credentials): {}",
            error.message
        );
        return StoreError::new(error.class, message);
    }
    error
}

impl BlockStore for EbsStore {
    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn get_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
        len_max_bytes: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(self.get_block(key, len_max_bytes))
    }

    fn put_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
        _bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(
            async move { Err(StoreError::permanent(format!("{}: EBS snapshots are read only ({key})", self.url))) },
        )
    }

    fn exists_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let index: Option<BlockIndex> = key.parse().ok();
            Ok(index.is_some_and(|i| self.token(i).is_some()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids() {
        for good in ["snap-0123456789abcdef0", "snap-0a"] {
            assert!(valid_snapshot_id(good), "{good}");
        }
        for bad in ["snap-", "vol-0a", "snap-0g", "snap-0a/..", &format!("snap-{}", "0".repeat(60))] {
            assert!(!valid_snapshot_id(bad), "{bad}");
        }
    }

    #[test]
    fn the_quota_is_the_default_rate_limit_unless_lower_is_configured() {
        let base = StoreOptions::default();
        assert_eq!(default_options(&base).rate_limit.requests_per_sec, GET_SNAPSHOT_BLOCK_PER_SNAPSHOT_PER_SEC);
        let mut low = base.clone();
        low.rate_limit.requests_per_sec = NonZeroU32::new(10);
        assert_eq!(default_options(&low).rate_limit.requests_per_sec, NonZeroU32::new(10));
    }
}
