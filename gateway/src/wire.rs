//! Server-to-client WebSocket framing (RFC 6455 §5.2, unmasked), done once per
//! message so that a broadcast shares one encoded frame among every socket.

use bytes::{BufMut, Bytes, BytesMut};

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    framed(0x80 | opcode, payload)
}

/// A complete frame: first byte `b0` (FIN, RSV bits, opcode), then the length and
/// `payload` (unmasked).
pub(crate) fn framed(b0: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    buf.put_u8(b0);
    match payload.len() {
        n if n < 126 => buf.put_u8(n as u8),
        n if n < 65536 => {
            buf.put_u8(126);
            buf.put_u16(n as u16);
        }
        n => {
            buf.put_u8(127);
            buf.put_u64(n as u64);
        }
    }
    buf.put_slice(payload);
    buf.freeze()
}

/// A complete text frame carrying `json`.
pub fn text(json: &[u8]) -> Bytes {
    frame(OP_TEXT, json)
}

/// A complete binary frame (only the conformance echo route sends these).
pub fn binary(payload: &[u8]) -> Bytes {
    frame(OP_BINARY, payload)
}

/// A close frame with `code` and a reason (truncated to the 123 bytes allowed).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OP_CLOSE, &payload)
}

/// A ping frame.
pub fn ping(payload: &[u8]) -> Bytes {
    frame(OP_PING, payload)
}

/// A pong frame answering a ping.
pub fn pong(payload: &[u8]) -> Bytes {
    frame(OP_PONG, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_the_right_encoding() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let f = text(&[b'a'; 200]);
        assert_eq!(&f[..4], &[0x81, 126, 0, 200]);
        assert_eq!(f.len(), 204);
        let f = text(&vec![b'a'; 70_000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn close_reason_is_truncated_on_a_char_boundary() {
        let f = close(4002, &"é".repeat(100));
        assert_eq!(f[0], 0x88);
        let len = usize::from(f[1]);
        assert!(len <= 125);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4002);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
