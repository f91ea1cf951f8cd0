//! Per-store options: `[[store]]` entries, one per URL prefix.
//!
//! In: the top-level `[s3]`, `[rate_limit]`, `[concurrency]`,
//! `[adaptive_rate]` sections and `fetch.attempt_timeout_millis` (the
//! defaults, as a [`StoreOptions`]), and the `[[store]]` entries. Out: the
//! [`StoreOptions`] of one store URL: the defaults, overlaid key by key with
//! the entry whose `url` is the longest prefix of the store's URL (at a path
//! boundary: `s3://bkt/vols` covers `s3://bkt/vols/db`, not `s3://bkt/volumes`).
//!
//! ```toml
//! [[store]]
//! url = "s3://mirror/vols"          # every store URL under this prefix
//! endpoint_url = "http://10.0.0.5:9000"
//! region = "eu-west-1"
//! profile = "mirror"                # a named AWS profile; never credentials
//! rate_limit = { requests_per_sec = 200 }
//! ```
//!
//! An `http(s)://` store takes the `[s3]` timeouts and body guards (the
//! endpoint keys do not apply to it):
//!
//! ```toml
//! [[store]]
//! url = "http://10.0.0.7:8080/snaps"
//! body_idle_timeout_millis = 2000
//! ```
//!
//! An entry's keys are the `[s3]` keys (endpoint, region, path style,
//! profile, timeouts, body guards), `attempt_timeout_millis`, and the tables
//! `rate_limit`, `concurrency` and `adaptive_rate`, each overlaid on its
//! top-level section. Entries are resolved and validated when the config is
//! read, so a typo in one is an error that names the entry and the key, not a
//! surprise at the first restore that reaches it.

use std::num::NonZeroU64;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{StoreOptions, StoreUrl};

/// One `[[store]]` entry.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct StoreSection {
    /// The URL prefix the entry applies to.
    pub url: String,
    /// The deadline of one attempt on this store (`fetch.attempt_timeout_millis`).
    #[serde(default)]
    pub attempt_timeout_millis: Option<NonZeroU64>,
    #[serde(default)]
    pub rate_limit: Option<toml::Table>,
    #[serde(default)]
    pub concurrency: Option<toml::Table>,
    #[serde(default)]
    pub adaptive_rate: Option<toml::Table>,
    /// Every other key is an `[s3]` key; an unknown one is refused by name
    /// when the entry is resolved.
    #[serde(flatten)]
    pub s3: toml::Table,
}

impl StoreSection {
    fn prefix(&self) -> Result<StoreUrl, String> {
        StoreUrl::parse(&self.url).map_err(|e| e.to_string())
    }

    /// How specific this entry is for `url`: its prefix length when it covers
    /// `url`, `None` otherwise.
    fn covers(&self, url: &StoreUrl) -> Option<usize> {
        match (self.prefix().ok()?, url) {
            (StoreUrl::S3 { bucket: b, prefix: p }, StoreUrl::S3 { bucket, prefix }) => {
                let under = p.is_empty() || prefix == &p || prefix.starts_with(&format!("{p}/"));
                (b == *bucket && under).then_some(b.len() + 1 + p.len())
            }
            (StoreUrl::File { root: r }, StoreUrl::File { root }) => root.starts_with(&r).then(|| r.as_os_str().len()),
            (StoreUrl::Ebs { snapshot_id: p }, StoreUrl::Ebs { snapshot_id }) => {
                (p.is_empty() || p == *snapshot_id).then_some(1 + p.len())
            }
            (StoreUrl::Http { base: b }, StoreUrl::Http { base }) => {
                (base == &b || base.starts_with(&format!("{b}/"))).then_some(b.len())
            }
            _ => None,
        }
    }

    /// `base` with this entry's keys laid over it.
    fn apply(&self, base: &StoreOptions) -> Result<StoreOptions, String> {
        let options = StoreOptions {
            s3: overlay(&base.s3, Some(&self.s3), "s3 keys")?,
            rate_limit: overlay(&base.rate_limit, self.rate_limit.as_ref(), "rate_limit")?,
            concurrency: overlay(&base.concurrency, self.concurrency.as_ref(), "concurrency")?,
            adaptive_rate: overlay(&base.adaptive_rate, self.adaptive_rate.as_ref(), "adaptive_rate")?,
            attempt_timeout: self
                .attempt_timeout_millis
                .map_or(base.attempt_timeout, |millis| Duration::from_millis(millis.get())),
            inflight_bytes_max: base.inflight_bytes_max,
        };
        options.validate()?;
        Ok(options)
    }
}

