//! Opening an EBS snapshot for a restore or a read-back: `ebs://snap-...`.
//!
//! The snapshot's store is opened with its options (the per-snapshot quota
//! as its default rate limit, `store/ebs.rs`), listed once (page by page,
//! each page retried within the fetch policy's bounds), and put inside the
//! same store stack as any remote store. A snapshot the service does not know
//! fails here, before anything is allocated: no target is created.

use std::sync::Arc;

use super::{Engine, RestoreError};
use crate::error::ErrorClass;
use crate::snapshot::ebs::EbsSnapshot;
use crate::store::ebs::EbsStore;
use crate::store::{self, SharedStore, StoreUrl};

/// The snapshot `url` names, listed, and its store inside the store stack.
pub async fn open(engine: &Engine, url: &str) -> Result<(Arc<EbsSnapshot>, SharedStore), RestoreError> {
    let parsed = StoreUrl::parse(url).map_err(|e| RestoreError::Usage(e.to_string()))?;
    let StoreUrl::Ebs { snapshot_id } = &parsed else {
        return Err(RestoreError::Usage(format!("{url} is not an ebs://snap-... URL")));
    };
    if snapshot_id.is_empty() {
        return Err(RestoreError::Usage(format!("{url}: name the snapshot, e.g. ebs://snap-0123456789abcdef0")));
    }
    let options = engine.config.store_options(&parsed).map_err(|e| RestoreError::Usage(e.to_string()))?;
    let raw = Arc::new(
        EbsStore::connect(snapshot_id, &options.s3)
            .await
            .map_err(|e| RestoreError::Usage(format!("cannot open {url}: {e}")))?,
    );
    let policy = crate::fetch::RetryPolicy::from_config(&engine.config.fetch);
    let mut state = crate::fetch::RetryState::new(&policy, policy.jitter_seed, false);
    // A throttled list honours the service's Retry-After, capped like
    // every other Retry-After (`fetch.retry_after_max_millis`).
    let retry_after_max = policy.retry_after_max;
    let mut retry = |e: &crate::error::StoreError| {
        state.after(e).sleep.map(|sleep| sleep.max(e.retry_after().unwrap_or_default().min(retry_after_max)))
    };
    let listing = raw.list(&mut retry).await.map_err(|e| match e.class {
        ErrorClass::Corrupt => RestoreError::Refused(format!("cannot list {url}: {e}")),
        _ => RestoreError::Source(format!("cannot list {url}: {e}")),
    })?;
    let snapshot = EbsSnapshot::new(snapshot_id, listing).map_err(RestoreError::Refused)?;
    let stacked = store::stack(store::Backend::Remote(raw), &options)
        .map_err(|e| RestoreError::Usage(format!("store {url}: {e}")))?;
    Ok((Arc::new(snapshot), stacked))
}

/// Blocks compared at once by [`readback`]: enough fetches in flight to keep
/// the APIs busy, few enough that memory stays a few tens of MiB.
const READBACK_INFLIGHT_MAX: usize = 32;

