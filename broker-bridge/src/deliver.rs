//! Deliver: one long-lived gRPC stream per gateway node. Items are sent in
//! the order they were consumed, kept until the gateway acknowledges them, and
//! sent again on a new stream after a break (the gateway drops duplicates). A
//! gateway that acknowledges nothing for the delivery timeout, or that presence
//! reports gone, is given up on for what it had pending.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kit::grpc::Bearer;
use parking_lot::Mutex;
use proto::bridge::v1 as pb;
use proto::bridge::v1::delivery_client::DeliveryClient;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::offsets::{RecordRef, Tracker};
use crate::route::NodeChange;

/// Items queued per gateway before the consumer waits.
const LINK_QUEUE: usize = 4096;
/// Items per gRPC message.
const BATCH: usize = 256;

/// One message for one gateway.
#[derive(Debug, Clone)]
pub struct Item {
    pub envelope: Arc<pb::Envelope>,
    pub channel_seq: u64,
    /// For channel messages: the epoch `channel_seq` counts in.
    pub epoch: Option<Arc<str>>,
    pub record: RecordRef,
}

/// Marks deliveries complete in the offset tracker.
#[derive(Debug, Clone)]
pub struct Completer {
    pub tracker: Arc<Mutex<Tracker>>,
    pub progress: Arc<Notify>,
}

impl Completer {
    fn complete(&self, r: RecordRef) {
        self.tracker.lock().done(r);
        self.progress.notify_waiters();
    }

    fn give_up(&self, items: impl IntoIterator<Item = Item>) {
        let mut n = 0;
        for it in items {
            self.complete(it.record);
            n += 1;
        }
        if n > 0 {
            metrics::counter!(m::GIVEN_UP).increment(n);
        }
    }
}

#[derive(Debug)]
struct LinkHandle {
    addr: String,
    tx: mpsc::Sender<Item>,
    cancel: CancellationToken,
}

/// Every gateway stream of this bridge.
#[derive(Debug)]
pub struct Links {
    links: Mutex<HashMap<Arc<str>, LinkHandle>>,
    completer: Completer,
    timeout: Duration,
    stop: CancellationToken,
    bearer: Bearer,
}

impl Links {
    pub fn new(completer: Completer, timeout: Duration, stop: CancellationToken, bearer: Bearer) -> Self {
        Self { links: Mutex::new(HashMap::new()), completer, timeout, stop, bearer }
    }

    /// Queues `item` for `node` (opening its stream if needed); waits while its queue is full.
    pub async fn send(&self, node: &Arc<str>, addr: &str, item: Item) {
        let tx = {
            let mut links = self.links.lock();
            let stale = links.get(node).is_some_and(|l| l.addr != addr || l.tx.is_closed());
            if stale && let Some(old) = links.remove(node) {
                old.cancel.cancel();
            }
            links
                .entry(node.clone())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(LINK_QUEUE);
                    let cancel = self.stop.child_token();
                    tokio::spawn(link_task(
                        node.clone(),
                        addr.to_owned(),
                        rx,
                        self.completer.clone(),
                        cancel.clone(),
                        self.timeout,
                        self.bearer.clone(),
                    ));
                    LinkHandle { addr: addr.to_owned(), tx, cancel }
                })
                .tx
                .clone()
        };
        if let Err(e) = tx.send(item).await {
            self.completer.give_up([e.0]);
        }
    }

    /// A node left or moved: its stream is closed and its pending deliveries given up.
    pub fn node_change(&self, change: &NodeChange) {
        let mut links = self.links.lock();
        let node = match change {
            NodeChange::Down { node } => node,
            NodeChange::Up { node, delivery_addr } => {
                if links.get(node).is_none_or(|l| &l.addr == delivery_addr) {
                    return;
                }
                node
            }
        };
        if let Some(old) = links.remove(node) {
            old.cancel.cancel();
        }
    }
}

/// Why a stream ended.
enum Ended {
    Cancelled,
    Broken,
}

