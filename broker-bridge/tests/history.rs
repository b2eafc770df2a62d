//! Push.History against librdkafka's in-process mock cluster: where a channel's
//! records go, reads from the hot window of the consuming bridge and from Kafka
//! after it restarted, and every `lost` answer the log can give.
//!
//! The mock cannot delete records (no DeleteRecords, no retention), so the log's
//! low watermark never moves here: TOO_OLD from a low watermark is covered by
//! `history::plan_since` (pure), TOO_OLD from the rule's age by an old record.

use std::sync::Arc;
use std::time::Duration;

use broker_bridge::config::Cli;
use broker_bridge::consume::{self, Continuity, Ctx};
use broker_bridge::deliver::{Completer, Links};
use broker_bridge::epoch::{Epochs, Incarnation, channel_key, partition_for};
use broker_bridge::history::{History, Readers};
use broker_bridge::hot::HotWindows;
use broker_bridge::ingest::{Ids, Producer, PushIngest};
use broker_bridge::kafka;
use broker_bridge::offsets::Tracker;
use broker_bridge::route::Routes;
use clap::Parser;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use proto::bridge::v1::{Envelope, envelope};
use proto::push::v1 as pb;
use proto::push::v1::push_server::Push;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "history";
const PARTITIONS: i32 = 3;
type Lost = pb::history_response::Lost;

fn cli(bootstrap: &str, extra: &[&str]) -> Cli {
    let mut args =
        vec!["broker-bridge", "--brokers", bootstrap, "--presence-addrs", "http://127.0.0.1:1", "--topic", TOPIC];
    args.extend_from_slice(&["--group", "history-test", "--kafka-option", "fetch.wait.max.ms=10"]);
    args.extend_from_slice(extra);
    Cli::try_parse_from(args).unwrap()
}

/// One bridge's Push API and history, in process (no consumer unless [`Bridge::consume`]).
struct Bridge {
    ingest: PushIngest,
    hot: Arc<Mutex<HotWindows>>,
    epochs: Arc<RwLock<Epochs>>,
    cli: Cli,
}

fn epochs() -> Epochs {
    // The mock reports no topic id (see `the_mock_cluster_gives_no_topic_id`).
    Epochs::new(Incarnation::Generation("1".into()), PARTITIONS)
}

fn bridge(bootstrap: &str, extra: &[&str]) -> Bridge {
    let cli = cli(bootstrap, extra);
    let hot = Arc::new(Mutex::new(HotWindows::new(kit::history::Rules::new(cli.history.clone()), cli.history_memory)));
    let epochs = Arc::new(RwLock::new(epochs()));
    let readers = Arc::new(Readers::new(kafka::reader_config(&cli).unwrap(), TOPIC).unwrap());
    let producer = Arc::new(Producer::new(kafka::producer_config(&cli).unwrap()).unwrap());
    let log = Arc::new(broker_bridge::log::Log::Kafka { producer, readers, topic: TOPIC.into() });
    let history = Arc::new(History {
        hot: hot.clone(),
        epochs: epochs.clone(),
        log: log.clone(),
        max_scan: cli.history_max_scan,
    });
    let ingest = PushIngest {
        log,
        topic: TOPIC.into(),
        ids: Arc::new(Ids::new("h")),
        produce_timeout: Duration::from_secs(5),
        max_message_bytes: 65536,
        presence: Vec::new(),
        idempotency: Arc::new(kit::idempotency::Idempotency::new(
            broker_bridge::ingest::IDEMPOTENCY_WINDOW,
            broker_bridge::ingest::IDEMPOTENCY_KEYS,
        )),
        history: Some(history),
    };
    Bridge { ingest, hot, epochs, cli }
}

