//! The SEQPACKET connection to istio-cni (layer L4, I/O only): connect, send one datagram,
//! receive one datagram with its fds. Framing is one protobuf message per datagram, no length
//! prefix; what the bytes mean is [`super::proto`]'s business.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    connect, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::proto::{decode_request, Request, ZdsError, MAX_MESSAGE_SIZE};

/// Room for fds in one receive: the kernel's per-message maximum (SCM_MAX_FD), so an abusive
/// sender cannot make us lose (and leak) fds through control-data truncation.
const MAX_FDS: usize = 253;

/// A connected, non-blocking SEQPACKET socket registered with tokio.
#[derive(Debug)]
pub struct Connection {
    socket: AsyncFd<OwnedFd>,
}

/// One datagram as received, before decoding.
#[derive(Debug)]
pub struct Datagram {
    /// The bytes (at most [`MAX_MESSAGE_SIZE`]).
    pub bytes: Vec<u8>,
    /// The fds attached to it.
    pub fds: Vec<OwnedFd>,
    /// The datagram was larger than [`MAX_MESSAGE_SIZE`].
    pub truncated: bool,
    /// The fds did not all fit.
    pub control_truncated: bool,
}

impl Datagram {
    /// Checks the size bounds, then decodes. Any fd not moved into the request is closed.
    pub fn decode(self) -> Result<Request, ZdsError> {
        if self.truncated {
            return Err(ZdsError::TooLarge);
        }
        if self.control_truncated {
            return Err(ZdsError::ControlTruncated);
        }
        decode_request(&self.bytes, self.fds)
    }
}

impl Connection {
    /// Connects to the istio-cni socket at `path`. Unix-socket connects do not block; a full
    /// backlog fails with `WouldBlock` and is retried by the caller's backoff.
    pub fn connect(path: &Path) -> io::Result<Connection> {
        let socket = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let address = UnixAddr::new(path)?;
        connect(socket.as_raw_fd(), &address)?;
        Ok(Connection {
            socket: crate::sys::register_async_fd(socket)?,
        })
    }

    /// Sends one datagram (no fds). Fails on a closed peer (`EPIPE`, no SIGPIPE).
    pub async fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, |socket| {
                let raw = socket.as_raw_fd();
                send(raw, bytes, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
            })
            .await?;
        if sent != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write on a SEQPACKET socket",
            ));
        }
        Ok(())
    }

    /// Receives one datagram; `None` when istio-cni closed the connection.
    pub async fn recv(&self) -> io::Result<Option<Datagram>> {
        let mut buffer = vec![0u8; MAX_MESSAGE_SIZE];
        let received = self
            .socket
            .async_io(Interest::READABLE, |socket| {
                crate::sys::recv_with_fds(socket.as_fd(), &mut buffer, MAX_FDS)
            })
            .await?;
        if received.len == 0 && received.fds.is_empty() && !received.truncated {
            return Ok(None);
        }
        buffer.truncate(received.len);
        Ok(Some(Datagram {
            bytes: buffer,
            fds: received.fds,
            truncated: received.truncated,
            control_truncated: received.control_truncated,
        }))
    }
}
