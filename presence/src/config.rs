//! presence configuration: every flag is also a `SWITCHBOARD_PRESENCE_*` variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "presence", version, about = "Switchboard presence registry", args_override_self = true)]
pub struct Cli {
    /// gRPC address (Sync, queries, Watch, health, reflection).
    #[arg(long, env = "SWITCHBOARD_PRESENCE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub common: kit::args::CommonArgs,
    /// A node that sends nothing for this long is forgotten.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_LEASE", value_parser = parse_duration, default_value = "10s")]
    pub lease: Duration,
    /// Channel patterns whose members are tracked (comma-separated, `*` wildcard).
    #[arg(long, env = "SWITCHBOARD_PRESENCE_CHANNELS", value_delimiter = ',', default_value = "room:*")]
    pub presence_channels: Vec<String>,
    /// Rooms with more members than this publish counts instead of joins and leaves.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_LARGE_ROOM", default_value = "1000")]
    pub large_room: usize,
    /// Queries handled at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_MAX_CONCURRENT", default_value = "256")]
    pub max_concurrent: usize,
    /// Time limit to produce a response.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub timeout: Duration,
}

pub use kit::args::parse_duration;

#[cfg(test)]
mod tests {
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
