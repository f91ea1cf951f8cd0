//! Job specs: what a client may ask for, and the checks that keep it inside
//! what the worker's configuration allows.
//!
//! In: a [`JobSpec`] parsed from a request body (unknown fields refused). Out:
//! a [`ResolvedSpec`] naming a configured store profile, a manifest key under
//! it and a target path under one of `worker.target_roots`, or a [`SpecError`]
//! saying which field is wrong. Nothing is written while checking: the target's
//! parent directory must already exist and is canonicalized, so a symlink that
//! points out of the root is caught; a target that is itself a symlink is
//! refused.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::worker::{ExportRange, WorkerConfig};
use crate::nbd::ExportAddr;
use crate::store::{MANIFEST_SUFFIX, StoreUrl};

pub use crate::config::worker::{NAME_LEN_MAX, valid_name};
/// Longest manifest key and target path accepted.
pub const PATH_LEN_MAX: usize = 1024;

/// A job as a client submits it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Client-chosen, `[A-Za-z0-9_-]{1,64}`: resubmitting the same spec under
    /// the same id returns the same job.
    pub id: String,
    /// A `[worker.profiles.NAME]` of the worker's configuration.
    pub profile: String,
    /// The manifest's key under the profile's store (`vol.manifest`), or an
    /// EBS snapshot, whole (`ebs://snap-0123456789abcdef0`).
    pub manifest: String,
    /// The file to restore into, under one of `worker.target_roots`.
    #[schema(value_type = String)]
    pub target: PathBuf,
    /// Cancel an active job on the same target and take over its work.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
    /// Discard a checkpoint an earlier restore left on this target (of
    /// another snapshot) instead of resuming it. Implied when `replace`
    /// takes over a job restoring another snapshot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
    /// Serve the volume over NBD while it is restored and after, until the
    /// job is cancelled or its export stopped: `true` (an address from
    /// `worker.export_listen`) or an export URL inside that range
    /// (`nbd://127.0.0.1:10905/db`, `nbd+unix:///db?socket=/run/rehydrate/nbd/db.sock`).
    #[serde(default, skip_serializing_if = "JobExport::is_off")]
    pub export: JobExport,
}

/// A job's `export`: `true`/`false`, or where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum JobExport {
    Flag(bool),
    Url(String),
}

impl Default for JobExport {
    fn default() -> Self {
        JobExport::Flag(false)
    }
}

impl JobExport {
    pub fn is_off(&self) -> bool {
        *self == JobExport::Flag(false)
    }
}

/// Where a job's export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportPlan {
    /// The first free address of the range (TCP), or `<dir>/<job id>.sock`.
    Any(ExportRange),
    At(ExportAddr),
}

impl JobSpec {
    /// Whether two specs ask for the same restore (`replace` and `restart`
    /// are how to submit, not what to restore).
    pub fn same_job(&self, other: &JobSpec) -> bool {
        self.id == other.id
            && self.profile == other.profile
            && self.manifest == other.manifest
            && self.target == other.target
    }
}

/// A spec checked against the configuration.
#[derive(Debug, Clone)]
pub struct ResolvedSpec {
    pub manifest_url: String,
    pub secondaries: Vec<String>,
    /// Peer workers asked first (the profile's `peers`).
    pub peers: Vec<String>,
    /// The target with its parent canonicalized.
    pub target: PathBuf,
    /// Serve the volume over NBD while it is restored.
    pub export: Option<ExportPlan>,
}

/// Which field of a spec is unacceptable, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError { field, reason: reason.into() }
}

/// Why a request body is not a job spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON at all, or cut short (the API answers 400).
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not a job spec: a missing, unknown or mistyped field (422).
    #[error("job spec: {0}")]
    NotASpec(String),
}

/// Parse a submitted body as a [`JobSpec`] (unknown fields refused). What
/// comes out still has to pass [`resolve`].
pub fn parse_body(body: &[u8]) -> Result<JobSpec, BodyError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() { BodyError::NotJson(e.to_string()) } else { BodyError::NotASpec(e.to_string()) }
    })
}

