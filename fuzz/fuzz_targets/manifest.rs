//! Fuzz the manifest decoder: any bytes either decode or are refused with an
//! error, never a panic; whatever decodes re-encodes to exactly the same bytes
//! (the format is canonical) and decodes again to the same manifest.
//!
//! A manifest ends with the BLAKE3 of everything before it, which random
//! bytes almost never match (run alone, the raw form stays at 132 edges); so
//! each input is also tried as a body with its trailer appended, which takes
//! the fuzzer past the trailer into the header, name and entry checks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rehydrate::manifest::{Manifest, ManifestLimits};

fn round_trip(bytes: &[u8]) {
    let limits = ManifestLimits::default();
    let Ok(manifest) = Manifest::decode(bytes, &limits) else {
        return;
    };
    let encoded = manifest.encode();
    assert_eq!(encoded, bytes, "a decoded manifest re-encodes to its own bytes");
    let again = Manifest::decode(&encoded, &limits).expect("a re-encoded manifest decodes");
    assert_eq!(again, manifest);
    assert_eq!(again.digest(), manifest.digest());
}

fuzz_target!(|bytes: &[u8]| {
    round_trip(bytes);
    let mut sealed = bytes.to_vec();
    sealed.extend_from_slice(blake3::hash(bytes).as_bytes());
    round_trip(&sealed);
});
