//! permessage-deflate (RFC 7692): the negotiation, the compressed twin of an
//! outgoing frame, and the bounded inflation of a client message.
//!
//! The server always answers `server_no_context_takeover` and
//! `client_no_context_takeover`: every message is compressed and inflated on
//! its own. So a publication is compressed once and the same compressed frame
//! is shared by every subscriber that negotiated, and no session keeps a
//! compressor or an inflater: both live one per worker thread and are reset
//! per message. Pure: no I/O.

use std::cell::{OnceCell, RefCell};

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// What RFC 7692 §7.2.1 removes from the end of a compressed message, and §7.2.2 adds back.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest LZ77 window (bits) the compressor uses.
pub const MAX_WINDOW_BITS: u8 = 15;

/// An accepted offer: the response's value, and the largest window the client
/// lets the server use (`server_max_window_bits`, 15 when it set none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub response: String,
    pub window_bits: u8,
}

/// Picks the first `permessage-deflate` offer in the `Sec-WebSocket-Extensions`
/// values that the server can honour (RFC 7692 §5: offers are tried in order, one
/// with an unknown, repeated or invalid parameter is declined and the next tried);
/// `None`: answer without the extension.
///
/// Accepted parameters: `server_no_context_takeover` and `client_no_context_takeover`
/// (the server does both anyway), `client_max_window_bits` with or without a value
/// 8..=15 (the inflater has a 32 KiB window, so any client window is fine; not echoed),
/// `server_max_window_bits` 8..=15 (echoed; a message larger than that window is then
/// sent to this session uncompressed, see [`Twin::pick`]).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Accepted> {
    values.into_iter().flat_map(split_offers).find_map(|offer| accept(&offer))
}

/// Splits one header value into offers (commas outside quoted strings).
fn split_offers(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn window_bits(v: &str) -> Option<u8> {
    // RFC 7692 §7.1.2: 1*DIGIT without leading zeros, 8..=15.
    if v.starts_with('0') || v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=MAX_WINDOW_BITS).contains(b))
}

fn accept(offer: &str) -> Option<Accepted> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let (mut snct, mut cnct, mut smwb, mut cmwb) = (false, false, None::<u8>, false);
    for p in parts {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => {
                let v = v.trim();
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                (k.trim(), Some(v))
            }
            None => (p, None),
        };
        let seen = match k.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if v.is_none() => std::mem::replace(&mut snct, true),
            "client_no_context_takeover" if v.is_none() => std::mem::replace(&mut cnct, true),
            "server_max_window_bits" => smwb.replace(window_bits(v?)?).is_some(),
            "client_max_window_bits" => {
                if let Some(v) = v {
                    window_bits(v)?;
                }
                std::mem::replace(&mut cmwb, true)
            }
            _ => return None,
        };
        if seen {
            return None;
        }
    }
    let mut response = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
    if let Some(b) = smwb {
        response.push_str(&format!("; server_max_window_bits={b}"));
    }
    Some(Accepted { response, window_bits: smwb.unwrap_or(MAX_WINDOW_BITS) })
}

