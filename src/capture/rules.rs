//! Redirection rules inside a pod's network namespace (layer L4), for standalone mode where no
//! CNI installs them.
//!
//! One nftables table per pod does what istio-cni's in-pod rules do: outbound TCP → 15001 except
//! loopback and the agent's own marked sockets; inbound TCP → 15006 except HBONE on 15008; and
//! the connmark + policy-route return path that lets the agent connect to the app from the
//! client's IP (the app's replies are routed back to the agent's transparent socket).
//!
//! Installing is one atomic `nft -f` transaction that first deletes our table, so re-adding a
//! pod never duplicates rules, and a new agent taking over the pod (a rollout: both agents
//! serve it for a while) replaces the old agent's table in one step. Each install records the
//! handle the kernel gave its table (handles are never reused in a namespace), and removal
//! deletes the table by that handle: if another agent has replaced it since, the delete finds
//! nothing and the other agent's rules, and the return path they share, stay. `nft` is the reference encoder of nftables rulesets (and how
//! Kubernetes tooling drives them); the return-path `ip rule` and route are plain rtnetlink
//! messages, sent by `capture::return_path` from the same thread inside the pod's namespace,
//! so the whole change stays in that namespace.

use std::io::Write;
use std::process::{Command, Stdio};

use super::return_path::{self, Family, ReturnPathError, MARK_MASK, RETURN_MARK};
use crate::sys::Netns;

/// Name of our nftables table in each pod.
pub const TABLE: &str = "nodetunnel";

/// Why rules could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// A tool could not be run at all (not installed?).
    #[error("run {tool}: {source} (is it installed?)")]
    Spawn {
        /// `nft`.
        tool: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The return-path rule or route could not be programmed.
    #[error("return path: {0}")]
    ReturnPath(#[from] ReturnPathError),
    /// Entering the namespace failed.
    #[error("enter the pod network namespace: {0}")]
    Netns(#[source] std::io::Error),
    /// `nft --echo` did not name the table it created.
    #[error("nft did not report the handle of table inet {TABLE}: {echo}")]
    NoTableHandle {
        /// What it printed.
        echo: String,
    },
}

/// The table one [`RedirectRules::install`] created, by its kernel handle: the proof of
/// ownership [`RedirectRules::remove`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstalledTable {
    handle: u64,
}

/// What [`RedirectRules::remove`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Our table (and the return path) were removed, or were already gone.
    Removed,
    /// Another agent had replaced our table (it took the pod over): its rules stay.
    TakenOver,
}

/// The redirection rules for pods, parameterised by the agent's packet mark and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectRules {
    /// `SO_MARK` of the agent's sockets in the pod.
    pub mark: u32,
    /// Outbound listener port.
    pub outbound_port: u16,
    /// Plaintext inbound listener port.
    pub inbound_plaintext_port: u16,
    /// HBONE port (not redirected).
    pub hbone_port: u16,
    /// The DNS proxy's port: the pod's DNS (UDP and TCP port 53 to anywhere but loopback)
    /// goes there. `None`: DNS is left alone.
    pub dns_port: Option<u16>,
}

