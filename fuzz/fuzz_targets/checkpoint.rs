//! Fuzz the checkpoint decoder: any bytes either decode or are refused with
//! an error, never a panic, and whatever decodes survives a round trip
//! (decode(encode(c)) == c).
//!
//! A checkpoint ends with the BLAKE3 of everything before it, which random
//! bytes almost never match; so each input is also tried as a body with its
//! checksum appended, which takes the fuzzer past the checksum into the
//! parser proper (identity, ranges, failed blocks).

#![no_main]

use libfuzzer_sys::fuzz_target;
use rehydrate::checkpoint::Checkpoint;

fn round_trip(bytes: &[u8]) {
    let Ok(checkpoint) = Checkpoint::decode(bytes) else {
        return;
    };
    let encoded = checkpoint.encode();
    let again = Checkpoint::decode(&encoded).expect("a re-encoded checkpoint decodes");
    assert_eq!(again, checkpoint, "a checkpoint changed through encode and decode");
}

fuzz_target!(|bytes: &[u8]| {
    round_trip(bytes);
    let mut sealed = bytes.to_vec();
    sealed.extend_from_slice(blake3::hash(bytes).as_bytes());
    round_trip(&sealed);
});
