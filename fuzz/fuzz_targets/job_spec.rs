//! Fuzz the job-spec parser the API runs on every submitted body: any bytes
//! parse to a spec or are refused with a classified error ([`BodyError`]),
//! never a panic; an accepted spec survives a round trip; and a spec that
//! resolves against the configuration names a target under the target root
//! and a manifest under the profile's store.
//!
//! Random bytes are rarely a JSON object with the right members, so each
//! input is also split at NUL bytes into the four string fields of a spec,
//! which takes the fuzzer past the JSON parser into the checks proper.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rehydrate::config::worker::{ProfileConfig, WorkerConfig};
use rehydrate::job::spec::{BodyError, parse_body, resolve};

/// A worker configuration with one real target root (resolution
/// canonicalizes parents, so the root must exist).
fn config() -> &'static (WorkerConfig, PathBuf) {
    static CONFIG: OnceLock<(WorkerConfig, PathBuf)> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("rehydrate-fuzz-job-spec-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sub")).expect("a fuzz target root");
        let root = root.canonicalize().expect("the root canonicalizes");
        let mut config = WorkerConfig { target_roots: vec![root.clone()], ..WorkerConfig::default() };
        config
            .profiles
            .insert("main".into(), ProfileConfig { store: "s3://bucket/prefix".into(), secondaries: vec![] });
        (config, root)
    })
}

fn check(body: &[u8]) {
    let spec = match parse_body(body) {
        Ok(spec) => spec,
        Err(BodyError::NotJson(_) | BodyError::NotASpec(_)) => return,
    };
    let again = parse_body(&serde_json::to_vec(&spec).expect("a spec serializes")).expect("a spec parses again");
    assert_eq!(again, spec, "a spec changed through serialize and parse");
    let (config, root) = config();
    if let Ok(resolved) = resolve(&spec, config) {
        assert!(resolved.target.starts_with(root), "target {} escaped the root", resolved.target.display());
        assert!(resolved.manifest_url.starts_with("s3://bucket/prefix/"), "{}", resolved.manifest_url);
        assert!(!spec.manifest.split('/').any(|p| p == ".." || p.is_empty()), "{}", spec.manifest);
    }
}

fuzz_target!(|bytes: &[u8]| {
    check(bytes);
    let mut fields = bytes.split(|&b| b == 0).map(|f| String::from_utf8_lossy(f).into_owned());
    let mut field = || fields.next().unwrap_or_default();
    let (id, profile, manifest, target) = (field(), field(), field(), field());
    let (_, root) = config();
    // Targets both as given and placed under the root, so the root checks run.
    for target in [target.clone(), format!("{}/{}", root.display(), target)] {
        let body = serde_json::json!({ "id": id, "profile": profile, "manifest": manifest, "target": target });
        check(&serde_json::to_vec(&body).expect("JSON serializes"));
    }
});