impl RedirectRules {
    /// The nft script that (re)creates our table atomically.
    pub fn nft_script(&self) -> String {
        let mark = self.mark & MARK_MASK;
        let keep = !MARK_MASK;
        // After the mark exemptions (the agent's own upstream queries must not loop back),
        // before the TCP-only rules (DNS is mostly UDP). Loopback DNS (a local stub) is the
        // pod's own business, as istio-cni leaves it.
        let dns = self.dns_port.map_or(String::new(), |port| {
            format!(
                "\x20   oifname != \"lo\" udp dport 53 redirect to :{port}\n\
                 \x20   oifname != \"lo\" tcp dport 53 redirect to :{port}\n"
            )
        });
        // The return path restores the mark only on the app's replies (`ct direction reply`):
        // the agent's own packets on those connections go to the pod's IP, which the main table
        // already routes locally, and marking them would make every one of them routed a second
        // time (a `route` chain re-routes a packet whose mark it changed): istio-cni's
        // `CONNMARK --restore-mark` does that for every packet the agent sends to the app.
        format!(
            "table inet {TABLE}\n\
             delete table inet {TABLE}\n\
             table inet {TABLE} {{\n\
             \x20 chain prerouting_mangle {{\n\
             \x20   type filter hook prerouting priority mangle; policy accept;\n\
             \x20   meta mark & {MARK_MASK:#x} == {mark:#x} ct mark set ct mark & {keep:#x} | {RETURN_MARK:#x}\n\
             \x20 }}\n\
             \x20 chain output_mangle {{\n\
             \x20   type route hook output priority mangle; policy accept;\n\
             \x20   ct direction reply ct mark & {MARK_MASK:#x} == {RETURN_MARK:#x} meta mark set meta mark & {keep:#x} | {RETURN_MARK:#x}\n\
             \x20 }}\n\
             \x20 chain output_nat {{\n\
             \x20   type nat hook output priority -100; policy accept;\n\
             \x20   meta mark & {MARK_MASK:#x} == {RETURN_MARK:#x} accept\n\
             \x20   meta mark & {MARK_MASK:#x} == {mark:#x} accept\n\
             {dns}\
             \x20   meta l4proto != tcp accept\n\
             \x20   oifname \"lo\" ip daddr != 127.0.0.1 accept\n\
             \x20   oifname \"lo\" ip6 daddr != ::1 accept\n\
             \x20   ip daddr 127.0.0.0/8 accept\n\
             \x20   ip6 daddr ::1 accept\n\
             \x20   meta l4proto tcp redirect to :{outbound}\n\
             \x20 }}\n\
             \x20 chain prerouting_nat {{\n\
             \x20   type nat hook prerouting priority -100; policy accept;\n\
             \x20   meta l4proto != tcp accept\n\
             \x20   meta mark & {MARK_MASK:#x} == {mark:#x} accept\n\
             \x20   tcp dport {hbone} accept\n\
             \x20   ip daddr 127.0.0.0/8 accept\n\
             \x20   ip6 daddr ::1 accept\n\
             \x20   meta l4proto tcp redirect to :{inbound}\n\
             \x20 }}\n\
             }}\n",
            outbound = self.outbound_port,
            inbound = self.inbound_plaintext_port,
            hbone = self.hbone_port,
        )
    }

    /// Installs (or replaces, whoever installed them) the rules and the return-path routing in
    /// `netns`. Returns the table created, which only its creator may remove.
    pub fn install(&self, netns: &Netns) -> Result<InstalledTable, RulesError> {
        let script = self.nft_script();
        netns
            .run_on_thread(|| {
                let echo = run("nft", &["--echo", "--handle", "-f", "-"], Some(&script))?;
                let table = table_handle(&echo)
                    .map(|handle| InstalledTable { handle })
                    .ok_or(RulesError::NoTableHandle { echo })?;
                return_path::with_handle(install_return_path)?;
                Ok(table)
            })
            .map_err(RulesError::Netns)?
    }

    /// Removes what [`RedirectRules::install`] added, if `table` is still the pod's table.
    /// Missing pieces are not an error.
    ///
    /// The delete by handle is atomic: it fails with "no such file" once another agent's
    /// install has replaced the table, and then the return path (the same for every agent)
    /// stays too. If another agent installs right after our delete, its return path may be
    /// removed here after it was added, so we look for its table once more and restore them.
    pub fn remove(netns: &Netns, table: InstalledTable) -> Result<Removal, RulesError> {
        netns
            .run_on_thread(|| {
                let handle = table.handle.to_string();
                match run("nft", &["delete", "table", "inet", "handle", &handle], None) {
                    Ok(_) => {}
                    Err(RulesError::Failed { stderr, .. }) if is_missing(&stderr) => {
                        return Ok(Removal::TakenOver);
                    }
                    Err(error) => return Err(error),
                }
                let routed = return_path::with_handle(|handle| async move {
                    for family in [Family::V4, Family::V6] {
                        if let Err(error) = return_path::remove(&handle, family).await {
                            tracing::debug!(%error, "return path already gone");
                        }
                    }
                    Ok(())
                });
                if let Err(error) = routed {
                    tracing::warn!(%error, "could not remove the return path");
                }
                if run("nft", &["list", "table", "inet", TABLE], None).is_ok() {
                    return_path::with_handle(install_return_path)?;
                    return Ok(Removal::TakenOver);
                }
                Ok(Removal::Removed)
            })
            .map_err(RulesError::Netns)?
    }
}

/// Installs the return path of both families; a pod without IPv6 cannot take the v6 one, v4
/// must work.
async fn install_return_path(handle: rtnetlink::Handle) -> Result<(), ReturnPathError> {
    return_path::install(&handle, Family::V4).await?;
    if let Err(error) = return_path::install(&handle, Family::V6).await {
        tracing::debug!(%error, "no IPv6 return path in pod");
    }
    Ok(())
}