impl Bridge {
    /// Runs this bridge's consumer (group member, no gateways) until the token is cancelled.
    fn consume(&self, stop: &CancellationToken) -> tokio::task::JoinHandle<()> {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let ctx = Ctx { tracker: tracker.clone(), hot: self.hot.clone(), topic: TOPIC.into() };
        let consumer: Arc<StreamConsumer<Ctx>> =
            Arc::new(kafka::consumer_config(&self.cli).unwrap().create_with_context(ctx).unwrap());
        consumer.subscribe(&[TOPIC]).unwrap();
        let completer = Completer { tracker, progress: Arc::new(tokio::sync::Notify::new()) };
        let links = Arc::new(Links::new(
            completer.clone(),
            Duration::from_secs(5),
            stop.clone(),
            kit::grpc::Bearer::new(None).unwrap(),
        ));
        tokio::spawn(consume::run(
            consume::Source::Kafka(consumer),
            TOPIC.into(),
            Arc::new(Routes::default()),
            links,
            completer,
            Continuity { hot: self.hot.clone(), epochs: self.epochs.clone() },
            1000,
            stop.clone(),
        ))
    }

    async fn publish(&self, channel: &str, n: u64, key: &str) -> pb::PublishResponse {
        let req = pb::PublishRequest {
            channel: channel.into(),
            data_json: format!("{{\"n\":{n}}}"),
            from: "t".into(),
            idempotency_key: key.into(),
        };
        self.ingest.publish(tonic::Request::new(req)).await.unwrap().into_inner()
    }

    /// As [`Bridge::publish`], marked as a retry of an ambiguous call.
    async fn publish_retry(&self, channel: &str, n: u64, key: &str) -> pb::PublishResponse {
        let mut req = tonic::Request::new(pb::PublishRequest {
            channel: channel.into(),
            data_json: format!("{{\"n\":{n}}}"),
            from: "t".into(),
            idempotency_key: key.into(),
        });
        req.metadata_mut().insert(kit::idempotency::RETRY_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        self.ingest.publish(req).await.unwrap().into_inner()
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: u32,
    ) -> Result<pb::HistoryResponse, tonic::Status> {
        let epoch = self.epochs.read().channel(channel).unwrap().1.to_string();
        self.history_at(channel, since.map(|seq| pb::Position { seq, epoch }), limit).await
    }

    async fn history_at(
        &self,
        channel: &str,
        since: Option<pb::Position>,
        limit: u32,
    ) -> Result<pb::HistoryResponse, tonic::Status> {
        let req = pb::HistoryRequest { channel: channel.into(), since, limit, position_only: false };
        self.ingest.history(tonic::Request::new(req)).await.map(tonic::Response::into_inner)
    }
}

/// Two channels that share a partition, and one that does not.
fn channels() -> (String, String, String) {
    let p = |c: &str| partition_for(channel_key(c).as_bytes(), PARTITIONS);
    let names: Vec<String> = (0..100).map(|i| format!("room:{i}")).collect();
    let a = names[0].clone();
    let b = names.iter().find(|c| **c != a && p(c) == p(&a)).unwrap().clone();
    let other = names.iter().find(|c| p(c) != p(&a)).unwrap().clone();
    (a, b, other)
}

fn summary(r: &pb::HistoryResponse) -> Vec<(u64, String)> {
    r.messages.iter().map(|m| (m.seq, m.data_json.clone())).collect()
}

fn mock() -> (MockCluster<'static, DefaultProducerContext>, String) {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    (mock, bootstrap)
}

#[tokio::test]
async fn the_partition_computed_for_a_channel_is_where_its_records_go() {
    let (_mock, bootstrap) = mock();
    let b = bridge(&bootstrap, &[]);
    let mut expected = Vec::new();
    for i in 0..40 {
        let channel = format!("c{i}");
        let seq = b.publish(&channel, i, "").await.seq;
        expected.push((channel, seq));
    }
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).set("group.id", "verify").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen = std::collections::HashMap::new();
    while seen.len() < expected.len() {
        let m = consumer.poll(Duration::from_secs(5)).expect("every record is read back").unwrap();
        let env = Envelope::decode(m.payload().unwrap()).unwrap();
        let Some(envelope::Target::Channel(c)) = env.target else { panic!("not a channel message") };
        assert_eq!(m.key(), Some(channel_key(&c).as_bytes()));
        seen.insert(c, (m.partition(), m.offset() as u64 + 1));
    }
    let mut used = std::collections::HashSet::new();
    for (channel, seq) in expected {
        let (p, _) = b.epochs.read().channel(&channel).unwrap();
        assert_eq!(seen[&channel], (p, seq), "{channel}");
        used.insert(p);
    }
    assert_eq!(used.len(), PARTITIONS as usize, "the channels spread over every partition");
}