/// Check a spec against the worker's configuration.
pub fn resolve(spec: &JobSpec, config: &WorkerConfig) -> Result<ResolvedSpec, SpecError> {
    if !valid_name(&spec.id) {
        return Err(err("id", "1-64 characters of A-Z a-z 0-9 _ -"));
    }
    let profile = config
        .profiles
        .get(&spec.profile)
        .ok_or_else(|| err("profile", format!("no store profile {:?} is configured", spec.profile)))?;
    // An EBS snapshot is named whole (`ebs://snap-...`); a manifest is a key
    // under the profile's store (or a Longhorn backup under a Longhorn one).
    let manifest_url = if spec.manifest.starts_with(crate::store::EBS_SCHEME) {
        let url = StoreUrl::parse(&spec.manifest).map_err(|e| err("manifest", e.to_string()))?;
        if matches!(&url, StoreUrl::Ebs { snapshot_id } if snapshot_id.is_empty()) {
            return Err(err("manifest", "ebs://snap-<hex>: name the snapshot"));
        }
        url.to_string()
    } else {
        manifest_url(&profile.store, &spec.manifest)?
    };
    let target = match check_device(&spec.target, &config.block_devices)? {
        Some(device) => device,
        None => check_target(&spec.target, &config.target_roots)?,
    };
    let export = check_export(&spec.export, config)?;
    let secondaries =
        if manifest_url.starts_with(crate::store::EBS_SCHEME) { Vec::new() } else { profile.secondaries.clone() };
    Ok(ResolvedSpec { manifest_url, secondaries, peers: profile.peers.clone(), target, export })
}

/// The snapshot URL of a job: the manifest key under the profile's store,
/// or, for a Longhorn profile (`longhorn+s3://BUCKET/PREFIX`), the backup
/// the job names as `volume=V&backup=B`.
fn manifest_url(store: &str, manifest: &str) -> Result<String, SpecError> {
    if crate::snapshot::longhorn::is_longhorn_url(store) {
        let url = format!("{store}?{manifest}");
        crate::snapshot::longhorn::LonghornUrl::parse(&url).map_err(|e| err("manifest", e.reason))?;
        return Ok(url);
    }
    check_manifest_key(manifest)?;
    let store = StoreUrl::parse(store).map_err(|e| err("profile", e.to_string()))?;
    Ok(store.join(manifest))
}

/// An export must be inside `worker.export_listen`.
fn check_export(export: &JobExport, config: &WorkerConfig) -> Result<Option<ExportPlan>, SpecError> {
    if export.is_off() {
        return Ok(None);
    }
    let range = match config.export_range() {
        Some(Ok(range)) => range,
        Some(Err(e)) => return Err(err("export", format!("worker.export_listen is invalid: {e}"))),
        None => return Err(err("export", "this worker has no worker.export_listen configured: jobs may not export")),
    };
    match export {
        JobExport::Flag(_) => Ok(Some(ExportPlan::Any(range))),
        JobExport::Url(url) => {
            let addr = ExportAddr::parse(url).map_err(|e| err("export", e))?;
            if !range_allows(&range, &addr) {
                return Err(err("export", format!("{url} is outside worker.export_listen ({range})")));
            }
            Ok(Some(ExportPlan::At(addr)))
        }
    }
}

/// Whether an export at `addr` lies inside `range`: the range's IP and one
/// of its ports, or a socket directly in its directory.
fn range_allows(range: &ExportRange, addr: &ExportAddr) -> bool {
    match (range, addr) {
        (ExportRange::Tcp { ip, ports }, ExportAddr::Tcp { addr, .. }) => {
            addr.ip() == *ip && ports.contains(&addr.port())
        }
        (ExportRange::UnixDir(dir), ExportAddr::Unix { path, .. }) => {
            path.parent() == Some(dir.as_path())
                && path.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        }
        _ => false,
    }
}

fn check_manifest_key(key: &str) -> Result<(), SpecError> {
    if key.is_empty() || key.len() > PATH_LEN_MAX {
        return Err(err("manifest", format!("a key of 1-{PATH_LEN_MAX} bytes")));
    }
    if key.starts_with('/') || key.contains('\0') || key.contains('\\') {
        return Err(err("manifest", "a relative key without NUL or backslashes"));
    }
    if key.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err(err("manifest", "no empty, '.' or '..' segments"));
    }
    if !key.ends_with(MANIFEST_SUFFIX) {
        return Err(err("manifest", format!("a manifest key ends in {MANIFEST_SUFFIX}")));
    }
    Ok(())
}

