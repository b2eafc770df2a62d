//! Positions in a cluster, pure: which partition holds a channel, and the epoch
//! (the name of the stream a channel's `seq` counts in).
//!
//! - The producer keys a channel's records `c:<channel>` and uses librdkafka's
//!   `consistent_random` partitioner (set explicitly in `kafka::producer_config`):
//!   CRC-32 (IEEE, as zlib) of the key, modulo the partition count.
//!   [`partition_for`] computes the same, so history knows where a channel lives.
//! - `seq` = offset + 1 within that partition; the epoch names the partition of
//!   one incarnation of the topic: `k<topic-id>.<partition>`, topic-id being
//!   Kafka's topic UUID in Kafka's own printable form (URL-safe base64, 22
//!   characters). A re-created topic has a new UUID, a re-partitioned one moves
//!   channels to other partitions: either way the channel's epoch changes.
//! - A broker that reports no topic id (all zero) gets a fallback epoch
//!   `g<generation>.<partition>` (see [`Epochs::fallback`] and docs/design.md).

/// CRC-32 (IEEE 802.3, reflected, as zlib and librdkafka's `rd_crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The Kafka record key of a channel's messages.
pub fn channel_key(channel: &str) -> String {
    format!("c:{channel}")
}

/// The partition librdkafka's `consistent_random` partitioner picks for a
/// non-empty `key` among `partitions` (> 0).
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    debug_assert!(partitions > 0 && !key.is_empty());
    (crc32(key) % partitions.max(1) as u32) as i32
}

/// Kafka's printable form of a topic id: URL-safe base64 without padding.
pub fn topic_id_string(id: [u8; 16]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(22);
    for chunk in id.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// What names the topic's incarnation in epochs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incarnation {
    /// Kafka's topic UUID (never all zero).
    TopicId([u8; 16]),
    /// The broker reports no topic id: a generation marker (see docs/design.md).
    Generation(String),
    /// A leased backbone's log id (created with the log): `n` NATS JetStream, `r` Redis Streams.
    Log(char, [u8; 16]),
}

/// The epochs of one topic's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epochs {
    pub incarnation: Incarnation,
    pub partitions: i32,
    /// Per partition, the epoch string.
    names: Vec<std::sync::Arc<str>>,
}

/// Longest epoch (printable ASCII).
pub const MAX_EPOCH: usize = 64;

impl Epochs {
    pub fn new(incarnation: Incarnation, partitions: i32) -> Self {
        let prefix = match &incarnation {
            Incarnation::TopicId(id) => format!("k{}", topic_id_string(*id)),
            Incarnation::Generation(g) => format!("g{g}"),
            Incarnation::Log(letter, id) => format!("{letter}{}", topic_id_string(*id)),
        };
        let names = (0..partitions.max(0)).map(|p| std::sync::Arc::from(format!("{prefix}.{p}"))).collect();
        Self { incarnation, partitions, names }
    }

    /// From a topic id as the broker reported it; all zero means none.
    pub fn from_topic_id(id: [u8; 16], partitions: i32, fallback: impl FnOnce() -> String) -> Self {
        if id == [0; 16] {
            Self::new(Incarnation::Generation(fallback()), partitions)
        } else {
            Self::new(Incarnation::TopicId(id), partitions)
        }
    }

    /// The epoch of `partition` (None when the topic has no such partition).
    pub fn of(&self, partition: i32) -> Option<&std::sync::Arc<str>> {
        usize::try_from(partition).ok().and_then(|p| self.names.get(p))
    }

    /// The partition and epoch of a channel.
    pub fn channel(&self, channel: &str) -> Option<(i32, std::sync::Arc<str>)> {
        if self.partitions < 1 {
            return None;
        }
        let p = partition_for(channel_key(channel).as_bytes(), self.partitions);
        self.of(p).map(|e| (p, e.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
    }

    #[test]
    fn partitions_spread_and_stay_in_range() {
        let mut seen = [0usize; 12];
        for i in 0..1200 {
            let p = partition_for(channel_key(&format!("room:{i}")).as_bytes(), 12);
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        assert_eq!(partition_for(b"c:x", 1), 0);
    }

    #[test]
    fn topic_ids_print_as_kafka_does() {
        // Kafka prints Uuid(0x123456789abcdef0, 0x0fedcba987654321) as "EjRWeJq83vAP7cuph2VDIQ".
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&0x1234_5678_9abc_def0u64.to_be_bytes());
        id[8..].copy_from_slice(&0x0fed_cba9_8765_4321u64.to_be_bytes());
        assert_eq!(topic_id_string(id), "EjRWeJq83vAP7cuph2VDIQ");
        assert_eq!(topic_id_string([0xff; 16]), "_____________________w");
    }

    #[test]
    fn epochs_name_the_partition_of_one_incarnation() {
        let e = Epochs::from_topic_id([7; 16], 4, || unreachable!());
        let (p, epoch) = e.channel("room:1").unwrap();
        assert_eq!(p, partition_for(b"c:room:1", 4));
        assert_eq!(&*epoch, format!("k{}.{p}", topic_id_string([7; 16])));
        assert!(epoch.len() <= MAX_EPOCH && epoch.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        assert!(e.of(4).is_none() && e.of(-1).is_none());
        let f = Epochs::from_topic_id([0; 16], 4, || "abc".into());
        assert_eq!(&**f.of(2).unwrap(), "gabc.2");
        // Another incarnation or another partition count gives other epochs.
        assert_ne!(Epochs::from_topic_id([8; 16], 4, String::new).of(0), e.of(0));
        let c = (0..64)
            .map(|i| format!("c{i}"))
            .find(|c| e.channel(c).unwrap().0 != Epochs::new(e.incarnation.clone(), 5).channel(c).unwrap().0);
        assert!(c.is_some(), "re-partitioning moves some channel");
    }
}
