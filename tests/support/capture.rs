//! Packet capture on an interface inside a test namespace, and a small pcap reader.
//!
//! We run `tcpdump -w` rather than an in-process AF_PACKET socket: binding a packet socket to one
//! interface needs a raw `sockaddr_ll` (unsafe code, which the crate's lints deny), while tcpdump
//! is one package away, applies the BPF filter in the kernel, and leaves a pcap a person can open
//! in Wireshark when a test fails. `-Z root` keeps it from dropping privileges (the pcap lives in
//! a root-only tempdir); `-U` writes every packet as it comes.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A running tcpdump; dropping it stops the process.
pub struct Capture {
    child: Option<Child>,
    pcap: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

/// One captured TCP segment with payload.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Sender.
    pub source: SocketAddrV4,
    /// Receiver.
    pub destination: SocketAddrV4,
    /// TCP payload (may be empty).
    pub payload: Vec<u8>,
}

impl Capture {
    /// Starts capturing TCP on `interface` in namespace `netns` (full name) and waits (bounded)
    /// until tcpdump reports that it is listening.
    pub fn start(netns: &str, interface: &str) -> Result<Capture> {
        let dir = tempfile::tempdir()?;
        let pcap = dir.path().join("link.pcap");
        let stderr = dir.path().join("tcpdump.stderr");
        let pcap_text = pcap.to_string_lossy().to_string();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "-n",
                "-U",
                "--immediate-mode",
            ])
            .args(["-Z", "root", "-s", "0"])
            .args(["-i", interface, "-w", &pcap_text, "tcp"])
            .stdout(Stdio::null())
            .stderr(File::create(&stderr)?)
            .spawn()
            .context("spawning tcpdump (install it: apt-get install tcpdump)")?;
        let mut capture = Capture {
            child: Some(child),
            pcap,
            stderr,
            _dir: dir,
        };
        super::wait_for("tcpdump to listen", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&capture.stderr).unwrap_or_default();
            let exited = capture
                .child
                .as_mut()
                .map(|child| matches!(child.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            (text.contains("listening on") || exited).then_some(())
        })?;
        if let Some(child) = capture.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&capture.stderr).unwrap_or_default();
                bail!("tcpdump exited ({status}): {text}");
            }
        }
        Ok(capture)
    }

    /// Waits until the link has been quiet (the pcap stopped growing for 300 ms, bounded by
    /// 10 s), stops tcpdump and returns every TCP segment it saw.
    ///
    /// tcpdump counts packets "received by filter" that it has not yet written when SIGINT
    /// arrives and then drops them, so stopping right after the traffic would lose its tail;
    /// with `--immediate-mode -U` a packet is in the file as soon as it is read.
    pub fn finish(mut self) -> Result<Vec<Segment>> {
        let mut last = (0u64, 0u32);
        let _ = super::wait_for(
            "the captured link to go quiet",
            Duration::from_secs(10),
            || {
                let size = std::fs::metadata(&self.pcap)
                    .map(|meta| meta.len())
                    .unwrap_or(0);
                last = if size == last.0 {
                    (size, last.1 + 1)
                } else {
                    (size, 0)
                };
                (last.1 >= 6).then_some(())
            },
        );
        self.stop()?;
        let bytes = std::fs::read(&self.pcap)
            .with_context(|| format!("reading {}", self.pcap.display()))?;
        let segments = parse_pcap(&bytes)?;
        if std::env::var_os("NODETUNNEL_TEST_DEBUG").is_some() {
            let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            eprintln!(
                "capture: {} bytes, {} segments; tcpdump: {stderr}",
                bytes.len(),
                segments.len()
            );
        }
        Ok(segments)
    }

    /// Where the pcap is being written.
    pub fn path(&self) -> &Path {
        &self.pcap
    }

    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let exited = super::wait_for("tcpdump to exit", Duration::from_secs(10), || {
            child.try_wait().ok().flatten()
        });
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Parses a classic pcap file (Ethernet link type) into its IPv4 TCP segments.
pub fn parse_pcap(bytes: &[u8]) -> Result<Vec<Segment>> {
    if bytes.len() < 24 {
        bail!("pcap too short ({} bytes)", bytes.len());
    }
    let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let little = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        other => bail!("not a pcap file (magic {other:#x})"),
    };
    let word = |at: usize| -> u32 {
        let raw = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        if little {
            u32::from_le_bytes(raw)
        } else {
            u32::from_be_bytes(raw)
        }
    };
    let link_type = word(20);
    if link_type != 1 {
        bail!("unexpected pcap link type {link_type} (want Ethernet)");
    }
    let mut segments = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let captured = word(at + 8) as usize;
        let start = at + 16;
        let end = (start + captured).min(bytes.len());
        if let Some(segment) = parse_frame(&bytes[start..end]) {
            segments.push(segment);
        }
        at = start + captured;
    }
    Ok(segments)
}

fn parse_frame(frame: &[u8]) -> Option<Segment> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let ip = ip.get(..total_len.min(ip.len()))?;
    let tcp = ip.get(header_len..)?;
    let tcp_header_len = usize::from(tcp.get(12)? >> 4) * 4;
    let address = |octets: &[u8], port: &[u8]| {
        SocketAddrV4::new(
            Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]),
            u16::from_be_bytes([port[0], port[1]]),
        )
    };
    Some(Segment {
        source: address(ip.get(12..16)?, tcp.get(0..2)?),
        destination: address(ip.get(16..20)?, tcp.get(2..4)?),
        payload: tcp.get(tcp_header_len..)?.to_vec(),
    })
}

/// Summary of what a capture shows about one marker.
#[derive(Debug, Default)]
pub struct Findings {
    /// TCP segments seen.
    pub segments: usize,
    /// Payload bytes to or from `port`.
    pub payload_bytes_on_port: usize,
    /// Whether every flow to or from `port` starts with a TLS record header (0x16 0x03).
    pub flows_on_port_start_with_tls: bool,
    /// Whether the marker appears in any segment or in any flow's concatenated payload.
    pub marker_seen: bool,
}

/// Looks for `marker` in each segment and in each direction's reassembled payload (in capture
/// order, which on a veth is send order), and checks that flows on `port` begin with TLS.
pub fn examine(segments: &[Segment], marker: &[u8], port: u16) -> Findings {
    use std::collections::BTreeMap;
    let mut flows: BTreeMap<(SocketAddrV4, SocketAddrV4), Vec<u8>> = BTreeMap::new();
    for segment in segments {
        flows
            .entry((segment.source, segment.destination))
            .or_default()
            .extend_from_slice(&segment.payload);
    }
    let on_port = |(source, destination): &(SocketAddrV4, SocketAddrV4)| {
        source.port() == port || destination.port() == port
    };
    let port_flows: Vec<&Vec<u8>> = flows
        .iter()
        .filter(|(key, payload)| on_port(key) && !payload.is_empty())
        .map(|(_, payload)| payload)
        .collect();
    Findings {
        segments: segments.len(),
        payload_bytes_on_port: port_flows.iter().map(|payload| payload.len()).sum(),
        flows_on_port_start_with_tls: !port_flows.is_empty()
            && port_flows
                .iter()
                .all(|payload| payload.starts_with(&[0x16, 0x03])),
        marker_seen: segments
            .iter()
            .any(|segment| super::apps::contains(&segment.payload, marker))
            || flows
                .values()
                .any(|payload| super::apps::contains(payload, marker)),
    }
}