async fn link_task(
    node: Arc<str>,
    addr: String,
    mut rx: mpsc::Receiver<Item>,
    done: Completer,
    cancel: CancellationToken,
    timeout: Duration,
    bearer: Bearer,
) {
    metrics::gauge!(m::GATEWAY_LINKS).increment(1.0);
    let mut pending: VecDeque<(u64, Item)> = VecDeque::new();
    let mut next_seq = 1u64;
    // Since when pending items have seen no acknowledgement.
    let mut stalled_since: Option<Instant> = None;
    let mut delay = Duration::from_millis(50);
    loop {
        let ended =
            stream(&addr, &mut rx, &mut pending, &mut next_seq, &mut stalled_since, &done, &cancel, timeout, &bearer)
                .await;
        if matches!(ended, Ended::Cancelled) {
            break;
        }
        tracing::debug!(node = %node, addr = %addr, pending = pending.len(), "delivery stream broke");
        // Disconnected: keep taking items (so one dead gateway cannot stall the
        // consumer) until the delivery timeout, then give them up.
        let retry_at = Instant::now() + delay.mul_f64(rand::random_range(0.5..1.5));
        delay = (delay * 2).min(Duration::from_secs(2));
        loop {
            if stalled_since.is_some_and(|s| s.elapsed() >= timeout) {
                done.give_up(pending.drain(..).map(|(_, it)| it));
            }
            if pending.is_empty() {
                stalled_since = None;
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(retry_at) => break,
                item = rx.recv() => match item {
                    Some(it) => {
                        stalled_since.get_or_insert_with(Instant::now);
                        pending.push_back((next_seq, it));
                        next_seq += 1;
                    }
                    None => break,
                },
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    // Gone for good: everything pending or queued is given up.
    rx.close();
    done.give_up(pending.drain(..).map(|(_, it)| it));
    let mut rest = Vec::new();
    while let Ok(it) = rx.try_recv() {
        rest.push(it);
    }
    done.give_up(rest);
    metrics::gauge!(m::GATEWAY_LINKS).decrement(1.0);
}

fn delivered(seq: u64, it: &Item) -> pb::Delivered {
    pb::Delivered {
        seq,
        envelope: Some((*it.envelope).clone()),
        channel_seq: it.channel_seq,
        epoch: it.epoch.as_deref().unwrap_or_default().to_owned(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    addr: &str,
    rx: &mut mpsc::Receiver<Item>,
    pending: &mut VecDeque<(u64, Item)>,
    next_seq: &mut u64,
    stalled_since: &mut Option<Instant>,
    done: &Completer,
    cancel: &CancellationToken,
    timeout: Duration,
    bearer: &Bearer,
) -> Ended {
    let Ok(ep) = bearer.endpoint(addr) else { return Ended::Broken };
    let ep = ep.connect_timeout(Duration::from_secs(1)).http2_keep_alive_interval(Duration::from_secs(5));
    let channel = tokio::select! {
        () = cancel.cancelled() => return Ended::Cancelled,
        c = ep.connect() => match c { Ok(c) => c, Err(_) => return Ended::Broken },
    };
    let mut client = DeliveryClient::new(bearer.channel(channel)).max_encoding_message_size(64 << 20);
    let (out, out_rx) = mpsc::channel::<pb::DeliveryBatch>(64);
    let mut acks = match client.deliver(ReceiverStream::new(out_rx)).await {
        Ok(r) => r.into_inner(),
        Err(_) => return Ended::Broken,
    };
    // Everything not acknowledged goes again, first, in order.
    let mut unsent: VecDeque<pb::Delivered> = pending.iter().map(|(s, it)| delivered(*s, it)).collect();
    if !unsent.is_empty() {
        metrics::counter!(m::REDELIVERIES).increment(unsent.len() as u64);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ended::Cancelled,
            ack = acks.message() => match ack {
                Ok(Some(a)) => {
                    let mut n = 0;
                    while pending.front().is_some_and(|(s, _)| *s <= a.seq) {
                        if let Some((_, it)) = pending.pop_front() {
                            done.complete(it.record);
                            n += 1;
                        }
                    }
                    metrics::counter!(m::DELIVERED).increment(n);
                    *stalled_since = (!pending.is_empty()).then(Instant::now);
                }
                Ok(None) | Err(_) => return Ended::Broken,
            },
            permit = out.reserve(), if !unsent.is_empty() => {
                let Ok(permit) = permit else { return Ended::Broken };
                let n = unsent.len().min(BATCH);
                permit.send(pb::DeliveryBatch { items: unsent.drain(..n).collect() });
            }
            item = rx.recv(), if unsent.len() < BATCH * 4 => {
                let Some(it) = item else { return Ended::Cancelled };
                let mut batch = vec![it];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(it) => batch.push(it),
                        Err(_) => break,
                    }
                }
                for it in batch {
                    unsent.push_back(delivered(*next_seq, &it));
                    pending.push_back((*next_seq, it));
                    *next_seq += 1;
                }
                stalled_since.get_or_insert_with(Instant::now);
            }
            _ = tick.tick() => {
                if stalled_since.is_some_and(|s| s.elapsed() >= timeout) {
                    // Connected but silent (e.g. SIGSTOP): give up what is pending and reconnect.
                    done.give_up(pending.drain(..).map(|(_, it)| it));
                    *stalled_since = None;
                    return Ended::Broken;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_delivery_carries_its_epoch() {
        let record = RecordRef { partition: 2, offset: 41, generation: 1 };
        let envelope = Arc::new(pb::Envelope { id: "m".into(), ..Default::default() });
        let it = Item { envelope: envelope.clone(), channel_seq: 42, epoch: Some("kAbc.2".into()), record };
        let d = delivered(7, &it);
        assert_eq!((d.seq, d.channel_seq, d.epoch.as_str()), (7, 42, "kAbc.2"));
        assert_eq!(d.envelope.unwrap().id, "m");
        let direct = Item { envelope, channel_seq: 0, epoch: None, record };
        assert_eq!(delivered(8, &direct).epoch, "");
    }
}
