//! The positions an SSE event id (`id:`, sent back by the browser as
//! `Last-Event-ID`) and a long-poll cursor carry: for every channel followed, the
//! position of the last message (or subscribe ack) the client got.
//!
//! Format: `channel=seq@epoch` per channel, joined by `,`; `channel=-` when the
//! channel has no position yet. `%`, `,`, `=`, `@` in a channel name or an epoch are
//! percent-encoded (`%25`, `%2C`, `%3D`, `%40`). Channels keep the order in which
//! the request named them.

use std::fmt::Write;

use crate::protocol::{MAX_EPOCH_BYTES, Since, valid_channel};

/// Positions per channel, in the request's channel order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    entries: Vec<(String, Option<Since>)>,
}

/// Why an event id or cursor was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("not a list of channel=seq@epoch")]
    Syntax,
    #[error("a channel name is invalid")]
    Channel,
    #[error("an epoch is invalid")]
    Epoch,
}

fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ',' => out.push_str("%2C"),
            '=' => out.push_str("%3D"),
            '@' => out.push_str("%40"),
            c => out.push(c),
        }
    }
}

fn unescape(s: &str) -> Result<String, CursorError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(CursorError::Syntax)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| CursorError::Syntax)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| CursorError::Syntax)
}

fn valid_epoch(e: &str) -> bool {
    e.len() <= MAX_EPOCH_BYTES && e.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl Cursor {
    /// A cursor over `channels`, none with a position yet.
    pub fn new(channels: &[String]) -> Self {
        Self { entries: channels.iter().map(|c| (c.clone(), None)).collect() }
    }

    /// Parses an event id or cursor; an empty string is an empty cursor.
    pub fn parse(s: &str) -> Result<Self, CursorError> {
        let mut entries: Vec<(String, Option<Since>)> = Vec::new();
        if s.is_empty() {
            return Ok(Self { entries });
        }
        for part in s.split(',') {
            let (ch, pos) = part.split_once('=').ok_or(CursorError::Syntax)?;
            let ch = unescape(ch)?;
            if !valid_channel(&ch) {
                return Err(CursorError::Channel);
            }
            let since = match pos {
                "-" => None,
                pos => {
                    let (seq, epoch) = pos.split_once('@').ok_or(CursorError::Syntax)?;
                    let seq: u64 = seq.parse().map_err(|_| CursorError::Syntax)?;
                    let epoch = unescape(epoch)?;
                    if !valid_epoch(&epoch) {
                        return Err(CursorError::Epoch);
                    }
                    Some(Since { seq, epoch })
                }
            };
            if entries.iter().any(|(c, _)| *c == ch) {
                return Err(CursorError::Syntax);
            }
            entries.push((ch, since));
        }
        Ok(Self { entries })
    }

    /// The position given for `channel`, if any.
    pub fn get(&self, channel: &str) -> Option<&Since> {
        self.entries.iter().find(|(c, _)| c == channel).and_then(|(_, s)| s.as_ref())
    }

    /// Records `channel`'s position (a channel not followed yet is added at the end).
    pub fn set(&mut self, channel: &str, seq: u64, epoch: &str) {
        let since = Some(Since { seq, epoch: epoch.to_owned() });
        match self.entries.iter_mut().find(|(c, _)| c == channel) {
            Some(e) => e.1 = since,
            None => self.entries.push((channel.to_owned(), since)),
        }
    }

    /// The channels named, in order.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(c, _)| c.as_str())
    }

    /// Forgets `channel` (unsubscribed).
    pub fn remove(&mut self, channel: &str) {
        self.entries.retain(|(c, _)| c != channel);
    }

    /// Adds `channel` without a position, unless it is there already.
    pub fn follow(&mut self, channel: &str) {
        if !self.entries.iter().any(|(c, _)| c == channel) {
            self.entries.push((channel.to_owned(), None));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, (ch, since)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            escape(&mut out, ch);
            match since {
                None => out.push_str("=-"),
                Some(s) => {
                    let _ = write!(out, "={}@", s.seq);
                    escape(&mut out, &s.epoch);
                }
            }
        }
        out
    }

    /// Notes the position a server frame carries: a channel `message`, a subscribe
    /// `ack` with a position, a `gap`. True when it moved a position.
    pub fn observe(&mut self, frame: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Pos<'a> {
            seq: u64,
            #[serde(borrow)]
            epoch: std::borrow::Cow<'a, str>,
        }
        #[derive(serde::Deserialize)]
        struct Peek<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            #[serde(borrow, default)]
            channel: Option<std::borrow::Cow<'a, str>>,
            #[serde(default)]
            seq: Option<u64>,
            #[serde(borrow, default)]
            epoch: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow, default)]
            position: Option<Pos<'a>>,
            #[serde(borrow, default)]
            after: Option<Pos<'a>>,
            #[serde(default)]
            recovered: Option<bool>,
        }
        let Ok(p) = serde_json::from_slice::<Peek<'_>>(frame) else { return false };
        let Some(channel) = p.channel else { return false };
        if p.kind == "unsubscribed" {
            self.remove(&channel);
            return true;
        }
        // A complete recovery's ack names where the recovered messages will reach: the
        // position moves with each of them as it is delivered, not before.
        if p.kind == "ack" && p.recovered == Some(true) {
            self.follow(&channel);
            return false;
        }
        match (&*p.kind, p.seq, p.epoch, p.position, p.after) {
            ("message", Some(seq), Some(epoch), _, _) => {
                // Only forward: a channel's messages arrive in order.
                if self.get(&channel).is_some_and(|s| s.epoch == *epoch && s.seq >= seq) {
                    return false;
                }
                self.set(&channel, seq, &epoch);
                true
            }
            ("ack", _, _, Some(pos), _) if !pos.epoch.is_empty() => {
                // Live messages may have been queued before a copied ack: never back; but a
                // refused recovery's ack is where the stream now goes on from (`ahead`: a
                // position beyond the channel's, which must not stay).
                if p.recovered != Some(false)
                    && self.get(&channel).is_some_and(|s| s.epoch == *pos.epoch && s.seq >= pos.seq)
                {
                    return false;
                }
                self.set(&channel, pos.seq, &pos.epoch);
                true
            }
            ("gap", _, _, _, Some(after)) => {
                self.set(&channel, after.seq, &after.epoch);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_recovery_moves_a_position_back() {
        let mut c = Cursor::new(&["c".into()]);
        c.set("c", 9, "e");
        assert!(!c.observe(br#"{"type":"ack","channel":"c","position":{"seq":1,"epoch":"e"}}"#));
        assert_eq!(c.get("c").map(|s| s.seq), Some(9), "a plain ack never moves back");
        let ahead =
            br#"{"type":"ack","channel":"c","position":{"seq":1,"epoch":"e"},"recovered":false,"reason":"ahead"}"#;
        assert!(c.observe(ahead));
        assert_eq!(c.get("c").map(|s| s.seq), Some(1));
    }

    #[test]
    fn round_trips_with_awkward_names() {
        let mut c = Cursor::new(&["room:1".into(), "a,b=c@d%".into(), "news".into()]);
        c.set("room:1", 42, "s0123456789abcdef");
        c.set("a,b=c@d%", 7, "t@1,2");
        let s = c.encode();
        assert_eq!(s, "room:1=42@s0123456789abcdef,a%2Cb%3Dc%40d%25=7@t%401%2C2,news=-");
        assert_eq!(Cursor::parse(&s).unwrap(), c);
        assert_eq!(c.get("news"), None);
        assert_eq!(c.get("room:1").map(|s| s.seq), Some(42));
    }

    #[test]
    fn garbage_is_refused() {
        for bad in ["x", "a=", "a=1", "a=x@e", "=1@e", "a=1@e,a=2@e", "a b=1@e", "a=1@%zz", "a=-1@e"] {
            assert!(Cursor::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cursor::parse("").unwrap(), Cursor::default());
        assert_eq!(Cursor::parse(&format!("a=1@{}", "e".repeat(65))), Err(CursorError::Epoch));
    }

    #[test]
    fn frames_move_positions_forward_only() {
        let mut c = Cursor::new(&["c".into()]);
        assert!(c.observe(br#"{"type":"ack","channel":"c","position":{"seq":3,"epoch":"e"}}"#));
        assert!(c.observe(br#"{"type":"message","channel":"c","id":"x","from":"u","seq":5,"epoch":"e","data":{}}"#));
        assert!(!c.observe(br#"{"type":"message","channel":"c","id":"x","from":"u","seq":4,"epoch":"e","data":{}}"#));
        assert!(!c.observe(br#"{"type":"pong"}"#));
        assert_eq!(c.encode(), "c=5@e");
        assert!(c.observe(br#"{"type":"gap","channel":"c","after":{"seq":9,"epoch":"e"},"reason":"too_old"}"#));
        assert_eq!(c.encode(), "c=9@e");
        let recovered = br#"{"type":"ack","channel":"c","position":{"seq":20,"epoch":"e"},"recovered":true}"#;
        assert!(!c.observe(recovered), "moves with the recovered messages, not before");
        assert!(c.observe(br#"{"type":"ack","channel":"c","position":{"seq":30,"epoch":"f"},"recovered":false}"#));
        assert_eq!(c.encode(), "c=30@f");
        assert!(c.observe(br#"{"type":"unsubscribed","channel":"c"}"#));
        assert_eq!(c.encode(), "");
    }
}
