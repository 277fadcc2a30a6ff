//! Linux system interfaces (layer L0): network namespaces and socket options that the safe
//! crates expose only partially. This is the only module allowed to hold `unsafe`, and only
//! where neither nix nor socket2 wraps the call.
//!
//! Used by [`crate::socket`] (the socket factory) and by the listeners, which recover the
//! original destination of a redirected connection here.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{getsockopt, sockopt};

/// An open handle on a network namespace. Holding the fd keeps the namespace alive and lets us
/// enter it even after its `/run/netns` name is gone.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    id: NetnsId,
}

/// Device and inode of a namespace file: two handles name the same namespace iff these match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct NetnsId {
    /// `st_dev` of the nsfs inode.
    pub dev: u64,
    /// `st_ino` of the nsfs inode.
    pub inode: u64,
}

impl Netns {
    /// Opens the namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        Self::from_file(file, path.to_path_buf())
    }

    /// Wraps an already open namespace fd (e.g. one received over SCM_RIGHTS).
    pub fn from_file(file: File, path: PathBuf) -> io::Result<Self> {
        let stat = nix::sys::stat::fstat(file.as_raw_fd()).map_err(io::Error::from)?;
        Ok(Netns {
            file,
            path,
            id: NetnsId {
                dev: stat.st_dev,
                inode: stat.st_ino,
            },
        })
    }

    /// The namespace this thread is in now.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Identity of the namespace (dev + inode).
    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Where it was opened from (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the **calling thread** inside this namespace, then moves the thread back to
    /// `home`. Sockets keep the namespace they were created in, so `f` should only create sockets;
    /// it must not block or await. If the thread cannot return home, continuing would run
    /// unrelated work in a pod's namespace, so the process aborts.
    pub fn run_in<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        if let Err(error) = setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(%error, "cannot return to the agent's network namespace; aborting");
            std::process::abort();
        }
        Ok(result)
    }

    /// Runs `f` on a **new thread** that enters this namespace and stays there; for work that
    /// must not touch the caller's thread (listener creation at pod start).
    pub fn run_on_thread<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| io::Error::other("netns worker thread panicked"))?
        })
    }
}

/// The destination a redirected (REDIRECT/DNAT) connection was addressed to, falling back to
/// the local address (TPROXY delivers to the original address directly), which `local` reads
/// only then: a `getsockname` per redirected connection saved. IPv4-mapped IPv6 addresses are
/// turned into plain IPv4 so lookups in the model match.
pub fn original_destination(stream: &impl AsFd, local: impl FnOnce() -> SocketAddr) -> SocketAddr {
    if let Ok(addr) = getsockopt(stream, sockopt::OriginalDst) {
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        return SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)));
    }
    if let Ok(addr) = getsockopt(stream, sockopt::Ip6tOriginalDst) {
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        let v6 = SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0));
        return canonical(v6);
    }
    canonical(local())
}

/// Raises the soft limit on open files to the hard limit, as Istio's ztunnel does at start-up:
/// every proxied connection holds two or more descriptors, and distributions start processes
/// with a soft limit of 1024. Returns the (old, new) soft limit.
pub fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok((soft, hard.max(soft)))
}

/// Makes a closing `SO_REUSEPORT` listener of the calling thread's network namespace hand the
/// connections queued on it (accepted by the kernel, not yet by us) to another listener of its
/// group instead of resetting them (`net.ipv4.tcp_migrate_req`, Linux 5.14; it covers IPv6
/// too). This is what makes a hand-over between two agents lose no connection: the old one
/// closes its listeners while the new one's serve beside them. A sysctl file resolves to the
/// namespace of the thread that opens it. Fails where `/proc/sys` is read-only (an
/// unprivileged container) or the kernel is older.
pub fn enable_listener_migration() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", b"1")
}

/// `::ffff:a.b.c.d` → `a.b.c.d`; dual-stack listeners report IPv4 peers in mapped form.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

