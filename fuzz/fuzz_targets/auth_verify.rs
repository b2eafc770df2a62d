//! Any token (header, subprotocol or query value): verification never panics
//! and never admits a token we did not sign.
#![no_main]

use gateway::auth::{Verifier, glob_match, valid_anonymous_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let v = Verifier::new(Some("iss".into()), Some("aud".into())).with_hs256(b"fuzz-secret").expect("valid key");
    assert!(v.verify(text).is_err(), "an unsigned input was accepted: {text:?}");
    let mut mid = text.len() / 2;
    while !text.is_char_boundary(mid) {
        mid -= 1;
    }
    let (pattern, rest) = text.split_at(mid);
    let _ = glob_match(pattern, rest);
    let _ = valid_anonymous_name(text);
});
