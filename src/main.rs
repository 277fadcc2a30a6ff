//! The `nodetunnel` command line (layer L5): parses arguments, validates configuration before
//! anything binds, and hands over to [`nodetunnel::app::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nodetunnel::admin::tables::View;
use nodetunnel::config::{self, Overrides};
use nodetunnel::identity::ca::BuiltinCa;
use nodetunnel::telemetry::{self, LogFormat};

/// jemalloc instead of glibc malloc: the data path allocates and frees 16-64 KiB buffers per
/// read, which glibc serves from fresh pages (page faults, memcg charging) after trimming;
/// `scripts/bench` measured about a third less agent CPU per Gbit with jemalloc. The
/// `system-allocator` feature keeps glibc's, for heap profilers that hook malloc (heaptrack).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Node-level tunnel agent for zero-trust service meshes.
#[derive(Debug, Parser)]
#[command(name = "nodetunnel", version, about)]
struct Cli {
    /// Log format (level from RUST_LOG).
    #[arg(long, global = true, value_enum, env = "LOG_FORMAT", default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent. With `--config`, standalone (or mixed, if the file or the environment
    /// names istiod); without it, in Istio mode: discovery and certificates from istiod, pods
    /// from istio-cni, everything else from Istio's environment variables.
    Run {
        /// The config file (agent section + Istio local config).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where state (the built-in CA root) is kept.
        #[arg(long, default_value = "/var/lib/nodetunnel")]
        state_dir: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Run as Istio's ztunnel is run (`args: [proxy, ztunnel]` in Istio's Helm chart): Istio
    /// mode, configured by ztunnel's environment variables alone, as `run` without `--config`.
    /// Variables nodetunnel does not support are reported by name at start-up.
    Proxy {
        /// The proxy kind; only `ztunnel` (a node agent) is supported.
        #[arg(value_enum)]
        kind: ProxyKind,
        /// Where state is kept (only with `FAKE_CA=true` or no `CA_ADDRESS`: the built-in CA's
        /// root). Istio's chart mounts a writable `/tmp` and nothing else.
        #[arg(long, default_value = "/tmp/nodetunnel")]
        state_dir: PathBuf,
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
        /// The destination: ip:port of a workload, or workload:port (the destination's
        /// authorization); or a service VIP, an outside IP, or a hostname, with its port (the
        /// client's egress: registry, ServiceEntry, outbound traffic policy, waypoint,
        /// DestinationRule limits).
        #[arg(long)]
        to: String,
        /// Print the answer as JSON (the admin API's shape).
        #[arg(long)]
        json: bool,
    },
    /// Capture or release pods on a running agent (through its admin API).
    Pod {
        /// The agent's admin address.
        #[arg(long, global = true, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        #[command(subcommand)]
        command: PodCommand,
    },
    /// Summary of a running agent: node, pods, model and certificate counts.
    Status(InspectArgs),
    /// Workloads a running agent knows.
    Workloads(InspectArgs),
    /// Services a running agent knows.
    Services(InspectArgs),
    /// Authorization policies a running agent enforces.
    Policies(InspectArgs),
    /// Workload certificates a running agent holds, with their validity.
    Certificates(InspectArgs),
    /// Connections open on a running agent.
    Connections(InspectArgs),
    /// Certificate authority utilities.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

/// What `nodetunnel proxy` runs as (Istio's `pilot-agent proxy` kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProxyKind {
    /// The node agent of Istio's ambient mode.
    Ztunnel,
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

#[derive(Debug, Subcommand)]
enum PodCommand {
    /// Capture a pod: open its listeners in the netns and install its redirection rules.
    Add {
        /// The workload: uid or namespace/name (must be on this agent's node).
        #[arg(long)]
        workload: String,
        /// Its network namespace, e.g. /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long)]
        netns: PathBuf,
    },
    /// Release a pod: close its listeners and connections, remove its rules.
    Remove {
        /// The workload: uid or namespace/name.
        #[arg(long)]
        workload: String,
    },
    /// List captured pods.
    List {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Options of the commands that look inside a running agent.
#[derive(Debug, clap::Args)]
struct InspectArgs {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: std::net::SocketAddr,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    json: bool,
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
    /// Flags, over Istio's environment variables as this process sees them.
    fn from(args: OverrideArgs) -> Self {
        Overrides {
            env: config::env::Environment::capture(),
            node: args.node,
            ca_cert: args.ca_cert,
            ca_key: args.ca_key,
            ..Overrides::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it flushes buffered log lines.
    let logging = telemetry::init_logging(cli.log_format);
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
        Command::Pod { admin, command } => pod_command(admin, command),
        Command::Status(args) => inspect(View::Status, &args),
        Command::Workloads(args) => inspect(View::Workloads, &args),
        Command::Services(args) => inspect(View::Services, &args),
        Command::Policies(args) => inspect(View::Policies, &args),
        Command::Certificates(args) => inspect(View::Certificates, &args),
        Command::Connections(args) => inspect(View::Connections, &args),
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
        } => run_agent(path, state_dir, overrides.into(), &logging),
        Command::Proxy {
            kind: ProxyKind::Ztunnel,
            state_dir,
        } => {
            let overrides = Overrides {
                env: config::env::Environment::capture(),
                ..Overrides::default()
            };
            run_agent(None, state_dir, overrides, &logging)
        }
    }
}

/// `run` and `proxy ztunnel`: reports what of the environment has no effect, raises the
/// open-file limit, validates the config before anything binds, then runs the agent on a
/// runtime with the worker count ztunnel's variables ask for.
fn run_agent(
    path: Option<PathBuf>,
    state_dir: PathBuf,
    overrides: Overrides,
    logging: &telemetry::LoggingGuard,
) -> ExitCode {
    for unsupported in overrides.env.unsupported() {
        tracing::warn!(variable = %unsupported.variable, "{unsupported}");
    }
    match nodetunnel::sys::raise_open_files_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(from = old, to = new, "raised the open-file limit");
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    // Before any TLS config exists: the key exchange is fixed for the process's life.
    let key_exchange = overrides.env.key_exchange();
    if let Err(fixed) = nodetunnel::tls::set_key_exchange(key_exchange) {
        eprintln!(
            "error: TLS key exchange already fixed to {fixed:?}, cannot use {key_exchange:?}"
        );
        return ExitCode::FAILURE;
    }
    let istio_mode = path.is_none();
    // Reloads of LOCAL_XDS_PATH must start from the same Istio-mode defaults.
    let overrides = Overrides {
        istio_defaults: istio_mode,
        ..overrides
    };
    let loaded = match &path {
        Some(path) => config::load(path, &overrides),
        None => config::from_environment(&overrides),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = match overrides.env.worker_threads(cpus, istio_mode) {
        Ok(workers) => workers,
        Err(problem) => {
            eprintln!("environment: {}: {}", problem.variable, problem.message);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let workers = workers.unwrap_or(cpus);
    // The worker count goes to the data-plane shards, where connections are accepted and run,
    // and the runtime behind them (control plane, DNS, admin) needs one thread. With
    // NODETUNNEL_SHARDS=off connections run on that runtime's workers instead.
    let sharded = match overrides.env.data_plane_shards() {
        Ok(sharded) => sharded,
        Err(problem) => {
            eprintln!("environment: {}: {}", problem.variable, problem.message);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(problem) = overrides.env.release_startup_pages() {
        eprintln!("environment: {}: {}", problem.variable, problem.message);
        return ExitCode::from(EXIT_CONFIG);
    }
    let shards = if sharded {
        match nodetunnel::shard::Shards::start(workers) {
            Ok(shards) => shards,
            Err(error) => {
                eprintln!("error: cannot start the data-plane threads: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        nodetunnel::shard::Shards::inline()
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(if sharded { 1 } else { workers });
    let runtime = match builder.thread_name("nodetunnel").enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if sharded {
        // The runtime's one worker accepts connections and runs the control plane; the shards
        // watch their own threads' caches.
        runtime.spawn(nodetunnel::allocator::release_cache_when_quiet());
    }
    tracing::info!(
        mode = if istio_mode { "istio" } else { "config file" },
        workers,
        sharded,
        "starting"
    );
    let options = nodetunnel::app::RunOptions {
        watch_config: path.is_some() || overrides.env.local_config_file().is_some(),
        state_dir,
        overrides,
        logging: Some(logging.control.clone()),
        shards,
    };
    // The main thread polls the agent's top-level future (start-up, then the control plane's
    // waits): its allocator cache too goes back once it is quiet.
    let agent = async {
        tokio::select! {
            result = nodetunnel::app::run(config, options) => result,
            never = nodetunnel::allocator::release_cache_when_quiet() => match never {},
        }
    };
    match runtime.block_on(agent) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
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
    let snapshot = config.snapshot();
    if !nodetunnel::authz::explain::names_workload(&snapshot, to) {
        return explain_outbound(&snapshot, from, to, json);
    }
    let explained = match nodetunnel::authz::explain(&snapshot, from, to) {
        Ok(explained) => explained,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    print_explained(&explained, json, explained.decision.is_allowed())
}

/// Prints an explanation as text or JSON; the exit code says whether it was allowed.
fn print_explained<T: serde::Serialize + std::fmt::Display>(
    explained: &T,
    json: bool,
    allowed: bool,
) -> ExitCode {
    let text = if json {
        match serde_json::to_string_pretty(explained) {
            Ok(text) => text,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        explained.to_string()
    };
    println!("{}", text.trim_end_matches('\n'));
    if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `explain` for a destination that is not a workload: the source agent's outbound decision.
fn explain_outbound(
    snapshot: &nodetunnel::state::Snapshot,
    from: &str,
    to: &str,
    json: bool,
) -> ExitCode {
    let explained = match nodetunnel::proxy::explain::explain_outbound(snapshot, from, to) {
        Ok(explained) => explained,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    print_explained(&explained, json, explained.allowed)
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

/// Runs a `nodetunnel pod` subcommand against the agent's admin API.
fn pod_command(admin: std::net::SocketAddr, command: PodCommand) -> ExitCode {
    use hyper::Method;
    use nodetunnel::admin::{call, query};
    let (method, path, json) = match &command {
        PodCommand::Add { workload, netns } => {
            let netns = netns.to_string_lossy();
            let query = query(&[("workload", workload), ("netns", &netns)]);
            (Method::POST, format!("/pods?{query}"), false)
        }
        PodCommand::Remove { workload } => (
            Method::DELETE,
            format!("/pods?{}", query(&[("workload", workload)])),
            false,
        ),
        PodCommand::List { json } => (Method::GET, "/pods".to_string(), *json),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let (status, body) = match runtime.block_on(call(admin, method, &path)) {
        Ok(answer) => answer,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    if !status.is_success() {
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        eprintln!("error: {reason}");
        return ExitCode::FAILURE;
    }
    match command {
        PodCommand::List { .. } if !json => {
            match nodetunnel::admin::tables::pods(&body) {
                Ok(table) => print!("{table}"),
                Err(error) => {
                    eprintln!("error: the agent's /pods is not in the shape this nodetunnel reads: {error}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => println!("{}", body.trim()),
    }
    ExitCode::SUCCESS
}

/// Runs `nodetunnel status|workloads|...`: one admin API read, printed as a table or JSON.
fn inspect(view: View, args: &InspectArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let call = nodetunnel::admin::call(args.admin, hyper::Method::GET, view.path());
    let (status, body) = match runtime.block_on(call) {
        Ok(answer) => answer,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let answer: serde_json::Value = match serde_json::from_str(&body) {
        Ok(answer) if status.is_success() => answer,
        _ => {
            eprintln!("error: the agent answered {status}: {}", body.trim());
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        let selected = view.select(&answer);
        println!(
            "{}",
            serde_json::to_string_pretty(&selected).unwrap_or_default()
        );
    } else {
        match view.render(&answer) {
            Ok(table) => print!("{table}"),
            Err(error) => {
                eprintln!(
                    "error: the agent's {} is not in the shape this nodetunnel reads: {error}",
                    view.path()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
