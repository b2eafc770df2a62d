//! The history checker of the chaos runs: reads what a workload did and was shown (one
//! [`Event`] per line of a JSON-lines file) and reports every violation of what
//! docs/design.md and docs/protocol.md promise, by kind.
//!
//! The promises it judges, per channel and logical client (a client keeps its name across
//! reconnects; its subscription to a channel is one *chain* from a subscribe without
//! `since`, or a `recovered: false`, through every resume with `recovered: true`, to its
//! unsubscribe or the end of the run):
//! - **lost**: an acknowledged publish after the chain's start that the client was never
//!   shown and never told it missed (`gap`, `recovered: false`). A chain still open when
//!   the run went [`Event::Quiet`] (faults stopped, everything delivered) owes every
//!   acknowledged publish; a chain that ended earlier owes every one up to the last
//!   position it was shown (what was in flight when it ended is not owed).
//! - **incomplete_recovery**: such a loss inside the range a `recovered: true` promised.
//! - **duplicate**: one position, or one message, shown twice to one client.
//! - **backwards**: a client shown a position not above the previous one in its chain.
//! - **divergent**: one position carrying different messages (acks and deliveries
//!   disagree), so two subscribers saw the channel in different orders.
//! - **order**: a publish that started after another's ack got a lower position.
//! - **stored_twice**: one idempotency key acknowledged as two different messages (two
//!   ids; one id stored at two positions, as a retry on another bridge may, is one
//!   message that gateways show once).
//! - **phantom**: a message shown that no publish sent, or whose publish was refused
//!   as not stored (an unambiguous error).
//! - **direct_lost** / **direct_duplicate**: an acknowledged direct message that a
//!   connection of its user, open from [`ROUTE_SETTLE`] before the send to the end, did not
//!   get once (direct messages have no recovery; a connection newer than that may not be
//!   known to the bridges' routing yet).
//! - **presence**: after the quiet point, a presence query whose members are not the
//!   users connected and subscribed to that channel.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// How long a new connection may take to be known to the bridges' routing (presence's
/// Watch stream), before a direct message to its user must reach it.
pub const ROUTE_SETTLE: u64 = 1000;

/// A point in a channel's stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Pos {
    pub seq: u64,
    pub epoch: String,
}

/// How a publish or a send ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged; a channel publish names its position (a publish ack carries no epoch:
    /// an empty `epoch` is the channel's, when the history shows it only one) and the
    /// message id the gateway gave it.
    Ack {
        #[serde(default)]
        pos: Option<Pos>,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        duplicate: bool,
    },
    /// Refused. `ambiguous` means it may have been stored anyway.
    Error { code: String, ambiguous: bool },
    /// No answer (the connection ended or the client gave up): may have been stored.
    Unknown,
}

/// How a subscribe ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum SubOutcome {
    /// `pos` is absent when the gateway could not say where the stream is (its bridge did
    /// not answer: a plain subscribe, or a resume answered `recovered: false` with reason
    /// `unavailable`).
    Ack {
        #[serde(default)]
        pos: Option<Pos>,
        #[serde(default)]
        recovered: Option<bool>,
        #[serde(default)]
        reason: Option<String>,
    },
    Error {
        code: String,
    },
}

/// One line of a history. `t` is milliseconds since the run started; `done` the time
/// the answer came. Events of one client are in the order that client saw them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Event {
    /// A connection of `client` (as `user`) was welcomed.
    Connected {
        t: u64,
        client: String,
        user: String,
    },
    /// That connection ended (any close code, or a reset: `code` 1006).
    Closed {
        t: u64,
        client: String,
        code: u16,
    },
    /// A channel publish. `msg` names the message (a retry keeps it and its key).
    Publish {
        t: u64,
        done: u64,
        client: String,
        channel: String,
        msg: String,
        #[serde(default)]
        key: Option<String>,
        outcome: Outcome,
    },
    Subscribe {
        t: u64,
        client: String,
        channel: String,
        #[serde(default)]
        since: Option<Pos>,
        outcome: SubOutcome,
    },
    Unsubscribe {
        t: u64,
        client: String,
        channel: String,
    },
    /// A channel message shown to `client`.
    Deliver {
        t: u64,
        client: String,
        channel: String,
        pos: Pos,
        msg: String,
    },
    /// A `gap` frame: messages after `after` may be missing.
    Gap {
        t: u64,
        client: String,
        channel: String,
        after: Pos,
        reason: String,
    },
    /// A direct message to `user`.
    Send {
        t: u64,
        done: u64,
        client: String,
        user: String,
        msg: String,
        outcome: Outcome,
    },
    /// A direct message shown to `client`.
    Direct {
        t: u64,
        client: String,
        msg: String,
    },
    /// Faults have stopped and the workload has waited for everything in flight.
    Quiet {
        t: u64,
    },
    /// The members a presence query on `channel` answered, after [`Event::Quiet`].
    Presence {
        t: u64,
        client: String,
        channel: String,
        members: Vec<String>,
    },
}

impl Event {
    /// Its `op`, as in the history file.
    pub fn op(&self) -> &'static str {
        match self {
            Event::Connected { .. } => "connected",
            Event::Closed { .. } => "closed",
            Event::Publish { .. } => "publish",
            Event::Subscribe { .. } => "subscribe",
            Event::Unsubscribe { .. } => "unsubscribe",
            Event::Deliver { .. } => "deliver",
            Event::Gap { .. } => "gap",
            Event::Send { .. } => "send",
            Event::Direct { .. } => "direct",
            Event::Quiet { .. } => "quiet",
            Event::Presence { .. } => "presence",
        }
    }
}