#[tokio::test]
async fn the_consuming_bridge_answers_from_its_hot_window_and_after_a_restart_from_kafka() {
    let (mock, bootstrap) = mock();
    let (a, b_chan, other) = channels();
    let owner = bridge(&bootstrap, &[]);
    let stop = CancellationToken::new();
    let consumer = owner.consume(&stop);
    let mut a_msgs = Vec::new();
    for n in 0..30u64 {
        let channel = [&a, &b_chan, &other][n as usize % 3];
        let seq = owner.publish(channel, n, "").await.seq;
        if channel == &a {
            a_msgs.push((seq, format!("{{\"n\":{n}}}")));
        }
    }
    let (p, _) = owner.epochs.read().channel(&a).unwrap();
    let last = a_msgs.last().unwrap().0;
    // The hot window must have consumed up to the newest record of the partition.
    let high = owner.publish(&b_chan, 99, "").await.seq;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while owner.hot.lock().next_offset(p).is_none_or(|n| (n as u64) < high) {
        assert!(std::time::Instant::now() < deadline, "the consumer never caught up");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // With the broker down only the hot window can answer.
    mock.broker_down(1).unwrap();
    let since = a_msgs[3].0;
    let hot = owner.history(&a, Some(since), 0).await.expect("the hot window answers without Kafka");
    assert_eq!(summary(&hot), a_msgs[4..]);
    assert_eq!(hot.position.as_ref().unwrap().seq, high, "complete through what it consumed");
    assert!(!hot.more);
    let newest = owner.history(&a, None, 2).await.unwrap();
    assert_eq!(summary(&newest), a_msgs[8..]);
    mock.broker_up(1).unwrap();
    stop.cancel();
    consumer.await.unwrap();

    // The owner restarted: no hot window; the answer comes from the log, the same.
    let restarted = bridge(&bootstrap, &[]);
    let cold = restarted.history(&a, Some(since), 0).await.unwrap();
    assert_eq!(summary(&cold), a_msgs[4..]);
    assert_eq!(cold.position.as_ref().unwrap().seq, high, "complete through the high watermark");
    assert_eq!(cold.lost, Lost::None as i32);
    // Paged: at most `limit`, then `more` and the last message's position.
    let page = restarted.history(&a, Some(since), 2).await.unwrap();
    assert_eq!((summary(&page), page.more), (a_msgs[4..6].to_vec(), true));
    assert_eq!(page.position.as_ref().unwrap().seq, a_msgs[5].0);
    let rest = restarted.history_at(&a, page.position, 0).await.unwrap();
    assert_eq!((summary(&rest), rest.more), (a_msgs[6..].to_vec(), false));
    assert_eq!(summary(&restarted.history(&a, None, 3).await.unwrap()), a_msgs[7..]);
    assert_eq!(summary(&restarted.history(&a, Some(last), 0).await.unwrap()), []);
}

#[tokio::test]
async fn a_keyed_message_stored_twice_by_two_bridges_is_shown_once() {
    let (_mock, bootstrap) = mock();
    let (a, _, _) = channels();
    let (one, two) = (bridge(&bootstrap, &[]), bridge(&bootstrap, &[]));
    let first = one.publish(&a, 1, "order-1").await;
    one.publish(&a, 2, "").await;
    let again = two.publish(&a, 1, "order-1").await;
    assert_eq!(first.id, again.id);
    assert!(again.seq > first.seq && !again.duplicate, "stored a second time");
    let h = two.history(&a, Some(0), 0).await.unwrap();
    assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [first.seq, first.seq + 1]);
    assert!(h.messages[0].idempotent && !h.messages[1].idempotent);
    assert_eq!(h.messages.iter().filter(|m| m.id == first.id).count(), 1);
    let newest = two.history(&a, None, 10).await.unwrap();
    assert_eq!(newest.messages.iter().filter(|m| m.id == first.id).count(), 1);
    // A read from between the copies (a client shown the first resumes after it): the
    // second is not shown again. Bridge `two` had just started, so its memory of keys
    // did not cover the window and it marked its copy for readers to look back.
    let fresh = two.publish(&a, 3, "order-2").await;
    for reader in [&one, &two] {
        let between = reader.history(&a, Some(first.seq), 0).await.unwrap();
        assert_eq!(seqs(&between), [first.seq + 1, fresh.seq], "the copy at {} is left out", again.seq);
        assert_eq!(between.position.as_ref().unwrap().seq, fresh.seq);
    }

    // A bridge whose memory covers its window marks a copy only when the call says it
    // is a retry (`switchboard-retry`, as a gateway failing over to the next bridge does).
    let mut sure = bridge(&bootstrap, &[]);
    sure.ingest.idempotency = Arc::new(kit::idempotency::Idempotency::new(Duration::ZERO, 10));
    let k = sure.publish(&a, 4, "order-3").await;
    let unmarked = sure.publish(&a, 4, "order-3").await;
    let marked = sure.publish_retry(&a, 4, "order-3").await;
    assert!(k.seq < unmarked.seq && unmarked.seq < marked.seq && k.id == marked.id);
    let after = sure.history(&a, Some(k.seq), 0).await.unwrap();
    assert_eq!(seqs(&after), [unmarked.seq], "an unmarked copy cannot be told apart; the marked one is left out");
}

