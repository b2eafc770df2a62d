//! Client frame reader. It replaces fastwebsockets' read half, which allocates
//! an 8 KiB buffer per connection up front and keeps it for the connection's
//! life: here the read buffer exists only while a frame is incomplete, so an
//! idle session holds no read buffer at all. RFC 6455 framing rules are
//! checked from the header, before any payload is buffered.

use std::io;

use std::sync::Arc;

use tokio::net::TcpStream;

pub(super) const CONTINUATION: u8 = 0x0;
pub(super) const TEXT: u8 = 0x1;
pub(super) const BINARY: u8 = 0x2;
pub(super) const CLOSE: u8 = 0x8;
pub(super) const PING: u8 = 0x9;
pub(super) const PONG: u8 = 0xA;

/// Bytes read from the socket at a time (on the stack of the read call, not in the session).
const CHUNK: usize = 4096;

/// A complete client frame, unmasked.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Frame {
    pub(super) fin: bool,
    /// RSV1: a compressed message's first frame (permessage-deflate only).
    pub(super) rsv1: bool,
    pub(super) opcode: u8,
    pub(super) payload: Vec<u8>,
}

/// Why reading stopped.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadError {
    /// A framing violation: close with 1002 and this reason.
    Protocol(&'static str),
    /// The frame is larger than allowed: close with 1009.
    TooBig,
    /// The peer closed the TCP connection or it failed.
    Gone,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    header: usize,
    len: usize,
}

