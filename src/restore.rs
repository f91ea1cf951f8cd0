//! The restore engine: one restore of a snapshot into a target.
//!
//! In: a [`RestoreSpec`] (a manifest URL, fallback sources, a target). Out: a
//! [`RestoreReport`], or one [`RestoreError`] variant, each mapped to one
//! documented exit code.
//!
//! [`Engine`] holds what every restore in the process shares: the config, the
//! in-flight byte budget, the opened stores. [`restore()`] runs one restore
//! through its phases (`phases.rs`: validate → allocate → rehydrate → swap →
//! online); `allocate.rs` opens the target and resumes from its checkpoint;
//! [`plan`] computes the work left; [`read`] gives verified block *i*; the
//! pipeline (`pipeline.rs`: dispatcher and units, `settler.rs`) moves blocks
//! to the target and settles them; `report.rs` says how it went. [`progress`]
//! is what a watcher reads while it runs; [`readback`] reads a target back
//! against a snapshot. [`source`] opens the snapshot a URL names (a
//! rehydrate manifest, a Longhorn backup). [`live`] is the volume while it is restored, for an
//! export to serve ([`restore_live`]).

mod allocate;
pub mod ebs;
pub mod latency;
pub mod live;
mod phases;
mod pipeline;
pub mod plan;
pub mod progress;
pub mod read;
pub mod readback;
mod report;
mod settler;
pub mod source;
mod unsettled;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::error::{ErrorClass, ExitCode};
use crate::fetch::budget::Budget;
use crate::manifest::{Manifest, ManifestLimits};
use crate::store::{self, SharedStore, StoreUrl};

pub use phases::{Publish, RestoreSpec, restore, restore_live};
pub use report::{DamagedBlock, RestoreReport, Timings};

/// What all restores in one process share.
#[derive(Debug)]
pub struct Engine {
    pub config: Config,
    pub budget: Budget,
    /// Stores opened so far, by URL: every restore that reads a store goes
    /// through the same handle, so its rate limits are shared.
    stores: Mutex<HashMap<StoreUrl, SharedStore>>,
    /// The last tenant id handed to a restore (0: requests outside any).
    tenants: std::sync::atomic::AtomicU64,
    /// Peer workers opened so far, by URL: one skip state per peer.
    peers: Mutex<HashMap<String, SharedStore>>,
    /// What this process's restores hold, for peers (`crate::peer`).
    pub holdings: Arc<crate::peer::holdings::Holdings>,
}

impl Engine {
    pub fn new(config: Config) -> Self {
        let budget = Budget::new(config.fetch.inflight_bytes_max.get());
        // The buffers in use are bounded by the budget; keep as many idle,
        // so a steady restore never allocates.
        let retained_bytes_max = usize::try_from(config.fetch.inflight_bytes_max.get()).unwrap_or(usize::MAX);
        crate::buf::BufPool::shared().set_retained_bytes_max(retained_bytes_max);
        crate::metrics::describe();
        let holdings = Arc::new(crate::peer::holdings::Holdings::new(config.peers.holdings_max.get()));
        Self {
            config,
            budget,
            stores: Mutex::new(HashMap::new()),
            tenants: std::sync::atomic::AtomicU64::new(0),
            peers: Mutex::new(HashMap::new()),
            holdings,
        }
    }