/// The kinds of violation, as counted in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Lost,
    IncompleteRecovery,
    Duplicate,
    Backwards,
    Divergent,
    Order,
    StoredTwice,
    Phantom,
    DirectLost,
    DirectDuplicate,
    Presence,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Lost,
        Kind::IncompleteRecovery,
        Kind::Duplicate,
        Kind::Backwards,
        Kind::Divergent,
        Kind::Order,
        Kind::StoredTwice,
        Kind::Phantom,
        Kind::DirectLost,
        Kind::DirectDuplicate,
        Kind::Presence,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Lost => "lost",
            Kind::IncompleteRecovery => "incomplete_recovery",
            Kind::Duplicate => "duplicate",
            Kind::Backwards => "backwards",
            Kind::Divergent => "divergent",
            Kind::Order => "order",
            Kind::StoredTwice => "stored_twice",
            Kind::Phantom => "phantom",
            Kind::DirectLost => "direct_lost",
            Kind::DirectDuplicate => "direct_duplicate",
            Kind::Presence => "presence",
        }
    }
}

/// One violation: its kind and what shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: Kind,
    pub detail: String,
}

/// What [`check`] found.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Operations by kind (`publish`, `deliver`, …).
    pub operations: BTreeMap<String, u64>,
    pub violations: Vec<Violation>,
}

impl Report {
    /// How many violations of each kind (every kind listed, zeros included).
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut c: BTreeMap<&'static str, usize> = Kind::ALL.iter().map(|k| (k.name(), 0)).collect();
        for v in &self.violations {
            *c.entry(v.kind.name()).or_default() += 1;
        }
        c
    }

    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(move |v| v.kind == kind)
    }

    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: Vec<String> = self.operations.iter().map(|(k, n)| format!("{k}={n}")).collect();
        writeln!(f, "operations: {}", ops.join(" "))?;
        let counts: Vec<String> = self.counts().iter().map(|(k, n)| format!("{k}={n}")).collect();
        writeln!(f, "violations: {}", counts.join(" "))?;
        for v in self.violations.iter().take(50) {
            writeln!(f, "  {}: {}", v.kind.name(), v.detail)?;
        }
        if self.violations.len() > 50 {
            writeln!(f, "  … {} more", self.violations.len() - 50)?;
        }
        Ok(())
    }
}

/// Reads a JSON-lines history (blank lines ignored).
pub fn parse(text: &str) -> Result<Vec<Event>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// One event per line.
pub fn to_lines(events: &[Event]) -> String {
    let mut s = String::new();
    for e in events {
        s.push_str(&serde_json::to_string(e).expect("an event serialises"));
        s.push('\n');
    }
    s
}

/// An acknowledged publish.
struct Acked {
    msg: String,
    key: Option<String>,
    id: Option<String>,
    seq: u64,
    t: u64,
    done: u64,
}

/// One subscription chain of a client to a channel.
struct Chain {
    epoch: String,
    /// A lower bound of where the chain's stream starts: a plain subscribe's `position` may
    /// be a little older than the moment the subscription took effect (docs/design.md
    /// "Positions for a plain subscribe"), so what lies between it and the first message
    /// shown is owed only when published after the ack came (`acked_at`). A chain begun by
    /// a resume starts exactly at its `since`.
    start: u64,
    exact: bool,
    acked_at: u64,
    /// Positions and messages shown, in order.
    shown: Vec<(u64, String)>,
    /// Ranges (lo, hi] the client was told it may miss; `hi` None: up to the first
    /// position shown after `t`, or else every publish begun before `t`.
    excused: Vec<(u64, Option<u64>, u64)>,
    /// Ranges (since, reached] that a `recovered: true` promised.
    promised: Vec<(u64, u64)>,
    /// The chain was current, and its client subscribed and connected, at the quiet point.
    at_quiet: bool,
}

impl Chain {
    fn new(pos: &Pos, exact: bool, acked_at: u64) -> Chain {
        Chain {
            epoch: pos.epoch.clone(),
            start: pos.seq,
            exact,
            acked_at,
            shown: Vec::new(),
            excused: Vec::new(),
            promised: Vec::new(),
            at_quiet: false,
        }
    }
}

#[derive(Default)]
struct ClientChannel {
    current: Option<Chain>,
    done: Vec<Chain>,
    last: Option<Pos>,
    seen_pos: HashSet<Pos>,
    seen_msg: HashMap<String, Pos>,
    subscribed: bool,
}

impl ClientChannel {
    fn end_chain(&mut self) {
        if let Some(c) = self.current.take() {
            self.done.push(c);
        }
    }
}

