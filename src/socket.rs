//! The socket factory (layer L0): the one place the agent makes sockets.
//!
//! A factory is either for the agent's own namespace (node-level servers) or for one pod's
//! namespace, where every socket — listeners and outgoing connections alike — is created inside
//! the pod's netns and carries the packet mark so the pod's redirection rules skip it. Every
//! setting a socket needs (reuse-port, no-delay, keepalive, transparent, mark, congestion
//! control) lives here.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use crate::sys::Netns;

/// Backlog of every listener; a pod rarely has more pending accepts than this.
const LISTEN_BACKLOG: i32 = 1024;

/// TCP keepalive of outgoing and accepted connections: detects peers that vanished without FIN.
const KEEPALIVE_TIME: Duration = Duration::from_secs(180);

/// Owner of every listener the agent opens. The kernel lets a socket join a `SO_REUSEPORT`
/// group only if it has the same owner, so a restarted agent (same owner) binds beside the old
/// one for a hand-over without refused connections, while an app in the pod — even one running
/// as root, owner 0 — gets `EADDRINUSE` instead of a share of the redirected connections.
/// Kubernetes cannot run a container as this uid (`runAsUser` stops at 2^31 - 1); only a
/// process with `CAP_SETUID` could take it on.
pub const LISTENER_OWNER: u32 = u32::MAX - 1;

/// The congestion control of in-pod legs, and the one every kernel has if that one is missing.
///
/// Pod namespaces inherit the node's default, and where that is BBR the kernel paces every
/// socket with its own timers unless the device has an `fq` qdisc (loopback has none). A
/// connection between the agent and the app it captured never leaves the pod, so that pacing
/// buys nothing; through both agents it cost a tenth of their CPU per Gbit (README,
/// Performance, eleventh pass).
const IN_POD_CONGESTION: [&[u8]; 2] = [b"cubic", b"reno"];

/// Where the other end of a socket's connection is, which decides its TCP congestion control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The app in the same pod, over loopback (connections captured on 15001, delivery to the
    /// pod's own app): cubic, whatever the namespace's default (see [`IN_POD_CONGESTION`]).
    InPod,
    /// Across the network (HBONE both ways, passthrough, DNS upstreams): the factory's
    /// configured algorithm (`proxy.congestionControl`), else the namespace's default.
    Network,
}