fn seqs(r: &pb::HistoryResponse) -> Vec<u64> {
    r.messages.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn back_to_back_log_reads_of_one_partition_each_read_through_the_watermark() {
    // One pooled Kafka consumer serves the reads one after another: the end-of-partition
    // event of a read must not end the next one early (an answer "complete through" the
    // high watermark that lacked the messages below it: a poller lost two in a chaos run).
    let (_mock, bootstrap) = mock();
    let (a, b_chan, _) = channels();
    let b = bridge(&bootstrap, &[]);
    let mut shown = 0;
    for round in 0..20u64 {
        let mut want = Vec::new();
        for n in 0..3 {
            want.push(b.publish(&a, round * 10 + n, "").await.seq);
            b.publish(&b_chan, n, "").await;
        }
        let r = b.history(&a, Some(shown), 0).await.unwrap();
        assert_eq!(seqs(&r), want, "round {round}");
        shown = *want.last().unwrap();
    }
}

#[tokio::test]
async fn positions_ahead_other_epochs_channels_without_history_and_bad_requests() {
    let (_mock, bootstrap) = mock();
    let (a, _, _) = channels();
    let b = bridge(&bootstrap, &["--history", "quiet:*=off,*=1000/1h", "--history-max-scan", "5"]);
    for n in 0..8 {
        b.publish(&a, n, "").await;
    }
    let high = b.publish(&a, 8, "").await.seq;
    let (_, epoch) = b.epochs.read().channel(&a).unwrap();
    // position_only: the high watermark; every later message has a greater seq.
    let req = pb::HistoryRequest { channel: a.clone(), position_only: true, ..Default::default() };
    let pos = b.ingest.history(tonic::Request::new(req)).await.unwrap().into_inner();
    assert_eq!(pos.position, Some(pb::Position { seq: high, epoch: epoch.to_string() }));
    assert!(pos.messages.is_empty());
    assert!(b.publish(&a, 9, "").await.seq > high);
    let lost = |r: &pb::HistoryResponse| Lost::try_from(r.lost).unwrap();
    let ahead = b.history(&a, Some(high + 100), 0).await.unwrap();
    assert_eq!(lost(&ahead), Lost::Ahead);
    assert_eq!(ahead.position.as_ref().unwrap().seq, high + 1, "the current position");
    let other = pb::Position { seq: 3, epoch: "k0000.1".into() };
    let changed = b.history_at(&a, Some(other), 0).await.unwrap();
    assert_eq!((lost(&changed), changed.messages.len()), (Lost::EpochChanged, 0));
    assert_eq!(changed.position.as_ref().unwrap().epoch, *epoch);
    assert_eq!(lost(&b.history("quiet:1", Some(0), 0).await.unwrap()), Lost::NoHistory);
    // 10 records after seq 0, at most 5 may be read: decided before reading.
    assert_eq!(lost(&b.history(&a, Some(0), 0).await.unwrap()), Lost::TooMany);
    assert_eq!(lost(&b.history(&a, Some(high - 4), 0).await.unwrap()), Lost::None);
    for (channel, limit) in [(a.as_str(), 1001), ("", 0), ("a b", 0)] {
        let req = pb::HistoryRequest { channel: channel.into(), limit, ..Default::default() };
        let e = b.ingest.history(tonic::Request::new(req)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{channel:?} {limit}");
    }
    assert!(b.history(&a, Some(high - 4), 1000).await.is_ok());
}

#[tokio::test]
async fn messages_older_than_the_rules_age_are_too_old_in_the_log() {
    let (_mock, bootstrap) = mock();
    let b = bridge(&bootstrap, &["--history", "*=1000/1h"]);
    // A record accepted two hours ago (as if the topic's retention were longer than the rule).
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let two_hours_ago =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 - 7_200_000;
    let env = Envelope {
        id: "old".into(),
        target: Some(envelope::Target::Channel("old".into())),
        payload: b"1".to_vec(),
        published_at_ms: two_hours_ago,
        ..Default::default()
    };
    let payload = env.encode_to_vec();
    producer.send(BaseRecord::to(TOPIC).key(&channel_key("old")).payload(&payload)).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(5)).unwrap();
    let fresh = b.publish("old", 2, "").await.seq;
    let r = b.history("old", Some(0), 0).await.unwrap();
    assert_eq!(Lost::try_from(r.lost).unwrap(), Lost::TooOld);
    // The newest: only what the rule still keeps.
    let r = b.history("old", None, 10).await.unwrap();
    assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [fresh]);
}