/// Judges a history; see the module's documentation for what each kind means.
pub fn check(events: &[Event]) -> Report {
    let mut report = Report::default();
    let mut v = |kind: Kind, detail: String| report.violations.push(Violation { kind, detail });
    let mut ops: BTreeMap<String, u64> = BTreeMap::new();

    // Publishes: acknowledged ones per (channel, epoch); every message name ever sent and
    // those refused as not stored.
    let mut acked: HashMap<(String, String), Vec<Acked>> = HashMap::new();
    let mut attempted: HashSet<(String, String)> = HashSet::new();
    let mut refused: HashSet<(String, String)> = HashSet::new();
    let mut maybe: HashSet<(String, String)> = HashSet::new();
    let quiet = events.iter().find_map(|e| if let Event::Quiet { t } = e { Some(*t) } else { None });
    // When each message was first tried: a retry's ack (same key) is the first call's, so
    // its real-time order is that of its first attempt.
    let mut first_try: HashMap<(&str, &str), u64> = HashMap::new();
    for e in events {
        if let Event::Publish { t, channel, msg, .. } = e {
            let f = first_try.entry((channel, msg)).or_insert(*t);
            *f = (*f).min(*t);
        }
    }
    // The epochs each channel was seen in, for publish acks that name none.
    let mut epochs: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for e in events {
        match e {
            Event::Deliver { channel, pos, .. }
            | Event::Subscribe { channel, outcome: SubOutcome::Ack { pos: Some(pos), .. }, .. } => {
                epochs.entry(channel).or_default().insert(&pos.epoch);
            }
            _ => {}
        }
    }
    let epoch_of = |channel: &str, p: &Pos| -> String {
        match epochs.get(channel) {
            Some(set) if p.epoch.is_empty() && set.len() == 1 => {
                set.iter().next().map_or_else(String::new, |e| (*e).to_owned())
            }
            _ => p.epoch.clone(),
        }
    };

    for e in events {
        *ops.entry(e.op().to_owned()).or_default() += 1;
        if let Event::Publish { t, done, channel, msg, key, outcome, .. } = e {
            let id = (channel.clone(), msg.clone());
            attempted.insert(id.clone());
            match outcome {
                Outcome::Ack { pos: Some(p), id, .. } => {
                    acked.entry((channel.clone(), epoch_of(channel, p))).or_default().push(Acked {
                        msg: msg.clone(),
                        key: key.clone(),
                        id: id.clone(),
                        seq: p.seq,
                        t: first_try.get(&(channel.as_str(), msg.as_str())).copied().unwrap_or(*t),
                        done: *done,
                    })
                }
                Outcome::Ack { pos: None, .. } => {
                    v(Kind::Divergent, format!("publish {msg} on {channel} acknowledged without a position"))
                }
                Outcome::Error { ambiguous: false, .. } => {
                    refused.insert(id);
                }
                Outcome::Error { ambiguous: true, .. } | Outcome::Unknown => {
                    maybe.insert(id);
                }
            }
        }
    }
    for ((channel, epoch), list) in &acked {
        // A message refused once but acknowledged on a retry was stored.
        for a in list {
            refused.remove(&(channel.clone(), a.msg.clone()));
        }
        // One position, one message; one key, one message.
        let mut at: HashMap<u64, &str> = HashMap::new();
        let mut by_key: HashMap<&str, (u64, Option<&str>)> = HashMap::new();
        for a in list {
            if let Some(m) = at.insert(a.seq, &a.msg)
                && m != a.msg
            {
                v(Kind::Divergent, format!("{channel}@{epoch} seq {} acknowledged for both {m} and {}", a.seq, a.msg));
            }
            if let Some(k) = &a.key
                && let Some((s, id)) = by_key.insert(k, (a.seq, a.id.as_deref()))
                && match (id, a.id.as_deref()) {
                    (Some(x), Some(y)) => x != y,
                    _ => s != a.seq,
                }
            {
                v(
                    Kind::StoredTwice,
                    format!(
                        "{channel}@{epoch} key {k} acknowledged as two messages: seq {s} ({id:?}) and seq {} ({:?})",
                        a.seq, a.id
                    ),
                );
            }
        }
        // Real-time order: a publish begun after another's ack has a higher position.
        let mut by_done: Vec<&Acked> = list.iter().collect();
        by_done.sort_by_key(|a| a.done);
        let mut by_start: Vec<&Acked> = list.iter().collect();
        by_start.sort_by_key(|a| a.t);
        let (mut i, mut max): (usize, Option<&Acked>) = (0, None);
        for b in by_start {
            while i < by_done.len() && by_done[i].done < b.t {
                if max.is_none_or(|m| by_done[i].seq > m.seq) {
                    max = Some(by_done[i]);
                }
                i += 1;
            }
            if let Some(m) = max
                && b.seq <= m.seq
                && b.msg != m.msg
            {
                v(
                    Kind::Order,
                    format!(
                        "{channel}@{epoch}: {} began at {} ms after {} was acknowledged at seq {}, yet got seq {}",
                        b.msg, b.t, m.msg, m.seq, b.seq
                    ),
                );
            }
        }
    }

    // What each client was shown, chain by chain.
    let mut clients: BTreeMap<(String, String), ClientChannel> = BTreeMap::new();
    let mut position_msg: HashMap<(String, Pos), (String, String)> = HashMap::new();
    let mut open_conn: HashMap<String, String> = HashMap::new();
    for e in events {
        match e {
            Event::Subscribe { t, client, channel, since, outcome: SubOutcome::Ack { pos: None, .. } } => {
                // No position: a resume told it may have missed what followed `since` (up to
                // the first message shown after), as a `gap` does; a plain subscribe starts
                // a chain that owes what follows its first message, or is published later.
                let cc = clients.entry((client.clone(), channel.clone())).or_default();
                cc.subscribed = true;
                match since {
                    Some(s) => {
                        if cc.current.as_ref().is_none_or(|c| c.epoch != s.epoch) {
                            cc.end_chain();
                            cc.current = Some(Chain::new(s, true, *t));
                        }
                        if let Some(chain) = cc.current.as_mut() {
                            chain.excused.push((s.seq, None, *t));
                        }
                    }
                    None => {
                        cc.end_chain();
                        let epoch = cc.last.as_ref().map(|p| p.epoch.clone()).unwrap_or_default();
                        cc.current = Some(Chain::new(&Pos { seq: 0, epoch }, false, *t));
                    }
                }
            }
            Event::Subscribe {
                t,
                client,
                channel,
                since,
                outcome: SubOutcome::Ack { pos: Some(pos), recovered, .. },
            } => {
                let cc = clients.entry((client.clone(), channel.clone())).or_default();
                cc.subscribed = true;
                let resumes = since.is_some() && *recovered == Some(true);
                match (resumes, cc.current.as_mut()) {
                    (true, Some(chain)) if since.as_ref().is_some_and(|s| s.epoch == chain.epoch) => {
                        let s = since.as_ref().map_or(0, |s| s.seq);
                        chain.promised.push((s, pos.seq));
                    }
                    (true, _) => {
                        // A resume of a chain this history did not see begin (or of another
                        // epoch's): it starts at `since`, with the promise.
                        cc.end_chain();
                        let s = since.clone().unwrap_or_else(|| pos.clone());
                        let mut chain = Chain::new(&s, true, *t);
                        chain.promised.push((s.seq, pos.seq));
                        cc.current = Some(chain);
                    }
                    (false, _) => {
                        cc.end_chain();
                        cc.current = Some(Chain::new(pos, false, *t));
                    }
                }
            }
            Event::Connected { client, user, .. } => {
                open_conn.insert(client.clone(), user.clone());
            }
            Event::Quiet { .. } => {
                for cc in clients.values_mut() {
                    if let Some(chain) = cc.current.as_mut() {
                        chain.at_quiet = cc.subscribed;
                    }
                }
            }
            Event::Presence { t, client, channel, members } if quiet.is_some_and(|q| *t >= q) => {
                // The users with an open connection subscribed there, at that moment.
                let want: BTreeSet<&str> = clients
                    .iter()
                    .filter(|((c, ch), cc)| ch == channel && cc.subscribed && open_conn.contains_key(c))
                    .filter_map(|((c, _), _)| open_conn.get(c).map(String::as_str))
                    .collect();
                let got: BTreeSet<&str> = members.iter().map(String::as_str).collect();
                if want != got {
                    v(
                        Kind::Presence,
                        format!(
                            "{client} asked {channel} at {t} ms: members {got:?}, connected and subscribed {want:?}"
                        ),
                    );
                }
            }
            Event::Closed { client, .. } => {
                open_conn.remove(client);
                // Its subscriptions wait for a resume; without one they owe no more.
                for ((c, _), cc) in clients.iter_mut() {
                    if c == client {
                        cc.subscribed = false;
                    }
                }
            }
            Event::Unsubscribe { client, channel, .. } => {
                if let Some(cc) = clients.get_mut(&(client.clone(), channel.clone())) {
                    cc.subscribed = false;
                    cc.end_chain();
                }
            }
            Event::Gap { t, client, channel, after, .. } => {
                let cc = clients.entry((client.clone(), channel.clone())).or_default();
                if let Some(chain) = cc.current.as_mut() {
                    chain.excused.push((after.seq, None, *t));
                }
            }
            Event::Deliver { client, channel, pos, msg, .. } => {
                let id = (channel.clone(), msg.clone());
                if !attempted.contains(&id) {
                    v(Kind::Phantom, format!("{client} shown {msg} on {channel}, which no publish sent"));
                } else if refused.contains(&id) {
                    v(
                        Kind::Phantom,
                        format!("{client} shown {msg} on {channel}, whose publish was refused as not stored"),
                    );
                }
                match position_msg.get(&(channel.clone(), pos.clone())) {
                    Some((m, other)) if m != msg => v(
                        Kind::Divergent,
                        format!(
                            "{channel} seq {}@{}: {other} was shown {m}, {client} was shown {msg}",
                            pos.seq, pos.epoch
                        ),
                    ),
                    Some(_) => {}
                    None => {
                        position_msg.insert((channel.clone(), pos.clone()), (msg.clone(), client.clone()));
                    }
                }
                let cc = clients.entry((client.clone(), channel.clone())).or_default();
                let in_chain = |last: &Pos| {
                    cc.current.as_ref().is_some_and(|c| c.shown.last().is_some_and(|(s, _)| *s == last.seq))
                };
                if cc.seen_pos.contains(pos) {
                    v(Kind::Duplicate, format!("{client} shown {channel} seq {}@{} ({msg}) twice", pos.seq, pos.epoch));
                } else if let Some(p) = cc.seen_msg.get(msg) {
                    v(
                        Kind::Duplicate,
                        format!("{client} shown {msg} on {channel} at seq {} and again at seq {}", p.seq, pos.seq),
                    );
                } else if let Some(last) = &cc.last
                    && last.epoch == pos.epoch
                    && pos.seq <= last.seq
                    && in_chain(last)
                {
                    v(Kind::Backwards, format!("{client} shown {channel} seq {} after seq {}", pos.seq, last.seq));
                }
                cc.seen_pos.insert(pos.clone());
                cc.seen_msg.entry(msg.clone()).or_insert_with(|| pos.clone());
                cc.last = Some(pos.clone());
                if let Some(chain) = cc.current.as_mut()
                    && chain.epoch.is_empty()
                    && chain.start == 0
                    && chain.shown.is_empty()
                {
                    // A chain begun without a position takes the epoch of what it shows.
                    chain.epoch = pos.epoch.clone();
                }
                if let Some(chain) = cc.current.as_mut()
                    && chain.epoch == pos.epoch
                {
                    for ex in chain.excused.iter_mut() {
                        if ex.1.is_none() && pos.seq > ex.0 {
                            ex.1 = Some(pos.seq);
                        }
                    }
                    chain.shown.push((pos.seq, msg.clone()));
                }
            }
            _ => {}
        }
    }
    for ((channel, epoch), list) in &acked {
        for a in list {
            if let Some((m, who)) = position_msg.get(&(channel.clone(), Pos { seq: a.seq, epoch: epoch.clone() }))
                && *m != a.msg
            {
                v(
                    Kind::Divergent,
                    format!(
                        "{channel} seq {}@{epoch} acknowledged for {}, but {who} was shown {m} there",
                        a.seq, a.msg
                    ),
                );
            }
        }
    }

    // What each chain owed.
    for ((client, channel), cc) in &mut clients {
        cc.end_chain();
        for chain in &cc.done {
            let Some(list) = acked.get(&(channel.clone(), chain.epoch.clone())) else { continue };
            let shown: HashSet<u64> = chain.shown.iter().map(|(s, _)| *s).collect();
            let shown_msg: HashSet<&str> = chain.shown.iter().map(|(_, m)| m.as_str()).collect();
            let open = chain.at_quiet;
            let reach = if open { u64::MAX } else { chain.shown.iter().map(|(s, _)| *s).max().unwrap_or(chain.start) };
            let first = chain.shown.iter().map(|(s, _)| *s).min();
            // After the start, what is owed: everything when the start is exact, or after a
            // resume's `since`; else what follows the first message shown (the stream is a
            // suffix from where the subscription took effect), or was published after the ack.
            let owed = |a: &Acked| {
                chain.exact
                    || chain.promised.iter().any(|(s, _)| a.seq > *s)
                    || first.is_some_and(|f| a.seq > f)
                    || a.t > chain.acked_at
            };
            for a in list {
                if !owed(a) {
                    continue;
                }
                // Owed once per message: a copy at another position (a retry stored by another
                // bridge) is the same message.
                if a.seq <= chain.start || a.seq > reach || shown.contains(&a.seq) || shown_msg.contains(a.msg.as_str())
                {
                    continue;
                }
                if open && quiet.is_some_and(|q| a.done > q) {
                    continue;
                }
                let excused = chain.excused.iter().any(|&(lo, hi, t)| {
                    a.seq > lo
                        && match hi {
                            Some(hi) => a.seq < hi,
                            None => a.t < t,
                        }
                });
                if excused {
                    continue;
                }
                if let Some(&(s, r)) = chain.promised.iter().find(|&&(s, r)| a.seq > s && a.seq <= r) {
                    v(
                        Kind::IncompleteRecovery,
                        format!(
                            "{client} on {channel}: recovered from seq {s} to {r} without seq {} ({})",
                            a.seq, a.msg
                        ),
                    );
                } else {
                    v(
                        Kind::Lost,
                        format!(
                            "{client} on {channel}: acknowledged seq {}@{} ({}) never shown and no gap",
                            a.seq, chain.epoch, a.msg
                        ),
                    );
                }
            }
        }
    }

    // Direct messages: every connection of the user open from before the send to the end.
    let Some(quiet_t) = quiet else {
        report.operations = ops;
        return report;
    };
    let mut open_since: HashMap<String, (String, u64)> = HashMap::new();
    let mut sessions: Vec<(String, String, u64, Option<u64>)> = Vec::new();
    let mut directs: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for e in events {
        match e {
            Event::Connected { t, client, user } => {
                if let Some((u, since)) = open_since.insert(client.clone(), (user.clone(), *t)) {
                    sessions.push((client.clone(), u, since, Some(*t)));
                }
            }
            Event::Closed { t, client, .. } => {
                if let Some((u, since)) = open_since.remove(client) {
                    sessions.push((client.clone(), u, since, Some(*t)));
                }
            }
            Event::Direct { t, client, msg } => directs.entry(client.clone()).or_default().push((*t, msg.clone())),
            _ => {}
        }
    }
    for (client, (user, since)) in open_since {
        sessions.push((client, user, since, None));
    }
    for e in events {
        let Event::Send { t, done, user, msg, outcome: Outcome::Ack { .. }, .. } = e else { continue };
        if *done > quiet_t {
            continue;
        }
        for (client, u, since, until) in &sessions {
            if u != user || *since + ROUTE_SETTLE > *t || until.is_some() {
                continue;
            }
            if !directs.get(client).is_some_and(|d| d.iter().any(|(dt, m)| m == msg && *dt >= *since)) {
                v(Kind::DirectLost, format!("{client} ({user}) never shown direct {msg}"));
            }
        }
    }
    for (client, list) in &directs {
        let mut seen = HashSet::new();
        for (_, m) in list {
            if !seen.insert(m) {
                v(Kind::DirectDuplicate, format!("{client} shown direct {m} twice"));
            }
        }
    }

    report.operations = ops;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: &str = "k1";

    fn pos(seq: u64) -> Pos {
        Pos { seq, epoch: E.into() }
    }

    /// Builds histories one event at a time, each a millisecond after the last.
    #[derive(Default)]
    struct H {
        ev: Vec<Event>,
        t: u64,
    }

    impl H {
        fn t(&mut self) -> u64 {
            self.t += 1;
            self.t
        }
        fn connect(&mut self, client: &str, user: &str) {
            let t = self.t();
            self.ev.push(Event::Connected { t, client: client.into(), user: user.into() });
        }
        fn close(&mut self, client: &str) {
            let t = self.t();
            self.ev.push(Event::Closed { t, client: client.into(), code: 1006 });
        }
        fn publish_as(&mut self, msg: &str, key: Option<&str>, outcome: Outcome) {
            let (t, done) = (self.t(), self.t());
            self.ev.push(Event::Publish {
                t,
                done,
                client: "pub".into(),
                channel: "c".into(),
                msg: msg.into(),
                key: key.map(Into::into),
                outcome,
            });
        }
        fn publish(&mut self, msg: &str, seq: u64) {
            self.publish_as(
                msg,
                None,
                Outcome::Ack { pos: Some(pos(seq)), id: Some(format!("id-{msg}")), duplicate: false },
            );
        }
        fn sub(&mut self, client: &str, at: u64) {
            let t = self.t();
            let outcome = SubOutcome::Ack { pos: Some(pos(at)), recovered: None, reason: None };
            self.ev.push(Event::Subscribe { t, client: client.into(), channel: "c".into(), since: None, outcome });
        }
        fn resume(&mut self, client: &str, since: u64, reached: u64, recovered: bool) {
            let t = self.t();
            let outcome = SubOutcome::Ack {
                pos: Some(pos(reached)),
                recovered: Some(recovered),
                reason: (!recovered).then(|| "too_old".into()),
            };
            let since = Some(pos(since));
            self.ev.push(Event::Subscribe { t, client: client.into(), channel: "c".into(), since, outcome });
        }
        fn deliver(&mut self, client: &str, seq: u64, msg: &str) {
            let t = self.t();
            self.ev.push(Event::Deliver {
                t,
                client: client.into(),
                channel: "c".into(),
                pos: pos(seq),
                msg: msg.into(),
            });
        }
        fn send(&mut self, user: &str, msg: &str) {
            let (t, done) = (self.t(), self.t());
            let outcome = Outcome::Ack { pos: None, id: Some(format!("id-{msg}")), duplicate: false };
            self.ev.push(Event::Send { t, done, client: "pub".into(), user: user.into(), msg: msg.into(), outcome });
        }
        fn direct(&mut self, client: &str, msg: &str) {
            let t = self.t();
            self.ev.push(Event::Direct { t, client: client.into(), msg: msg.into() });
        }
        fn quiet(&mut self) {
            let t = self.t();
            self.ev.push(Event::Quiet { t });
        }
        fn presence(&mut self, members: &[&str]) {
            let t = self.t();
            let members = members.iter().map(|m| m.to_string()).collect();
            self.ev.push(Event::Presence { t, client: "a".into(), channel: "c".into(), members });
        }
        /// Removes the first event matching `f` (panics when there is none).
        fn drop_first(&mut self, f: impl Fn(&Event) -> bool) {
            let i = self.ev.iter().position(f).expect("the event to drop is in the history");
            self.ev.remove(i);
        }
        fn kinds(&self) -> BTreeMap<&'static str, usize> {
            // Every history goes through its file form, as the chaos run's does.
            let report = check(&parse(&to_lines(&self.ev)).expect("the history parses"));
            report.counts().into_iter().filter(|(_, n)| *n > 0).collect()
        }
    }

    fn shown(client: &'static str, seq: u64) -> impl Fn(&Event) -> bool {
        move |e| matches!(e, Event::Deliver { client: c, pos, .. } if c == client && pos.seq == seq)
    }

    /// Two subscribers; `b` drops and resumes; an ambiguous publish never shown; a gap
    /// excuses what it names; a direct message to every tab of a user; presence at the end.
    fn clean() -> H {
        let mut h = H::default();
        h.connect("a", "ua");
        h.connect("b", "ub");
        h.connect("b2", "ub");
        h.sub("a", 0);
        h.sub("b", 0);
        for (i, m) in ["m1", "m2", "m3"].iter().enumerate() {
            let seq = 2 * (i as u64 + 1);
            h.publish(m, seq);
            h.deliver("a", seq, m);
            h.deliver("b", seq, m);
        }
        h.close("b");
        h.publish("m4", 8);
        h.deliver("a", 8, "m4");
        h.publish_as("m5", Some("k5"), Outcome::Error { code: "unavailable".into(), ambiguous: true });
        h.publish_as(
            "m5",
            Some("k5"),
            Outcome::Ack {
                pos: Some(Pos { seq: 10, epoch: String::new() }),
                id: Some("id-m5".into()),
                duplicate: false,
            },
        );
        h.deliver("a", 10, "m5");
        h.publish_as("m6", None, Outcome::Unknown);
        h.connect("b", "ub");
        h.resume("b", 6, 10, true);
        h.deliver("b", 8, "m4");
        h.deliver("b", 10, "m5");
        // Long enough after both of ub's connections opened for the routing to know them.
        h.t += ROUTE_SETTLE + 1;
        h.send("ub", "d1");
        h.direct("b", "d1");
        h.direct("b2", "d1");
        let t = h.t();
        h.ev.push(Event::Gap { t, client: "a".into(), channel: "c".into(), after: pos(10), reason: "too_old".into() });
        h.publish("m7", 12);
        h.deliver("b", 12, "m7");
        h.publish("m8", 14);
        h.deliver("a", 14, "m8");
        h.deliver("b", 14, "m8");
        h.quiet();
        h.presence(&["ua", "ub"]);
        h
    }

    #[test]
    fn a_history_that_keeps_every_promise_is_clean() {
        let h = clean();
        let report = check(&h.ev);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.operations["publish"], 9);
        assert_eq!(report.operations["deliver"], 13);
    }

    #[test]
    fn an_acknowledged_message_never_shown_is_lost() {
        let mut h = clean();
        h.drop_first(shown("a", 4));
        assert_eq!(h.kinds(), BTreeMap::from([("lost", 1)]));
        // Even as the last message of a chain still open at the end.
        let mut h = clean();
        h.drop_first(shown("b", 14));
        assert_eq!(h.kinds(), BTreeMap::from([("lost", 1)]));
    }

    #[test]
    fn a_hole_in_a_recovery_that_said_recovered_true_is_named_so() {
        let mut h = clean();
        h.drop_first(shown("b", 8));
        assert_eq!(h.kinds(), BTreeMap::from([("incomplete_recovery", 1)]));
    }

    #[test]
    fn a_chain_that_ended_owes_nothing_after_what_it_was_shown_but_every_hole_before() {
        let mut h = clean();
        let at = h.ev.iter().position(shown("a", 14)).unwrap();
        let t = h.t;
        h.ev.insert(at, Event::Unsubscribe { t, client: "a".into(), channel: "c".into() });
        h.drop_first(shown("a", 14));
        h.drop_first(|e| matches!(e, Event::Presence { .. }));
        assert!(h.kinds().is_empty(), "{:?}", h.kinds());
        h.drop_first(shown("a", 6));
        assert_eq!(h.kinds(), BTreeMap::from([("lost", 1)]));
    }

    #[test]
    fn a_plain_subscribe_position_may_be_older_than_what_was_shown_before() {
        // `a` leaves after 6 and subscribes again; the ack's position (2) is an older
        // watermark: 4 and 6, published before, are not owed again; 8, after, is.
        let mut h = H::default();
        h.connect("a", "ua");
        h.sub("a", 0);
        for (m, seq) in [("m1", 2), ("m2", 4), ("m3", 6)] {
            h.publish(m, seq);
            h.deliver("a", seq, m);
        }
        let t = h.t();
        h.ev.push(Event::Unsubscribe { t, client: "a".into(), channel: "c".into() });
        h.sub("a", 2);
        h.publish("m4", 8);
        h.deliver("a", 8, "m4");
        h.quiet();
        assert!(h.kinds().is_empty(), "{:?}", h.kinds());
        // What follows the first message shown in the new stream is owed, whenever published.
        h.drop_first(|e| matches!(e, Event::Quiet { .. }));
        h.publish("m5", 10);
        h.publish("m6", 12);
        h.deliver("a", 12, "m6");
        h.quiet();
        assert_eq!(h.kinds(), BTreeMap::from([("lost", 1)]));
    }

    #[test]
    fn recovered_false_and_gap_excuse_what_they_name_and_nothing_after() {
        let mut h = clean();
        // `a`'s gap after 10 excuses 12 (shown to `b` only) because 14 followed it; with
        // nothing shown after the gap, only what was published before it is excused: 12
        // and 14 were published after, both owed.
        h.drop_first(shown("a", 14));
        assert_eq!(h.kinds(), BTreeMap::from([("lost", 2)]));
        // A resume answered recovered: false starts again at its position.
        let mut h = clean();
        let i = h.ev.iter().position(|e| matches!(e, Event::Subscribe { since: Some(_), .. })).unwrap();
        let t = h.ev[i].clone();
        let Event::Subscribe { t, .. } = t else { unreachable!("a subscribe") };
        h.ev[i] = Event::Subscribe {
            t,
            client: "b".into(),
            channel: "c".into(),
            since: Some(pos(6)),
            outcome: SubOutcome::Ack { pos: Some(pos(10)), recovered: Some(false), reason: Some("too_old".into()) },
        };
        h.drop_first(shown("b", 8));
        h.drop_first(shown("b", 10));
        assert!(h.kinds().is_empty(), "{:?}", h.kinds());
    }

    #[test]
    fn an_ack_without_a_position_excuses_up_to_the_first_message_shown_after_it() {
        let without = |h: &mut H, since: Option<u64>| {
            let i =
                h.ev.iter()
                    .position(|e| matches!(e, Event::Subscribe { since: s, .. } if s.is_some() == since.is_some()))
                    .unwrap();
            let Event::Subscribe { t, client, .. } = h.ev[i].clone() else { unreachable!("a subscribe") };
            let (recovered, reason) = match since {
                Some(_) => (Some(false), Some("unavailable".into())),
                None => (None, None),
            };
            h.ev[i] = Event::Subscribe {
                t,
                client,
                channel: "c".into(),
                since: since.map(pos),
                outcome: SubOutcome::Ack { pos: None, recovered, reason },
            };
        };
        // `b` resumed from 6 and was told `unavailable`: the hole before 12 is excused...
        let mut h = clean();
        without(&mut h, Some(6));
        h.drop_first(shown("b", 8));
        h.drop_first(shown("b", 10));
        assert!(h.kinds().is_empty(), "{:?}", h.kinds());
        // ...what follows the first message shown after it is owed.
        h.drop_first(shown("b", 14));
        assert_eq!(h.kinds(), BTreeMap::from([("lost", 1)]));
        // A plain subscribe without a position owes what follows its first message.
        let mut h = clean();
        without(&mut h, None);
        assert!(h.kinds().is_empty(), "{:?}", h.kinds());
        h.drop_first(shown("a", 4));
        assert_eq!(h.kinds(), BTreeMap::from([("lost", 1)]));
    }

    #[test]
    fn a_message_shown_twice_is_a_duplicate() {
        let mut h = clean();
        h.deliver("a", 14, "m8");
        assert_eq!(h.kinds(), BTreeMap::from([("duplicate", 1)]));
        // The same message at a second position too.
        let mut h = clean();
        h.publish("m8", 16);
        h.deliver("b", 16, "m8");
        assert_eq!(h.kinds(), BTreeMap::from([("duplicate", 1)]));
    }

    #[test]
    fn a_position_lower_than_the_last_one_shown_goes_backwards() {
        let mut h = clean();
        let i = h.ev.iter().position(shown("a", 4)).unwrap();
        let j = h.ev.iter().position(shown("a", 6)).unwrap();
        h.ev.swap(i, j);
        assert_eq!(h.kinds(), BTreeMap::from([("backwards", 1)]));
    }

    #[test]
    fn one_position_with_two_messages_is_divergent() {
        let mut h = clean();
        let i = h.ev.iter().position(shown("b", 6)).unwrap();
        if let Event::Deliver { msg, .. } = &mut h.ev[i] {
            *msg = "m2".into();
        }
        let k = h.kinds();
        assert!(k.get("divergent").is_some_and(|n| *n >= 1), "{k:?}");
    }

    #[test]
    fn a_publish_begun_after_an_ack_with_a_lower_position_is_out_of_order() {
        let mut h = clean();
        h.publish("m9", 13);
        assert_eq!(h.kinds(), BTreeMap::from([("order", 1)]));
    }

    #[test]
    fn a_retry_is_ordered_by_its_first_attempt() {
        // r1's first attempt got no answer; m9 was acknowledged meanwhile at 16; r1's retry
        // (same key) is answered with the first call's seq, 15: not out of order.
        let mut h = H::default();
        h.connect("a", "ua");
        h.sub("a", 0);
        h.publish_as("r1", Some("kr"), Outcome::Unknown);
        h.publish("m9", 16);
        h.publish_as("r1", Some("kr"), Outcome::Ack { pos: Some(pos(15)), id: Some("id-r1".into()), duplicate: true });
        h.deliver("a", 15, "r1");
        h.deliver("a", 16, "m9");
        h.quiet();
        assert!(h.kinds().is_empty(), "{:?}", h.kinds());
        // A new message begun after m9's ack that gets 15 is out of order.
        let i = h.ev.iter().position(|e| matches!(e, Event::Publish { outcome: Outcome::Unknown, .. })).unwrap();
        h.ev.remove(i);
        assert_eq!(h.kinds(), BTreeMap::from([("order", 1)]));
    }

    #[test]
    fn one_key_acknowledged_at_two_positions_is_stored_twice() {
        let mut h = clean();
        let (t, done) = (h.t(), h.t());
        h.ev.insert(
            h.ev.len() - 2,
            Event::Publish {
                t,
                done,
                client: "pub".into(),
                channel: "c".into(),
                msg: "m5".into(),
                key: Some("k5".into()),
                outcome: Outcome::Ack { pos: Some(pos(16)), id: Some("id-m5".into()), duplicate: true },
            },
        );
        // One id at two positions: one message, shown once, as a retry on another bridge makes.
        assert!(h.kinds().is_empty(), "{:?}", h.kinds());
        let i = h.ev.len() - 3;
        if let Some(Event::Publish { outcome: Outcome::Ack { id, .. }, .. }) = h.ev.get_mut(i) {
            *id = Some("id-m5-again".into());
        }
        let k = h.kinds();
        assert_eq!(k.get("stored_twice"), Some(&1), "{k:?}");
    }

    #[test]
    fn a_message_nobody_published_or_that_was_refused_is_a_phantom() {
        let mut h = clean();
        h.deliver("a", 15, "nobody");
        assert!(h.kinds().get("phantom") == Some(&1), "{:?}", h.kinds());
        let mut h = clean();
        h.publish_as("m10", None, Outcome::Error { code: "unavailable".into(), ambiguous: false });
        h.deliver("a", 20, "m10");
        assert!(h.kinds().get("phantom") == Some(&1), "{:?}", h.kinds());
    }

    #[test]
    fn direct_messages_reach_every_open_tab_once() {
        let mut h = clean();
        h.drop_first(|e| matches!(e, Event::Direct { client, .. } if client == "b2"));
        assert_eq!(h.kinds(), BTreeMap::from([("direct_lost", 1)]));
        let mut h = clean();
        h.direct("b", "d1");
        assert_eq!(h.kinds(), BTreeMap::from([("direct_duplicate", 1)]));
    }

    #[test]
    fn presence_after_the_quiet_point_must_match_who_is_there() {
        let mut h = clean();
        h.presence(&["ua"]);
        assert_eq!(h.kinds(), BTreeMap::from([("presence", 1)]));
    }

    #[test]
    fn every_op_name_is_the_one_in_the_file() {
        for e in clean().ev {
            assert_eq!(serde_json::to_value(&e).unwrap()["op"], e.op(), "{e:?}");
        }
    }

    #[test]
    fn a_line_that_is_not_an_event_is_an_error_with_its_line_number() {
        let err = parse("{\"op\":\"quiet\",\"t\":1}\n\n{\"op\":\"nope\"}\n").unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
    }
}