/// Read `target` back against the EBS snapshot `url`: every stored block of
/// `selection` is fetched through the fetch stage (verified against the
/// checksum its answer carries) and compared with the target's bytes; every
/// other block must read back as zeros. The read-back of a rehydrate
/// manifest needs no fetch (`readback.rs`); an EBS snapshot's hashes come
/// only with its blocks.
pub async fn readback(
    engine: &Engine,
    url: &str,
    target: &std::path::Path,
    selection: Option<crate::block::BlockSelection>,
) -> Result<super::readback::ReadbackReport, RestoreError> {
    use std::os::unix::fs::FileExt;
    let (snapshot, store) = open(engine, url).await?;
    let layout = crate::snapshot::Snapshot::layout(&*snapshot);
    let range = match selection {
        Some(s) => s.resolve(&layout).map_err(RestoreError::Usage)?,
        None => crate::block::BlockRange::all(&layout),
    };
    let io = |e: std::io::Error| RestoreError::Io(format!("reading {}: {e}", target.display()));
    let file = Arc::new(std::fs::File::open(target).map_err(io)?);
    let size = crate::target::device_size_bytes(&file).map_err(io)?;
    if size < layout.volume_size_bytes() {
        return Err(RestoreError::Refused(format!(
            "{} holds {size} bytes, the volume {}",
            target.display(),
            layout.volume_size_bytes()
        )));
    }
    let fetch = crate::fetch::FetchContext::new(crate::fetch::Source::ordered(vec![store]), &engine.config.fetch);
    let reader = Arc::new(super::read::BlockReader::new(snapshot.clone(), fetch));
    let mut tasks = tokio::task::JoinSet::new();
    let mut mismatched = Vec::new();
    let mut zeros = vec![0u8; layout.block_size_bytes() as usize];
    for index in range.start..range.end {
        let len = layout.len(index) as usize;
        if crate::snapshot::Snapshot::block(&*snapshot, index).is_none() {
            file.read_exact_at(&mut zeros[..len], layout.offset(index)).map_err(io)?;
            if !crate::block::is_zero(&zeros[..len]) {
                mismatched.push(index);
            }
            continue;
        }
        while tasks.len() >= READBACK_INFLIGHT_MAX {
            collect(tasks.join_next().await, &mut mismatched)?;
        }
        let (reader, file) = (Arc::clone(&reader), Arc::clone(&file));
        let offset = layout.offset(index);
        tasks.spawn(async move {
            let block = reader.read(index, super::read::Priority::Background).await;
            let mut buf = vec![0u8; len];
            let read = file.read_exact_at(&mut buf, offset);
            (index, block.map(|b| b.bytes()[..] == buf[..]).map_err(|f| format!("{f:?}")), read.err())
        });
    }
    while let Some(done) = tasks.join_next().await {
        collect(Some(done), &mut mismatched)?;
    }
    mismatched.sort_unstable();
    Ok(super::readback::ReadbackReport {
        block_range: range,
        blocks_total: range.len(),
        blocks_checked: range.len(),
        mismatched,
    })
}

type Compared = (crate::block::BlockIndex, Result<bool, String>, Option<std::io::Error>);

/// One compared block: a mismatch is noted; a block no source served or a
/// target that cannot be read ends the read-back.
fn collect(
    done: Option<Result<Compared, tokio::task::JoinError>>,
    mismatched: &mut Vec<crate::block::BlockIndex>,
) -> Result<(), RestoreError> {
    let Some(done) = done else { return Ok(()) };
    let (index, same, read_error) = done.map_err(|e| RestoreError::Io(format!("read-back task failed: {e}")))?;
    if let Some(e) = read_error {
        return Err(RestoreError::Io(format!("reading block {index} of the target: {e}")));
    }
    match same {
        Ok(true) => {}
        Ok(false) => mismatched.push(index),
        Err(failures) => return Err(RestoreError::Source(format!("block {index}: no source served it: {failures}"))),
    }
    Ok(())
}

/// A `--secondary` of an EBS snapshot: a rehydrate snapshot of the same
/// volume (`url` names its manifest), whose layout must be the EBS
/// snapshot's. Blocks are matched by index: the EBS checksum of a block is
/// known only from the primary's answer, so the secondary's block is
/// verified against its own manifest's hash (and a block its manifest holds
/// as zero is zeros). It is the snapshot of the same volume only if whoever
/// named it says so: the layouts are checked, the contents cannot be.
pub async fn secondary(
    engine: &Engine,
    snapshot: &EbsSnapshot,
    url: &str,
    position: usize,
    tenant: u64,
) -> Result<crate::fetch::Source, RestoreError> {
    use crate::snapshot::Snapshot;
    let (store_url, key) = StoreUrl::parse_manifest(url).map_err(|e| {
        RestoreError::Usage(format!(
            "--secondary {url}: the secondary of an EBS snapshot is a rehydrate snapshot of the same volume, named by its manifest URL ({e})"
        ))
    })?;
    let store = engine.open_store(&store_url).await?;
    let manifest = super::load_manifest(engine, &store, &key, tenant).await?;
    if manifest.layout != snapshot.layout() {
        return Err(RestoreError::Usage(format!(
            "--secondary {url}: its volume is {} bytes in {}-byte blocks, {} is {} bytes in {}-byte blocks: not a snapshot of the same volume",
            manifest.layout.volume_size_bytes(),
            manifest.layout.block_size_bytes(),
            snapshot.snapshot_id(),
            snapshot.layout().volume_size_bytes(),
            snapshot.layout().block_size_bytes()
        )));
    }
    Ok(crate::fetch::Source {
        name: format!("secondary{position}"),
        rate: store.rate_control(),
        store,
        snapshot: Some(Arc::new(manifest)),
        peer: false,
    })
}