/// A target named exactly in `worker.block_devices` (symlinks resolved, as
/// udev names like `/dev/disk/by-id/…` are) must be a block device. Other
/// targets are files under the roots (`None`).
fn check_device(target: &Path, devices: &[PathBuf]) -> Result<Option<PathBuf>, SpecError> {
    use std::os::unix::fs::FileTypeExt;
    let Some(listed) = devices.iter().find(|d| d.as_path() == target) else { return Ok(None) };
    let resolved = listed
        .canonicalize()
        .map_err(|e| err("target", format!("block device {} is not usable: {e}", listed.display())))?;
    match std::fs::metadata(&resolved) {
        Ok(m) if m.file_type().is_block_device() => Ok(Some(resolved)),
        Ok(_) => Err(err(
            "target",
            format!("{} is listed in worker.block_devices but is not a block device", listed.display()),
        )),
        Err(e) => Err(err("target", format!("block device {} is not usable: {e}", listed.display()))),
    }
}

/// The target must be an absolute path whose (existing, canonicalized) parent
/// lies under a root, and must not itself be a symlink or a directory.
fn check_target(target: &Path, roots: &[PathBuf]) -> Result<PathBuf, SpecError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = target.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() > PATH_LEN_MAX || bytes.contains(&0) {
        return Err(err("target", format!("an absolute path of 1-{PATH_LEN_MAX} bytes without NUL")));
    }
    if !target.is_absolute() || target.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(err("target", "an absolute path without '.' or '..' segments"));
    }
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(err("target", "a file path, not a directory"));
    };
    if roots.is_empty() {
        return Err(err("target", "this worker has no worker.target_roots configured: it restores nowhere"));
    }
    let parent = parent
        .canonicalize()
        .map_err(|e| err("target", format!("the parent directory {} is not usable: {e}", parent.display())))?;
    let under_root = roots.iter().any(|root| root.canonicalize().is_ok_and(|root| parent.starts_with(root)));
    if !under_root {
        return Err(err("target", "not under any of worker.target_roots (symlinks resolved)"));
    }
    let resolved = parent.join(name);
    match std::fs::symlink_metadata(&resolved) {
        Ok(m) if m.file_type().is_symlink() => Err(err("target", "is a symlink")),
        Ok(m) if m.is_dir() => Err(err("target", "is a directory")),
        Ok(m) if !m.is_file() => Err(err("target", "the worker restores into regular files only")),
        _ => Ok(resolved),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    #[test]
    fn names_and_manifest_keys() {
        assert!(valid_name("job-1_A"));
        for bad in ["", "a/b", "a b", "ä", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(check_manifest_key("dir/vol.manifest").is_ok());
        for bad in ["/vol.manifest", "../vol.manifest", "a//vol.manifest", "vol.txt", "a\0.manifest", "./v.manifest"] {
            assert!(check_manifest_key(bad).is_err(), "{bad}");
        }
    }

    /// An EBS snapshot is named whole, not under the profile's store, and
    /// the profile's secondaries (store URLs) are not its sources.
    #[test]
    fn an_ebs_snapshot_is_a_manifest_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = WorkerConfig { target_roots: vec![dir.path().to_owned()], ..WorkerConfig::default() };
        let profile = crate::config::worker::ProfileConfig {
            store: "s3://bucket/p".into(),
            secondaries: vec!["file:///mirror".into()],
            peers: vec![],
        };
        config.profiles.insert("main".into(), profile);
        let spec = |manifest: &str| JobSpec {
            id: "j".into(),
            profile: "main".into(),
            manifest: manifest.into(),
            target: dir.path().join("t.img"),
            replace: false,
            restart: false,
            export: Default::default(),
        };
        let resolved = resolve(&spec("ebs://snap-0123456789abcdef0"), &config).unwrap();
        assert_eq!(resolved.manifest_url, "ebs://snap-0123456789abcdef0");
        assert!(resolved.secondaries.is_empty());
        for bad in ["ebs://", "ebs://vol-01", "ebs://snap-01/../x"] {
            assert!(resolve(&spec(bad), &config).is_err(), "{bad}");
        }
        assert_eq!(resolve(&spec("v.manifest"), &config).unwrap().secondaries, vec!["file:///mirror".to_owned()]);
    }

    #[test]
    fn a_longhorn_profile_takes_the_backup_as_its_manifest() {
        let store = "longhorn+s3://lh-backups/cluster-a";
        let url = manifest_url(store, "volume=pvc-1&backup=backup-2").unwrap();
        assert_eq!(url, "longhorn+s3://lh-backups/cluster-a?volume=pvc-1&backup=backup-2");
        for bad in ["vol.manifest", "volume=pvc-1", "volume=../x&backup=b2", "volume=v1&backup=b2&x=1"] {
            assert_eq!(manifest_url(store, bad).unwrap_err().field, "manifest", "{bad}");
        }
        assert_eq!(manifest_url("s3://bucket/p", "v.manifest").unwrap(), "s3://bucket/p/v.manifest");
    }

    #[test]
    fn targets_stay_under_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.join("x"), root.join("link.img")).unwrap();
        let roots = vec![root.clone()];
        assert!(check_target(&root.join("sub/a.img"), &roots).is_ok());
        for bad in [
            root.join("escape/a.img"),
            root.join("link.img"),
            root.join("../outside/a.img"),
            outside.join("a.img"),
            root.join("missing/a.img"),
            PathBuf::from("relative.img"),
            root.join("sub"),
        ] {
            assert!(check_target(&bad, &roots).is_err(), "{}", bad.display());
        }
    }

    #[test]
    fn export_ranges_hold_only_their_addresses() {
        let addr = |url: &str| ExportAddr::parse(url).unwrap();
        let tcp = ExportRange::parse("127.0.0.1:10900-10909").unwrap();
        assert!(range_allows(&tcp, &addr("nbd://127.0.0.1:10905/a")));
        assert!(!range_allows(&tcp, &addr("nbd://127.0.0.1:10910/a")));
        assert!(!range_allows(&tcp, &addr("nbd://127.0.0.2:10905/a")));
        assert!(!range_allows(&tcp, &addr("nbd+unix:///run/x.sock")));
        let unix = ExportRange::parse("unix:/run/rehydrate/nbd").unwrap();
        assert!(range_allows(&unix, &addr("nbd+unix:///run/rehydrate/nbd/db.sock")));
        assert!(range_allows(&unix, &addr("nbd+unix:///db?socket=/run/rehydrate/nbd/db.sock")));
        assert!(!range_allows(&unix, &addr("nbd+unix:///run/rehydrate/db.sock")));
        assert!(!range_allows(&unix, &addr("nbd+unix:///run/rehydrate/nbd/sub/db.sock")));
        assert!(!range_allows(&unix, &addr("nbd://127.0.0.1:10905/a")));
    }

    #[test]
    fn exports_stay_inside_the_configured_range() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = WorkerConfig { target_roots: vec![dir.path().to_owned()], ..WorkerConfig::default() };
        let profile =
            crate::config::worker::ProfileConfig { store: "file:///store".into(), secondaries: vec![], peers: vec![] };
        config.profiles.insert("main".into(), profile);
        let spec = |export: JobExport| JobSpec {
            id: "db".into(),
            profile: "main".into(),
            manifest: "v.manifest".into(),
            target: dir.path().join("v.img"),
            replace: false,
            restart: false,
            export,
        };
        assert_eq!(resolve(&spec(JobExport::Flag(false)), &config).unwrap().export, None);
        let e = resolve(&spec(JobExport::Flag(true)), &config).unwrap_err();
        assert_eq!(e.field, "export");
        assert!(e.reason.contains("no worker.export_listen"), "{e}");
        config.export_listen = Some("127.0.0.1:10900-10909".into());
        assert!(matches!(resolve(&spec(JobExport::Flag(true)), &config).unwrap().export, Some(ExportPlan::Any(_))));
        let at = resolve(&spec(JobExport::Url("nbd://127.0.0.1:10901/db".into())), &config).unwrap();
        assert!(matches!(at.export, Some(ExportPlan::At(_))));
        for bad in ["nbd://127.0.0.1:10910/db", "nbd+unix:///tmp/x.sock", "nbd://10.1.1.1:10901/db", "http://x"] {
            let e = resolve(&spec(JobExport::Url(bad.into())), &config).unwrap_err();
            assert_eq!(e.field, "export", "{bad}");
        }
        let parsed = parse_body(br#"{"id":"a","profile":"main","manifest":"v.manifest","target":"/t","export":true}"#);
        assert_eq!(parsed.unwrap().export, JobExport::Flag(true));
        let parsed = parse_body(
            br#"{"id":"a","profile":"main","manifest":"v.manifest","target":"/t","export":"nbd://127.0.0.1:1/x"}"#,
        );
        assert_eq!(parsed.unwrap().export, JobExport::Url("nbd://127.0.0.1:1/x".into()));
        assert!(
            parse_body(br#"{"id":"a","profile":"main","manifest":"v.manifest","target":"/t","export":3}"#).is_err()
        );
    }

    proptest::proptest! {
        /// Whatever a client sends, resolving never panics, and an accepted
        /// target lies under the root and an accepted manifest key has no
        /// way out of the store prefix.
        #[test]
        fn resolve_never_escapes(
            target in "[a-z./\\-]{0,12}(/\\.\\.)?[a-z./]{0,12}",
            manifest in "[a-z./\\-]{0,16}(\\.manifest)?",
            id in "[A-Za-z0-9_/-]{0,70}",
        ) {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            std::fs::create_dir_all(root.join("a")).unwrap();
            let mut config = WorkerConfig { target_roots: vec![root.clone()], ..WorkerConfig::default() };
            let profile = crate::config::worker::ProfileConfig { store: "s3://bucket/p".into(), secondaries: vec![], peers: vec![] };
            config.profiles.insert("main".into(), profile);
            let spec = JobSpec {
                id,
                profile: "main".into(),
                manifest: manifest.clone(),
                target: root.join(target.trim_start_matches('/')),
                replace: false,
                restart: false,
                export: JobExport::default(),
            };
            if let Ok(resolved) = resolve(&spec, &config) {
                proptest::prop_assert!(resolved.target.starts_with(root.canonicalize().unwrap()));
                proptest::prop_assert!(!manifest.split('/').any(|p| p == ".." || p.is_empty()));
                proptest::prop_assert!(resolved.manifest_url.starts_with("s3://bucket/p/"));
            }
        }

        /// Arbitrary bytes as a request body: a spec or a classified error,
        /// never a panic; an accepted spec survives a round trip.
        #[test]
        fn parse_body_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Ok(spec) = parse_body(&body) {
                let again = parse_body(&serde_json::to_vec(&spec).unwrap());
                proptest::prop_assert_eq!(again, Ok(spec));
            }
        }

        /// JSON objects with arbitrary members (known and unknown names,
        /// strings, numbers, nulls, nesting) parse or are refused, then
        /// resolve or are refused, never a panic.
        #[test]
        fn json_bodies_parse_and_resolve_without_panics(
            members in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::strategy::Just("id".to_owned()),
                        proptest::strategy::Just("profile".to_owned()),
                        proptest::strategy::Just("manifest".to_owned()),
                        proptest::strategy::Just("target".to_owned()),
                        proptest::strategy::Just("replace".to_owned()),
                        proptest::strategy::Just("restart".to_owned()),
                        proptest::strategy::Just("export".to_owned()),
                        "\\PC{0,8}",
                    ],
                    proptest::prop_oneof![
                        "\\PC{0,40}".prop_map(serde_json::Value::from),
                        "(/[a-z.]{0,6}){0,4}".prop_map(serde_json::Value::from),
                        proptest::prelude::any::<bool>().prop_map(serde_json::Value::from),
                        proptest::prelude::any::<i64>().prop_map(serde_json::Value::from),
                        proptest::strategy::Just(serde_json::Value::Null),
                        proptest::strategy::Just(serde_json::json!({"a": [1, "b"]})),
                    ],
                ),
                0..8,
            ),
        ) {
            let object: serde_json::Map<String, serde_json::Value> = members.into_iter().collect();
            let body = serde_json::to_vec(&object).unwrap();
            let mut config = WorkerConfig { target_roots: vec![PathBuf::from("/nonexistent-root")], ..WorkerConfig::default() };
            let profile = crate::config::worker::ProfileConfig { store: "file:///store".into(), secondaries: vec![], peers: vec![] };
            config.profiles.insert("main".into(), profile);
            match parse_body(&body) {
                Ok(spec) => {
                    let _ = resolve(&spec, &config);
                }
                Err(e) => proptest::prop_assert!(matches!(e, BodyError::NotASpec(_)), "{e}"),
            }
        }
    }
}
