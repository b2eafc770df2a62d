//! Subscribing at a position (docs/protocol.md "Positions and recovery").
//!
//! The session is first put in the channel's recovering list (live frames for it
//! are held back), then the history after its `since` is read in full, up to the
//! recovery limit, before the ack says `recovered: true` (or `false` and why:
//! never a partial stream presented as complete). The missed messages are then
//! queued in order, paced by the client's reading, and the held live frames newer
//! than the last one sent follow. In a cluster the history comes from
//! broker-bridge and the live stream through another path, so before the session
//! becomes a plain subscriber the hub checks that the first held frame follows the
//! history read; when it may not, the span between is read too.
//!
//! A subscribe without `since` is the same with nothing to recover: the ack
//! carries the channel's position, from which a later reconnect resumes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;

use super::Node;
use super::commands::Out;
use crate::history::{Item, Lost, Page, Position};
use crate::hub::{Finish, SessionHandle};
use crate::metrics as m;
use crate::protocol::{self, Since};
use crate::wire;

/// Bytes of missed messages one recovery may hold while it is read.
pub(super) const RECOVERY_MAX_BYTES: usize = 16 << 20;
/// How long a recovery waits for proof that the cluster routes a channel new to
/// this node here (its first live message) before it relies on the route.
const ROUTE_SETTLE: Duration = Duration::from_secs(1);
/// Rounds of "read the span before the first held frame" before giving up with a gap.
const FINISH_ROUNDS: usize = 16;
/// Pause before reading a span again when the last read made no progress (so the
/// rounds cover about 400 ms of a lagging position, not a few microseconds).
const STALE_READ_RETRY: Duration = Duration::from_millis(25);

/// Subscribes `handle` to `channel` (already counted in the session's state),
/// recovering from `since` when given, and sends the ack.
pub(crate) async fn subscribe(
    node: &Node,
    out: &Out<'_>,
    r: Option<&RawValue>,
    channel: &Arc<str>,
    since: Option<Since>,
) {
    let handle = out.handle;
    let Some(local) = node.hub.subscribe_recovering(handle, channel) else {
        out.reply(protocol::subscribed(r, channel, None, None));
        return;
    };
    if handle.ctl.in_presence() {
        node.presence.subscribed(handle.id, channel);
    }
    let gapless = node.bus.gapless();
    let local_epoch = local.epoch.clone();
    let since = since.map(|s| Position { seq: s.seq, epoch: Arc::from(s.epoch) });
    let max = node.config.recovery_max;
    let (items, mut position, lost) = match &since {
        None if gapless => (Vec::new(), Some(local.clone()), None),
        // The bridge's position may be a watermark up to 250 ms old; the channel's last live
        // frame here, when newer, is closer to where the subscription took effect (and what
        // this session was shown before, if it was subscribed then, is not shown again).
        None => match node.bus.history(channel, None, 0, true).await {
            Ok(page) => (Vec::new(), page.position.map(|p| newest(p, &local)), None),
            Err(_) => (Vec::new(), None, None),
        },
        Some(since) => read_all(&*node.bus, max, channel, since).await,
    };
    if lost == Some(Lost::TooMany) {
        // The live stream starts where the subscription took effect, not where the read stopped.
        position = if gapless {
            Some(local)
        } else {
            node.bus.history(channel, None, 0, true).await.ok().and_then(|p| p.position)
        };
    }
    let outcome = match (&since, lost) {
        (None, _) => "none",
        (Some(_), None) => "recovered",
        (Some(_), Some(l)) => l.as_str(),
    };
    metrics::counter!(m::RECOVERIES, "outcome" => outcome).increment(1);
    out.reply(protocol::subscribed(r, channel, position.as_ref(), since.as_ref().map(|_| lost)));
    // What the session was sent is complete through `through`: its since plus what
    // was recovered, or the position it was given.
    let through = match (&since, lost) {
        (Some(s), None) => items.last().map_or(s.seq, |i| i.seq).max(position.as_ref().map_or(0, |p| p.seq)),
        // Nothing could be read (`unavailable`): the client has everything through its
        // since, so a held frame at or before it would be shown twice; when this node's
        // stream is in another epoch, every held frame goes (none is known to be seen).
        (Some(s), Some(_)) if position.is_none() && *local_epoch == *s.epoch => s.seq,
        _ => position.as_ref().map_or(0, |p| p.seq),
    };
    let epoch = position.as_ref().map(|p| p.epoch.clone()).or_else(|| since.as_ref().map(|s| s.epoch.clone()));
    if !send(handle, &items).await {
        return;
    }
    let (None, Some(epoch)) = (lost, epoch.clone()) else {
        // Nothing to line up with: the live stream goes on from here.
        node.hub.abandon_recovery(handle.id, channel, (through, epoch.as_deref()));
        return;
    };
    let mut handover = Handover {
        hub: node.hub.clone(),
        bus: node.bus.clone(),
        max,
        handle: handle.clone(),
        channel: channel.clone(),
        epoch,
        through,
        gapless,
        asked: since.is_some(),
    };
    // Usually done at once; a wait for proof of the cluster's route runs beside the
    // session, so that its other commands are not held up.
    if let Some(notify) = handover.run(false).await {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(ROUTE_SETTLE, notify.notified()).await;
            handover.run(true).await;
        });
    }
}