/// The IP form of [`canonical`].
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Sets `IPV6_TRANSPARENT`, which nix and socket2 do not wrap; needed to bind an outgoing
/// socket to a foreign IPv6 client address (original-source preservation).
#[allow(unsafe_code)]
pub fn set_ipv6_transparent(socket: &impl AsRawFd) -> io::Result<()> {
    let enable: libc::c_int = 1;
    // SAFETY: `socket` is an open fd for the duration of the call; we pass a pointer to a live
    // c_int and its exact size, as setsockopt(2) requires for this boolean option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            std::ptr::addr_of!(enable).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This process's resident set in KiB (`VmRSS`), if readable.
pub fn resident_kib() -> Option<u64> {
    status_kib("VmRSS:")
}

/// A KiB figure of `/proc/self/status` (`field` with its colon).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The read-only mappings of this process's own executable (code and constants), as
/// `(start, length)`, from `/proc/self/maps`.
fn executable_mappings() -> io::Result<Vec<(usize, usize)>> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut ranges = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        // offset, device, inode, then the path (which may contain spaces).
        let path = fields.skip(3).collect::<Vec<_>>().join(" ");
        if path != exe || !perms.starts_with('r') || perms.contains('w') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let parse = |hex| usize::from_str_radix(hex, 16).ok();
        if let (Some(start), Some(end)) = (parse(start), parse(end)) {
            ranges.push((start, end.saturating_sub(start)));
        }
    }
    Ok(ranges)
}