thread_local! {
    static DEFLATER: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// The payload of a complete server frame (unmasked), and its first byte.
fn payload(frame: &[u8]) -> Option<(u8, &[u8])> {
    let [b0, b1, ..] = *frame else { return None };
    let at = match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    Some((b0, frame.get(at..)?))
}

/// Compresses `data` as one message (raw deflate, sync flush, the tail removed);
/// `None` if the flush did not come out whole (not seen; the frame then goes plain).
///
/// miniz_oxide can return from a call with the input and a sync flush with the flush
/// not made (after a block, when its buffer of LZ codes fills on the input's last byte),
/// and drops the flush marker when the flushed block does not fit the output: Autobahn
/// 12.2.9's 64 KiB bitmap slices inflated 4 KB short. Hence: the input without a flush,
/// what it holds drained, then the sync flush alone with room for everything pending.
pub fn compress(data: &[u8]) -> Option<Vec<u8>> {
    // Stored blocks bound the output: the input and 5 bytes per 64 KiB, plus the flush.
    let bound = data.len() + data.len() / 8192 + 64;
    DEFLATER.with_borrow_mut(|c| {
        c.reset();
        let mut out = Vec::with_capacity(bound);
        let mut input = data;
        while !input.is_empty() {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            let before = c.total_in();
            let _ = c.compress_vec(input, &mut out, FlushCompress::None);
            input = &input[(c.total_in() - before) as usize..];
        }
        drain(c, &mut out);
        out.reserve(bound);
        let _ = c.compress_vec(&[], &mut out, FlushCompress::Sync);
        drain(c, &mut out);
        let whole = out.ends_with(&TAIL);
        debug_assert!(whole, "a sync flush ends with the tail");
        whole.then(|| {
            out.truncate(out.len() - TAIL.len());
            out
        })
    })
}

/// Takes what the compressor holds until a call with no input and no flush brings nothing.
fn drain(c: &mut Compress, out: &mut Vec<u8>) {
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(64));
        }
        let before = c.total_out();
        let _ = c.compress_vec(&[], out, FlushCompress::None);
        if c.total_out() == before {
            return;
        }
    }
}

/// The compressed form of a complete, unfragmented data frame (RSV1 set), or
/// `None` when compression would not make it smaller (or it is not a data frame).
pub fn deflate_frame(frame: &[u8]) -> Option<Bytes> {
    let (b0, data) = payload(frame)?;
    if b0 & 0x0f == 0 || b0 & 0x08 != 0 || b0 & 0x80 == 0 {
        return None;
    }
    let z = compress(data)?;
    let header = match z.len() {
        n if n < 126 => 2,
        n if n < 65536 => 4,
        _ => 10,
    };
    if z.len() + header >= frame.len() {
        return None;
    }
    Some(crate::wire::framed(0xC0 | (b0 & 0x0f), &z))
}

/// A frame and its compressed twin, computed at most once, on the first
/// subscriber that negotiated permessage-deflate: a publication nobody with
/// the extension receives is never compressed.
#[derive(Debug)]
pub struct Twin<'a> {
    plain: &'a Bytes,
    deflated: OnceCell<Option<Bytes>>,
}

impl<'a> Twin<'a> {
    pub fn new(plain: &'a Bytes) -> Self {
        Self { plain, deflated: OnceCell::new() }
    }

    /// The frame to queue for a session with this `deflate` setting (see
    /// [`crate::hub::SessionCtl::deflate`]: 0 = not negotiated, else the window bits
    /// it allows). A frame larger than the session's window goes plain (its
    /// back-references could reach beyond the window), as does one that does not shrink.
    pub fn pick(&self, deflate: u8) -> &Bytes {
        if deflate == 0 || (deflate < MAX_WINDOW_BITS && self.plain.len() > 1 << deflate) {
            return self.plain;
        }
        self.deflated
            .get_or_init(|| {
                metrics::counter!(crate::metrics::DEFLATE_FRAMES).increment(1);
                deflate_frame(self.plain)
            })
            .as_ref()
            .unwrap_or(self.plain)
    }
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit (close 1009).
    TooBig,
    /// Not a valid deflate stream (close 1002).
    Invalid,
}