/// Whether `nft` failed because the object was not there.
fn is_missing(stderr: &str) -> bool {
    stderr.contains("No such file") || stderr.contains("does not exist")
}

/// The handle of the table our script created, from `nft --echo --handle`: the last
/// `add table inet nodetunnel # handle N` (the script's first line adds the table too, so that
/// the delete after it cannot fail, and is echoed with the old handle if one existed).
fn table_handle(echo: &str) -> Option<u64> {
    let prefix = format!("add table inet {TABLE} ");
    echo.lines()
        .rev()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| {
            rest.trim_start_matches('{')
                .trim()
                .strip_prefix("# handle ")
        })
        .filter_map(|handle| handle.trim().parse().ok())
        .next()
}

/// Runs a tool on the calling thread (so in that thread's network namespace: a child process
/// inherits the namespaces of the thread that forks it) and returns what it printed.
fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, RulesError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RulesError::Spawn { tool, source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| RulesError::Spawn { tool, source })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| RulesError::Spawn { tool, source })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    Err(RulesError::Failed {
        command: format!("{tool} {}", args.join(" ")),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> RedirectRules {
        RedirectRules {
            mark: 0x539,
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            dns_port: Some(15053),
        }
    }

    #[test]
    fn script_replaces_the_table_atomically() {
        let script = rules().nft_script();
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "table inet nodetunnel");
        assert_eq!(lines[1], "delete table inet nodetunnel");
        assert_eq!(lines[2], "table inet nodetunnel {");
    }

    #[test]
    fn script_exempts_marked_loopback_and_hbone() {
        let script = rules().nft_script();
        for needle in [
            "meta mark & 0xfff == 0x539 accept",
            "ip daddr 127.0.0.0/8 accept",
            "tcp dport 15008 accept",
            "meta l4proto tcp redirect to :15001",
            "meta l4proto tcp redirect to :15006",
            "ct mark set ct mark & 0xfffff000 | 0x111",
            "meta mark set meta mark & 0xfffff000 | 0x111",
            // Only the app's replies: the agent's own packets to the app need no second route.
            "ct direction reply ct mark & 0xfff == 0x111 meta mark set",
        ] {
            assert!(script.contains(needle), "missing {needle:?} in\n{script}");
        }
    }

    /// The pod's DNS goes to the proxy, but only after the agent's own marked sockets are let
    /// through (its upstream queries would loop otherwise), and loopback DNS is left alone.
    #[test]
    fn script_redirects_dns_after_the_mark_exemptions() {
        let script = rules().nft_script();
        let position = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("missing {needle:?} in\n{script}"))
        };
        let udp = position("oifname != \"lo\" udp dport 53 redirect to :15053");
        let tcp = position("oifname != \"lo\" tcp dport 53 redirect to :15053");
        let marked = position("meta mark & 0xfff == 0x539 accept");
        let returning = position("meta mark & 0xfff == 0x111 accept");
        let tcp_only = position("meta l4proto != tcp accept");
        assert!(marked < udp && returning < udp, "{script}");
        assert!(udp < tcp && tcp < tcp_only, "{script}");

        let without = RedirectRules {
            dns_port: None,
            ..rules()
        }
        .nft_script();
        assert!(!without.contains("dport 53"), "{without}");
        assert_eq!(without.matches("redirect to").count(), 2, "{without}");
    }

    /// `nft --echo --handle` of our script, over a table left by another agent: the first
    /// `add` names the old table, the second the one we created.
    #[test]
    fn the_created_table_is_read_from_the_echo() {
        let echo = "add table inet nodetunnel # handle 7\n\
                    add table inet nodetunnel # handle 9\n\
                    add chain inet nodetunnel output_nat { type nat hook output priority -100; policy accept; } # handle 1\n\
                    # new generation 4 by process 23396 (nft)\n";
        assert_eq!(table_handle(echo), Some(9));
        assert_eq!(table_handle("add table inet other # handle 3\n"), None);
        assert_eq!(table_handle(""), None);
        assert_eq!(
            table_handle("add table inet nodetunnel { # handle 12\n"),
            Some(12),
            "the block form of older nft"
        );
    }

    #[test]
    fn mark_outside_our_bits_is_masked() {
        let script = RedirectRules {
            mark: 0x7539,
            ..rules()
        }
        .nft_script();
        assert!(script.contains("== 0x539 accept"), "{script}");
    }
}
