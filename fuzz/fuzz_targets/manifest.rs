//! Fuzz the manifest decoder: any bytes either decode or are refused with an
//! error, never a panic; whatever decodes re-encodes to exactly the same bytes
//! (the format is canonical) and decodes again to the same manifest.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rehydrate::manifest::{Manifest, ManifestLimits};

fuzz_target!(|bytes: &[u8]| {
    let limits = ManifestLimits::default();
    let Ok(manifest) = Manifest::decode(bytes, &limits) else {
        return;
    };
    let encoded = manifest.encode();
    assert_eq!(encoded, bytes, "a decoded manifest re-encodes to its own bytes");
    let again = Manifest::decode(&encoded, &limits).expect("a re-encoded manifest decodes");
    assert_eq!(again, manifest);
    assert_eq!(again.digest(), manifest.digest());
});
