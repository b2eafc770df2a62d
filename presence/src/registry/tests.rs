use super::*;

const LEASE: Duration = Duration::from_secs(10);

fn reg() -> Registry {
    Registry::new(LEASE, vec!["room:*".into()], 3)
}

fn conn(id: u64, user: &str, channels: &[&str]) -> ConnIn {
    ConnIn {
        conn_id: id,
        user: user.into(),
        connected_at_ms: 1000 + id,
        client_info: "test".into(),
        channels: channels.iter().map(|c| (*c).to_owned()).collect(),
    }
}

fn joins(ev: &[Event]) -> Vec<(String, String)> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Join { channel, user } => Some((format!("+{channel}"), user.to_string())),
            Event::Leave { channel, user } => Some((format!("-{channel}"), user.to_string())),
            _ => None,
        })
        .collect()
}

#[test]
fn locate_finds_every_connection_on_every_node() {
    let t = Instant::now();
    let mut r = reg();
    let (s1, ev) = r.hello("gw1", "a:1", 1, t).unwrap();
    assert!(matches!(&ev[..], [Event::NodeUp { .. }]));
    let (s2, _) = r.hello("gw2", "a:2", 1, t).unwrap();
    r.snapshot("gw1", s1, vec![conn(1, "alice", &[]), conn(2, "bob", &[])], t).unwrap();
    r.snapshot("gw2", s2, vec![conn(1, "alice", &[])], t).unwrap();
    let mut at: Vec<_> = r.locate("alice").iter().map(|l| (l.node.to_string(), l.conn_id)).collect();
    at.sort();
    assert_eq!(at, vec![("gw1".into(), 1), ("gw2".into(), 1)]);
    assert!(r.locate("nobody").is_empty());
    assert_eq!(r.counts(), Counts { users: 2, connections: 3, nodes: 2, channels: 0 });
}

#[test]
fn lease_expiry_removes_everything_the_node_held() {
    let t = Instant::now();
    let mut r = reg();
    let (s, _) = r.hello("gw1", "a", 1, t).unwrap();
    r.snapshot("gw1", s, vec![conn(1, "alice", &["room:1", "news"])], t).unwrap();
    // Renewed at 8 s: alive at 17 s, gone at 18 s.
    r.renew("gw1", s, t + Duration::from_secs(8)).unwrap();
    assert!(r.expire(t + Duration::from_secs(17)).is_empty());
    let ev = r.expire(t + Duration::from_secs(18));
    assert!(ev.contains(&Event::NodeDown { node: "gw1".into() }));
    assert_eq!(joins(&ev), vec![("-room:1".into(), "alice".into())]);
    assert!(ev.iter().filter(|e| matches!(e, Event::Interest { interested: false, .. })).count() == 2);
    assert!(r.locate("alice").is_empty());
    assert_eq!(r.counts(), Counts::default());
    assert!(r.users.is_empty() && r.channels.is_empty() && r.nodes.is_empty());
}

#[test]
fn snapshot_replaces_old_state_without_flicker() {
    let t = Instant::now();
    let mut r = reg();
    let (s, _) = r.hello("gw1", "a", 1, t).unwrap();
    r.snapshot("gw1", s, vec![conn(1, "alice", &["room:1"]), conn(2, "bob", &["room:1"])], t).unwrap();
    // The gateway reconnects (new stream) and resends: alice moved to another conn,
    // bob left, carol arrived.
    let (s2, _) = r.hello("gw1", "a", 1, t).unwrap();
    let ev = r.snapshot("gw1", s2, vec![conn(3, "alice", &["room:1"]), conn(4, "carol", &["room:1"])], t).unwrap();
    let mut j = joins(&ev);
    j.sort();
    assert_eq!(j, vec![("+room:1".into(), "carol".into()), ("-room:1".into(), "bob".into())]);
    assert!(!ev.iter().any(|e| matches!(e, Event::Interest { .. })), "interest did not change: {ev:?}");
    assert_eq!(
        r.channel_members("room:1", "", 10).0.iter().map(|u| u.to_string()).collect::<Vec<_>>(),
        vec!["alice", "carol"]
    );
    assert_eq!(r.counts().connections, 2);
}

#[test]
fn duplicate_connects_and_unknown_changes_are_ignored() {
    let t = Instant::now();
    let mut r = reg();
    let (s, _) = r.hello("gw1", "a", 1, t).unwrap();
    let d = vec![
        DeltaIn::Connect(conn(1, "alice", &[])),
        DeltaIn::Connect(conn(1, "alice", &[])),
        DeltaIn::Subscribe(1, "room:1".into()),
        DeltaIn::Subscribe(1, "room:1".into()),
        DeltaIn::Subscribe(99, "room:1".into()),
        DeltaIn::Disconnect(98),
        DeltaIn::Unsubscribe(1, "never".into()),
    ];
    let ev = r.deltas("gw1", s, d, t).unwrap();
    assert_eq!(joins(&ev), vec![("+room:1".into(), "alice".into())]);
    assert_eq!(r.counts().connections, 1);
    assert_eq!(r.locate("alice").len(), 1);
}

