//! The demo chat page and its reusable client module, embedded in the binary.

const INDEX: &str = include_str!("../static/index.html");
const CLIENT: &str = include_str!("../static/switchboard.js");

/// A static asset by path: (content type, body).
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX.as_bytes())),
        "/switchboard.js" => Some(("text/javascript; charset=utf-8", CLIENT.as_bytes())),
        _ => None,
    }
}
