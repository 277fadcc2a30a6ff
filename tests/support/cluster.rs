//! The topology most namespace tests run on: nodes `a` and `b` linked by a veth, pods on them,
//! and a real agent on each node, both trusting one root.
//!
//! A test says which pods exist and where, which workloads speak plain TCP, which pods the
//! agents capture, which get redirection rules from the test itself (as istio-cni would
//! install them), how the mesh differs from one HBONE workload per pod, and how each node's
//! config differs from the rendered mesh. [`Cluster`] builds that, waits until both agents are
//! ready, and tears it down in order (agents before namespaces).

use std::net::{Ipv4Addr, SocketAddr};

use super::agent::{Agent, Ca, Mesh, Protocol, WorkloadSpec};
use super::netns::Topology;

/// Two nodes with an agent each. Field order is drop order: agents stop before the
/// namespaces go.
pub struct Cluster {
    /// The agents of nodes `a` and `b`, in that order.
    pub agents: Vec<Agent>,
    /// The root both agents trust.
    pub ca: Ca,
    /// The mesh model every agent's config carries.
    pub mesh: Mesh,
    /// Nodes, pods and links.
    pub topology: Topology,
    /// Pods the agents capture (each by the agent of its node).
    captured: Vec<String>,
}

/// What [`Cluster::build`] is asked to make.
pub struct ClusterBuilder {
    topology: Topology,
    mesh: Mesh,
    captured: Vec<String>,
    test_redirected: Vec<String>,
}

impl Cluster {
    /// Nodes `a` and `b` with `pods` (node, pod) on them, each pod one HBONE workload named
    /// like the pod; adjust with the builder, then [`ClusterBuilder::start`].
    pub fn build(pods: &[(&str, &str)]) -> ClusterBuilder {
        let topology = Topology::linked_pair(pods);
        let mesh = Mesh {
            workloads: pods
                .iter()
                .map(|(node, pod)| {
                    WorkloadSpec::new(pod, topology.pod(pod).ip, node, Protocol::Hbone)
                })
                .collect(),
            services: Vec::new(),
        };
        ClusterBuilder {
            topology,
            mesh,
            captured: Vec::new(),
            test_redirected: Vec::new(),
        }
    }

    /// The config of `node`'s agent as the mesh renders it: its captured pods and the model.
    pub fn render(&self, node: &str) -> String {
        self.mesh
            .render(&self.topology, node, &self.captured_on(node))
    }

    /// The captured pods that live on `node`.
    pub fn captured_on(&self, node: &str) -> Vec<&str> {
        self.captured
            .iter()
            .map(String::as_str)
            .filter(|pod| self.topology.pod(pod).node == node)
            .collect()
    }

    /// The agent of `node` (`a` or `b`).
    pub fn agent(&self, node: &str) -> &Agent {
        &self.agents[Self::index(node)]
    }

    /// The agent of `node`, to stop or replace it.
    pub fn agent_mut(&mut self, node: &str) -> &mut Agent {
        &mut self.agents[Self::index(node)]
    }

    /// The IP of `pod`.
    pub fn ip(&self, pod: &str) -> Ipv4Addr {
        self.topology.pod(pod).ip
    }

    /// `pod`'s IP at `port`.
    pub fn target(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip(pod), port))
    }

    fn index(node: &str) -> usize {
        match node {
            "a" => 0,
            "b" => 1,
            other => panic!("the cluster has nodes a and b, not {other}"),
        }
    }
}

impl ClusterBuilder {
    /// These workloads speak plain TCP (the rest HBONE).
    pub fn plain_tcp(mut self, pods: &[&str]) -> Self {
        for workload in &mut self.mesh.workloads {
            if pods.contains(&workload.name.as_str()) {
                workload.protocol = Protocol::Tcp;
            }
        }
        self
    }

    /// The agents capture these pods and install their redirection rules.
    pub fn captured(mut self, pods: &[&str]) -> Self {
        self.captured.extend(pods.iter().map(ToString::to_string));
        self
    }

    /// The test installs its own redirection rules in these pods before the agents start (as
    /// istio-cni would; see `Topology::install_redirect`).
    pub fn test_redirected(mut self, pods: &[&str]) -> Self {
        self.test_redirected
            .extend(pods.iter().map(ToString::to_string));
        self
    }

    /// Changes the mesh (services, service ports) before the agents start.
    pub fn mesh(mut self, edit: impl FnOnce(&Topology, &mut Mesh)) -> Self {
        edit(&self.topology, &mut self.mesh);
        self
    }

    /// The topology, for what must exist before the agents do (a fake istiod, its model).
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Starts both agents with the rendered configs and waits until they are ready.
    pub fn start(self) -> Cluster {
        self.start_with(Cluster::render)
    }

    /// Starts both agents, `configure(cluster, node)` giving each node's config file, and waits
    /// until they are ready.
    pub fn start_with(self, configure: impl Fn(&Cluster, &str) -> String) -> Cluster {
        self.spawn_with(|cluster, node| {
            let config = configure(cluster, node);
            Agent::start(&cluster.topology, node, &cluster.ca, &config).expect("agent ready")
        })
    }

    /// Starts each node's agent with `spawn(cluster, node)`, for agents not configured from
    /// the mesh (Istio mode); readiness is the caller's to wait for.
    pub fn spawn_with(self, spawn: impl Fn(&Cluster, &str) -> Agent) -> Cluster {
        for pod in &self.test_redirected {
            self.topology
                .install_redirect(pod)
                .expect("the test's redirection rules");
        }
        let mut cluster = Cluster {
            agents: Vec::new(),
            ca: Ca::init().expect("nodetunnel ca init"),
            mesh: self.mesh,
            topology: self.topology,
            captured: self.captured,
        };
        for node in ["a", "b"] {
            let agent = spawn(&cluster, node);
            cluster.agents.push(agent);
        }
        cluster
    }
}
