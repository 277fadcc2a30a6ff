//! Network-namespace topology for tests: "nodes" and "pods" as namespaces joined by veth pairs.
//!
//! Layout, with node `i` (1-based, in creation order) and its `j`-th pod (`j` from 2):
//! - pod netns: `lo` up, `eth0` with `10.200.<i>.<j>/32`, a route to the gateway `10.200.<i>.1`
//!   on `eth0` and a default route via it;
//! - node netns: `lo` up, `ip_forward=1`, one veth per pod (`v-<pod>`, address `10.200.<i>.1/32`,
//!   route to the pod's `/32`), and per linked node a veth `l-<other>` with `10.199.<k>.1|2/24`
//!   and a route to the other node's pod subnet `10.200.<n>.0/24` across it.
//!
//! IPv6 (on request, [`Topology::enable_ipv6`] and [`Topology::add_pod_ipv6`]): pod `j` of node `i`
//! gets `fd00:200:<i>::<j>/128` with gateway `fd00:200:<i>::1`, links get `fd00:199:<k>::1|2/64` and
//! routes to the other node's `fd00:200:<n>::/64`. Addresses are added with `nodad`, so they are
//! usable at once (no duplicate address detection delay).
//!
//! Nothing leaves these namespaces: no interface is connected to the host's namespace, and nodes
//! have no default route.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

/// One node namespace.
#[derive(Debug, Clone)]
pub struct Node {
    /// Short role name given by the test (`a`, `b`).
    pub role: String,
    /// Full namespace name.
    pub netns: String,
    /// 1-based index; the node's pod subnet is `10.200.<index>.0/24`.
    pub index: u8,
    /// Pods created on this node so far.
    pub pods: u8,
}

/// One pod namespace.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Short role name given by the test (`client`, `server`).
    pub role: String,
    /// Full namespace name.
    pub netns: String,
    /// The node it hangs off.
    pub node: String,
    /// Its IPv4 address on `eth0` (configured only if `ipv4`).
    pub ip: Ipv4Addr,
    /// Whether `ip` is configured (false for an IPv6-only pod).
    pub ipv4: bool,
    /// Its IPv6 address on `eth0`, if it has one.
    pub ip6: Option<Ipv6Addr>,
}

/// A link between two nodes.
#[derive(Debug, Clone)]
pub struct Link {
    /// Node roles at either end.
    pub ends: (String, String),
    /// Interface name inside each end (`l-<other role>`).
    pub interfaces: (String, String),
}

/// Owner of every namespace of one test; dropping it kills their processes and deletes them.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<String, Pod>,
    links: Vec<Link>,
    /// Every namespace we created, in creation order, for cleanup.
    created: Vec<String>,
}

