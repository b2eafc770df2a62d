//! `presence`: parse config, start telemetry, run, map the result to an exit code.

use clap::Parser;
use presence::config::Cli;

fn main() {
    let cli = Cli::parse();
    if let Err(e) = kit::telemetry::init_logging(cli.common.log_format, &cli.common.log_filter) {
        eprintln!("presence: invalid --log-filter: {e}");
        std::process::exit(kit::EXIT_CONFIG);
    }
    if cli.lease.is_zero() || cli.max_concurrent == 0 {
        eprintln!("presence: --lease and --max-concurrent must be above zero");
        std::process::exit(kit::EXIT_CONFIG);
    }
    let tls = match kit::grpc::InternalTls::load(
        cli.common.internal_tls_cert.as_deref(),
        cli.common.internal_tls_key.as_deref(),
        cli.common.internal_tls_ca.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("presence: {e}");
            std::process::exit(kit::EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("presence: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let metrics = match kit::telemetry::init_metrics(&[]) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("presence: cannot install the metrics recorder: {e}");
                return 1;
            }
        };
        let (listener, admin) = match (
            tokio::net::TcpListener::bind(cli.listen).await,
            tokio::net::TcpListener::bind(cli.common.admin_addr).await,
        ) {
            (Ok(l), Ok(a)) => (l, a),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("presence: cannot bind: {e}");
                return kit::EXIT_CONFIG;
            }
        };
        if let (Ok(g), Ok(a)) = (listener.local_addr(), admin.local_addr()) {
            println!("LISTENING grpc={g} admin={a}");
        }
        let shutdown = kit::shutdown::on_signals();
        match presence::run(cli, tls, listener, admin, metrics, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "presence failed");
                1
            }
        }
    });
    std::process::exit(code);
}
