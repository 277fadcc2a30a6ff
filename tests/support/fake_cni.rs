//! A fake istio-cni: the server side of the ZDS protocol, driven step by step by a test.
//!
//! It listens on a SEQPACKET socket in a tempdir (the agent is configured to connect there),
//! accepts the agent, reads its hello, and sends `WorkloadRequest`s — `Add` with a pod's
//! namespace fd attached by SCM_RIGHTS, `Keep`, `Del`, `SnapshotSent`, or raw bytes — waiting
//! for the agent's answer to each, as istio-cni does. Every answer is recorded. It can be
//! stopped and started again on the same path, to test the agent's reconnect.
//!
//! The messages are the agent's own prost structs; the unit tests in
//! `src/capture/zds/proto_tests.rs` pin them to istio's field numbers byte by byte.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags};
use prost::Message;
use socket2::{Domain, SockAddr, Socket, Type};

use nodetunnel::capture::zds::proto::{
    decode_response, workload_request::Payload, AddWorkload, DelWorkload, KeepWorkload,
    SnapshotSent, Version, WorkloadInfo, WorkloadRequest, ZdsHello,
};

/// How long the fake waits for the agent (to connect, to answer).
pub const CNI_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Empty error.
    Ack,
    /// The reason the agent gave.
    Nack(String),
}

impl Answer {
    /// Whether it is an ACK.
    pub fn is_ack(&self) -> bool {
        *self == Answer::Ack
    }

    /// The NACK reason, or a panic naming what was expected.
    pub fn nack_reason(&self) -> &str {
        match self {
            Answer::Nack(reason) => reason,
            Answer::Ack => panic!("expected a NACK, got an ACK"),
        }
    }
}

/// The listening side; the socket file is removed on drop.
pub struct FakeCni {
    path: PathBuf,
    listener: Socket,
}

impl FakeCni {
    /// Listens on `path` (a stale socket file there is replaced).
    pub fn listen(path: &Path) -> Result<FakeCni> {
        let _ = std::fs::remove_file(path);
        let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).context("socket")?;
        listener
            .bind(&SockAddr::unix(path)?)
            .with_context(|| format!("bind {}", path.display()))?;
        listener.listen(8).context("listen")?;
        // accept(2) on a unix socket honours SO_RCVTIMEO: no wait here can hang.
        set_timeout(&listener)?;
        Ok(FakeCni {
            path: path.to_path_buf(),
            listener,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the agent to connect and reads its hello, which must be `V1`.
    pub fn accept(&self) -> Result<CniConnection> {
        // A signal to the test process (another test's child exiting) interrupts a wait with
        // SO_RCVTIMEO even under SA_RESTART: wait again.
        let accepted = loop {
            match self.listener.accept() {
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let (socket, _peer) = accepted
            .with_context(|| format!("no agent connected to {} in time", self.path.display()))?;
        set_timeout(&socket)?;
        let connection = CniConnection {
            socket,
            answers: Vec::new(),
        };
        let hello = ZdsHello::decode(connection.receive()?.as_slice()).context("hello")?;
        if hello.version != Version::V1 as i32 {
            bail!("hello with version {}, want V1", hello.version);
        }
        Ok(connection)
    }

    /// Stops listening and removes the socket file; the agent's connection attempts now fail.
    pub fn stop(self) {}
}

impl Drop for FakeCni {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One accepted agent connection. Dropping it closes the connection.
pub struct CniConnection {
    socket: Socket,
    answers: Vec<(String, Answer)>,
}

/// A `WorkloadInfo` for a pod.
pub fn workload_info(name: &str, namespace: &str, service_account: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
    }
}

impl CniConnection {
    /// `AddWorkload` with the namespace at `netns` (e.g. `/run/netns/NAME`) attached.
    pub fn add(&mut self, uid: &str, info: &WorkloadInfo, netns: &Path) -> Result<Answer> {
        let file = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
        self.add_fd(uid, info, file.as_fd())
    }

    /// `AddWorkload` with any fd attached (a bad one, for NACK tests).
    pub fn add_fd(&mut self, uid: &str, info: &WorkloadInfo, fd: BorrowedFd<'_>) -> Result<Answer> {
        let request = request(Payload::Add(AddWorkload {
            uid: uid.to_string(),
            workload_info: Some(info.clone()),
        }));
        self.exchange(&format!("add {uid}"), &request, &[fd])
    }

    /// `KeepWorkload`.
    pub fn keep(&mut self, uid: &str) -> Result<Answer> {
        let keep = Payload::Keep(KeepWorkload {
            uid: uid.to_string(),
        });
        self.exchange(&format!("keep {uid}"), &request(keep), &[])
    }

    /// `DelWorkload`.
    pub fn del(&mut self, uid: &str) -> Result<Answer> {
        let del = Payload::Del(DelWorkload {
            uid: uid.to_string(),
        });
        self.exchange(&format!("del {uid}"), &request(del), &[])
    }

    /// `SnapshotSent`.
    pub fn snapshot_sent(&mut self) -> Result<Answer> {
        let snapshot = request(Payload::SnapshotSent(SnapshotSent {}));
        self.exchange("snapshotSent", &snapshot, &[])
    }

    /// Any bytes with any fds, answered like a request.
    pub fn send_raw(&mut self, what: &str, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<Answer> {
        self.exchange(what, bytes, fds)
    }

    /// Every request sent on this connection with the agent's answer, in order.
    pub fn answers(&self) -> &[(String, Answer)] {
        &self.answers
    }

    fn exchange(&mut self, what: &str, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<Answer> {
        let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        sendmsg::<()>(
            self.socket.as_raw_fd(),
            &[IoSlice::new(bytes)],
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .with_context(|| format!("send {what}"))?;
        let response = self
            .receive()
            .with_context(|| format!("answer to {what}"))?;
        let answer = match decode_response(&response) {
            Some(Ok(())) => Answer::Ack,
            Some(Err(nack)) => Answer::Nack(nack.0),
            None => bail!("the answer to {what} is not a WorkloadResponse with an ack"),
        };
        self.answers.push((what.to_string(), answer.clone()));
        Ok(answer)
    }

    fn receive(&self) -> Result<Vec<u8>> {
        let mut buffer = vec![0u8; 4096];
        let read = loop {
            match recv(self.socket.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        }
        .context("recv from the agent")?;
        if read == 0 {
            bail!("the agent closed the connection");
        }
        buffer.truncate(read);
        Ok(buffer)
    }
}

fn request(payload: Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn set_timeout(socket: &Socket) -> Result<()> {
    socket.set_read_timeout(Some(CNI_TIMEOUT))?;
    socket.set_write_timeout(Some(CNI_TIMEOUT))?;
    Ok(())
}

/// The bytes of an `AddWorkload` request (to send without an fd, or twice the fds).
pub fn encode_add(uid: &str, info: &WorkloadInfo) -> Vec<u8> {
    request(Payload::Add(AddWorkload {
        uid: uid.to_string(),
        workload_info: Some(info.clone()),
    }))
}