/// `base`, with the keys of `over` replacing its own, read back through the
/// type (so an unknown key or a bad value is refused by name).
fn overlay<T: Clone + Serialize + DeserializeOwned>(
    base: &T,
    over: Option<&toml::Table>,
    what: &str,
) -> Result<T, String> {
    let Some(over) = over.filter(|t| !t.is_empty()) else {
        return Ok(base.clone());
    };
    let mut table = toml::Table::try_from(base).map_err(|e| format!("{what}: {e}"))?;
    table.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
    table.try_into().map_err(|e: toml::de::Error| format!("{what}: {}", e.message()))
}

/// The options of the store at `url`: `base` overlaid with the entry of the
/// longest prefix covering it, if any.
pub fn resolve(base: &StoreOptions, sections: &[StoreSection], url: &StoreUrl) -> Result<StoreOptions, String> {
    let ebs_base;
    let base = match url {
        StoreUrl::Ebs { .. } => {
            ebs_base = super::ebs::default_options(base);
            &ebs_base
        }
        _ => base,
    };
    let best = sections.iter().filter_map(|s| Some((s.covers(url)?, s))).max_by_key(|(len, _)| *len);
    match best {
        Some((_, section)) => section.apply(base).map_err(|e| format!("[[store]] url = {:?}: {e}", section.url)),
        None => Ok(base.clone()),
    }
}