#[test]
fn two_tabs_join_once_and_leave_with_the_last() {
    let t = Instant::now();
    let mut r = reg();
    let (s, _) = r.hello("gw1", "a", 1, t).unwrap();
    let (s2, _) = r.hello("gw2", "b", 1, t).unwrap();
    let ev = r.deltas("gw1", s, vec![DeltaIn::Connect(conn(1, "alice", &["room:1"]))], t).unwrap();
    assert_eq!(joins(&ev).len(), 1);
    let ev = r.deltas("gw2", s2, vec![DeltaIn::Connect(conn(7, "alice", &["room:1"]))], t).unwrap();
    assert!(joins(&ev).is_empty());
    assert_eq!(r.channel_nodes("room:1").len(), 2);
    let ev = r.deltas("gw1", s, vec![DeltaIn::Disconnect(1)], t).unwrap();
    assert!(joins(&ev).is_empty());
    let ev = r.deltas("gw2", s2, vec![DeltaIn::Unsubscribe(7, "room:1".into())], t).unwrap();
    assert_eq!(joins(&ev), vec![("-room:1".into(), "alice".into())]);
    // Non-presence channels track interest but not members.
    let ev = r.deltas("gw2", s2, vec![DeltaIn::Subscribe(7, "news".into())], t).unwrap();
    assert!(joins(&ev).is_empty());
    assert_eq!(r.channel_members("news", "", 10).1, 0);
    assert_eq!(r.channel_nodes("news").iter().map(|n| n.to_string()).collect::<Vec<_>>(), vec!["gw2"]);
}

#[test]
fn large_rooms_report_counts_instead_of_members() {
    let t = Instant::now();
    let mut r = reg(); // large room: over 3 members
    let (s, _) = r.hello("gw1", "a", 1, t).unwrap();
    let mut join_events = 0;
    for i in 0..6 {
        let ev = r.deltas("gw1", s, vec![DeltaIn::Connect(conn(i, &format!("u{i}"), &["room:big"]))], t).unwrap();
        join_events += joins(&ev).len();
    }
    assert_eq!(join_events, 3);
    assert_eq!(r.take_counts(), vec![("room:big".into(), 6)]);
    assert!(r.take_counts().is_empty());
    r.deltas("gw1", s, vec![DeltaIn::Disconnect(0)], t).unwrap();
    assert_eq!(r.take_counts(), vec![("room:big".into(), 5)]);
}

#[test]
fn stale_epochs_and_superseded_streams_are_refused() {
    let t = Instant::now();
    let mut r = reg();
    let (old, _) = r.hello("gw1", "a", 5, t).unwrap();
    assert_eq!(r.hello("gw1", "a", 4, t).unwrap_err(), SyncError::StaleEpoch);
    let (new, _) = r.hello("gw1", "a", 5, t).unwrap();
    assert_eq!(r.renew("gw1", old, t).unwrap_err(), SyncError::Superseded);
    assert_eq!(r.deltas("gw9", new, vec![], t).unwrap_err(), SyncError::UnknownNode);
    r.snapshot("gw1", new, vec![conn(1, "alice", &[])], t).unwrap();
    let ev = r.goodbye("gw1", new).unwrap();
    assert!(ev.contains(&Event::NodeDown { node: "gw1".into() }));
    assert!(r.locate("alice").is_empty());
}

#[test]
fn member_pages() {
    let t = Instant::now();
    let mut r = Registry::new(LEASE, vec!["*".into()], 1000);
    let (s, _) = r.hello("gw1", "a", 1, t).unwrap();
    let conns = (0..5).map(|i| conn(i, &format!("u{i}"), &["c"])).collect();
    r.snapshot("gw1", s, conns, t).unwrap();
    let (p, total) = r.channel_members("c", "", 2);
    assert_eq!((p.iter().map(|u| u.to_string()).collect::<Vec<_>>(), total), (vec!["u0".into(), "u1".into()], 5));
    let (p, _) = r.channel_members("c", "u3", 2);
    assert_eq!(p.iter().map(|u| u.to_string()).collect::<Vec<_>>(), vec!["u4"]);
}

#[test]
fn globs() {
    assert!(glob_match("room:*", "room:1"));
    assert!(glob_match("*", ""));
    assert!(glob_match("a*b*c", "aXbYc"));
    assert!(!glob_match("a*b*c", "aXbY"));
    assert!(glob_match("exact", "exact"));
    assert!(!glob_match("room:*", "rooms"));
}

#[test]
fn user_online_and_offline_per_node() {
    let t = Instant::now();
    let mut r = reg();
    let (s, _) = r.hello("gw1", "a", 1, t).unwrap();
    let online = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::UserOnline { .. })).count();
    let offline = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::UserOffline { .. })).count();
    let ev = r
        .deltas("gw1", s, vec![DeltaIn::Connect(conn(1, "alice", &[])), DeltaIn::Connect(conn(2, "alice", &[]))], t)
        .unwrap();
    assert_eq!((online(&ev), offline(&ev)), (1, 0));
    assert_eq!(r.user_events(), vec![Event::UserOnline { user: "alice".into(), node: "gw1".into() }]);
    let ev = r.deltas("gw1", s, vec![DeltaIn::Disconnect(1)], t).unwrap();
    assert_eq!(offline(&ev), 0);
    let ev = r.deltas("gw1", s, vec![DeltaIn::Disconnect(2)], t).unwrap();
    assert_eq!(offline(&ev), 1);
}

#[test]
fn a_restarted_node_is_announced_with_its_new_address() {
    let t = Instant::now();
    let mut r = reg();
    r.hello("gw1", "http://a:1", 1, t).unwrap();
    let (_, ev) = r.hello("gw1", "http://a:1", 1, t).unwrap();
    assert!(ev.is_empty(), "a reconnection of the same process announces nothing");
    let (_, ev) = r.hello("gw1", "http://a:2", 2, t).unwrap();
    assert_eq!(ev, vec![Event::NodeUp { node: "gw1".into(), delivery_addr: "http://a:2".into(), epoch: 2 }]);
}
