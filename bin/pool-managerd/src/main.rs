//! `pool-managerd`: the per-machine daemon. Flags and signals here; the logic is in pool-core.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pool_core::PoolConfig;

#[derive(Parser)]
#[command(
    name = "pool-managerd",
    version,
    about = "Spawns, supervises and routes to llorch workers on this machine"
)]
struct Cli {
    /// Pool configuration (see deploy/pool.toml). Without it: the default model on the best device.
    #[arg(long, env = "POOL_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides `bind` in the config).
    #[arg(long, env = "POOL_BIND")]
    bind: Option<String>,
    /// Directory holding llorch-cpu / llorch-cuda / llorch-metal (default: beside this binary).
    #[arg(long, env = "POOL_WORKER_BIN_DIR")]
    worker_bin_dir: Option<PathBuf>,
    /// Require this bearer token on the API (overrides `api_key` in the config).
    #[arg(long, env = "POOL_API_KEY")]
    api_key: Option<String>,
    /// Model to serve when there is no --config (path or known name).
    #[arg(long, env = "POOL_MODEL", default_value = "smollm2-135m-instruct")]
    model: String,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the devices found on this machine (JSON) and exit.
    Devices,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pool-managerd: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Devices) = cli.cmd {
        println!(
            "{}",
            serde_json::to_string_pretty(&pool_core::devices::detect())?
        );
        return Ok(());
    }
    let mut cfg = match &cli.config {
        Some(p) => PoolConfig::load(p)?,
        None => PoolConfig::default_with(&cli.model),
    };
    if cli.api_key.is_some() {
        cfg.api_key = cli.api_key.clone();
    }
    let bind = cli
        .bind
        .clone()
        .or(cfg.bind.clone())
        .unwrap_or_else(|| "127.0.0.1:9200".into());
    let bin_dir = match cli.worker_bin_dir.clone().or(cfg.worker_bin_dir.clone()) {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(pool_core::server::run(cfg, bind, bin_dir))
        .map_err(anyhow::Error::msg)
}