/// Where sockets are created and how they are marked.
#[derive(Debug, Clone)]
pub struct SocketFactory {
    /// `None`: the agent's own namespace.
    pod: Option<PodNetns>,
    /// Congestion control of [`Leg::Network`] sockets; `None`: the namespace's default.
    network_congestion: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
struct PodNetns {
    netns: Arc<Netns>,
    home: Arc<Netns>,
    mark: u32,
}

/// Errors making a socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Entering the pod's namespace failed (it may be gone).
    #[error("cannot enter network namespace {path}: {source}")]
    Netns {
        /// The namespace path.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A socket call failed.
    #[error("{op} {addr}: {source}")]
    Io {
        /// What we were doing (`bind`, `connect`...).
        op: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The connect did not complete in time.
    #[error("connect {0}: timed out")]
    ConnectTimeout(SocketAddr),
}

impl SocketError {
    /// Whether the failure was a timeout (reported as a possible NetworkPolicy block).
    pub fn is_timeout(&self) -> bool {
        matches!(self, SocketError::ConnectTimeout(_))
    }
}

impl SocketFactory {
    /// Sockets in the agent's own namespace, unmarked.
    pub fn node() -> Self {
        SocketFactory {
            pod: None,
            network_congestion: None,
        }
    }

    /// Sockets inside `netns`, marked with `mark`. `home` is the agent's own namespace, to which
    /// the creating thread returns.
    pub fn pod(netns: Arc<Netns>, home: Arc<Netns>, mark: u32) -> Self {
        SocketFactory {
            pod: Some(PodNetns { netns, home, mark }),
            network_congestion: None,
        }
    }

    /// Gives [`Leg::Network`] sockets `algorithm` (checked with [`check_congestion_control`]
    /// at start-up) instead of the namespace's default.
    pub fn with_network_congestion(mut self, algorithm: Option<&str>) -> Self {
        self.network_congestion = algorithm.map(Arc::from);
        self
    }

    /// Sets `socket`'s congestion control for `leg`. Never fails the socket: a kernel without
    /// the algorithm leaves the namespace's default, which carries traffic just the same.
    fn set_congestion(&self, socket: &Socket, leg: Leg) {
        let result = match (leg, &self.network_congestion) {
            (Leg::InPod, _) => socket
                .set_tcp_congestion(IN_POD_CONGESTION[0])
                .or_else(|_| socket.set_tcp_congestion(IN_POD_CONGESTION[1])),
            (Leg::Network, Some(algorithm)) => socket.set_tcp_congestion(algorithm.as_bytes()),
            (Leg::Network, None) => Ok(()),
        };
        if let Err(error) = result {
            tracing::debug!(?leg, %error, "congestion control not set; the namespace's default applies");
        }
    }

    /// Creates a raw TCP socket in the right namespace with the mark set, owned by `owner`
    /// (else by the agent's own uid).
    fn raw_socket(&self, domain: Domain, owner: Option<u32>) -> Result<Socket, io::Error> {
        self.raw_socket_of(domain, Type::STREAM, Protocol::TCP, owner)
    }

    /// Creates a raw socket of `kind` in the right namespace with the mark set, owned by
    /// `owner` (else by the agent's own uid).
    fn raw_socket_of(
        &self,
        domain: Domain,
        kind: Type,
        protocol: Protocol,
        owner: Option<u32>,
    ) -> Result<Socket, io::Error> {
        // socket2 creates it close-on-exec already (SOCK_CLOEXEC), so no fcntl follows.
        let create = || {
            let socket = || Socket::new(domain, kind.nonblocking(), Some(protocol));
            match owner {
                Some(uid) => crate::sys::with_fsuid(uid, socket),
                None => socket(),
            }
        };
        let socket = match &self.pod {
            None => create()?,
            Some(pod) => pod.netns.run_in(&pod.home, create)??,
        };
        if let Some(pod) = &self.pod {
            socket.set_mark(pod.mark)?;
        }
        Ok(socket)
    }

    /// A listener on `addr`, owned by [`LISTENER_OWNER`] with port reuse on, so that a
    /// restarted agent can bind beside the old one and nothing else can.
    /// A wildcard IPv6 address is dual-stack; if the namespace has no IPv6, IPv4 wildcard is used.
    /// `transparent` lets the listener accept connections for non-local addresses (TPROXY);
    /// accepted connections get `leg`'s congestion control.
    pub fn listen(
        &self,
        addr: SocketAddr,
        transparent: bool,
        leg: Leg,
    ) -> Result<TcpListener, SocketError> {
        let listener = self.listen_std(addr, transparent, leg)?;
        let addr = listener.local_addr().unwrap_or(addr);
        TcpListener::from_std(listener).map_err(|source| SocketError::Io {
            op: "listen",
            addr,
            source,
        })
    }

    /// [`SocketFactory::listen`], not yet registered with any runtime: the runtime that will
    /// accept on it registers it (a data-plane shard, see `WorkloadProxy::spawn`). Several
    /// listeners on one address form a `SO_REUSEPORT` group, over which the kernel spreads new
    /// connections.
    pub fn listen_std(
        &self,
        addr: SocketAddr,
        transparent: bool,
        leg: Leg,
    ) -> Result<std::net::TcpListener, SocketError> {
        let attempt = |addr: SocketAddr| -> io::Result<std::net::TcpListener> {
            let socket = self.raw_socket(Domain::for_address(addr), Some(LISTENER_OWNER))?;
            warn_unless_owned(&socket, addr);
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(false)?;
            }
            if transparent {
                // Best effort: without CAP_NET_ADMIN TPROXY is unavailable, REDIRECT still works.
                let _ = socket.set_ip_transparent(true);
            }
            // Linux copies these to every accepted connection, which saves each of them up to
            // four setsockopt calls (a test below checks the inheritance).
            socket.set_nodelay(true)?;
            socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(KEEPALIVE_TIME))?;
            self.set_congestion(&socket, leg);
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(socket.into())
        };
        match attempt(addr) {
            Ok(listener) => Ok(listener),
            Err(error)
                if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    && error.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
                attempt(v4).map_err(|source| SocketError::Io {
                    op: "listen",
                    addr: v4,
                    source,
                })
            }
            Err(source) => Err(SocketError::Io {
                op: "listen",
                addr,
                source,
            }),
        }
    }

    /// A UDP socket bound to `addr`, owned by [`LISTENER_OWNER`] with port reuse on, as TCP
    /// listeners are: a restarted agent can bind beside the old one and nothing else can.
    pub fn udp_bind(&self, addr: SocketAddr) -> Result<UdpSocket, SocketError> {
        let attempt = || -> io::Result<UdpSocket> {
            let socket = self.raw_socket_of(
                Domain::for_address(addr),
                Type::DGRAM,
                Protocol::UDP,
                Some(LISTENER_OWNER),
            )?;
            warn_unless_owned(&socket, addr);
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&addr.into())?;
            UdpSocket::from_std(socket.into())
        };
        attempt().map_err(|source| SocketError::Io {
            op: "bind udp",
            addr,
            source,
        })
    }

    /// A UDP socket connected to `dst` from a fresh ephemeral port, so that only `dst` can
    /// answer on it (the kernel drops datagrams from anyone else).
    pub fn udp_connect(&self, dst: SocketAddr) -> Result<UdpSocket, SocketError> {
        let attempt = || -> io::Result<UdpSocket> {
            let domain = Domain::for_address(dst);
            let socket = self.raw_socket_of(domain, Type::DGRAM, Protocol::UDP, None)?;
            let any: IpAddr = if dst.is_ipv6() {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            socket.bind(&SocketAddr::new(any, 0).into())?;
            socket.connect(&dst.into())?;
            UdpSocket::from_std(socket.into())
        };
        attempt().map_err(|source| SocketError::Io {
            op: "connect udp",
            addr: dst,
            source,
        })
    }

    /// Connects to `dst`, which is `leg` away. With `source` set, the socket is bound to that
    /// (foreign) IP with transparent + freebind, so the destination sees the original client's
    /// address.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        source: Option<IpAddr>,
        leg: Leg,
        timeout: Duration,
    ) -> Result<TcpStream, SocketError> {
        let io_error = |op, source| SocketError::Io {
            op,
            addr: dst,
            source,
        };
        let socket = self
            .raw_socket(Domain::for_address(dst), None)
            .map_err(|source| io_error("socket", source))?;
        socket
            .set_nodelay(true)
            .map_err(|source| io_error("setsockopt", source))?;
        socket
            .set_tcp_keepalive(&TcpKeepalive::new().with_time(KEEPALIVE_TIME))
            .map_err(|source| io_error("setsockopt", source))?;
        self.set_congestion(&socket, leg);
        if let Some(ip) = source {
            let bind = || -> io::Result<()> {
                // Transparent alone lets the socket bind a foreign address (Linux checks
                // `ip_nonlocal_bind || freebind || transparent`), so no freebind call as well.
                if ip.is_ipv4() {
                    socket.set_ip_transparent(true)?;
                } else {
                    crate::sys::set_ipv6_transparent(&socket)?;
                }
                // The port is then picked by connect, unique per 4-tuple, instead of by bind
                // among every port of the client IP: bind no longer searches the bind table (it
                // grows with TIME_WAIT sockets at high connection rates), and one client IP is
                // not limited to one connection per ephemeral port across all destinations.
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                )?;
                socket.bind(&SocketAddr::new(ip, 0).into())
            };
            bind().map_err(|source| io_error("bind original source", source))?;
        }
        let socket = TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(timeout, socket.connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(io_error("connect", source)),
            Err(_) => Err(SocketError::ConnectTimeout(dst)),
        }
    }
}

