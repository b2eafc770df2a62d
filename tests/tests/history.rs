//! Push.History on a real broker-bridge over tansu: the epoch names tansu's topic
//! id, the consuming bridge answers from its hot window, and after it restarted
//! (hot window gone) from Kafka, with exactly the channel's messages after the
//! position, in order, once.

use std::time::Duration;

use proto::push::v1 as pb;
use proto::push::v1::push_client::PushClient;
use switchboard_tests::cluster::Cluster;
use switchboard_tests::ws::http_get;
use tonic::transport::Channel;

type Lost = pb::history_response::Lost;

fn push(url: String) -> PushClient<Channel> {
    PushClient::new(tonic::transport::Endpoint::from_shared(url).unwrap().connect_lazy())
}

/// `switchboard_bridge_history_reads_total{source,outcome="ok"}` of bridge `i`.
/// Bridge `i`'s unlabelled counter `name`.
async fn counter(c: &Cluster, i: usize, name: &str) -> u64 {
    let (status, body) = http_get(c.bridges[i].addr("admin"), "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not exported"))
}

async fn reads(c: &Cluster, i: usize, source: &str) -> u64 {
    let (status, body) = http_get(c.bridges[i].addr("admin"), "/metrics").await;
    assert_eq!(status, 200);
    let want = format!("switchboard_bridge_history_reads_total{{source=\"{source}\",outcome=\"ok\"}}");
    body.lines()
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            // Label order is not fixed: compare the label set.
            let same = name.starts_with("switchboard_bridge_history_reads_total{")
                && name.contains(&format!("source=\"{source}\""))
                && name.contains("outcome=\"ok\"");
            same.then(|| v.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{want} not exported"))
}

async fn history(p: &mut PushClient<Channel>, channel: &str, since: Option<pb::Position>) -> pb::HistoryResponse {
    let req = pb::HistoryRequest { channel: channel.into(), since, limit: 0, position_only: false };
    p.history(req).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_from_the_hot_window_then_from_kafka_after_the_owner_restarted() {
    let mut c = Cluster::builder().kafka().bridges(1).gateways(0).start().await;
    let mut p = push(c.bridge_url(0));
    // Where the channel stands now; the epoch is tansu's topic id and the partition.
    let req = pb::HistoryRequest { channel: "room:h".into(), position_only: true, ..Default::default() };
    let start = p.history(req).await.unwrap().into_inner().position.unwrap();
    let (id, partition) = start.epoch.strip_prefix('k').and_then(|e| e.split_once('.')).expect(&start.epoch);
    assert_eq!(id.len(), 22, "Kafka's printable topic id: {}", start.epoch);
    assert!(partition.parse::<u32>().unwrap() < 4);
    let mut mine = Vec::new();
    for n in 0..40u32 {
        let channel = ["room:h", "room:x", "room:y", "room:z"][n as usize % 4];
        let r = p
            .publish(pb::PublishRequest {
                channel: channel.into(),
                data_json: format!("{{\"n\":{n}}}"),
                from: "svc".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if channel == "room:h" {
            mine.push((r.seq, format!("{{\"n\":{n}}}")));
        }
    }
    let since = pb::Position { seq: mine[2].0, epoch: start.epoch.clone() };
    let expected = mine[3..].to_vec();
    let got = |r: &pb::HistoryResponse| r.messages.iter().map(|m| (m.seq, m.data_json.clone())).collect::<Vec<_>>();

    // The bridge joins its group and consumes: once its window holds the messages, it
    // answers from there (counted as source="hot"); until then from the log.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let before = reads(&c, 0, "hot").await;
        let r = history(&mut p, "room:h", Some(since.clone())).await;
        assert_eq!((got(&r), r.lost), (expected.clone(), Lost::None as i32), "from either source, the same");
        if reads(&c, 0, "hot").await > before {
            assert_eq!(r.position.as_ref().unwrap().epoch, start.epoch);
            assert!(r.position.as_ref().unwrap().seq >= mine.last().unwrap().0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the hot window never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Restarted: a new process has no window before what it consumes from now on. A
    // graceful stop commits everything consumed, so the new window starts after `since`.
    c.bridges[0].signal("-TERM");
    assert!(c.bridges[0].wait_exit(Duration::from_secs(20)).success());
    c.bridges[0].restart();
    let mut p = push(c.bridge_url(0));
    let r = history(&mut p, "room:h", Some(since.clone())).await;
    assert_eq!(got(&r), expected, "exactly the channel's messages after the position, in order, once");
    assert!(!r.more);
    assert_eq!(r.position.as_ref().unwrap().epoch, start.epoch, "the same topic: the same epoch");
    // Paged, through the same pooled reader again, from earlier offsets each time.
    let req =
        pb::HistoryRequest { channel: "room:h".into(), since: Some(since.clone()), limit: 2, position_only: false };
    let page = p.history(req).await.unwrap().into_inner();
    assert_eq!((got(&page), page.more), (expected[..2].to_vec(), true));
    assert_eq!(page.position.as_ref().unwrap().seq, expected[1].0);
    let rest = history(&mut p, "room:h", page.position).await;
    assert_eq!((got(&rest), rest.more), (expected[2..].to_vec(), false));
    let again = history(&mut p, "room:h", Some(since.clone())).await;
    assert_eq!(got(&again), expected);
    assert_eq!((reads(&c, 0, "log").await, reads(&c, 0, "hot").await), (4, 0), "read from Kafka");
    let ahead = history(&mut p, "room:h", Some(pb::Position { seq: 1_000_000, epoch: start.epoch.clone() })).await;
    assert_eq!(ahead.lost, Lost::Ahead as i32);
    let other =
        history(&mut p, "room:h", Some(pb::Position { seq: 1, epoch: "kAAAAAAAAAAAAAAAAAAAAAA.0".into() })).await;
    assert_eq!(other.lost, Lost::EpochChanged as i32);
}

/// A `since` just past the channel's position, which a publish makes real while the
/// request waits, is answered (not `ahead`): another gateway may show a message before
/// the watermark this bridge reads has it (found by the chaos pollers: a poll resumed
/// there got `recovered: false, ahead` and was shown the message again). A position
/// nothing makes real is still `ahead`, once the settle time passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_just_ahead_of_the_watermark_is_given_time_to_become_real() {
    let c = Cluster::builder().kafka().bridges(1).gateways(0).start().await;
    let mut p = push(c.bridge_url(0));
    let publish = pb::PublishRequest {
        channel: "room:ahead".into(),
        data_json: "{}".into(),
        from: "svc".into(),
        ..Default::default()
    };
    // A first publish: the bridge's producer is connected and the topic known, so that the
    // one below takes milliseconds, well inside the settle time.
    p.publish(publish.clone()).await.unwrap();
    let req = pb::HistoryRequest { channel: "room:ahead".into(), position_only: true, ..Default::default() };
    let now = p.history(req).await.unwrap().into_inner().position.unwrap();
    let next = pb::Position { seq: now.seq + 1, epoch: now.epoch.clone() };
    let mut asking = push(c.bridge_url(0));
    let asked = tokio::spawn(async move { history(&mut asking, "room:ahead", Some(next)).await });
    // The message that makes `next` real comes once the request found it ahead and waits
    // (without the settle time the answer is `ahead` at once).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while counter(&c, 0, "switchboard_bridge_history_ahead_waits_total").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the request never waited for its since");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seq = p.publish(publish).await.unwrap().into_inner().seq;
    assert_eq!(seq, now.seq + 1, "the next position of the partition");
    let r = asked.await.unwrap();
    assert_ne!(r.lost, Lost::Ahead as i32, "{r:?}");
    assert_eq!(r.position.map(|p| p.seq), Some(seq), "nothing after it yet");
    // Far ahead, and nothing makes it real: `ahead`, with where the channel is.
    let far = pb::Position { seq: seq + 1000, epoch: now.epoch.clone() };
    let r = history(&mut p, "room:ahead", Some(far)).await;
    assert_eq!(r.lost, Lost::Ahead as i32, "{r:?}");
    assert_eq!(r.position.map(|p| p.seq), Some(seq));
}
