//! The `nodetunnel` command line (layer L5): parses arguments, validates configuration before
//! anything binds, and hands over to [`nodetunnel::app::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nodetunnel::config::{self, Overrides};
use nodetunnel::identity::ca::BuiltinCa;
use nodetunnel::telemetry::{self, LogFormat};

/// Exit status for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Node-level tunnel agent for zero-trust service meshes.
#[derive(Debug, Parser)]
#[command(name = "nodetunnel", version, about)]
struct Cli {
    /// Log format (level from RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// The config file (agent section + Istio local config).
        #[arg(long)]
        config: PathBuf,
        /// Where state (the built-in CA root) is kept.
        #[arg(long, default_value = "/var/lib/nodetunnel")]
        state_dir: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Validate a config file; prints every error and exits 64 if there are any.
    CheckConfig {
        /// The config file.
        file: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Explain whether a connection would be allowed, and which policy decides; exits 0 if
    /// allowed, 1 if denied, 64 for a config error or a source/destination that cannot be
    /// resolved.
    Explain {
        /// The config file (agent section + Istio local config + policies).
        #[arg(long)]
        config: PathBuf,
        /// The client: a workload (name, namespace/name or uid), an IP, or a SPIFFE id.
        #[arg(long)]
        from: String,
        /// The destination: ip:port of a workload, or workload:port.
        #[arg(long)]
        to: String,
        /// Print the answer as JSON (the admin API's shape).
        #[arg(long)]
        json: bool,
    },
    /// Certificate authority utilities.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root certificate and key (ca-cert.pem, ca-key.pem) for agents to share.
    Init {
        /// Directory to write into.
        #[arg(long)]
        out_dir: PathBuf,
        /// Common name of the root.
        #[arg(long, default_value = "nodetunnel root CA")]
        common_name: String,
    },
}

#[derive(Debug, clap::Args)]
struct OverrideArgs {
    /// This node's name (wins over agent.node).
    #[arg(long)]
    node: Option<String>,
    /// Root certificate to sign workload certificates with (wins over agent.ca.certFile).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Key of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
}

impl From<OverrideArgs> for Overrides {
    fn from(args: OverrideArgs) -> Self {
        Overrides {
            node: args.node,
            ca_cert: args.ca_cert,
            ca_key: args.ca_key,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file, overrides } => match config::load(&file, &overrides.into()) {
            Ok(config) => {
                print_policy_findings(&config);
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Explain {
            config,
            from,
            to,
            json,
        } => explain(&config, &from, &to, json),
        Command::Ca {
            command:
                CaCommand::Init {
                    out_dir,
                    common_name,
                },
        } => match init_ca(&out_dir, &common_name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config: path,
            state_dir,
            overrides,
        } => {
            let overrides: Overrides = overrides.into();
            // Validate before anything binds.
            let config = match config::load(&path, &overrides) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .thread_name("nodetunnel")
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("error: cannot start the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let options = nodetunnel::app::RunOptions {
                state_dir,
                overrides,
            };
            match runtime.block_on(nodetunnel::app::run(config, options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("error: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Istio resources left out or changed: not errors (the rest applies), but shown.
fn print_policy_findings(config: &config::Config) {
    for finding in &config.istio.findings {
        eprintln!("{finding}");
    }
}

fn explain(path: &std::path::Path, from: &str, to: &str, json: bool) -> ExitCode {
    let config = match config::load(path, &Overrides::default()) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    print_policy_findings(&config);
    let explained = match nodetunnel::authz::explain(&config.snapshot(), from, to) {
        Ok(explained) => explained,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if json {
        match serde_json::to_string_pretty(&explained) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("{explained}");
    }
    if explained.decision.is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn init_ca(out_dir: &std::path::Path, common_name: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let (cert_pem, key_pem) = BuiltinCa::generate_root(common_name)?;
    let cert_path = out_dir.join("ca-cert.pem");
    let key_path = out_dir.join("ca-key.pem");
    std::fs::write(&cert_path, cert_pem)
        .with_context(|| format!("write {}", cert_path.display()))?;
    write_private(&key_path, key_pem.as_bytes())?;
    println!("wrote {} and {}", cert_path.display(), key_path.display());
    Ok(())
}

fn write_private(path: &std::path::Path, contents: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("write {}", path.display()))
}
