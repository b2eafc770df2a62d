//! broker-bridge configuration: every flag is also a `SWITCHBOARD_BRIDGE_*` variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "broker-bridge", version, about = "Switchboard Kafka bridge and Push API", args_override_self = true)]
pub struct Cli {
    /// gRPC address of the Push API (gateways and internal services).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub common: kit::args::CommonArgs,
    /// This bridge's id (in message ids and logs). Default: hostname-pid.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_ID")]
    pub bridge_id: Option<String>,
    /// The backbone: `kafka://host:port,...`, `nats://host:port` (JetStream) or
    /// `redis://host:port[/db]` (Streams). Without it: Kafka at `--brokers`.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_BACKBONE")]
    pub backbone: Option<String>,
    /// NATS and Redis: how long a bridge's partition lease lasts without renewal (a dead
    /// bridge's partitions are taken over after it; Kafka uses its consumer group instead).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_LEASE", value_parser = parse_duration, default_value = "10s")]
    pub lease: Duration,
    /// Redis: entries kept per partition stream (`XADD MAXLEN ~`).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_STREAM_MAX_LEN", default_value = "1000000")]
    pub stream_max_len: u64,
    /// NATS: bytes kept per partition stream (-1: no limit; `--retention` bounds the age).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_STREAM_MAX_BYTES", default_value = "-1", allow_hyphen_values = true)]
    pub stream_max_bytes: i64,
    /// Kafka bootstrap servers.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// The messages topic.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_TOPIC", default_value = "switchboard.messages")]
    pub topic: String,
    /// Consumer group shared by all bridges.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_GROUP", default_value = "switchboard-bridge")]
    pub group: String,
    /// Create the topic at start if it is missing.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_CREATE_TOPICS", default_value = "true", action = clap::ArgAction::Set)]
    pub create_topics: bool,
    /// Partitions of a created topic (NATS, Redis: of a created log; then fixed).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_PARTITIONS", default_value = "12")]
    pub partitions: i32,
    /// Replication factor of a created topic (NATS: stream and bucket replicas).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_REPLICATION", default_value = "1")]
    pub replication: i32,
    /// Retention of a created topic (NATS: stream max age).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_RETENTION", value_parser = parse_duration, default_value = "1h")]
    pub retention: Duration,
    /// Extra librdkafka settings, `key=value`, repeatable (e.g. fetch.wait.max.ms=10).
    #[arg(long = "kafka-option", env = "SWITCHBOARD_BRIDGE_KAFKA_OPTIONS", value_delimiter = ',')]
    pub kafka_options: Vec<String>,
    /// Presence replicas (`http://host:port`, comma-separated), for routing.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_PRESENCE_ADDRS", value_delimiter = ',', required = true)]
    pub presence_addrs: Vec<String>,
    /// After reconnecting to presence, how long a gateway it does not list is still routed to.
    /// Presence is soft state: a restarted replica starts empty and gateways re-feed it within
    /// seconds; dropping them at once would route their subscribers' messages nowhere meanwhile.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_PRESENCE_GRACE", value_parser = parse_duration, default_value = "15s")]
    pub presence_grace: Duration,
    /// Longest wait for Kafka to store a message before the caller gets UNAVAILABLE.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_PRODUCE_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub produce_timeout: Duration,
    /// A gateway that acknowledges nothing for this long is given up on for the pending messages
    /// (a dead gateway is normally given up on sooner, when presence reports it down).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_DELIVERY_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub delivery_timeout: Duration,
    /// Consumed messages not yet acknowledged by every target gateway, at most.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_MAX_IN_FLIGHT", default_value = "20000")]
    pub max_in_flight: usize,
    /// Largest payload accepted, in bytes.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_MAX_MESSAGE_BYTES", default_value = "65536")]
    pub max_message_bytes: usize,
    /// Channel history rules, `PATTERN=COUNT/AGE` (first match decides; `PATTERN=off`: none).
    /// COUNT/AGE bound the hot window per channel; AGE also bounds reads from Kafka.
    #[arg(long, env = "SWITCHBOARD_BRIDGE_HISTORY", value_delimiter = ',', default_value = "*=10000/1h")]
    pub history: Vec<kit::history::Rule>,
    /// Bytes all hot history windows of this bridge may hold (oldest entries evicted first).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_HISTORY_MEMORY", default_value = "67108864")]
    pub history_memory: usize,
    /// Most records one History request may read from Kafka (decided from the watermarks
    /// before reading: more is answered TOO_MANY).
    #[arg(long, env = "SWITCHBOARD_BRIDGE_HISTORY_MAX_SCAN", default_value = "200000")]
    pub history_max_scan: u64,
    /// Generation of the topic in epochs when the broker reports no topic id (bump it after
    /// re-creating the topic on such a broker; docs/design.md "History in a cluster").
    #[arg(long, env = "SWITCHBOARD_BRIDGE_TOPIC_GENERATION", default_value = "1")]
    pub topic_generation: String,
}

pub use kit::args::parse_duration;

#[cfg(test)]
mod tests {
    #[test]
    fn history_flags_parse() {
        use clap::Parser;
        let base = ["broker-bridge", "--presence-addrs", "http://p:1"];
        let cli = super::Cli::try_parse_from(base).unwrap();
        assert_eq!(cli.history.len(), 1);
        assert_eq!((cli.history[0].pattern.as_str(), cli.history[0].max_messages), ("*", 10000));
        assert_eq!(cli.history[0].max_age, std::time::Duration::from_secs(3600));
        assert_eq!((cli.history_memory, cli.history_max_scan), (64 << 20, 200_000));
        let cli =
            super::Cli::try_parse_from(base.into_iter().chain(["--history", "secret:*=off,room:*=5/1m"])).unwrap();
        let rules = kit::history::Rules::new(cli.history);
        assert!(rules.for_channel("secret:1").is_none());
        assert_eq!(rules.for_channel("room:1").unwrap().max_messages, 5);
        assert!(super::Cli::try_parse_from(base.into_iter().chain(["--history", "x"])).is_err());
    }

    #[test]
    fn every_flag_has_an_env_var() {
        use clap::CommandFactory;
        for arg in super::Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" {
                assert!(arg.get_env().is_some(), "flag {id} has no environment variable");
            }
        }
    }
}