/// Parses the header at the start of `buf`; `Ok(None)` when more bytes are needed.
/// `limit` is the largest payload this frame may have if it is a data frame.
/// `deflate`: permessage-deflate was negotiated, so RSV1 may mark the first frame
/// of a data message (RFC 7692 §6: never a control frame or a continuation).
fn head(buf: &[u8], limit: usize, deflate: bool) -> Result<Option<Head>, ReadError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let opcode = b0 & 0x0f;
    let rsv1 = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (rsv1 && !(deflate && matches!(opcode, TEXT | BINARY))) {
        return Err(ReadError::Protocol("reserved bits set"));
    }
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err(ReadError::Protocol("reserved opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("unmasked client frame"));
    }
    let fin = b0 & 0x80 != 0;
    let (len, at) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().unwrap_or_default()), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode >= CLOSE {
        if !fin {
            return Err(ReadError::Protocol("fragmented control frame"));
        }
        if len > 125 {
            return Err(ReadError::Protocol("control frame over 125 bytes"));
        }
    }
    // Also covers a 64-bit length with its top bit set (over any limit).
    if opcode < CLOSE && len > limit as u64 {
        return Err(ReadError::TooBig);
    }
    let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
    let mask = [mask[0], mask[1], mask[2], mask[3]];
    Ok(Some(Head { fin, rsv1, opcode, mask, header: at + 4, len: len as usize }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Takes the first complete frame off `buf[*pos..]`, advancing `pos`.
fn take(buf: &[u8], pos: &mut usize, limit: usize, deflate: bool) -> Result<Option<Frame>, ReadError> {
    let rest = &buf[*pos..];
    let Some(h) = head(rest, limit, deflate)? else { return Ok(None) };
    let end = h.header + h.len;
    if rest.len() < end {
        return Ok(None);
    }
    let mut payload = rest[h.header..end].to_vec();
    unmask(&mut payload, h.mask);
    *pos += end;
    Ok(Some(Frame { fin: h.fin, rsv1: h.rsv1, opcode: h.opcode, payload }))
}

/// Reads frames from the client half of a session.
#[derive(Debug)]
pub(super) struct Reader {
    read: Arc<TcpStream>,
    /// Unconsumed bytes are `buf[pos..]`; empty (no allocation) between frames.
    buf: Vec<u8>,
    pos: usize,
}

impl Reader {
    /// `leftover`: bytes the HTTP layer read past the upgrade request.
    pub(super) fn new(read: Arc<TcpStream>, leftover: &[u8]) -> Self {
        Self { read, buf: leftover.to_vec(), pos: 0 }
    }

    /// The next frame, whose payload may be at most `limit` bytes; `deflate`: RSV1
    /// may be set (permessage-deflate was negotiated).
    pub(super) async fn next(&mut self, limit: usize, deflate: bool) -> Result<Frame, ReadError> {
        loop {
            if let Some(f) = take(&self.buf, &mut self.pos, limit, deflate)? {
                if self.pos == self.buf.len() {
                    // Nothing buffered: give the memory back.
                    self.buf = Vec::new();
                    self.pos = 0;
                }
                return Ok(f);
            }
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            self.fill().await?;
        }
    }

    /// Reads and drops whatever the peer still sends, until EOF, an error or `limit`
    /// elapses: after our close frame, so that the socket is not closed with unread
    /// input (which the kernel answers with a reset, and the peer's kernel then
    /// discards what it had not yet read, our close frame included).
    pub(super) async fn discard(&mut self, limit: std::time::Duration) {
        self.buf = Vec::new();
        self.pos = 0;
        let drain = async {
            let mut chunk = [0u8; CHUNK];
            loop {
                if self.read.readable().await.is_err() {
                    return;
                }
                match self.read.try_read(&mut chunk) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(limit, drain).await;
    }

    async fn fill(&mut self) -> Result<(), ReadError> {
        loop {
            self.read.readable().await.map_err(|_| ReadError::Gone)?;
            match try_fill(&self.read, &mut self.buf) {
                Ok(0) => return Err(ReadError::Gone),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(ReadError::Gone),
            }
        }
    }
}

/// One non-blocking read appended to `buf` (the chunk lives on this call's stack).
fn try_fill(read: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; CHUNK];
    let n = read.try_read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    use switchboard_tests::ws::masked_frame as masked;

    fn all(buf: &[u8], limit: usize) -> Result<Vec<Frame>, ReadError> {
        let mut pos = 0;
        let mut out = Vec::new();
        while let Some(f) = take(buf, &mut pos, limit, false)? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn frames_of_every_length_encoding_unmask() {
        for len in [0, 1, 5, 125, 126, 65535, 65536, 70_001] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let buf = masked(0x81, &payload, [1, 2, 3, 0xfe]);
            let f = all(&buf, 1 << 20).unwrap();
            assert_eq!(f, vec![Frame { fin: true, rsv1: false, opcode: TEXT, payload }], "len {len}");
        }
    }

    #[test]
    fn several_frames_in_one_read_and_a_partial_one_waits() {
        let mut buf = masked(0x01, b"ab", [9, 9, 9, 9]);
        buf.extend(masked(0x80, b"cd", [7, 0, 7, 0]));
        let third = masked(0x89, b"ping", [1, 1, 1, 1]);
        buf.extend_from_slice(&third[..3]);
        let mut pos = 0;
        assert_eq!(take(&buf, &mut pos, 100, false).unwrap().unwrap().payload, b"ab");
        let f = take(&buf, &mut pos, 100, false).unwrap().unwrap();
        assert_eq!((f.fin, f.opcode, f.payload.as_slice()), (true, CONTINUATION, &b"cd"[..]));
        assert_eq!(take(&buf, &mut pos, 100, false).unwrap(), None);
        assert_eq!(buf.len() - pos, 3);
    }

    #[test]
    fn violations_are_refused_from_the_header() {
        let cases: Vec<(Vec<u8>, ReadError)> = vec![
            (vec![0xC1, 0x80], ReadError::Protocol("reserved bits set")),
            (vec![0x83, 0x80], ReadError::Protocol("reserved opcode")),
            (vec![0x8B, 0x80], ReadError::Protocol("reserved opcode")),
            (vec![0x81, 0x00], ReadError::Protocol("unmasked client frame")),
            (vec![0x09, 0x80], ReadError::Protocol("fragmented control frame")),
            (vec![0x89, 0x80 | 126, 0, 126], ReadError::Protocol("control frame over 125 bytes")),
            (vec![0x81, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0], ReadError::TooBig),
            (vec![0x81, 0x80 | 127, 0, 0, 0, 0, 0x06, 0x40, 0, 0], ReadError::TooBig),
            (vec![0x81, 0x80 | 126, 0x04, 0x01], ReadError::TooBig),
        ];
        for (buf, want) in cases {
            // Only the header: nothing of the payload is needed to decide.
            assert_eq!(head(&buf, 1024, false), Err(want), "{buf:02x?}");
        }
        // With permessage-deflate, RSV1 is allowed on a data message's first frame only.
        assert!(head(&[0xC1, 0x80, 0, 0, 0, 0], 1024, true).unwrap().unwrap().rsv1);
        assert!(head(&[0x42, 0x80, 0, 0, 0, 0], 1024, true).unwrap().unwrap().rsv1);
        for buf in [[0xC0, 0x80], [0xC9, 0x80], [0xA1, 0x80], [0x91, 0x80]] {
            assert_eq!(head(&buf, 1024, true), Err(ReadError::Protocol("reserved bits set")), "{buf:02x?}");
        }
        // Exactly the limit is fine.
        assert!(all(&masked(0x81, &[b' '; 1024], [0; 4]), 1024).is_ok());
    }

    #[test]
    fn incomplete_headers_wait() {
        for buf in [&[][..], &[0x81], &[0x81, 0x80 | 126, 0], &[0x81, 0x80 | 127, 0, 0, 0], &[0x81, 0x85, 1, 2]] {
            assert_eq!(head(buf, 1024, false), Ok(None), "{buf:02x?}");
        }
    }
}