/// Inflates one message (the §7.2.2 tail appended), stopping as soon as the
/// output would exceed `limit`: a zip bomb costs at most `limit` bytes of output.
pub fn inflate(data: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with_borrow_mut(|d| {
        d.reset(false);
        let mut out = Vec::with_capacity(data.len().saturating_mul(4).max(256).min(limit + 1));
        let mut inputs = [data, &TAIL[..]];
        let mut i = 0;
        loop {
            let (before_in, before_out) = (d.total_in(), d.total_out());
            let status = d.decompress_vec(inputs[i], &mut out, FlushDecompress::Sync);
            let status = status.map_err(|_| InflateError::Invalid)?;
            if out.len() > limit {
                return Err(InflateError::TooBig);
            }
            let read = (d.total_in() - before_in) as usize;
            inputs[i] = &inputs[i][read..];
            if status == Status::StreamEnd {
                // A final block (allowed without context takeover): what follows is ignored.
                return Ok(out);
            }
            let full = out.len() == out.capacity();
            let produced = d.total_out() - before_out;
            if inputs[i].is_empty() && !full {
                // Done once the tail is in and a call brings no more output.
                if i == 1 && produced == 0 {
                    return Ok(out);
                }
                i = 1;
                continue;
            }
            if full {
                // Room up to one byte past the limit, so that going over it shows.
                let room = out.capacity().max(256).min(limit + 1 - out.len());
                out.reserve_exact(room);
            } else if read == 0 && produced == 0 {
                // No progress with input and room: a truncated stream.
                return Err(InflateError::Invalid);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(v: &str) -> Option<String> {
        negotiate([v]).map(|a| a.response)
    }

    const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn offers_are_accepted_with_their_parameters_or_declined() {
        assert_eq!(neg("permessage-deflate").as_deref(), Some(ANSWER));
        // What browsers send.
        assert_eq!(neg("permessage-deflate; client_max_window_bits").as_deref(), Some(ANSWER));
        assert_eq!(
            neg(
                "permessage-deflate; client_max_window_bits=10; server_no_context_takeover; client_no_context_takeover"
            )
            .as_deref(),
            Some(ANSWER)
        );
        let a = negotiate(["permessage-deflate; server_max_window_bits=\"10\""]).unwrap();
        assert_eq!(a.response, format!("{ANSWER}; server_max_window_bits=10"));
        assert_eq!(a.window_bits, 10);
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=99",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_param",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(neg(bad), None, "{bad}");
        }
        // The first acceptable offer wins, across commas and header lines.
        let a = negotiate([
            "foo, permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=9, permessage-deflate",
        ]);
        assert_eq!(a.unwrap().window_bits, 9);
    }

    #[test]
    fn a_frame_deflates_once_and_inflates_back() {
        let json = br#"{"type":"message","channel":"room:lobby","id":"gw-1.2","from":"alice","seq":42,"data":{"text":"hello hello hello hello"}}"#;
        let plain = crate::wire::text(json);
        let twin = Twin::new(&plain);
        assert!(std::ptr::eq(twin.pick(0), &plain));
        let z = twin.pick(15).clone();
        assert_eq!(z[0], 0xC1, "FIN, RSV1, text");
        assert!(z.len() < plain.len());
        // The same compressed frame for every session that negotiated.
        assert_eq!(twin.pick(15).as_ptr(), z.as_ptr());
        let (_, payload) = payload(&z).unwrap();
        assert_eq!(inflate(payload, 1 << 16).unwrap(), json);
        // A frame that does not shrink goes plain.
        let tiny = crate::wire::text(b"{}");
        assert!(std::ptr::eq(Twin::new(&tiny).pick(15), &tiny));
        // Control frames are never compressed.
        assert_eq!(deflate_frame(&crate::wire::ping(&[b'a'; 100])), None);
    }

    #[test]
    fn a_frame_beyond_the_sessions_window_goes_plain() {
        let json = vec![b'a'; 600];
        let plain = crate::wire::text(&json);
        let twin = Twin::new(&plain);
        assert!(std::ptr::eq(twin.pick(9), &plain), "606 bytes > 512");
        assert!(!std::ptr::eq(twin.pick(10), &plain));
    }

    /// Bytes that hardly compress (a xorshift stream), and text that compresses well.
    fn samples() -> Vec<Vec<u8>> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut noise = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        let mut out = Vec::new();
        for len in [0, 1, 100, 4096, 32_767, 32_768, 40_000, 65_536, 131_072, 300_000] {
            out.push((0..len).map(|_| noise()).collect());
            out.push(b"the quick brown fox ".iter().copied().cycle().take(len).collect());
            // Mostly text with noise: long matches and literals mixed.
            out.push((0..len).map(|i| if i % 97 < 5 { noise() } else { b"abcdefgh"[i % 8] }).collect());
        }
        out
    }

    #[test]
    fn every_message_inflates_back_whole() {
        // Autobahn 12.2.9 / 12.5.*: a 64 KiB message that hardly compresses came back short
        // when inflation stopped at "input used up and output room left" with output still
        // pending inside the inflater.
        for data in samples() {
            let z = compress(&data).unwrap();
            let back = inflate(&z, 1 << 20).unwrap_or_else(|e| panic!("{} bytes: {e:?}", data.len()));
            assert!(back == data, "{} bytes came back as {}", data.len(), back.len());
            // Compressed at other levels, stored blocks (level 0, what zlib sends for noise) too.
            for level in [0, 9] {
                let mut c = Compress::new(Compression::new(level), false);
                let mut z = Vec::with_capacity(data.len() * 2 + 1024);
                c.compress_vec(&data, &mut z, FlushCompress::Sync).unwrap();
                assert_eq!(c.total_in() as usize, data.len());
                assert!(z.ends_with(&TAIL));
                z.truncate(z.len() - 4);
                let back = inflate(&z, 1 << 20).unwrap();
                assert!(back == data, "{} bytes at level {level} came back as {}", data.len(), back.len());
            }
        }
    }

    #[test]
    fn a_sync_flush_is_complete_whatever_the_input() {
        // Autobahn 12.2.9 / 12.5.*: 64 KiB slices of a bitmap and a PDF came back short.
        // When miniz_oxide's buffer of LZ codes filled on the input's last byte, one call
        // with the input and a sync flush returned without flushing. These lengths of this
        // noise did that (found by a sweep; each failed before the fix).
        for (mask, lens) in
            [(0x0f, [58_578, 58_579, 58_600]), (0x07, [59_259, 59_300, 60_000]), (0x1f, [58_384, 58_400, 58_500])]
        {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let noise: Vec<u8> = (0..61_000u32)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (i as u8).wrapping_mul(3) ^ (x as u8 & mask)
                })
                .collect();
            for len in lens {
                let z = compress(&noise[..len]).unwrap();
                // Inflated by our inflater and by flate2's streaming decoder.
                let back = inflate(&z, 1 << 20).map(|v| v.len());
                assert_eq!(back, Ok(len), "mask {mask:#x}, {len} bytes");
                let mut d = Decompress::new(false);
                let mut out = Vec::with_capacity(len + 1);
                d.decompress_vec(&[&z[..], &TAIL[..]].concat(), &mut out, FlushDecompress::Sync).unwrap();
                assert!(out == noise[..len], "mask {mask:#x}, {len} bytes: {}", out.len());
            }
        }
    }

    #[test]
    fn inflation_stops_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let z = compress(&zeros).unwrap();
        assert!(z.len() < 65536, "{}", z.len());
        assert_eq!(inflate(&z, 65536), Err(InflateError::TooBig));
        assert_eq!(inflate(&z, 10 << 20).map(|v| v.len()), Ok(10 << 20));
        // Exactly the limit is fine.
        let z = compress(&vec![b'x'; 1000]).unwrap();
        assert_eq!(inflate(&z, 1000).map(|v| v.len()), Ok(1000));
        assert_eq!(inflate(&z, 999), Err(InflateError::TooBig));
        assert_eq!(inflate(&[0xff, 0xff, 0xff], 1000), Err(InflateError::Invalid));
        assert_eq!(inflate(&[], 10).as_deref(), Ok(&b""[..]));
    }
}