/// Checks at start-up that this kernel lets the agent give its sockets `algorithm` (loading
/// its module if need be), so that a typo in `proxy.congestionControl` stops the agent with a
/// clear error instead of leaving every connection on the default.
pub fn check_congestion_control(algorithm: &str) -> Result<(), String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|error| format!("cannot make a socket to try it on: {error}"))?;
    socket
        .set_tcp_congestion(algorithm.as_bytes())
        .map_err(|error| {
            let available =
                std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                    .map(|list| list.trim().to_string())
                    .unwrap_or_else(|_| "unknown".into());
            format!(
                "the kernel refuses TCP congestion control {algorithm:?}: {error} \
                 (available: {available})"
            )
        })
}

/// Without the owner (an agent in a user namespace that does not map it), port reuse is open
/// to any socket of the agent's uid again; say so rather than fail the pod.
fn warn_unless_owned(socket: &Socket, addr: SocketAddr) {
    use std::os::fd::AsRawFd;
    match nix::sys::stat::fstat(socket.as_raw_fd()) {
        Ok(stat) if stat.st_uid == LISTENER_OWNER => {}
        Ok(stat) => tracing::warn!(%addr, owner = stat.st_uid, wanted = LISTENER_OWNER,
            "listener not owned by the agent's listener uid; apps running as its owner could bind beside it"),
        Err(error) => tracing::debug!(%addr, %error, "cannot check the listener's owner"),
    }
}

