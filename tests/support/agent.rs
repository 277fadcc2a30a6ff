//! Runs real `nodetunnel` processes inside node namespaces, and renders their config files.
//!
//! Each agent gets its own tempdir (config, state dir, stderr log). Agents of one test share a
//! root made by `nodetunnel ca init`, so their workload certificates verify each other.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::logs::{Log, LogEvent};
use super::netns::Topology;

/// The agent binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_nodetunnel")
}

/// Runs the agent binary with `args` (outside any namespace) and returns its output.
pub fn run_cli(args: &[&str]) -> Result<Output> {
    Command::new(binary())
        .args(args)
        .output()
        .context("spawning nodetunnel")
}

/// How long an agent may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A shared root CA written by `nodetunnel ca init`.
pub struct Ca {
    /// `ca-cert.pem`.
    pub cert: PathBuf,
    /// `ca-key.pem`.
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ca {
    /// Creates a fresh root in a tempdir.
    pub fn init() -> Result<Ca> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().to_string_lossy().to_string();
        let output = run_cli(&["ca", "init", "--out-dir", &out])?;
        if !output.status.success() {
            bail!(
                "nodetunnel ca init failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let (cert, key) = (
            dir.path().join("ca-cert.pem"),
            dir.path().join("ca-key.pem"),
        );
        for file in [&cert, &key] {
            if !file.is_file() {
                bail!("nodetunnel ca init did not write {}", file.display());
            }
        }
        Ok(Ca {
            cert,
            key,
            _dir: dir,
        })
    }
}

/// How a workload takes mesh traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// mTLS + HTTP/2 CONNECT on 15008.
    Hbone,
    /// Plain TCP (not in the mesh).
    Tcp,
}

/// A workload entry in Istio's local-config shape.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Name; the uid is `cluster1//Pod/<namespace>/<name>`.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account (the identity's `sa`).
    pub service_account: String,
    /// Its pod IP.
    pub ip: Ipv4Addr,
    /// HBONE or TCP.
    pub protocol: Protocol,
    /// Node role the workload runs on (rendered as the node's name, `node-<role>`).
    pub node: String,
    /// Services it backs: (`namespace/hostname`, service port, target port).
    pub services: Vec<(String, u16, u16)>,
}

impl WorkloadSpec {
    /// A workload in namespace `default` whose service account equals its name.
    pub fn new(name: &str, ip: Ipv4Addr, node: &str, protocol: Protocol) -> WorkloadSpec {
        WorkloadSpec {
            name: name.to_string(),
            namespace: "default".to_string(),
            service_account: name.to_string(),
            ip,
            protocol,
            node: node.to_string(),
            services: Vec::new(),
        }
    }

    /// Its SPIFFE identity in trust domain `cluster.local`.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// `namespace/name`, how `agent.pods` refers to it.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A service entry with one VIP.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`.
    pub hostname: String,
    /// The VIP (default network).
    pub vip: Ipv4Addr,
    /// (service port, target port).
    pub ports: Vec<(u16, u16)>,
}

impl ServiceSpec {
    /// A service in `default` with one port mapping.
    pub fn new(name: &str, vip: Ipv4Addr, port: u16, target_port: u16) -> ServiceSpec {
        ServiceSpec {
            name: name.to_string(),
            namespace: "default".to_string(),
            hostname: format!("{name}.default.svc.cluster.local"),
            vip,
            ports: vec![(port, target_port)],
        }
    }

    /// `namespace/hostname`, the key workloads use to join it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// The mesh model shared by all agents of a test.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    /// Workloads.
    pub workloads: Vec<WorkloadSpec>,
    /// Services.
    pub services: Vec<ServiceSpec>,
}

/// The node name a role is rendered as.
pub fn node_name(role: &str) -> String {
    format!("node-{role}")
}