#[tokio::test]
async fn the_mock_cluster_gives_no_topic_id_so_the_generation_names_the_epochs() {
    let (_mock, bootstrap) = mock();
    let cli = cli(&bootstrap, &[]);
    let readers = Readers::new(kafka::reader_config(&cli).unwrap(), TOPIC).unwrap();
    let (partitions, id) =
        tokio::task::spawn_blocking(move || broker_bridge::history::discover(&readers, TOPIC)).await.unwrap().unwrap();
    assert_eq!(partitions, PARTITIONS);
    // librdkafka sends DescribeTopics to the controller, and the mock never names one.
    assert_eq!(id, None);
    let e = broker_bridge::history::epochs_from(partitions, id, "1", None);
    assert_eq!(e, epochs());
    assert_eq!(&**e.of(2).unwrap(), "g1.2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_reads_beyond_the_running_and_queued_bound_are_refused_at_once() {
    use broker_bridge::history::{CONCURRENT_READS, Collector, QUEUED_READS};
    let (mock, bootstrap) = mock();
    let cli = cli(&bootstrap, &[]);
    let readers = Arc::new(
        Readers::new(kafka::reader_config(&cli).unwrap(), TOPIC).unwrap().with_read_timeout(Duration::from_secs(1)),
    );
    // With a slow broker every read lasts until its timeout: the slots fill, then the queue.
    mock.broker_round_trip_time(1, Duration::from_secs(5)).unwrap();
    let mut reads = Vec::new();
    for _ in 0..CONCURRENT_READS + QUEUED_READS {
        let r = readers.clone();
        reads.push(tokio::spawn(async move { r.scan(0, 0, 10, Collector::since("a", 10, 0)).await.map(|_| ()) }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while readers.load() != (CONCURRENT_READS, QUEUED_READS) {
        assert!(std::time::Instant::now() < deadline, "load {:?}", readers.load());
        tokio::task::yield_now().await;
    }
    let refused = readers.scan(0, 0, 10, Collector::since("a", 10, 0)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains("retry"), "{}", refused.message());
    // Queued callers that go away (a cancelled gRPC call drops its future) leave the queue;
    // running reads end at their timeout.
    for r in reads.iter().skip(CONCURRENT_READS) {
        r.abort();
    }
    let first = reads.remove(0).await.unwrap().unwrap_err();
    assert_eq!(first.code(), tonic::Code::Unavailable, "{first:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while readers.load() != (0, 0) {
        assert!(std::time::Instant::now() < deadline, "load {:?}", readers.load());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Room again: a new read is queued and runs (it times out against the slow broker).
    let again = readers.scan(0, 0, 10, Collector::since("a", 10, 0)).await.unwrap_err();
    assert!(again.message().contains("timed out"), "{}", again.message());
}
