//! The socket factory (layer L0): the one place the agent makes sockets.
//!
//! A factory is either for the agent's own namespace (node-level servers) or for one pod's
//! namespace, where every socket — listeners and outgoing connections alike — is created inside
//! the pod's netns and carries the packet mark so the pod's redirection rules skip it. Every
//! setting a socket needs (reuse-port, no-delay, keepalive, transparent, mark) lives here.

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

/// Where sockets are created and how they are marked.
#[derive(Debug, Clone)]
pub struct SocketFactory {
    /// `None`: the agent's own namespace.
    pod: Option<PodNetns>,
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
        SocketFactory { pod: None }
    }

    /// Sockets inside `netns`, marked with `mark`. `home` is the agent's own namespace, to which
    /// the creating thread returns.
    pub fn pod(netns: Arc<Netns>, home: Arc<Netns>, mark: u32) -> Self {
        SocketFactory {
            pod: Some(PodNetns { netns, home, mark }),
        }
    }

    /// Creates a raw TCP socket in the right namespace with the mark set.
    fn raw_socket(&self, domain: Domain) -> Result<Socket, io::Error> {
        self.raw_socket_of(domain, Type::STREAM, Protocol::TCP)
    }

    /// Creates a raw socket of `kind` in the right namespace with the mark set.
    fn raw_socket_of(
        &self,
        domain: Domain,
        kind: Type,
        protocol: Protocol,
    ) -> Result<Socket, io::Error> {
        // socket2 creates it close-on-exec already (SOCK_CLOEXEC), so no fcntl follows.
        let create = || Socket::new(domain, kind.nonblocking(), Some(protocol));
        let socket = match &self.pod {
            None => create()?,
            Some(pod) => pod.netns.run_in(&pod.home, create)??,
        };
        if let Some(pod) = &self.pod {
            socket.set_mark(pod.mark)?;
        }
        Ok(socket)
    }

    /// A listener on `addr` (port reuse on, so a restarted agent can bind beside the old one).
    /// A wildcard IPv6 address is dual-stack; if the namespace has no IPv6, IPv4 wildcard is used.
    /// `transparent` lets the listener accept connections for non-local addresses (TPROXY).
    pub fn listen(&self, addr: SocketAddr, transparent: bool) -> Result<TcpListener, SocketError> {
        let attempt = |addr: SocketAddr| -> io::Result<TcpListener> {
            let socket = self.raw_socket(Domain::for_address(addr))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(false)?;
            }
            if transparent {
                // Best effort: without CAP_NET_ADMIN TPROXY is unavailable, REDIRECT still works.
                let _ = socket.set_ip_transparent(true);
            }
            // Linux copies these to every accepted connection, which saves each of them three
            // setsockopt calls (a test below checks the inheritance).
            socket.set_nodelay(true)?;
            socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(KEEPALIVE_TIME))?;
            socket.bind(&addr.into())?;
            socket.listen(LISTEN_BACKLOG)?;
            TcpListener::from_std(socket.into())
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

    /// A UDP socket bound to `addr` (port reuse on, as for TCP listeners, so a restarted agent
    /// can bind beside the old one).
    pub fn udp_bind(&self, addr: SocketAddr) -> Result<UdpSocket, SocketError> {
        let attempt = || -> io::Result<UdpSocket> {
            let socket =
                self.raw_socket_of(Domain::for_address(addr), Type::DGRAM, Protocol::UDP)?;
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
            let socket = self.raw_socket_of(domain, Type::DGRAM, Protocol::UDP)?;
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

    /// Connects to `dst`. With `source` set, the socket is bound to that (foreign) IP with
    /// transparent + freebind, so the destination sees the original client's address.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        source: Option<IpAddr>,
        timeout: Duration,
    ) -> Result<TcpStream, SocketError> {
        let io_error = |op, source| SocketError::Io {
            op,
            addr: dst,
            source,
        };
        let socket = self
            .raw_socket(Domain::for_address(dst))
            .map_err(|source| io_error("socket", source))?;
        socket
            .set_nodelay(true)
            .map_err(|source| io_error("setsockopt", source))?;
        socket
            .set_tcp_keepalive(&TcpKeepalive::new().with_time(KEEPALIVE_TIME))
            .map_err(|source| io_error("setsockopt", source))?;
        if let Some(ip) = source {
            let bind = || -> io::Result<()> {
                if ip.is_ipv4() {
                    socket.set_ip_transparent(true)?;
                    socket.set_freebind(true)?;
                } else {
                    socket.set_freebind_ipv6(true)?;
                    crate::sys::set_ipv6_transparent(&socket)?;
                }
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
        let first = sockets.listen(any_port, false).expect("listen");
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
            .listen(address, false)
            .expect("rebinding beside TIME_WAIT must work");
    }

    /// Accepted connections carry the listener's options (no per-connection setsockopt).
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive() {
        let listener = SocketFactory::node()
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)), false)
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
