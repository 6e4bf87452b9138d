use clap::Parser;
use cocoon::cli::Cli;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    // COCOON_RUNTIME_THREADS=1 runs everything on one thread (no hand-offs
    // between threads); otherwise one worker thread per core.
    let threads = std::env::var("COCOON_RUNTIME_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok());
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if let Some(n) = threads.filter(|&n| n > 1) {
        builder.worker_threads(n);
    }
    let runtime = builder.enable_all().build().expect("the runtime starts");
    runtime.block_on(run())
}

async fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    cocoon_signaling::logs::init(cli.default_log_level());
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match cli.run(shutdown).await {
        Ok(code) => {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
}
