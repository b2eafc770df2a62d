//! Broker-side faults, in process, with librdkafka's mock cluster: injected
//! produce errors, a leader moving, brokers going down and up. Every message the
//! Push API acknowledged must be in the topic exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use broker_bridge::config::Cli;
use broker_bridge::ingest::{Ids, Producer, PushIngest};
use broker_bridge::kafka;
use clap::Parser;
use prost::Message as _;
use proto::bridge::v1::Envelope;
use proto::push::v1 as pb;
use proto::push::v1::push_server::Push;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TOPIC: &str = "faults";
const PARTITIONS: i32 = 4;

fn ingest(bootstrap: &str, timeout: &str) -> PushIngest {
    let cli = Cli::try_parse_from([
        "broker-bridge",
        "--brokers",
        bootstrap,
        "--presence-addrs",
        "http://127.0.0.1:1",
        "--topic",
        TOPIC,
        "--produce-timeout",
        timeout,
    ])
    .unwrap();
    let producer = Arc::new(Producer::new(kafka::producer_config(&cli).unwrap()).unwrap());
    let readers = Arc::new(broker_bridge::history::Readers::new(kafka::reader_config(&cli).unwrap(), TOPIC).unwrap());
    PushIngest {
        log: Arc::new(broker_bridge::log::Log::Kafka { producer, readers, topic: TOPIC.into() }),
        topic: TOPIC.into(),
        ids: Arc::new(Ids::new("mock")),
        produce_timeout: cli.produce_timeout,
        max_message_bytes: 65536,
        presence: Vec::new(),
        idempotency: Arc::new(kit::idempotency::Idempotency::new(
            broker_bridge::ingest::IDEMPOTENCY_WINDOW,
            broker_bridge::ingest::IDEMPOTENCY_KEYS,
        )),
        history: None,
    }
}

async fn publish(ing: &PushIngest, n: usize) -> Result<(String, u64), tonic::Status> {
    let req = pb::PublishRequest {
        channel: format!("ch{}", n % 8),
        data_json: format!("{{\"n\":{n}}}"),
        from: "t".into(),
        ..Default::default()
    };
    ing.publish(tonic::Request::new(req)).await.map(|r| {
        let r = r.into_inner();
        (r.id, r.seq)
    })
}

/// Every envelope id in the topic, with how many times it appears.
fn stored_ids(bootstrap: &str) -> HashMap<String, usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "verify")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut idle = 0;
    while idle < 20 {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                idle = 0;
                let env = Envelope::decode(m.payload().unwrap()).unwrap();
                *ids.entry(env.id).or_default() += 1;
            }
            Some(Err(e)) => panic!("verify consumer: {e}"),
            None => idle += 1,
        }
    }
    ids
}

#[tokio::test]
async fn acknowledged_messages_survive_produce_errors_and_leader_moves_exactly_once() {
    let mock = MockCluster::new(3).unwrap();
    mock.create_topic(TOPIC, PARTITIONS, 3).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let ing = ingest(&bootstrap, "3s");
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut refused = 0;
    for round in 0..10 {
        // A fault per round: retriable produce errors, a leader move, a broker bouncing.
        match round % 3 {
            0 => mock.request_errors(
                RDKafkaApiKey::Produce,
                &[
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                ],
            ),
            1 => mock.partition_leader(TOPIC, round % PARTITIONS, Some(1 + (round % 3))).unwrap(),
            _ => {
                mock.broker_down(2).unwrap();
            }
        }
        let batch = futures_util::future::join_all((0..150).map(|i| publish(&ing, round as usize * 150 + i))).await;
        if round % 3 == 2 {
            mock.broker_up(2).unwrap();
        }
        for r in batch {
            match r {
                Ok((id, seq)) => {
                    acked.insert(id, seq);
                }
                // A partition whose leader is down stays unavailable (the mock moves no leader
                // by itself): those publishes are refused as retryable, never acknowledged.
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                    refused += 1;
                }
            }
        }
    }
    assert!(acked.len() >= 1000, "only {} of 1500 acknowledged ({refused} refused)", acked.len());
    let stored = stored_ids(&bootstrap);
    for id in acked.keys() {
        assert_eq!(stored.get(id), Some(&1), "acknowledged {id} stored {:?} times", stored.get(id));
    }
    assert!(stored.values().all(|&n| n == 1), "the idempotent producer never duplicates");
}

#[tokio::test]
async fn all_brokers_down_gives_unavailable_within_the_timeout_then_recovers() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let ing = ingest(&bootstrap, "1500ms");
    let (first, _) = publish(&ing, 0).await.expect("healthy cluster");
    mock.broker_down(1).unwrap();
    let started = std::time::Instant::now();
    let err = publish(&ing, 1).await.expect_err("nothing can store it");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("retry"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_millis(1500 + 1500), "took {:?}", started.elapsed());
    mock.broker_up(1).unwrap();
    let mut again = None;
    for n in 2..200 {
        if let Ok((id, _)) = publish(&ing, n).await {
            again = Some(id);
            break;
        }
    }
    let again = again.expect("publishes recover when the broker is back");
    let stored = stored_ids(&bootstrap);
    assert_eq!(stored.get(&first), Some(&1));
    assert_eq!(stored.get(&again), Some(&1));
}

#[tokio::test]
async fn concurrent_and_repeated_calls_with_one_idempotency_key_store_one_record() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let ing = ingest(&bootstrap, "3s");
    let req = |key: &str| pb::PublishRequest {
        channel: "orders".into(),
        data_json: "1".into(),
        from: "shop".into(),
        idempotency_key: key.into(),
    };
    let answers =
        futures_util::future::join_all((0..20).map(|_| ing.publish(tonic::Request::new(req("order-1"))))).await;
    let answers: Vec<pb::PublishResponse> = answers.into_iter().map(|r| r.unwrap().into_inner()).collect();
    assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1, "one call stored it");
    assert!(answers.iter().all(|a| (a.id.as_str(), a.seq) == (answers[0].id.as_str(), answers[0].seq)));
    assert_eq!(answers[0].delivered, None, "a bridge does not claim a delivery count");
    let later = ing.publish(tonic::Request::new(req("order-1"))).await.unwrap().into_inner();
    assert!(later.duplicate);
    // Another bridge (its own memory) stores the retry again, under the same id.
    let other = ingest(&bootstrap, "3s");
    let elsewhere = other.publish(tonic::Request::new(req("order-1"))).await.unwrap().into_inner();
    assert_eq!(elsewhere.id, answers[0].id);
    ing.publish(tonic::Request::new(req("order-2"))).await.unwrap();
    let bad = ing.publish(tonic::Request::new(req("a b"))).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let stored = stored_ids(&bootstrap);
    assert_eq!(stored.get(&answers[0].id), Some(&2), "once per bridge: {stored:?}");
    assert_eq!(stored.len(), 2, "{stored:?}");
}