impl Mesh {
    /// Renders the config file for the agent on `node`: its `agent` section (capturing
    /// `captured` workloads, looked up in `topology` by workload name = pod role) plus the model.
    pub fn render(&self, topology: &Topology, node: &str, captured: &[&str]) -> String {
        let mut yaml = String::new();
        let _ = writeln!(
            yaml,
            "agent:\n  node: {}\n  trustDomain: cluster.local",
            node_name(node)
        );
        let _ = writeln!(yaml, "  drainTimeout: 2s\n  reloadInterval: 200ms\n  pods:");
        if captured.is_empty() {
            yaml.truncate(yaml.len() - "  pods:\n".len());
            yaml.push_str("  pods: []\n");
        }
        for name in captured {
            let workload = self.workload(name);
            let path = topology.netns_path(name);
            let _ = writeln!(yaml, "    - workload: {}", workload.reference());
            let _ = writeln!(yaml, "      netns: {}", path.display());
        }
        yaml.push_str(&self.render_model());
        yaml
    }

    /// The Istio local-config part (`workloads`, `services`, `policies`).
    pub fn render_model(&self) -> String {
        let mut yaml = String::from("workloads:\n");
        if self.workloads.is_empty() {
            yaml = "workloads: []\n".to_string();
        }
        for workload in &self.workloads {
            let protocol = match workload.protocol {
                Protocol::Hbone => "HBONE",
                Protocol::Tcp => "TCP",
            };
            let ns = &workload.namespace;
            let _ = writeln!(yaml, "  - uid: cluster1//Pod/{ns}/{}", workload.name);
            let _ = writeln!(yaml, "    name: {}\n    namespace: {ns}", workload.name);
            let _ = writeln!(yaml, "    serviceAccount: {}", workload.service_account);
            let _ = writeln!(yaml, "    workloadIps: [{}]", workload.ip);
            let _ = writeln!(yaml, "    protocol: {protocol}");
            let _ = writeln!(yaml, "    node: {}", node_name(&workload.node));
            if !workload.services.is_empty() {
                yaml.push_str("    services:\n");
            }
            for (key, port, target) in &workload.services {
                let _ = writeln!(yaml, "      {key}: {{{port}: {target}}}");
            }
        }
        yaml.push_str(if self.services.is_empty() {
            "services: []\n"
        } else {
            "services:\n"
        });
        for service in &self.services {
            let ports: Vec<String> = service
                .ports
                .iter()
                .map(|(port, target)| format!("{port}: {target}"))
                .collect();
            let _ = writeln!(
                yaml,
                "  - name: {}\n    namespace: {}",
                service.name, service.namespace
            );
            let _ = writeln!(yaml, "    hostname: {}", service.hostname);
            let _ = writeln!(yaml, "    vips: [/{}]", service.vip);
            let _ = writeln!(yaml, "    ports: {{{}}}", ports.join(", "));
        }
        yaml.push_str("policies: []\n");
        yaml
    }

    /// The workload with this name.
    pub fn workload(&self, name: &str) -> &WorkloadSpec {
        self.workloads
            .iter()
            .find(|workload| workload.name == name)
            .unwrap_or_else(|| panic!("no workload {name} in the mesh"))
    }
}

/// A `nodetunnel run` process inside a node namespace; killed on drop.
pub struct Agent {
    /// Node role.
    pub node: String,
    /// The config file the agent watches.
    pub config: PathBuf,
    /// Its stderr (JSON log lines).
    pub log_path: PathBuf,
    netns: String,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Writes `config`, starts the agent in `node`'s namespace and waits until it is ready.
    pub fn start(topology: &Topology, node: &str, ca: &Ca, config: &str) -> Result<Agent> {
        let mut agent = Agent::spawn(topology, node, ca, config)?;
        agent.wait_ready(topology, READY_TIMEOUT)?;
        Ok(agent)
    }

    /// Writes `config` and starts the agent, without waiting for readiness.
    pub fn spawn(topology: &Topology, node: &str, ca: &Ca, config: &str) -> Result<Agent> {
        Agent::spawn_with_env(topology, node, ca, config, &[])
    }

