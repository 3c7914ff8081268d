//! Fuzzes the inbound side's first look at a connection: whether its first bytes are a TLS
//! ClientHello and which server name it asks for. Any client of a meshed pod sends these bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_sidecar::inbound::{Hello, client_hello_sni};

fuzz_target!(|data: &[u8]| {
    // Never a panic.
    let whole = client_hello_sni(data);

    // The inbound side reads until the answer is not "need more": once a prefix decides "not
    // TLS" or names the server, no longer prefix may say otherwise, so that how the bytes were
    // split over reads never changes where a connection goes.
    let mut decided: Option<Hello> = None;
    for k in 0..=data.len() {
        let h = client_hello_sni(&data[..k]);
        if let Some(d) = &decided {
            assert_eq!(&h, d, "prefix of {k} bytes changed the answer");
        } else if h != Hello::NeedMore {
            decided = Some(h);
        }
    }
    assert_eq!(whole, decided.unwrap_or(Hello::NeedMore));
});
