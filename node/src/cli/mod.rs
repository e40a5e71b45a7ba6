//! The `maos` command line: parses with [`args`], runs one command, maps its error to an exit code.
//!
//! It is a client of the cluster (through `maos-client`) and of the server library's declared
//! boundary (`serve`, `config`, `storage::postgres` for `maos db`); the server never imports it.
//!
//! Tables by default, `--json` for scripts. Exit codes scripts can rely on ([`exit_code`]):
//! 0 success, 1 other error, 2 bad usage (clap), 3 input refused (INVALID_ARGUMENT /
//! FAILED_PRECONDITION), 4 not found, 5 cluster unavailable or unhealthy, 6 resource exhausted
//! (retry later), 7 the watched or awaited task ended FAILED or CANCELLED.

mod agent;
pub mod args;
mod auth;
mod cluster;
mod db;
mod kv;
mod output;
mod progress;
mod security_scan;
mod task;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use maos_client::{Client, ClientError};
use maos_node::config::Config;
use maos_node::telemetry::traces::{Settings as TraceSettings, Tracing};

use args::{Cli, Commands, ConfigCommand, Target};

/// Exit codes.
pub const EXIT_REFUSED: u8 = 3;
pub const EXIT_NOT_FOUND: u8 = 4;
pub const EXIT_UNAVAILABLE: u8 = 5;
pub const EXIT_EXHAUSTED: u8 = 6;
pub const EXIT_TASK_FAILED: u8 = 7;
pub const EXIT_FINDINGS: u8 = 8;

/// A task that ended FAILED or CANCELLED (exit code 7).
#[derive(Debug, thiserror::Error)]
#[error("task {task_id} ended {state}: {cause}")]
pub struct TaskEnded {
    pub task_id: String,
    pub state: &'static str,
    pub cause: String,
}

/// The cluster or a node is not healthy (exit code 5).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unhealthy(pub String);

/// A check that found something to do (exit code 3), such as pending migrations.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The exit code for an error.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Refused>().is_some() {
        return EXIT_REFUSED;
    }
    if let Some(storage) = error.downcast_ref::<maos_node::storage::StorageError>() {
        return if storage.is_unavailable() { EXIT_UNAVAILABLE } else { 1 };
    }
    if error.downcast_ref::<TaskEnded>().is_some() {
        return EXIT_TASK_FAILED;
    }
    if error.downcast_ref::<security_scan::HighFindings>().is_some() {
        return EXIT_FINDINGS;
    }
    if error.downcast_ref::<Unhealthy>().is_some() {
        return EXIT_UNAVAILABLE;
    }
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::InvalidArgument(_) | ClientError::FailedPrecondition(_)) => EXIT_REFUSED,
        Some(ClientError::NotFound(_)) => EXIT_NOT_FOUND,
        Some(ClientError::Unavailable { .. }) => EXIT_UNAVAILABLE,
        Some(ClientError::ResourceExhausted(_)) => EXIT_EXHAUSTED,
        Some(ClientError::Server(status)) if status.code() == tonic::Code::DeadlineExceeded => EXIT_UNAVAILABLE,
        _ => 1,
    }
}

fn environment() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

pub fn load_config(file: Option<&PathBuf>) -> anyhow::Result<(Config, Vec<String>)> {
    let loaded = Config::load(file.map(|p| p.as_path()), &environment())?;
    Ok((loaded.config, loaded.unknown_env))
}

/// How long a command's client session lives after its last write.
const CLI_SESSION_TTL: Duration = Duration::from_secs(60);

/// A client of `target` with its token: `--token`, `MAOS_TOKEN`, or the token file.
pub fn client(target: &Target) -> anyhow::Result<Client> {
    client_of(target.endpoints.clone(), target)
}

/// A client of `endpoints` with `target`'s token and TLS settings.
pub fn client_of(endpoints: Vec<String>, target: &Target) -> anyhow::Result<Client> {
    // One command's writes share a session that outlives it briefly, not for the cluster's
    // default ten minutes: the cluster holds at most 4,096 sessions.
    let client = Client::new_with_tls(endpoints, tls(target)?.as_ref())?.with_session_ttl(CLI_SESSION_TTL);
    Ok(match token(target)? {
        Some(token) => client.with_credentials(&token)?,
        None => client,
    })
}

/// `target`'s TLS settings: some when it names a CA or a client certificate.
pub fn tls(target: &Target) -> anyhow::Result<Option<maos_client::Tls>> {
    if target.ca_file.is_none() && target.client_cert.is_none() && target.client_key.is_none() {
        return Ok(None);
    }
    let tls = maos_client::Tls::from_files(
        target.ca_file.as_deref(),
        target.client_cert.as_deref(),
        target.client_key.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("--ca-file, --cert, --key: {e}"))?;
    Ok(Some(tls))
}