/// The later of two positions of one stream (`a` when their epochs differ).
fn newest(a: Position, b: &Position) -> Position {
    if a.epoch == b.epoch && b.seq > a.seq { b.clone() } else { a }
}

/// The end of a recovery: lining the held live frames up with what was sent.
struct Handover {
    hub: Arc<crate::hub::Hub>,
    bus: Arc<dyn crate::bus::Bus>,
    max: usize,
    handle: SessionHandle,
    channel: Arc<str>,
    epoch: Arc<str>,
    /// What the session was sent is complete through this seq.
    through: u64,
    gapless: bool,
    /// The client asked to recover (a `gap` is reported); else it only subscribed.
    asked: bool,
}

impl Handover {
    /// Hands over; returns what to wait on when the route is not proven yet (only
    /// when not `settled`).
    async fn run(&mut self, settled: bool) -> Option<Arc<tokio::sync::Notify>> {
        let id = self.handle.id;
        for _ in 0..FINISH_ROUNDS {
            match self.hub.finish_recovery(id, &self.channel, (self.through, Some(&self.epoch)), self.gapless, settled)
            {
                Finish::Done => return None,
                Finish::Wait(notify) => return Some(notify),
                Finish::EpochChanged => {
                    self.lost(Lost::EpochChanged);
                    return None;
                }
                Finish::More { since } => {
                    let from = Position { seq: since, epoch: self.epoch.clone() };
                    let (items, position, lost) = read_all(&*self.bus, self.max, &self.channel, &from).await;
                    if let Some(lost) = lost {
                        self.through = self.through.max(since);
                        self.lost(lost);
                        return None;
                    }
                    let fresh: Vec<Item> = items.into_iter().filter(|i| i.seq > self.through).collect();
                    if !send(&self.handle, &fresh).await {
                        return None;
                    }
                    let before = self.through;
                    self.through =
                        fresh.last().map_or(self.through, |i| i.seq).max(position.map_or(0, |p| p.seq)).max(since);
                    if self.through == before {
                        // The read is still behind what this node already delivered live (a
                        // position that lags): give it a moment rather than spin the rounds.
                        tokio::time::sleep(STALE_READ_RETRY).await;
                    }
                }
            }
        }
        self.lost(Lost::TooMany);
        None
    }

    /// What follows `through` cannot be read: tell a client that asked to recover
    /// (`gap`), and go live.
    fn lost(&self, lost: Lost) {
        if self.asked {
            metrics::counter!(m::RECOVERY_GAPS, "reason" => lost.as_str()).increment(1);
            let after = Position { seq: self.through, epoch: self.epoch.clone() };
            reply(&self.handle, protocol::gap(&self.channel, &after, lost));
        }
        self.hub.abandon_recovery(self.handle.id, &self.channel, (self.through, Some(&self.epoch)));
    }
}

/// Reads every message after `since`, page by page, up to the recovery limits.
async fn read_all(
    bus: &dyn crate::bus::Bus,
    max: usize,
    channel: &str,
    since: &Position,
) -> (Vec<Item>, Option<Position>, Option<Lost>) {
    let mut items: Vec<Item> = Vec::new();
    let mut bytes = 0;
    let mut cursor = since.clone();
    loop {
        let page: Page = match bus.history(channel, Some(&cursor), crate::history::PAGE_MAX, false).await {
            Ok(p) => p,
            Err(_) => return (Vec::new(), None, Some(Lost::Unavailable)),
        };
        if let Some(lost) = page.lost {
            return (Vec::new(), page.position, Some(lost));
        }
        for item in page.items {
            if item.seq > cursor.seq {
                bytes += item.frame.len();
                cursor.seq = item.seq;
                items.push(item);
            }
        }
        if items.len() > max || bytes > RECOVERY_MAX_BYTES {
            return (Vec::new(), page.position, Some(Lost::TooMany));
        }
        if !page.more {
            return (items, page.position, None);
        }
    }
}

/// Queues `items` in order, each after there is room (paced by the client's
/// reading); false when the session closes meanwhile.
async fn send(handle: &SessionHandle, items: &[Item]) -> bool {
    for item in items {
        let room = tokio::select! {
            biased;
            room = handle.outbox.room() => room && handle.ctl.requested().is_none(),
            () = handle.ctl.wait() => false,
        };
        if !room || !handle.deliver(&item.frame) {
            return false;
        }
    }
    true
}

fn reply(handle: &SessionHandle, frame: Vec<u8>) {
    handle.deliver(&wire::text(&frame));
}