impl Topology {
    /// An empty topology with a fresh unique prefix.
    pub fn new() -> Topology {
        Topology {
            prefix: super::unique_prefix(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            links: Vec::new(),
            created: Vec::new(),
        }
    }

    /// Two linked nodes `a` and `b`, with pods given as (node, pod role): the layout most
    /// namespace tests start from.
    pub fn linked_pair(pods: &[(&str, &str)]) -> Topology {
        let mut topology = Topology::new();
        topology.add_node("a").expect("node a");
        topology.add_node("b").expect("node b");
        topology.link("a", "b").expect("link a-b");
        for (node, pod) in pods {
            topology.add_pod(node, pod).expect("pod");
        }
        topology
    }

    /// The unique prefix of every namespace of this topology.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Creates a bare namespace `<prefix>-<role>` with loopback up (no node or pod wiring);
    /// useful for a "fresh netns" check.
    pub fn add_bare(&mut self, role: &str) -> Result<String> {
        let name = format!("{}-{role}", self.prefix);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.created.push(name.clone());
        self.exec(&name, &["ip", "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Adds a node namespace with forwarding on.
    pub fn add_node(&mut self, role: &str) -> Result<&Node> {
        if self.nodes.contains_key(role) || self.pods.contains_key(role) {
            bail!("role {role} already exists");
        }
        let netns = self.add_bare(role)?;
        self.exec(&netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let index = u8::try_from(self.nodes.len() + 1).context("too many nodes")?;
        let node = Node {
            role: role.to_string(),
            netns,
            index,
            pods: 1,
        };
        Ok(self.nodes.entry(role.to_string()).or_insert(node))
    }

    /// Adds a pod namespace on `node` and wires it (see the module header for addresses).
    pub fn add_pod(&mut self, node_role: &str, role: &str) -> Result<&Pod> {
        if self.nodes.contains_key(role) || self.pods.contains_key(role) {
            bail!("role {role} already exists");
        }
        let Some(node) = self.nodes.get_mut(node_role) else {
            bail!("no node {node_role}");
        };
        node.pods += 1;
        let (index, host, node_netns) = (node.index, node.pods, node.netns.clone());
        let netns = self.add_bare(role)?;
        let ip = Ipv4Addr::new(10, 200, index, host);
        let gateway = Ipv4Addr::new(10, 200, index, 1);
        let node_side = interface_name("v-", role);
        run(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            &netns,
            "type",
            "veth",
            "peer",
            "name",
            &node_side,
            "netns",
            &node_netns,
        ]))?;
        let pod_cidr = format!("{ip}/32");
        let gateway_cidr = format!("{gateway}/32");
        for step in [
            vec!["ip", "addr", "add", &pod_cidr, "dev", "eth0"],
            vec!["ip", "link", "set", "eth0", "up"],
        ] {
            self.exec(&netns, &step)?;
        }
        let gateway_text = gateway.to_string();
        for step in [
            vec![
                "ip",
                "route",
                "add",
                &gateway_text,
                "dev",
                "eth0",
                "scope",
                "link",
            ],
            vec![
                "ip",
                "route",
                "add",
                "default",
                "via",
                &gateway_text,
                "dev",
                "eth0",
            ],
        ] {
            self.exec(&netns, &step)?;
        }
        for step in [
            vec!["ip", "addr", "add", &gateway_cidr, "dev", &node_side],
            vec!["ip", "link", "set", &node_side, "up"],
            vec!["ip", "route", "add", &pod_cidr, "dev", &node_side],
        ] {
            self.exec(&node_netns, &step)?;
        }
        let pod = Pod {
            role: role.to_string(),
            netns,
            node: node_role.to_string(),
            ip,
            ipv4: true,
            ip6: None,
        };
        Ok(self.pods.entry(role.to_string()).or_insert(pod))
    }

    /// Gives pod `role` one more IPv4 address (`10.200.<node>.<host>`, in its node's pod
    /// subnet, so every other node already routes it), routed from its node to the pod.
    pub fn add_pod_address(&self, role: &str, host: u8) -> Result<Ipv4Addr> {
        let pod = self.pod(role);
        let node = self.node(&pod.node);
        let ip = Ipv4Addr::new(10, 200, node.index, host);
        let cidr = format!("{ip}/32");
        self.exec(&pod.netns, &["ip", "addr", "add", &cidr, "dev", "eth0"])?;
        let node_side = interface_name("v-", role);
        self.exec(
            &node.netns,
            &["ip", "route", "add", &cidr, "dev", &node_side],
        )?;
        Ok(ip)
    }

    /// Joins two nodes with a veth pair and routes each node's pod subnet across it.
    pub fn link(&mut self, left: &str, right: &str) -> Result<Link> {
        let (Some(left_node), Some(right_node)) = (
            self.nodes.get(left).cloned(),
            self.nodes.get(right).cloned(),
        ) else {
            bail!("link {left}-{right}: unknown node");
        };
        let subnet = u8::try_from(self.links.len() + 1).context("too many links")?;
        let left_if = interface_name("l-", right);
        let right_if = interface_name("l-", left);
        run(Command::new("ip").args([
            "link",
            "add",
            &left_if,
            "netns",
            &left_node.netns,
            "type",
            "veth",
            "peer",
            "name",
            &right_if,
            "netns",
            &right_node.netns,
        ]))?;
        let ends = [
            (&left_node, &left_if, 1u8, &right_node, 2u8),
            (&right_node, &right_if, 2u8, &left_node, 1u8),
        ];
        for (node, interface, host, other, other_host) in ends {
            let address = format!("10.199.{subnet}.{host}/24");
            let via = format!("10.199.{subnet}.{other_host}");
            let other_subnet = format!("10.200.{}.0/24", other.index);
            self.exec(
                &node.netns,
                &["ip", "addr", "add", &address, "dev", interface],
            )?;
            self.exec(&node.netns, &["ip", "link", "set", interface, "up"])?;
            self.exec(
                &node.netns,
                &["ip", "route", "add", &other_subnet, "via", &via],
            )?;
        }
        let link = Link {
            ends: (left.to_string(), right.to_string()),
            interfaces: (left_if, right_if),
        };
        self.links.push(link.clone());
        Ok(link)
    }

    /// IPv6 between the nodes: forwarding on every node, and on every link so far an IPv6
    /// address per end and a route to the other node's IPv6 pod range. Call after the links.
    pub fn enable_ipv6(&mut self) -> Result<()> {
        for node in self.nodes.values() {
            self.exec(
                &node.netns,
                &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
            )?;
        }
        for (subnet, link) in self.links.iter().enumerate() {
            let subnet = subnet + 1;
            let ends = [
                (&link.ends.0, &link.interfaces.0, 1, &link.ends.1, 2),
                (&link.ends.1, &link.interfaces.1, 2, &link.ends.0, 1),
            ];
            for (node, interface, host, other, other_host) in ends {
                let netns = &self.node(node).netns;
                let address = format!("fd00:199:{subnet}::{host}/64");
                let via = format!("fd00:199:{subnet}::{other_host}");
                let other_range = format!("fd00:200:{}::/64", self.node(other).index);
                self.exec(
                    netns,
                    &[
                        "ip", "-6", "addr", "add", &address, "dev", interface, "nodad",
                    ],
                )?;
                self.exec(
                    netns,
                    &["ip", "-6", "route", "add", &other_range, "via", &via],
                )?;
            }
        }
        Ok(())
    }

    /// Adds a pod like [`Topology::add_pod`] that also has an IPv6 address (see the module
    /// header); with `keep_ipv4` false its IPv4 address and routes are removed, so it is
    /// IPv6-only.
    pub fn add_pod_ipv6(&mut self, node_role: &str, role: &str, keep_ipv4: bool) -> Result<&Pod> {
        let pod = self.add_pod(node_role, role)?.clone();
        let node = self.node(node_role).clone();
        let host = pod.ip.octets()[3];
        let ip6 = Ipv6Addr::new(
            0xfd00,
            0x200,
            u16::from(node.index),
            0,
            0,
            0,
            0,
            u16::from(host),
        );
        let gateway = Ipv6Addr::new(0xfd00, 0x200, u16::from(node.index), 0, 0, 0, 0, 1);
        let (pod_cidr, gateway_cidr) = (format!("{ip6}/128"), format!("{gateway}/128"));
        let gateway_text = gateway.to_string();
        if !keep_ipv4 {
            self.exec(&pod.netns, &["ip", "-4", "route", "flush", "dev", "eth0"])?;
            self.exec(&pod.netns, &["ip", "-4", "addr", "flush", "dev", "eth0"])?;
        }
        for step in [
            vec!["ip", "-6", "addr", "add", &pod_cidr, "dev", "eth0", "nodad"],
            vec!["ip", "-6", "route", "add", &gateway_text, "dev", "eth0"],
            vec![
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway_text,
                "dev",
                "eth0",
            ],
        ] {
            self.exec(&pod.netns, &step)?;
        }
        let node_side = interface_name("v-", role);
        for step in [
            vec![
                "ip",
                "-6",
                "addr",
                "add",
                &gateway_cidr,
                "dev",
                &node_side,
                "nodad",
            ],
            vec!["ip", "-6", "route", "add", &pod_cidr, "dev", &node_side],
        ] {
            self.exec(&node.netns, &step)?;
        }
        let entry = self.pods.get_mut(role).context("pod just added")?;
        entry.ip6 = Some(ip6);
        entry.ipv4 = keep_ipv4;
        Ok(entry)
    }

    /// The node with this role.
    pub fn node(&self, role: &str) -> &Node {
        self.nodes
            .get(role)
            .unwrap_or_else(|| panic!("no node {role}"))
    }

    /// The pod with this role.
    pub fn pod(&self, role: &str) -> &Pod {
        self.pods
            .get(role)
            .unwrap_or_else(|| panic!("no pod {role}"))
    }

    /// Full namespace name of a node or pod role.
    pub fn netns(&self, role: &str) -> String {
        if let Some(node) = self.nodes.get(role) {
            return node.netns.clone();
        }
        self.pod(role).netns.clone()
    }

    /// `/run/netns/<name>` of a node or pod role, as the agent config wants it.
    pub fn netns_path(&self, role: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.netns(role))
    }

    /// The interface on `node` that leads to the linked node `other`.
    pub fn link_interface(&self, node: &str, other: &str) -> String {
        let _ = (self.node(node), self.node(other));
        interface_name("l-", other)
    }

    /// Runs a command inside a namespace (full name) and fails on a non-zero exit.
    pub fn exec(&self, netns: &str, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").args(["netns", "exec", netns]).args(args))
    }

    /// Runs a command inside a role's namespace and returns its output whatever the exit code.
    pub fn exec_role(&self, role: &str, args: &[&str]) -> Result<Output> {
        let netns = self.netns(role);
        Command::new("ip")
            .args(["netns", "exec", &netns])
            .args(args)
            .output()
            .with_context(|| format!("spawning {args:?} in {netns}"))
    }

    /// Installs the test's redirection rules in a pod (see [`redirect_rules`]).
    pub fn install_redirect(&self, pod: &str) -> Result<()> {
        let netns = self.netns(pod);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("spawning nft")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("nft stdin")?;
            stdin.write_all(redirect_rules().as_bytes())?;
        }
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "nft in {netns}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Runs `work` on a new thread that first enters the role's network namespace, so every
    /// socket `work` creates lives there. The calling thread's namespace is never touched.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        role: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let path = self.netns_path(role);
        std::thread::spawn(move || {
            enter(&path)?;
            Ok(work())
        })
    }

    /// Like [`Topology::spawn_in`] but waits for the result.
    pub fn run_in<T: Send + 'static>(
        &self,
        role: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        match self.spawn_in(role, work).join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Names of this topology's namespaces that `ip netns list` still shows.
    pub fn leftover_namespaces(prefix: &str) -> Result<Vec<String>> {
        let output = run(Command::new("ip").args(["netns", "list"]))?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| name.starts_with(&format!("{prefix}-")))
            .map(str::to_string)
            .collect())
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for netns in self.created.iter().rev() {
            kill_processes_in(netns);
            let deleted = Command::new("ip").args(["netns", "del", netns]).output();
            if !deleted.is_ok_and(|output| output.status.success()) {
                eprintln!("warning: could not delete netns {netns}");
            }
        }
    }
}

/// The nftables ruleset the tests install in a captured pod (the agent will do this itself
/// from issue 3 on): outbound TCP to 15001 unless marked 0x539 or local, inbound TCP to 15006
/// unless it targets 15008 or comes over loopback. One `nft -f` transaction.
pub fn redirect_rules() -> &'static str {
    r#"table inet nodetunnel_test {
  chain output {
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == 0x539 return
    oifname "lo" return
    ip daddr 127.0.0.0/8 return
    meta l4proto tcp redirect to :15001
  }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    iifname "lo" return
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }
}
"#
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &std::path::Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {}", path.display()))
}

/// SIGKILLs every process still inside `netns` (agents, tcpdump), so the namespace can go.
fn kill_processes_in(netns: &str) {
    let Ok(output) = Command::new("ip").args(["netns", "pids", netns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        // Never ourselves: test threads enter namespaces, and `ip netns pids` looks per process.
        if pid == std::process::id() as i32 {
            continue;
        }
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `<prefix><role>` cut to the kernel's 15-character interface name limit.
fn interface_name(prefix: &str, role: &str) -> String {
    format!("{prefix}{role}").chars().take(15).collect()
}

/// Runs a command and fails with its stderr on a non-zero exit.
pub fn run(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("spawning {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}
