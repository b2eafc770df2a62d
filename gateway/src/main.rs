//! `gateway`: parse config, start telemetry, run, map the result to an exit code.

use clap::Parser;
use gateway::config::Cli;

fn main() {
    let cli = Cli::parse();
    if let Err(e) = kit::telemetry::init_logging(cli.common.log_format, &cli.common.log_filter) {
        eprintln!("gateway: invalid --log-filter: {e}");
        std::process::exit(kit::EXIT_CONFIG);
    }
    let settings = match gateway::Settings::from_cli(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(kit::EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let metrics = match kit::telemetry::init_metrics(gateway::metrics::BUCKETS) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("gateway: cannot install the metrics recorder: {e}");
                return 1;
            }
        };
        let listeners =
            match gateway::Listeners::bind(cli.listen, cli.reuse_port, cli.grpc_addr, cli.common.admin_addr).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("gateway: cannot bind: {e}");
                    return kit::EXIT_CONFIG;
                }
            };
        if let (Ok(c), Ok(g), Ok(a)) =
            (listeners.client.local_addr(), listeners.grpc.local_addr(), listeners.admin.local_addr())
        {
            // One machine-readable line so that scripts and tests can find the ports.
            println!("LISTENING client={c} grpc={g} admin={a}");
        }
        let shutdown = kit::shutdown::on_signals();
        match gateway::run(settings, listeners, metrics, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "gateway failed");
                1
            }
        }
    });
    std::process::exit(code);
}
