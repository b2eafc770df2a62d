//! The only Kafka client in Switchboard: client settings, topic creation,
//! the idempotent producer.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::Cli;

/// Settings common to producer, consumer and admin, plus `--kafka-option`s.
pub fn client_config(cli: &Cli) -> Result<ClientConfig, String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cli.brokers);
    c.set("client.id", "switchboard-bridge");
    for kv in &cli.kafka_options {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("--kafka-option `{kv}` is not key=value"))?;
        c.set(k.trim(), v.trim());
    }
    Ok(c)
}

/// Producer settings: idempotent, acks=all, bounded time to store a message.
/// (`--kafka-option`s are applied first, so they cannot weaken these.)
pub fn producer_config(cli: &Cli) -> Result<ClientConfig, String> {
    let mut c = client_config(cli)?;
    let timeout = cli.produce_timeout.as_millis().to_string();
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", &timeout)
        .set("socket.timeout.ms", &timeout)
        .set("compression.type", "none")
        // Explicit, because history computes a channel's partition the same way
        // (`epoch::partition_for`): CRC-32 of the key modulo the partition count.
        .set("partitioner", "consistent_random");
    Ok(c)
}

/// Consumer settings: manual offset management, earliest on a new group.
pub fn consumer_config(cli: &Cli) -> Result<ClientConfig, String> {
    let mut c = client_config(cli)?;
    c.set("group.id", &cli.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // No transactions are used: read_committed would only add a dependence on the
        // broker's last-stable-offset bookkeeping.
        .set("isolation.level", "read_uncommitted")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("partition.assignment.strategy", "range,roundrobin")
        .set("statistics.interval.ms", "0");
    for kv in &cli.kafka_options {
        if let Some((k, v)) = kv.split_once('=') {
            c.set(k.trim(), v.trim());
        }
    }
    Ok(c)
}

/// Creates the messages topic unless it exists.
pub async fn ensure_topic(cli: &Cli) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(cli)?.create().map_err(|e| format!("kafka admin client: {e}"))?;
    let retention = cli.retention.as_millis().to_string();
    let topic = NewTopic::new(&cli.topic, cli.partitions, TopicReplication::Fixed(cli.replication))
        .set("retention.ms", &retention)
        .set("cleanup.policy", "delete");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics([&topic], &opts).await.map_err(|e| format!("create topic {}: {e}", cli.topic))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("create topic {name}: {code}")),
        }
    }
    Ok(())
}

/// Settings of a consumer outside the group (history reads, watermarks, metadata):
/// assigned by hand, never committing.
pub fn reader_config(cli: &Cli) -> Result<ClientConfig, String> {
    let mut c = client_config(cli)?;
    c.set("group.id", format!("{}.history", cli.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("isolation.level", "read_uncommitted")
        .set("statistics.interval.ms", "0");
    Ok(c)
}
