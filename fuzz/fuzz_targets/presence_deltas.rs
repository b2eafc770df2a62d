//! Any sequence of gateway messages applied to the presence registry: it never
//! panics, and its counts agree with what locate reports.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use presence::registry::{ConnIn, DeltaIn, Registry};
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut r = Registry::new(Duration::from_secs(10), vec!["room:*".into()], 3);
    let nodes = ["g0", "g1", "g2"];
    let mut streams = [0u64; 3];
    let mut now = t0;
    for chunk in data.chunks(4) {
        let [op, a, b, c] = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0), *chunk.get(3).unwrap_or(&0)];
        let n = usize::from(a) % 3;
        let conn = u64::from(b % 16);
        let user = format!("u{}", c % 5);
        let channel = if c % 2 == 0 { format!("room:{}", b % 3) } else { format!("c{}", b % 3) };
        let conn_in = |channels: Vec<String>| ConnIn { conn_id: conn, user: user.clone(), connected_at_ms: 0, client_info: String::new(), channels };
        let _ = match op % 9 {
            0 => r.hello(nodes[n], "addr", u64::from(b % 3), now).map(|(s, _)| {
                streams[n] = s;
            }),
            1 => r.deltas(nodes[n], streams[n], vec![DeltaIn::Connect(conn_in(vec![channel.clone()]))], now).map(|_| ()),
            2 => r.deltas(nodes[n], streams[n], vec![DeltaIn::Disconnect(conn)], now).map(|_| ()),
            3 => r.deltas(nodes[n], streams[n], vec![DeltaIn::Subscribe(conn, channel.clone())], now).map(|_| ()),
            4 => r.deltas(nodes[n], streams[n], vec![DeltaIn::Unsubscribe(conn, channel.clone())], now).map(|_| ()),
            5 => r.snapshot(nodes[n], streams[n], vec![conn_in(vec![channel.clone()]), conn_in(vec![])], now).map(|_| ()),
            6 => r.goodbye(nodes[n], streams[n]).map(|_| ()),
            7 => {
                now += Duration::from_secs(u64::from(b % 12));
                r.expire(now);
                Ok(())
            }
            _ => {
                let _ = r.take_counts();
                Ok(())
            }
        };
        // Invariant: the connection count equals what locate finds for every user.
        let located: usize = (0..5).map(|u| r.locate(&format!("u{u}")).len()).sum();
        assert_eq!(r.counts().connections, located);
        let _ = r.channel_members("room:0", "", 10);
    }
});