/// Check every entry: its URL, no two for the same prefix, and its options
/// resolved over `base`.
pub fn validate(base: &StoreOptions, sections: &[StoreSection]) -> Result<(), String> {
    let mut seen = Vec::new();
    for section in sections {
        let prefix = section.prefix().map_err(|e| format!("[[store]] url: {e}"))?;
        if seen.contains(&prefix) {
            return Err(format!("[[store]] url = {:?} is given twice: merge the two entries", section.url));
        }
        section.apply(base).map_err(|e| format!("[[store]] url = {:?}: {e}", section.url))?;
        seen.push(prefix);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(text: &str) -> Vec<StoreSection> {
        #[derive(serde::Deserialize)]
        struct File {
            store: Vec<StoreSection>,
        }
        toml::from_str::<File>(text).unwrap().store
    }

    /// The options of a store no entry covers, as the config's defaults.
    fn base() -> StoreOptions {
        StoreOptions { attempt_timeout: Duration::from_secs(10), ..StoreOptions::default() }
    }

    fn url(text: &str) -> StoreUrl {
        StoreUrl::parse(text).unwrap()
    }

    const TWO: &str = r#"
        [[store]]
        url = "s3://mirror/vols"
        endpoint_url = "http://10.0.0.5:9000"
        region = "eu-west-1"
        profile = "mirror"
        rate_limit = { requests_per_sec = 200 }

        [[store]]
        url = "s3://mirror/vols/cold"
        endpoint_url = "http://10.0.0.6:9000"
        attempt_timeout_millis = 30000
        concurrency = { concurrency_max = 8 }
    "#;

    #[test]
    fn the_longest_prefix_wins_key_by_key_over_the_defaults() {
        let mut base = base();
        base.s3.connect_timeout_millis = 1234;
        base.rate_limit.bytes_per_sec = NonZeroU64::new(1 << 30);
        let stores = sections(TWO);
        validate(&base, &stores).unwrap();

        let hot = resolve(&base, &stores, &url("s3://mirror/vols/db")).unwrap();
        assert_eq!(hot.s3.endpoint_url.as_deref(), Some("http://10.0.0.5:9000"));
        assert_eq!(hot.s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(hot.s3.profile.as_deref(), Some("mirror"));
        assert_eq!(hot.s3.connect_timeout_millis, 1234, "unset keys keep the top-level value");
        assert_eq!(hot.rate_limit.requests_per_sec.map(|r| r.get()), Some(200));
        assert_eq!(hot.rate_limit.bytes_per_sec, base.rate_limit.bytes_per_sec);

        let cold = resolve(&base, &stores, &url("s3://mirror/vols/cold/x")).unwrap();
        assert_eq!(cold.s3.endpoint_url.as_deref(), Some("http://10.0.0.6:9000"));
        assert_eq!(cold.s3.region, None, "entries do not inherit from each other");
        assert_eq!(cold.attempt_timeout, Duration::from_secs(30));
        assert_eq!(cold.concurrency.concurrency_max.get(), 8);
        assert_eq!(cold.concurrency.concurrency_min, base.concurrency.concurrency_min);

        // Not at a path boundary, another bucket, another kind: the defaults.
        for other in ["s3://mirror/volumes", "s3://other/vols", "file:///mirror/vols"] {
            assert_eq!(resolve(&base, &stores, &url(other)).unwrap(), base, "{other}");
        }
        assert_eq!(resolve(&base, &stores, &url("s3://mirror/vols")).unwrap(), hot);
    }

    #[test]
    fn file_stores_match_by_path_components() {
        let stores = sections("[[store]]\nurl = \"file:///srv/a\"\nattempt_timeout_millis = 5\n");
        let base = base();
        assert_eq!(resolve(&base, &stores, &url("file:///srv/a/b")).unwrap().attempt_timeout, Duration::from_millis(5));
        assert_eq!(resolve(&base, &stores, &url("file:///srv/ab")).unwrap(), base);
    }

    /// An EBS snapshot gets the EBS direct APIs' per-snapshot quota as its
    /// rate limit; an `ebs://` entry overrides it.
    #[test]
    fn ebs_stores_default_to_the_api_quota() {
        let base = base();
        let snap = url("ebs://snap-0a");
        let plain = resolve(&base, &[], &snap).unwrap();
        assert_eq!(plain.rate_limit.requests_per_sec, crate::store::ebs::GET_SNAPSHOT_BLOCK_PER_SNAPSHOT_PER_SEC);
        let stores = sections("[[store]]\nurl = \"ebs://\"\nrate_limit = { requests_per_sec = 100 }\n");
        validate(&base, &stores).unwrap();
        assert_eq!(resolve(&base, &stores, &snap).unwrap().rate_limit.requests_per_sec.map(|r| r.get()), Some(100));
        assert_eq!(resolve(&base, &stores, &url("s3://bkt/p")).unwrap(), base, "other kinds untouched");
    }

    #[test]
    fn http_stores_match_by_path_segments() {
        let stores = sections("[[store]]\nurl = \"http://h:8080/snaps\"\nattempt_timeout_millis = 7\n");
        let base = base();
        let got = resolve(&base, &stores, &url("http://h:8080/snaps/vol")).unwrap();
        assert_eq!(got.attempt_timeout, Duration::from_millis(7));
        assert_eq!(resolve(&base, &stores, &url("http://h:8080/snapshots")).unwrap(), base);
        assert_eq!(resolve(&base, &stores, &url("http://h:8081/snaps")).unwrap(), base);
    }

    #[test]
    fn bad_entries_are_refused_by_name() {
        let base = base();
        for (text, needle) in [
            ("url = \"s3://bkt/p\"\nendpont_url = \"http://x\"", "endpont_url"),
            ("url = \"s3://bkt/p\"\nendpoint_url = \"ftp://x\"", "endpoint_url"),
            ("url = \"s3://bkt/p\"\nrate_limit = { requests_per_sec = 0 }", "rate_limit"),
            ("url = \"s3://bkt/p\"\nconcurrency = { concurrency_min = 9, concurrency_max = 4 }", "concurrency_min"),
            ("url = \"s3://bkt/p\"\nadaptive_rate = { decrease_factor = 2.0 }", "decrease_factor"),
            ("url = \"relative\"", "url"),
        ] {
            let stores = sections(&format!("[[store]]\n{text}\n"));
            let e = validate(&base, &stores).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let twice = sections("[[store]]\nurl = \"s3://bkt/p\"\n[[store]]\nurl = \"s3://bkt/p/\"\n");
        assert!(validate(&base, &twice).unwrap_err().contains("twice"));
    }
}
