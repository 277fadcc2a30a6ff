//! Defaults of the agent section, one function per field so serde and `Default` agree.

use super::*;
use crate::net::ports;

pub(crate) fn drain_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(crate) fn reload_interval() -> Duration {
    Duration::from_secs(1)
}
pub(crate) fn workload_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
pub(crate) fn istio_root_ca() -> String {
    "/var/run/secrets/istio/root-cert.pem".to_string()
}
pub(crate) fn xds_max_message_size() -> usize {
    // Istio's limit: a full push of a large cluster fits.
    200 * 1024 * 1024
}
pub(crate) fn xds_reconnect_max() -> Duration {
    Duration::from_secs(15)
}
pub(crate) fn xds_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(crate) fn cluster_id() -> String {
    "Kubernetes".to_string()
}
pub(crate) fn zds_socket() -> PathBuf {
    PathBuf::from("/var/run/ztunnel/ztunnel.sock")
}
pub(crate) fn zds_reconnect_max() -> Duration {
    Duration::from_secs(15)
}
pub(crate) fn connect_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn packet_mark() -> u32 {
    0x539
}
pub(crate) fn hbone_port() -> u16 {
    ports::HBONE
}
pub(crate) fn max_header_list_size() -> u32 {
    16 * 1024
}
pub(crate) fn max_concurrent_streams() -> u32 {
    200
}
pub(crate) fn stream_window() -> u32 {
    4 * 1024 * 1024
}
pub(crate) fn connection_window() -> u32 {
    16 * 1024 * 1024
}
pub(crate) fn frame_size() -> u32 {
    1024 * 1024
}
pub(crate) fn memory_budget() -> u64 {
    256 * 1024 * 1024
}
pub(crate) fn keepalive_interval() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn keepalive_timeout() -> Duration {
    Duration::from_secs(20)
}
pub(crate) fn original_source() -> bool {
    true
}
pub(crate) fn install_rules() -> bool {
    true
}
pub(crate) fn handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn max_unauthenticated_per_pod() -> u32 {
    20_000
}
pub(crate) fn max_unauthenticated_per_source() -> u32 {
    5_000
}
pub(crate) fn connection_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
pub(crate) fn connect_response_timeout() -> Duration {
    Duration::from_secs(20)
}
pub(crate) fn max_streams_per_connection() -> u32 {
    100
}
pub(crate) fn pool_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
pub(crate) fn spread_above() -> u32 {
    4
}
pub(crate) fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], ports::ADMIN))
}
/// `[::]`: dual-stack, as ztunnel binds it (IPv6-only clusters probe over IPv6).
pub(crate) fn metrics_addr() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, ports::METRICS))
}
pub(crate) fn root_namespace() -> String {
    "istio-system".to_string()
}
/// `[::]`, like the metrics address.
pub(crate) fn readiness_addr() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, ports::READINESS))
}
