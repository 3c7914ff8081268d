//! Fuzzes `classify`, which sees the first bytes any client of a meshed pod sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_http::{Protocol, classify};

fuzz_target!(|data: &[u8]| {
    // Never a panic: these bytes come from the network.
    let whole = classify(data);

    // The detector reads until `classify` decides, so a decision must not depend on where the
    // bytes were split: once a prefix decides, every longer prefix decides the same.
    let mut decided: Option<Protocol> = None;
    for k in 0..=data.len() {
        let p = classify(&data[..k]);
        if let Some(d) = decided {
            assert_eq!(p, Some(d), "prefix of {k} bytes changed the decision");
        }
        decided = decided.or(p);
    }
    assert_eq!(whole, decided);
});
