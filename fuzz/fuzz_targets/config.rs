//! Fuzz the configuration parser (`Config::parse`: TOML, serde defaults, then
//! `validate()`): any text is a configuration or a clear error, never a
//! panic, and an accepted configuration validates again and yields its
//! derived values (durations, the worker's state directory) without panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rehydrate::config::Config;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    config.validate().expect("an accepted configuration validates again");
    let _ = config.worker.shutdown_grace();
    let _ = config.worker.header_read_timeout();
    let _ = config.worker_state_dir();
});
