//! `broker-bridge`: parse config, start telemetry, run, map the result to an exit code.

use broker_bridge::config::Cli;
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    // async-nats logs every refused connect at error level; the bridge reports those itself
    // (a start that fails is one line and exit 64; later ones are the client's events,
    // logged by the NATS log). Unless the filter names async_nats, its connector is quiet.
    let mut filter = cli.common.log_filter.clone();
    if !filter.contains("async_nats") {
        filter.push_str(",async_nats::connector=off");
    }
    if let Err(e) = kit::telemetry::init_logging(cli.common.log_format, &filter) {
        eprintln!("broker-bridge: invalid --log-filter: {e}");
        std::process::exit(kit::EXIT_CONFIG);
    }
    if cli.partitions < 1 || cli.replication < 1 || cli.max_in_flight == 0 || cli.produce_timeout.is_zero() {
        eprintln!(
            "broker-bridge: --partitions, --replication, --max-in-flight and --produce-timeout must be above zero"
        );
        std::process::exit(kit::EXIT_CONFIG);
    }
    if let Err(e) = broker_bridge::log::Backbone::parse(cli.backbone.as_deref(), &cli.brokers) {
        eprintln!("broker-bridge: {e}");
        std::process::exit(kit::EXIT_CONFIG);
    }
    if cli.lease < std::time::Duration::from_millis(500) {
        eprintln!("broker-bridge: --lease must be at least 500ms");
        std::process::exit(kit::EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("broker-bridge: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let metrics = match kit::telemetry::init_metrics(broker_bridge::metrics::BUCKETS) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("broker-bridge: cannot install the metrics recorder: {e}");
                return 1;
            }
        };
        let (listener, admin) = match (
            tokio::net::TcpListener::bind(cli.listen).await,
            tokio::net::TcpListener::bind(cli.common.admin_addr).await,
        ) {
            (Ok(l), Ok(a)) => (l, a),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("broker-bridge: cannot bind: {e}");
                return kit::EXIT_CONFIG;
            }
        };
        if let (Ok(g), Ok(a)) = (listener.local_addr(), admin.local_addr()) {
            println!("LISTENING grpc={g} admin={a}");
        }
        let shutdown = kit::shutdown::on_signals();
        match broker_bridge::run(cli, listener, admin, metrics, shutdown).await {
            Ok(()) => 0,
            Err(e @ broker_bridge::RunError::Config(_)) => {
                eprintln!("broker-bridge: {e}");
                kit::EXIT_CONFIG
            }
            Err(e) => {
                tracing::error!(error = %e, "broker-bridge failed");
                1
            }
        }
    });
    std::process::exit(code);
}