    /// [`Agent::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        topology: &Topology,
        node: &str,
        ca: &Ca,
        config: &str,
        env: &[(String, String)],
    ) -> Result<Agent> {
        let path_text = |path: &Path| path.to_string_lossy().to_string();
        let args = [
            "--ca-cert".to_string(),
            path_text(&ca.cert),
            "--ca-key".to_string(),
            path_text(&ca.key),
        ];
        Agent::launch(topology, node, Some(config), &args, env)
    }

    /// Starts an agent the Istio way: Istio's environment variables in `env`, and a config file
    /// only if `config` is given (without one the agent runs in Istio mode). Does not wait.
    pub fn spawn_istio(
        topology: &Topology,
        node: &str,
        config: Option<&str>,
        env: &[(String, String)],
    ) -> Result<Agent> {
        Agent::launch(topology, node, config, &[], env)
    }

    fn launch(
        topology: &Topology,
        node: &str,
        config: Option<&str>,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Agent> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("config.yaml");
        let log_path = dir.path().join("agent.log");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state)?;
        let netns = topology.netns(node);
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &netns, binary(), "run"]);
        if let Some(config) = config {
            std::fs::write(&config_path, config)?;
            command.arg("--config").arg(&config_path);
        }
        let child = command
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .args(["--log-format", "json"])
            .env(
                "RUST_LOG",
                std::env::var("NODETUNNEL_TEST_LOG").unwrap_or("info".into()),
            )
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("spawning nodetunnel run")?;
        Ok(Agent {
            node: node.to_string(),
            config: config_path,
            log_path,
            netns,
            child: Some(child),
            _dir: dir,
        })
    }

    /// Polls `GET /healthz/ready` on 15021 inside the node namespace until it answers 200.
    /// Fails early, with the log tail, if the process exits.
    pub fn wait_ready(&mut self, topology: &Topology, timeout: Duration) -> Result<()> {
        let node = self.node.clone();
        let mut last = String::from("no answer yet");
        let result = super::wait_for("agent readiness", timeout, || {
            if let Some(status) = self.exit_status() {
                last = format!("agent exited with {status}");
                return Some(false);
            }
            match topology.run_in(&node, || http_status("127.0.0.1:15021", "/healthz/ready")) {
                Ok(Ok(200)) => Some(true),
                Ok(Ok(status)) => {
                    last = format!("readiness answered {status}");
                    None
                }
                Ok(Err(error)) | Err(error) => {
                    last = format!("{error:#}");
                    None
                }
            }
        });
        match result {
            Ok(true) => Ok(()),
            _ => bail!(
                "agent on {} not ready ({last}); log tail:\n{}",
                self.node,
                self.log().tail(30)
            ),
        }
    }

    /// The exit status, if the process has ended.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Everything logged so far.
    pub fn log(&self) -> Log {
        Log::read(&self.log_path)
    }

    /// Waits (bounded) for a log event matching `predicate`.
    pub fn wait_for_event(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&LogEvent) -> bool,
    ) -> Result<LogEvent> {
        super::wait_for(what, timeout, || {
            self.log().events.into_iter().find(|e| predicate(e))
        })
        .with_context(|| format!("agent {} log tail:\n{}", self.node, self.log().tail(30)))
    }

    /// Replaces the config file atomically (write + rename), as an editor or a ConfigMap would.
    pub fn write_config(&self, config: &str) -> Result<()> {
        let temporary = self.config.with_extension("yaml.new");
        std::fs::write(&temporary, config)?;
        std::fs::rename(&temporary, &self.config)?;
        Ok(())
    }

    /// Sends SIGTERM without waiting (graceful drain starts).
    pub fn terminate(&self) {
        if let Some(child) = self.child.as_ref() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; kills it after that.
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = super::wait_for("agent to exit", timeout, || child.try_wait().ok().flatten());
        if status.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().ok();
        self.child = None;
        status
    }

    /// The agent's process id (`ip netns exec` execs it, so this is nodetunnel itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The node namespace it runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent {} log tail ---\n{}",
                self.node,
                self.log().tail(40)
            );
        }
    }
}

/// A bounded HTTP/1.0 GET from the current namespace; returns the status code.
pub fn http_status(address: &str, path: &str) -> Result<u16> {
    let address: SocketAddr = address.parse()?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    while !response.windows(2).any(|window| window == b"\r\n") {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..read]);
    }
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .context("no HTTP status line")?;
    Ok(status.parse()?)
}
