//! A short seeded chaos run over a whole cluster (tansu, presence, two bridges, three
//! gateways): the nemesis kills, drains and pauses services and cuts the broker path on
//! the seed's schedule (and partitions, cuts and slows the links between them) while
//! subscribers on WebSocket, SSE and long-polling, publishers and direct sends run; the history
//! checker must find no violation. `SWITCHBOARD_CHAOS_SEED` replays another seed
//! (`bench chaos` runs long ones).

use std::time::Duration;

use switchboard_tests::backbone::Backbone;
use switchboard_tests::chaos::{Config, Fault, fault_kinds, run, schedule};
use switchboard_tests::checker::{self, Event, Kind};

#[test]
fn the_same_seed_gives_the_same_schedule_and_every_kind_of_fault() {
    for backbone in [Backbone::Kafka, Backbone::Nats, Backbone::Redis] {
        let a = schedule(7, Duration::from_secs(90), 3, 2, backbone);
        assert_eq!(a, schedule(7, Duration::from_secs(90), 3, 2, backbone));
        assert_ne!(a, schedule(8, Duration::from_secs(90), 3, 2, backbone));
        let n = fault_kinds(backbone);
        let kinds: std::collections::BTreeSet<&str> = a.iter().take(n).map(|(_, f)| f.kind()).collect();
        assert_eq!(kinds.len(), n, "the first round holds every kind: {a:?}");
        // tansu keeps its data in memory: it is never restarted.
        let restarts = a.iter().any(|(_, f)| *f == Fault::KillBackbone);
        assert_eq!(restarts, backbone != Backbone::Kafka, "{backbone:?}: {a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_chaos_run_keeps_every_promise() {
    let seed = std::env::var("SWITCHBOARD_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let cfg = Config::new(seed, Duration::from_secs(75));
    let summary = run(&cfg).await;
    let path = std::env::temp_dir().join(format!("switchboard-chaos-{seed}-{}.jsonl", std::process::id()));
    std::fs::write(&path, &summary.history).expect("write the history");
    eprintln!("{summary}history: {}", path.display());
    assert_eq!(
        summary.faults.len(),
        fault_kinds(Backbone::Kafka),
        "every kind of fault was injected: {:?}",
        summary.faults
    );
    assert!(summary.report.operations.get("deliver").copied().unwrap_or(0) > 1000, "{summary}");
    assert!(summary.report.is_clean(), "seed {seed} broke a promise:\n{summary}history: {}", path.display());

    // Every transport was exercised, and the checker is not blind to any of them: without
    // the last message a client of that transport was shown before the quiet point (owed
    // to a subscriber still there), it reports a loss.
    let events = checker::parse(&summary.history).expect("the history parses");
    let quiet = events.iter().position(|e| matches!(e, Event::Quiet { .. })).expect("a quiet point");
    let transports =
        [("WebSocket", 's', cfg.subscribers), ("SSE", 'e', cfg.sse_clients), ("long-poll", 'q', cfg.pollers)];
    for (transport, prefix, _) in transports.into_iter().filter(|t| t.2 > 0) {
        let of = |e: &Event| matches!(e, Event::Deliver { client, .. } if client.starts_with(prefix));
        let shown = events.iter().filter(|e| of(e)).count();
        assert!(shown > 100, "{transport} clients were shown {shown} messages:\n{summary}");
        let last = events[..quiet].iter().rposition(of).expect("messages were shown");
        let mut cut = events.clone();
        let dropped = cut.remove(last);
        let report = checker::check(&cut);
        let losses = report.of(Kind::Lost).count() + report.of(Kind::IncompleteRecovery).count();
        assert!(losses >= 1, "{transport}: dropping {dropped:?} went unnoticed:\n{report}");
    }
}
