//! Fuzzes `decode`, the parser that sees the first bytes a peer sends after the TLS handshake.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_transport_header::decode;

fuzz_target!(|data: &[u8]| {
    // Any input must yield Ok or Err, never a panic: these bytes come from the network.
    let Ok(Some((h, n))) = decode(data) else {
        return;
    };

    // The caller advances its buffer by `n`; it must not claim bytes it was not given.
    assert!(n <= data.len(), "consumed {n} of {} bytes", data.len());

    // What `decode` accepts, `encode` must write back in a form `decode` reads as the same
    // header and consumes in full (a proxy forwards headers it has parsed).
    let wire = h.encode();
    match decode(&wire) {
        Ok(Some((h2, m))) => {
            assert_eq!(h2, h, "round trip changed the header");
            assert_eq!(m, wire.len(), "round trip left bytes unconsumed");
        }
        other => panic!("re-decoding {h:?} gave {other:?}"),
    }

    // `read` calls `decode` on partial buffers: a strict prefix of a complete header must mean
    // "need more bytes", not an error (which would drop a fragmented but valid connection)
    // and not a header (which would be parsed from bytes that are not all there).
    for k in [0, n / 2, n.saturating_sub(1)] {
        if k < n {
            assert!(
                matches!(decode(&data[..k]), Ok(None)),
                "prefix of {k} of {n} bytes gave {:?}",
                decode(&data[..k])
            );
        }
    }
});