/// Asks the kernel to reclaim this process's resident pages of its own executable
/// (`MADV_PAGEOUT` on the read-only mappings of `/proc/self/exe`, then `POSIX_FADV_DONTNEED` on
/// the file) and to fault them back one page at a time (`MADV_RANDOM`); returns the bytes of
/// mappings advised. Contents are never lost: the pages are clean copies of the file (or, for
/// the few relocated ones, kept unless there is swap), and any touched again fault back in.
/// Pages that another process maps too are left alone by the kernel.
///
/// Why all three: a fault on a file mapping maps every page of the file's page cache within
/// 64 KiB around it (fault-around), and a fault that reads from the file reads 128 KiB around
/// it (read-around). `MADV_PAGEOUT` alone unmapped the pages but, on 6.18, left the file cached
/// (`fincore`: 71 of the binary's 74 MB after it), so the code connections run later came back
/// in 64 KiB runs. With the file's cache dropped and no read-around, only pages the agent
/// touches come back (`scripts/bench`, memory-only: RSS after 2 000 connections closed 12.0–13.5
/// MB before, mostly 10.7–11.4 MB with this, on that kernel).
#[allow(unsafe_code)]
pub fn release_executable_pages() -> io::Result<usize> {
    let mut advised = 0;
    for (start, len) in executable_mappings()? {
        // SAFETY: the range is one of this process's own mappings as the kernel lists it;
        // MADV_RANDOM only changes how faults read ahead, and MADV_PAGEOUT changes no contents
        // (reclaim only): nothing the program holds is invalidated, the next access simply
        // faults the page back in.
        for advice in [libc::MADV_RANDOM, libc::MADV_PAGEOUT] {
            let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        advised += len;
    }
    // Only clean pages nobody maps are dropped: other processes running this file lose
    // nothing but cache.
    let exe = File::open("/proc/self/exe")?;
    nix::fcntl::posix_fadvise(
        exe.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )?;
    Ok(advised)
}

/// Runs `f` with the calling thread's file-system uid set to `uid`, then restores it. Linux
/// keeps the fsuid per thread (glibc does not spread `setfsuid` to other threads), and a new
/// socket takes its owner from it: the owner `SO_REUSEPORT` groups are matched by.
#[allow(unsafe_code)]
pub fn with_fsuid<T>(uid: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: setfsuid(2) changes only this thread's credentials and touches no memory of ours;
    // it cannot fail in a way that leaves anything to clean up (the result is the old fsuid).
    let previous = unsafe { libc::setfsuid(uid) };
    let output = f();
    // SAFETY: as above; this restores the fsuid the thread had.
    unsafe { libc::setfsuid(previous as libc::uid_t) };
    output
}

/// One datagram read by [`recv_with_fds`].
#[derive(Debug)]
pub struct ReceivedDatagram {
    /// Bytes written into the caller's buffer.
    pub len: usize,
    /// The fds that came with it (SCM_RIGHTS), owned, close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The datagram was longer than the buffer; the rest was discarded (`MSG_TRUNC`).
    pub truncated: bool,
    /// The ancillary data did not fit (`MSG_CTRUNC`); fds beyond the room were lost.
    pub control_truncated: bool,
}

/// Reads one datagram and its SCM_RIGHTS fds from a (non-blocking) unix socket. Each received
/// fd is owned by the result at once, so none can leak whatever the caller does next.
/// `max_fds` is the room for fds; the kernel caps one message at 253, so that much room means
/// no fd is ever dropped silently. A would-block read is returned as `ErrorKind::WouldBlock`.
#[allow(unsafe_code)]
pub fn recv_with_fds(
    socket: std::os::fd::BorrowedFd<'_>,
    buffer: &mut [u8],
    max_fds: usize,
) -> io::Result<ReceivedDatagram> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{FromRawFd, RawFd};
    let mut control = vec![0u8; nix::sys::socket::cmsg_space::<RawFd>() * max_fds.max(1)];
    let mut iov = [io::IoSliceMut::new(buffer)];
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    if let Ok(messages) = message.cmsgs() {
        for control_message in messages {
            let ControlMessageOwned::ScmRights(raw) = control_message else {
                continue;
            };
            for fd in raw {
                // SAFETY: the kernel installed `fd` in our fd table for this recvmsg(2) call
                // (SCM_RIGHTS); nothing else knows it, and it is wrapped exactly once here.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(ReceivedDatagram {
        len: message.bytes,
        fds,
        truncated: message.flags.contains(MsgFlags::MSG_TRUNC),
        control_truncated: message.flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

/// Registers an owned fd (e.g. a SEQPACKET socket nix made) with the current tokio reactor.
/// Must be called inside a tokio runtime.
#[allow(unsafe_code)]
pub fn register_async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open fd that only its owner can close, and its
    // `as_raw_fd` always returns that same fd; the `AsyncFd` owns it until it is dropped.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|error| error.into_parts().1)
}

/// Hands the calling thread's cached objects back to jemalloc's arenas, where emptied slabs can
/// be purged (`thread.idle`: flushes the thread's cache and lets jemalloc tidy what it holds
/// for an idle thread); see [`crate::allocator`]. False if jemalloc refused.
#[allow(unsafe_code)]
pub fn release_thread_allocator_cache() -> bool {
    // SAFETY: `thread.idle` is a void mallctl: it reads and writes nothing of ours (all four
    // pointers null, as jemalloc requires for it), and only acts on the calling thread's own
    // cache. The name is NUL-terminated.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.idle".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, "jemalloc thread.idle failed");
    }
    rc == 0
}

#[cfg(test)]
mod tests {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};

    fn resident_file_kib() -> u64 {
        super::status_kib("RssFile:").expect("RssFile in /proc/self/status")
    }

    #[test]
    fn the_executables_resident_pages_are_given_back_and_code_still_runs() {
        let mappings = super::executable_mappings().expect("maps");
        assert!(!mappings.is_empty(), "this test binary maps itself");
        let before = resident_file_kib();
        let advised = super::release_executable_pages().expect("madvise");
        let after = resident_file_kib();
        assert_eq!(advised, mappings.iter().map(|(_, len)| len).sum::<usize>());
        // This process is the only one mapping its test binary, so the kernel reclaims it
        // (other test threads fault a little back meanwhile).
        assert!(after < before, "RssFile {before} -> {after} KiB");
        // Code paged out runs again (faulted back in).
        assert_eq!(super::resident_kib().map(|kib| kib > 0), Some(true));
    }

    #[test]
    fn the_open_file_soft_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        // Lowered to half, not to a small number: other tests of this process open sockets.
        let lowered = (hard / 2).max(1024).min(hard);
        setrlimit(Resource::RLIMIT_NOFILE, lowered, hard).expect("setrlimit");
        let (old, new) = super::raise_open_files_limit().expect("raise");
        assert_eq!((old, new), (lowered, hard));
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit"),
            (hard, hard)
        );
    }

    /// Through jemalloc itself (the unit tests run on the system allocator): this thread's
    /// counter moves with what it allocates, and jemalloc knows `thread.idle` (this build has
    /// no statistics to show the cache emptied: `scripts/bench`'s RSS after connections close
    /// does).
    #[test]
    fn the_counter_moves_and_jemalloc_takes_the_cache_back() {
        use std::alloc::{GlobalAlloc, Layout};
        let jemalloc = tikv_jemallocator::Jemalloc;
        let layout = Layout::from_size_align(512, 8).expect("layout");
        let before = crate::allocator::thread_allocated().expect("jemalloc counter");
        // SAFETY (test): each pointer is allocated with `layout` and freed once with it.
        #[allow(unsafe_code)]
        unsafe {
            let objects: Vec<*mut u8> = (0..512).map(|_| jemalloc.alloc(layout)).collect();
            assert!(objects.iter().all(|object| !object.is_null()));
            for object in objects {
                jemalloc.dealloc(object, layout);
            }
        }
        let after = crate::allocator::thread_allocated().expect("counter");
        assert!(after >= before + 512 * 512, "{before} -> {after}");
        assert!(
            super::release_thread_allocator_cache(),
            "thread.idle refused"
        );
    }
}