/// A node-level listener (metrics, readiness) on `addr` in the current namespace. The wildcard
/// `[::]` is dual-stack, so IPv4-only, IPv6-only and dual-stack clusters can all reach it; on
/// a node without IPv6 it falls back to `0.0.0.0` and says so.
pub fn bind_node_listener(addr: SocketAddr) -> Result<TcpListener, SocketError> {
    let attempt = |addr: SocketAddr| -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(false)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        TcpListener::from_std(socket.into())
    };
    let io_error = |addr, source| SocketError::Io {
        op: "listen",
        addr,
        source,
    };
    match attempt(addr) {
        Ok(listener) => Ok(listener),
        Err(error)
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && matches!(
                    error.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
        {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            tracing::info!(%error, listen = %v4, "IPv6 is disabled on this node; listening on IPv4 only");
            attempt(v4).map_err(|source| io_error(v4, source))
        }
        Err(source) => Err(io_error(addr, source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;
    use tokio::io::AsyncReadExt;

    /// A restarted agent rebinds a pod's listener although connections it accepted (and closed
    /// first) still sit in TIME_WAIT on that port.
    #[tokio::test]
    async fn a_listener_rebinds_while_its_closed_connections_are_in_time_wait() {
        let sockets = SocketFactory::node();
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let first = sockets
            .listen(any_port, false, Leg::Network)
            .expect("listen");
        let address = first.local_addr().expect("address");
        let mut client = TcpStream::connect(address).await.expect("connect");
        let (accepted, _) = first.accept().await.expect("accept");
        // Our side closes first, so our end of the connection goes to TIME_WAIT.
        drop(accepted);
        let mut byte = [0u8; 1];
        assert_eq!(client.read(&mut byte).await.expect("end of stream"), 0);
        drop(client);
        drop(first);
        sockets
            .listen(address, false, Leg::Network)
            .expect("rebinding beside TIME_WAIT must work");
    }

    /// Port theft: an app (root, with `SO_REUSEPORT`) binding the agent's port gets
    /// `EADDRINUSE`, on the same address, the wildcard or the other family's wildcard; a
    /// restarted agent still binds beside the old listener (the hand-over).
    #[tokio::test]
    async fn only_another_agent_listener_can_bind_beside_a_listener() {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata("/proc/self").expect("/proc/self").uid();
        assert_eq!(
            uid, 0,
            "needs root: an app running as root is the case under test"
        );
        let sockets = SocketFactory::node();
        let agent = sockets
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)), false, Leg::Network)
            .expect("listen");
        let port = agent.local_addr().expect("address").port();
        let app_binds = |addr: SocketAddr| {
            let app = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
            app.set_reuse_address(true).expect("reuseaddr");
            app.set_reuse_port(true).expect("reuseport");
            app.bind(&addr.into())
        };
        let addresses = [
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        ];
        for addr in addresses {
            let error = app_binds(addr).expect_err("an app must not share the agent's port");
            assert_eq!(
                error.raw_os_error(),
                Some(libc::EADDRINUSE),
                "{addr}: {error}"
            );
        }
        let successor = sockets
            .listen(
                SocketAddr::from(([127, 0, 0, 1], port)),
                false,
                Leg::Network,
            )
            .expect("a restarted agent binds beside the old listener");
        drop(successor);
    }

    fn congestion_of(socket: &impl std::os::fd::AsFd) -> String {
        let name = SockRef::from(socket)
            .tcp_congestion()
            .expect("TCP_CONGESTION");
        String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_string()
    }

    /// In-pod legs run cubic (reno where the kernel has no cubic) whatever the namespace's
    /// default, on connects and on accepted connections alike; network legs keep the default
    /// unless the factory is given an algorithm.
    #[tokio::test]
    async fn in_pod_legs_run_cubic_and_network_legs_the_configured_or_default_algorithm() {
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .expect("available congestion controls");
        let in_pod = if available.split_whitespace().any(|name| name == "cubic") {
            "cubic"
        } else {
            "reno"
        };
        let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .expect("default congestion control")
            .trim()
            .to_string();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let timeout = Duration::from_secs(5);
        let cases = [
            (SocketFactory::node(), Leg::InPod, in_pod),
            (SocketFactory::node(), Leg::Network, default.as_str()),
            (
                SocketFactory::node().with_network_congestion(Some("reno")),
                Leg::Network,
                "reno",
            ),
            (
                SocketFactory::node().with_network_congestion(Some("reno")),
                Leg::InPod,
                in_pod,
            ),
        ];
        for (sockets, leg, expected) in cases {
            let listener = sockets.listen(loopback, false, leg).expect("listen");
            let address = listener.local_addr().expect("address");
            let connected = sockets
                .connect(address, None, leg, timeout)
                .await
                .expect("connect");
            let (accepted, _) = listener.accept().await.expect("accept");
            assert_eq!(congestion_of(&connected), expected, "{leg:?} connect");
            assert_eq!(congestion_of(&accepted), expected, "{leg:?} accepted");
        }
    }

    /// A name the kernel does not know stops start-up with the name and what is available.
    #[test]
    fn an_unknown_congestion_control_is_refused_naming_it() {
        check_congestion_control("reno").expect("reno is built into every kernel");
        let problem = check_congestion_control("nosuchalgo").expect_err("unknown algorithm");
        assert!(problem.contains("\"nosuchalgo\""), "{problem}");
        assert!(
            problem.contains("available: ") && problem.contains("reno"),
            "{problem}"
        );
    }

    /// Accepted connections carry the listener's options (no per-connection setsockopt).
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive() {
        let listener = SocketFactory::node()
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)), false, Leg::Network)
            .expect("listen");
        let address = listener.local_addr().expect("address");
        let _client = TcpStream::connect(address).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let socket = SockRef::from(&accepted);
        assert!(socket.nodelay().expect("nodelay"));
        assert!(socket.keepalive().expect("keepalive"));
        assert_eq!(
            socket.keepalive_time().expect("keepalive time"),
            KEEPALIVE_TIME
        );
    }
}
