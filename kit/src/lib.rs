//! Plumbing shared by every Switchboard binary; no domain logic lives here.
//!
//! - [`args`]: command-line flags every binary takes (logging, admin address).
//! - [`telemetry`]: tracing subscriber (text or JSON) and the Prometheus recorder.
//! - [`admin`]: the admin HTTP endpoints `/metrics`, `/healthz`, `/readyz`.
//! - [`shutdown`]: SIGTERM/SIGINT turned into a cancellation token.
//! - [`grpc`]: the shared-token credential of the internal gRPC APIs.
//! - [`idempotency`]: answers remembered by idempotency key for a window.
//! - [`history`]: per-channel retention rules and the bounded ring a channel's history lives in.

pub mod admin;
pub mod args;
pub mod grpc;
pub mod history;
pub mod idempotency;
pub mod shutdown;
pub mod telemetry;

/// Exit code for bad configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Percent-decodes `s` (a malformed escape stays as it is); with `plus_is_space`, as a
/// form or query value (`+` is a space), else as a URL's user info or path (`+` is itself).
pub fn percent_decode(s: &str, plus_is_space: bool) -> std::borrow::Cow<'_, str> {
    if !(s.contains('%') || plus_is_space && s.contains('+')) {
        return s.into();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

/// Glob match where `*` matches any run of characters (including none).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decode_as_form_or_as_user_info() {
        assert_eq!(percent_decode("a%2Cb+c", true), "a,b c");
        assert_eq!(percent_decode("p%40ss+1", false), "p@ss+1");
        assert_eq!(percent_decode("bad%zz%4", false), "bad%zz%4");
    }
}