    /// Open a peer worker by its URL (once per URL per process), behind its
    /// short deadline and skip (`peer/sources.rs`).
    pub fn open_peer(&self, url: &str) -> Result<SharedStore, RestoreError> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = peers.get(url) {
            return Ok(Arc::clone(store));
        }
        let base = StoreUrl::parse(url).map_err(|e| RestoreError::Usage(format!("peer: {e}")))?;
        let options = self.store_options(&base)?;
        let store = crate::peer::sources::open(url, &self.config.peers, &options)
            .map_err(|e| RestoreError::Usage(e.to_string()))?;
        peers.insert(url.to_owned(), Arc::clone(&store));
        Ok(store)
    }

    /// A tenant id for a new restore: its requests take turns with other
    /// restores' at each store's concurrency gate.
    pub fn next_tenant(&self) -> u64 {
        self.tenants.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// Open a store by URL (once per URL per process), with its own options
    /// (`[[store]]`).
    pub async fn open_store(&self, url: &StoreUrl) -> Result<SharedStore, RestoreError> {
        if let Some(store) = self.stores.lock().unwrap_or_else(|e| e.into_inner()).get(url) {
            return Ok(Arc::clone(store));
        }
        let store = store::open(url, &self.store_options(url)?)
            .await
            .map_err(|e| RestoreError::Source(format!("cannot open store {url}: {e}")))?;
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Arc::clone(stores.entry(url.clone()).or_insert(store)))
    }

    fn store_options(&self, url: &StoreUrl) -> Result<store::StoreOptions, RestoreError> {
        self.config.store_options(url).map_err(|e| RestoreError::Usage(e.to_string()))
    }

    /// Serve `url` from `backend` with the policies [`store::stack`] puts
    /// around it: a [`Backend::Local`](store::Backend::Local) (a directory, a
    /// test double) gets the attempt deadline, a
    /// [`Backend::Remote`](store::Backend::Remote) (an S3 store on an
    /// in-process or test endpoint) every policy, as [`store::open`] gives
    /// them.
    pub fn register(&self, url: StoreUrl, backend: store::Backend) -> Result<(), RestoreError> {
        let store = store::stack(backend, &self.store_options(&url)?)
            .map_err(|e| RestoreError::Usage(format!("store {url}: {e}")))?;
        self.stores.lock().unwrap_or_else(|e| e.into_inner()).insert(url, store);
        Ok(())
    }

    /// [`register`](Self::register) a local store (a directory, a test
    /// double): its deadline only.
    pub fn register_store(&self, url: StoreUrl, store: SharedStore) {
        // A local store's options cannot fail to stack (no policies to build).
        let _ = self.register(url, store::Backend::Local(store));
    }

    /// [`register`](Self::register) a remote store with every policy.
    pub fn register_remote_store(&self, url: StoreUrl, backend: SharedStore) -> Result<(), RestoreError> {
        self.register(url, store::Backend::Remote(backend))
    }

    pub fn manifest_limits(&self) -> ManifestLimits {
        self.config.manifest.limits()
    }
}

/// Why a restore did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The request itself is wrong (a bad URL, bad flags).
    #[error("{0}")]
    Usage(String),
    /// Refused input: a malformed manifest, an unusable target, a checkpoint
    /// that belongs to another restore. Nothing was written.
    #[error("{0}")]
    Refused(String),
    /// A store could not be read (the manifest missing or unreachable).
    #[error("{0}")]
    Source(String),
    /// Writing or syncing the target failed.
    #[error("{0}")]
    Io(String),
    /// Stopped on request, after settling what was written.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// Another restore holds the target (or took it over under this one):
    /// nothing of the other's was written over.
    #[error("{0}")]
    Busy(String),
    /// Some blocks failed on every source; everything else was restored.
    #[error(
        "{} of {} blocks could not be restored from any source (first: block {}); the target was not swapped into place",
        .0.blocks_failed, .0.blocks_total, .0.damage.first().map(|d| d.index).unwrap_or(0)
    )]
    BlocksFailed(Box<RestoreReport>),
}

impl RestoreError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            RestoreError::Usage(_) => ExitCode::Usage,
            RestoreError::Refused(_) => ExitCode::Refused,
            RestoreError::Source(_) | RestoreError::BlocksFailed(_) => ExitCode::DataFailure,
            RestoreError::Io(_) => ExitCode::IoFailure,
            RestoreError::Interrupted(_) => ExitCode::Interrupted,
            RestoreError::Busy(_) => ExitCode::TargetBusy,
        }
    }
}

impl From<crate::target::TargetError> for RestoreError {
    fn from(e: crate::target::TargetError) -> Self {
        match e {
            crate::target::TargetError::Refused { .. } => RestoreError::Refused(e.to_string()),
            crate::target::TargetError::Io { .. } => RestoreError::Io(e.to_string()),
        }
    }
}

/// Read and parse a manifest from its store, bounded by the limits.
/// `tenant`: the restore it is read for (0: none).
pub async fn load_manifest(
    engine: &Engine,
    store: &SharedStore,
    key: &str,
    tenant: u64,
) -> Result<Manifest, RestoreError> {
    let limits = engine.manifest_limits();
    let url = store.url().join(key);
    let policy = crate::fetch::RetryPolicy::from_config(&engine.config.fetch);
    // Everything of the restore (or the gate that reads it) waits on this
    // one request: it goes ahead of the blocks other restores have queued
    // at the store, as a reader's request does.
    let bytes = crate::fetch::get_retried(
        store,
        &crate::store::RequestContext { tenant, sent: None, demand: true },
        key,
        Manifest::encoded_len_max(&limits),
        &policy,
    )
    .await
    .map_err(|e| match e.class {
        ErrorClass::Corrupt => RestoreError::Refused(format!("manifest {url}: {e}")),
        _ => RestoreError::Source(format!("cannot read manifest {url}: {e}")),
    })?;
    Manifest::decode(&bytes, &limits).map_err(|e| RestoreError::Refused(format!("{url}: {e}")))
}
