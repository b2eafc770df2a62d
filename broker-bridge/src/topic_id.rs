//! The one FFI module of Switchboard: Kafka's topic id through librdkafka's
//! `rd_kafka_DescribeTopics`, which rust-rdkafka does not wrap. Everything else
//! uses the safe rust-rdkafka API.
#![allow(unsafe_code)]

use std::time::Duration;

use rdkafka::error::RDKafkaErrorCode;

/// Kafka's id (a UUID, 16 bytes, all zero when the broker has none) of `topic`,
/// asked with the DescribeTopics admin request on the client `native`.
///
/// rust-rdkafka does not wrap `rd_kafka_DescribeTopics` (librdkafka ≥ 2.3), so
/// this calls it through the raw bindings. Blocking: call it from a blocking
/// thread. Every object created here is destroyed here (the guard below), the
/// topic-name C string outlives the request (librdkafka copies the names into
/// the collection), and the returned description is only read before the result
/// event that owns it is destroyed.
pub fn describe(native: &rdkafka::client::NativeClient, topic: &str, timeout: Duration) -> Result<[u8; 16], String> {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, CString};

    /// Destroys what the request allocated, whatever path we leave by.
    struct Guard {
        queue: *mut rd::rd_kafka_queue_t,
        topics: *mut rd::rd_kafka_TopicCollection_t,
        options: *mut rd::rd_kafka_AdminOptions_t,
        event: *mut rd::rd_kafka_event_t,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: each pointer is null or was returned by its constructor and not freed yet.
            unsafe {
                if !self.event.is_null() {
                    rd::rd_kafka_event_destroy(self.event);
                }
                if !self.options.is_null() {
                    rd::rd_kafka_AdminOptions_destroy(self.options);
                }
                if !self.topics.is_null() {
                    rd::rd_kafka_TopicCollection_destroy(self.topics);
                }
                if !self.queue.is_null() {
                    rd::rd_kafka_queue_destroy(self.queue);
                }
            }
        }
    }

    let name = CString::new(topic).map_err(|_| "topic name contains NUL".to_owned())?;
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = native.ptr();
    // SAFETY: `rk` is a live handle borrowed from `native` for this call; the calls
    // follow librdkafka's documented admin-API sequence (rdkafka.h, DescribeTopics).
    unsafe {
        let mut g = Guard {
            queue: rd::rd_kafka_queue_new(rk),
            topics: std::ptr::null_mut(),
            options: std::ptr::null_mut(),
            event: std::ptr::null_mut(),
        };
        let mut names = [name.as_ptr()];
        g.topics = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        g.options = rd::rd_kafka_AdminOptions_new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS);
        if g.queue.is_null() || g.topics.is_null() || g.options.is_null() {
            return Err("describe topics: librdkafka refused to allocate the request".into());
        }
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(g.options, timeout_ms, errstr.as_mut_ptr(), errstr.len());
        rd::rd_kafka_DescribeTopics(rk, g.topics, g.options, g.queue);
        // The request times out (with an error event) after `timeout`; wait a little longer.
        g.event = rd::rd_kafka_queue_poll(g.queue, timeout_ms.saturating_add(1000));
        if g.event.is_null() {
            return Err(format!("describe topics: no answer within {timeout:?}"));
        }
        if rd::rd_kafka_event_error(g.event) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let msg = rd::rd_kafka_event_error_string(g.event);
            let msg = if msg.is_null() { "?".into() } else { CStr::from_ptr(msg).to_string_lossy() };
            return Err(format!("describe topics: {msg}"));
        }
        let result = rd::rd_kafka_event_DescribeTopics_result(g.event);
        if result.is_null() {
            return Err("describe topics: unexpected event".into());
        }
        let mut n = 0usize;
        let descs = rd::rd_kafka_DescribeTopics_result_topics(result, &mut n);
        for i in 0..n {
            let d = *descs.add(i);
            if CStr::from_ptr(rd::rd_kafka_TopicDescription_name(d)) != name.as_c_str() {
                continue;
            }
            let err = rd::rd_kafka_TopicDescription_error(d);
            if !err.is_null() && rd::rd_kafka_error_code(err) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let code: RDKafkaErrorCode = rd::rd_kafka_error_code(err).into();
                return Err(format!("describe topic {topic}: {code}"));
            }
            let uuid = rd::rd_kafka_TopicDescription_topic_id(d);
            if uuid.is_null() {
                return Ok([0; 16]);
            }
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&rd::rd_kafka_Uuid_most_significant_bits(uuid).to_be_bytes());
            id[8..].copy_from_slice(&rd::rd_kafka_Uuid_least_significant_bits(uuid).to_be_bytes());
            return Ok(id);
        }
        Err(format!("describe topics: {topic} not in the answer"))
    }
}