/// An HTTP client for `/health`, `/ready` and `/metrics` with `target`'s TLS settings, and the
/// scheme a bare `host:port` endpoint gets (https when `target` names TLS settings).
pub fn http_of(target: &Target) -> anyhow::Result<(reqwest::Client, &'static str)> {
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(3));
    let tls = tls(target)?;
    if let Some(tls) = &tls {
        if let Some(pem) = &tls.ca_pem {
            for ca in reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("--ca-file: not PEM certificates: {e}"))?
            {
                builder = builder.add_root_certificate(ca);
            }
        }
        if let Some((cert, key)) = &tls.identity {
            let identity = reqwest::Identity::from_pem(format!("{key}\n{cert}").as_bytes())
                .map_err(|e| anyhow::anyhow!("--cert and --key: {e}"))?;
            builder = builder.identity(identity);
        }
    }
    Ok((builder.build()?, if tls.is_some() { "https" } else { "http" }))
}

/// The base URL of `endpoint`: itself when it names a scheme, else `scheme://endpoint`.
pub fn base_url(endpoint: &str, scheme: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("{scheme}://{endpoint}")
    }
}

/// `$XDG_CONFIG_HOME/maos/token`, else `~/.config/maos/token`.
pub fn token_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("maos").join("token"))
}

fn token(target: &Target) -> anyhow::Result<Option<String>> {
    if let Some(token) = target.token.as_ref().filter(|t| !t.trim().is_empty()) {
        return Ok(Some(token.trim().to_string()));
    }
    let Some(path) = token_file() else { return Ok(None) };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().to_string()).filter(|t| !t.is_empty())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(anyhow::anyhow!("cannot read the token file {}: {error}", path.display())),
    }
}

/// What the trace exporter needs from the configuration.
fn trace_settings(config: &Config) -> TraceSettings {
    TraceSettings {
        endpoint: config.tracing.otlp_endpoint.clone(),
        sample_ratio: config.tracing.sample_ratio,
        service_name: config.tracing.service_name.clone(),
        node_id: config.node.id,
        ca_file: config.security.tls.ca_file.clone(),
    }
}

/// Run the command `cli` names.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Serve(args) => {
            let (mut config, unknown_env) = load_config(args.config.as_ref())?;
            config.apply_flags(&args.flags).map_err(anyhow::Error::msg)?;
            config.validate()?;
            let (traces, layer) = match config.tracing.enabled {
                true => {
                    let (traces, layer) = Tracing::start(&trace_settings(&config)).map_err(anyhow::Error::msg)?;
                    (Some(traces), Some(layer))
                }
                false => (None, None),
            };
            maos_node::telemetry::logs::init(&config.system.log_level, &config.system.log_format, layer);
            for name in unknown_env {
                tracing::warn!(variable = %name, "environment variable names no configuration key; ignored");
            }
            let served = maos_node::server::serve(config).await;
            if let Some(traces) = traces {
                traces.flush().await;
            }
            served
        }
        Commands::Demo { keep_data, keep } => {
            let binary = std::env::current_exe().context("cannot find the maos binary")?;
            let root = tempfile::Builder::new().prefix("maos-demo-").tempdir()?;
            let result = maos_testkit::demo::run(&binary, root.path(), keep).await;
            if keep_data || result.is_err() {
                let kept = root.keep();
                println!("data and node logs kept in {}", kept.display());
            }
            result
        }
        Commands::Health { all_components, target } => cluster::health(&target, all_components).await,
        Commands::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "maos", &mut std::io::stdout());
            Ok(())
        }
        Commands::Task(command) => task::run(command).await,
        Commands::Agent(command) => agent::run(command).await,
        Commands::Status { target } => cluster::status(&target).await,
        Commands::Cluster(command) => cluster::run(command).await,
        Commands::Kv(command) => kv::run(command).await,
        Commands::Config(ConfigCommand::Show(args)) => {
            let (mut config, _) = load_config(args.config.as_ref())?;
            // Passwords in URLs are secrets: shown as ***.
            for url in [config.database.primary_url.as_mut(), config.redis.url.as_mut()].into_iter().flatten() {
                *url = maos_node::config::redact_url(url);
            }
            print!("{}", serde_yaml::to_string(&config)?);
            Ok(())
        }
        Commands::Db(command) => db::run(command).await,
        Commands::Auth(command) => auth::run(command).await,
        Commands::Audit(command) => auth::audit(command).await,
        Commands::SecurityScan { comprehensive, config, target } => {
            let raw = match &config {
                Some(path) => {
                    Some(std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?)
                }
                None => None,
            };
            let (loaded, _) = load_config(config.as_ref())?;
            let mut findings = security_scan::scan_config(&loaded, raw.as_deref());
            findings.extend(security_scan::scan_cluster(&target, comprehensive).await?);
            security_scan::report(findings, target.json)
        }
        Commands::Config(ConfigCommand::Validate(args)) => {
            let (config, unknown_env) = load_config(args.config.as_ref())?;
            config.validate()?;
            for name in unknown_env {
                eprintln!("warning: {name} names no configuration key");
            }
            println!("configuration is valid");
            Ok(())
        }
    }
}
