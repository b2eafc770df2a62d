//! Criterion benches of the gateway's hot paths: client command decode, server
//! frame encode, and one publish fanned out to 10k sessions (`cargo bench -p gateway`).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gateway::hub::{Hub, SessionHandle};
use gateway::outbox::{OutboxRx, outbox};
use gateway::{protocol, wire};

const DATA: &str = r#""0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab""#; // 64 bytes of JSON

fn decode(c: &mut Criterion) {
    let publish = format!(r#"{{"op":"publish","channel":"room:42","data":{DATA},"ref":"17"}}"#);
    let subscribe = r#"{"op":"subscribe","channel":"room:42","ref":1}"#;
    let mut g = c.benchmark_group("protocol_decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publish_64B", |b| b.iter(|| protocol::decode(black_box(&publish)).is_ok()));
    g.bench_function("subscribe", |b| b.iter(|| protocol::decode(black_box(subscribe)).is_ok()));
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("message_64B", |b| {
        b.iter(|| wire::text(&protocol::message(black_box("room:42"), "id-1", "alice", 42, "s0123456789abcdef", DATA)))
    });
    g.finish();
}

fn sessions(hub: &Hub, n: u64, channel: &Arc<str>) -> Vec<OutboxRx> {
    (0..n)
        .map(|id| {
            let (tx, rx) = outbox(1024, std::time::Duration::from_secs(5));
            let h = SessionHandle {
                id,
                user: format!("u{id}").into(),
                connected_at_ms: 0,
                client_info: "".into(),
                outbox: tx,
                ctl: Arc::default(),
            };
            hub.register(h.clone());
            hub.subscribe(&h, channel);
            rx
        })
        .collect()
}

fn fanout(c: &mut Criterion) {
    let hub = Hub::new(vec![], usize::MAX);
    let channel: Arc<str> = "bench".into();
    let mut rxs = sessions(&hub, 10_000, &channel);
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("publish_to_10k_sessions", |b| {
        b.iter_batched(
            // Empty every queue first (untimed), so each publish reaches all 10k.
            || {
                let mut sink = Vec::new();
                for rx in &mut rxs {
                    rx.take(&mut sink, usize::MAX);
                    sink.clear();
                }
            },
            |()| hub.publish(&channel, "id", "alice", DATA),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, decode, encode, fanout);
criterion_main!(benches);
