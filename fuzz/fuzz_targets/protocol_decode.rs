//! Any client text frame: decoding never panics, and every reply we would
//! encode from what was decoded is valid JSON.
#![no_main]

use gateway::protocol::{self, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match protocol::decode(text) {
        Ok(req) => {
            let frame = match &req.command {
                Command::Publish { channel, data } => protocol::message(channel, "id", "from", 1, data.get()),
                Command::Send { user, data } => protocol::direct("id", "from", user, data.get()),
                Command::Subscribe { channel } | Command::Unsubscribe { channel } | Command::Presence { channel } => {
                    protocol::membership(true, channel, "u")
                }
                Command::Ping => protocol::pong(req.reference),
            };
            serde_json::from_slice::<serde_json::Value>(&frame).expect("encoded frames are JSON");
            let ack = protocol::ack(req.reference, Some("id"), Some(1), None);
            serde_json::from_slice::<serde_json::Value>(&ack).expect("acks are JSON");
        }
        Err(e) => {
            let reply = protocol::error(e.reference, e.code, e.message, None);
            serde_json::from_slice::<serde_json::Value>(&reply).expect("errors are JSON");
        }
    }
});
