//! QUIC endpoints with mutual TLS: the coordinator's server endpoint, the agent's and operator's
//! client endpoint, and the peer's identity read from its verified certificate.
//!
//! Both sides trust exactly one root, the fleet CA, and both present a certificate it issued:
//! the server *requires* a client certificate (there is no unauthenticated path), and the client
//! pins the fleet CA instead of the system roots. Every rustls object is built with the ring
//! provider passed explicitly, so nothing depends on a process-wide default provider, and only
//! TLS 1.3 is offered (QUIC requires it). 0-RTT stays off: early data can be replayed.
//!
//! Who the peer is comes only from its certificate ([`peer_identity`]), after the TLS layer has
//! verified the chain; roles are enforced by the caller on every request.
//!
//! Under TLS 1.3 a client finishes its half of the handshake before the server has checked the
//! client certificate, so a refused agent usually sees [`connect`] succeed and the refusal arrive
//! as a closed connection on first use of a stream. [`describe_connection_error`] turns such a
//! close (a TLS alert carried in a QUIC `CRYPTO_ERROR`) into one readable line wherever it shows.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetvault_certs::{identity_from_der, CertError, Identity};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// ALPN protocol identifier; must equal `protocol::ALPN`.
const ALPN: &[u8] = b"fleetvault/1";

/// QUIC error codes `0x100..=0x1ff` carry a TLS alert in their low byte (RFC 9001 §4.8).
const CRYPTO_ERROR_BASE: u64 = 0x100;

/// Why setting up an endpoint or a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A credentials file could not be read.
    #[error("reading {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The private key file is readable by group or others.
    #[error(
        "key file {} is accessible by group or others (mode {mode:03o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate or key is not valid PEM of the expected kind.
    #[error("{what}: {reason}")]
    Pem {
        /// Which credential, and its file when known.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls or quinn refused the TLS configuration (for example a key that does not match
    /// the certificate).
    #[error("tls configuration: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("binding udp socket {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The connection could not be established (other than a refused certificate).
    #[error("{0}")]
    Connect(String),
    /// The handshake failed on a certificate: ours refused by the peer, or the peer's by us.
    #[error("{0}")]
    CertificateRefused(String),
    /// The peer presented no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate carries no usable fleet identity.
    #[error("peer certificate: {0}")]
    PeerIdentity(CertError),
}

/// PEM bytes of the fleet CA, this party's certificate chain and key.
#[derive(Clone)]
pub struct Credentials {
    /// The fleet CA certificate(s): the only trust anchor.
    pub ca_pem: Vec<u8>,
    /// This party's certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// This party's private key.
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for Credentials {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads the three PEM files and checks that each holds what it should.
    ///
    /// Refuses a key file that group or others may access (mode & 0o077 != 0). Errors name the
    /// file.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TransportError> {
        check_key_permissions(key)?;
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TransportError::Io {
                path: path.to_owned(),
                source,
            })
        };
        let creds = Credentials {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        };
        parse_certs(&creds.ca_pem, &format!("ca certificate {}", ca.display()))?;
        parse_certs(&creds.cert_pem, &format!("certificate {}", cert.display()))?;
        parse_key(&creds.key_pem, &format!("key {}", key.display()))?;
        Ok(creds)
    }
}

#[cfg(unix)]
fn check_key_permissions(path: &Path) -> Result<(), TransportError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| TransportError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TransportError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_path: &Path) -> Result<(), TransportError> {
    Ok(())
}

/// All certificates in a PEM blob; at least one.
fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Pem {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TransportError::Pem {
            what: what.to_owned(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM blob.
fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TransportError::Pem {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store holding only the fleet CA.
fn fleet_roots(creds: &Credentials) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(&creds.ca_pem, "ca certificate")? {
        roots.add(cert).map_err(|e| TransportError::Pem {
            what: "ca certificate".into(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// How long a connection may go without a packet from the peer before it counts as lost. Both
/// sides send a keep-alive every [`KEEP_ALIVE`], from the QUIC stack and whatever the
/// application is doing, so only a dead peer or a cut network reaches it: a coordinator killed
/// mid-backup is noticed within seconds, and an idle `run` link stays up for days.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(6);

/// Keep-alive interval on both sides: several fit in [`IDLE_TIMEOUT`], so a few lost
/// packets do not end a connection.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

fn idle_timeout() -> IdleTimeout {
    IdleTimeout::try_from(IDLE_TIMEOUT).expect("a few seconds fit in a QUIC idle timeout")
}

/// The same limits on both sides: idle timeout with keep-alives well inside it, and windows
/// that bound how much memory one connection can make the other side buffer.
fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(idle_timeout()))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .stream_receive_window(VarInt::from_u32(8 << 20))
        .receive_window(VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(VarInt::from_u32(256))
        .max_concurrent_uni_streams(VarInt::from_u32(16));
    Arc::new(t)
}

/// Request streams one peer may have open at once on one connection to the coordinator. An
/// agent uses about five per backup in flight (four chunk uploads and a `Missing` call), so
/// even a dozen pushed jobs on one link stay under it; a client at the limit waits for a free
/// stream (QUIC flow control), it is not refused.
pub const SERVER_MAX_STREAMS: u32 = 64;

/// Bytes one peer may have in flight, not yet read by the coordinator, on one request stream
/// (QUIC stream flow-control window): enough for full speed on a fast long link.
pub const SERVER_STREAM_WINDOW: u32 = 8 << 20;

/// Bytes one peer may have in flight on one connection to the coordinator, all streams
/// together (QUIC connection flow-control window). With the per-identity connection limit of
/// the coordinator, this bounds what one certificate can make it buffer below its readers.
pub const SERVER_CONNECTION_WINDOW: u32 = 32 << 20;

/// The coordinator's side of [`transport_config`]: fewer concurrent streams and a smaller
/// connection window than a client accepts from the coordinator, since every peer's
/// connections share the coordinator's memory.
fn server_transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(idle_timeout()))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .stream_receive_window(VarInt::from_u32(SERVER_STREAM_WINDOW))
        .receive_window(VarInt::from_u32(SERVER_CONNECTION_WINDOW))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(VarInt::from_u32(SERVER_MAX_STREAMS))
        // Nothing in the protocol uses unidirectional streams.
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    Arc::new(t)
}

/// A UDP socket on `addr` (IPv6) that also reaches IPv4 peers, whatever
/// `net.ipv6.bindv6only` says.
fn dual_stack(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::{bind, socket, sockopt, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET6, SocketType::DGRAM, None)?;
    sockopt::set_ipv6_v6only(&fd, false)?;
    bind(&fd, &addr)?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Socket buffer size asked for (the kernel caps it at `net.core.rmem_max` / `wmem_max`).
const SOCKET_BUFFER: usize = 8 << 20;

/// Widens a socket's receive and send buffers. With the kernel's default (about 200 KiB), a
/// burst of chunk packets overflows the receive buffer, the drops read as congestion, and
/// the sender slows down. Where the system caps the size lower, a debug log says so.
fn widen_buffers(socket: &std::net::UdpSocket) {
    use rustix::net::sockopt;
    let _ = sockopt::set_socket_recv_buffer_size(socket, SOCKET_BUFFER);
    let _ = sockopt::set_socket_send_buffer_size(socket, SOCKET_BUFFER);
    // Linux reports twice the size it grants (the doubling covers its own bookkeeping).
    match sockopt::socket_recv_buffer_size(socket) {
        Ok(got) if got / 2 < SOCKET_BUFFER => tracing::debug!(
            granted = got / 2,
            wanted = SOCKET_BUFFER,
            "UDP receive buffer capped by net.core.rmem_max; raise it for full speed (deploy/sysctl.d/90-fleetvault.conf)"
        ),
        _ => {}
    }
}

fn tls_error(e: impl fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// The coordinator's endpoint, listening on `listen`.
///
/// Requires a client certificate chained to the fleet CA, offers only TLS 1.3 and the fleet
/// ALPN, and accepts no 0-RTT data.
pub fn server_endpoint(
    listen: SocketAddr,
    creds: &Credentials,
) -> Result<quinn::Endpoint, TransportError> {
    let provider = provider();
    // Mandatory client authentication is the builder's default; `allow_unauthenticated` must
    // never be called here.
    let verifier =
        WebPkiClientVerifier::builder_with_provider(fleet_roots(creds)?, provider.clone())
            .build()
            .map_err(tls_error)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(&creds.cert_pem, "certificate")?,
            parse_key(&creds.key_pem, "key")?,
        )
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // 0 disables 0-RTT (the default, restated because replayable data must never be accepted).
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(Arc::new(tls)).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(server_transport_config());
    // Stateless resets keyed by the coordinator's own key: after a crash and restart on the
    // same address, the new process can reset the old connections, so agents learn at once
    // that they must reconnect instead of waiting for the idle timeout.
    let seed = blake3::derive_key("fleetvault quic stateless reset v1", &creds.key_pem);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // Connection ids are validated with a keyed hash; the same key after a restart lets the
    // new process recognise the old ids, which it must do to answer them with a reset.
    let cid_key = blake3::derive_key("fleetvault quic connection ids v1", &creds.key_pem);
    let cid_key = u64::from_le_bytes(cid_key[..8].try_into().expect("8 of 32 bytes"));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let bind = |source| TransportError::Bind {
        addr: listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(listen).map_err(bind)?;
    widen_buffers(&socket);
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind)
}

/// The agent's or operator's endpoint: trusts only the fleet CA and presents its certificate.
///
/// Binds a dual-stack `[::]:0` so that both IPv4 and IPv6 coordinators can be reached, and
/// falls back to `0.0.0.0:0` where IPv6 is unavailable.
pub fn client_endpoint(creds: &Credentials) -> Result<quinn::Endpoint, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(fleet_roots(creds)?)
        .with_client_auth_cert(
            parse_certs(&creds.cert_pem, "certificate")?,
            parse_key(&creds.key_pem, "key")?,
        )
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(Arc::new(tls)).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());

    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let socket = dual_stack(v6)
        .or_else(|_| std::net::UdpSocket::bind(v4))
        .map_err(|source| TransportError::Bind { addr: v4, source })?;
    widen_buffers(&socket);
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr: v4, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects to `addr`, checking that its certificate is valid for `server_name`.
///
/// A refused certificate becomes [`TransportError::CertificateRefused`], any other failure
/// [`TransportError::Connect`], each one line naming the peer. Success does not prove that the
/// peer accepted our certificate (see the module docs): that shows on first use of a stream.
/// Cancelling the future abandons the attempt.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, TransportError> {
    let connecting = endpoint.connect(addr, server_name).map_err(|e| {
        TransportError::Connect(format!("cannot connect to {server_name} at {addr}: {e}"))
    })?;
    connecting.await.map_err(|e| {
        let message = format!(
            "cannot connect to {server_name} at {addr}: {}",
            describe_connection_error(&e)
        );
        if is_certificate_error(&e) {
            TransportError::CertificateRefused(message)
        } else {
            TransportError::Connect(message)
        }
    })
}

/// The identity in the peer's certificate, which the TLS layer has verified against the fleet
/// CA.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TransportError> {
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TransportError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(TransportError::NoPeerCertificate)?;
    identity_from_der(leaf).map_err(TransportError::PeerIdentity)
}

/// The DER bytes of the peer's leaf certificate, for comparing against an allow-list.
pub fn peer_certificate_der(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())?;
    chain.first().map(|c| c.as_ref().to_vec())
}

/// The DER bytes of every certificate in a PEM file's text; `what` names it in errors.
pub fn pem_certificates_der(pem: &[u8], what: &str) -> Result<Vec<Vec<u8>>, TransportError> {
    Ok(parse_certs(pem, what)?
        .into_iter()
        .map(|c| c.as_ref().to_vec())
        .collect())
}

/// Whether a connection failed because a certificate was refused, by the peer or by us.
pub fn is_certificate_error(e: &ConnectionError) -> bool {
    tls_alert(e).is_some_and(|(alert, _)| is_certificate_alert(alert))
}

/// The TLS alert a connection error carries, and whether the peer sent it.
fn tls_alert(e: &ConnectionError) -> Option<(u8, bool)> {
    let (code, remote) = match e {
        ConnectionError::ConnectionClosed(close) => (u64::from(close.error_code), true),
        ConnectionError::TransportError(err) => (u64::from(err.code), false),
        _ => return None,
    };
    if code & !0xff == CRYPTO_ERROR_BASE {
        Some(((code & 0xff) as u8, remote))
    } else {
        None
    }
}

/// Alerts that rustls sends when it refuses a certificate. `decrypt_error` is what a bad
/// signature in the chain gives, as with a certificate from another CA of the same name.
fn is_certificate_alert(alert: u8) -> bool {
    matches!(alert, 42..=46 | 48 | 49 | 51 | 116)
}

/// The TLS alert's name (RFC 8446 §6) and, for the ones an operator meets, what it usually
/// means when the peer sends it about our certificate.
fn alert_text(alert: u8) -> (&'static str, Option<&'static str>) {
    match alert {
        10 => ("unexpected_message", None),
        20 => ("bad_record_mac", None),
        40 => ("handshake_failure", None),
        42 => ("bad_certificate", None),
        43 => (
            "unsupported_certificate",
            Some("our certificate's role does not allow this use"),
        ),
        44 => (
            "certificate_revoked",
            Some("our certificate has been revoked"),
        ),
        45 => (
            "certificate_expired",
            Some("our certificate has expired or is not yet valid; check the clocks"),
        ),
        46 => ("certificate_unknown", None),
        47 => ("illegal_parameter", None),
        48 => (
            "unknown_ca",
            Some("our certificate is not signed by the CA the peer trusts"),
        ),
        49 => ("access_denied", None),
        50 => ("decode_error", None),
        51 => (
            "decrypt_error",
            Some(
                "a signature did not verify; is our certificate from another CA of the same name?",
            ),
        ),
        70 => ("protocol_version", None),
        71 => ("insufficient_security", None),
        80 => ("internal_error", None),
        90 => ("user_canceled", None),
        109 => ("missing_extension", None),
        110 => ("unsupported_extension", None),
        112 => ("unrecognized_name", None),
        116 => (
            "certificate_required",
            Some("we presented no certificate and the peer requires one"),
        ),
        120 => (
            "no_application_protocol",
            Some("the peer does not speak fleetvault/1"),
        ),
        _ => ("unknown alert", None),
    }
}

/// Turns a connection error into a one-line human reason.
///
/// A TLS alert in a `CRYPTO_ERROR` close becomes "certificate refused by the peer (unknown_ca:
/// …)" when the peer sent it, or "peer certificate refused (…): …" when our side refused the
/// peer's certificate. Works as well on the error of a stream's first use as on a failed
/// handshake.
pub fn describe_connection_error(e: &ConnectionError) -> String {
    if let Some((alert, remote)) = tls_alert(e) {
        let (name, hint) = alert_text(alert);
        let detail = match hint {
            Some(hint) => format!("{name}: {hint}"),
            None => format!("{name}, tls alert {alert}"),
        };
        return match (remote, is_certificate_alert(alert)) {
            (true, true) => format!("certificate refused by the peer ({detail})"),
            (true, false) if alert == 120 => format!("protocol refused by the peer ({detail})"),
            (true, false) => format!("tls handshake refused by the peer ({detail})"),
            (false, certificate) => {
                let reason = match e {
                    ConnectionError::TransportError(err) if !err.reason.is_empty() => {
                        format!(": {}", err.reason)
                    }
                    _ => String::new(),
                };
                if certificate {
                    format!("peer certificate refused ({name}){reason}")
                } else {
                    format!("tls handshake failed ({name}){reason}")
                }
            }
        };
    }
    match e {
        ConnectionError::VersionMismatch => "the peer does not support our QUIC version".into(),
        ConnectionError::TransportError(err) => format!("quic protocol error: {err}"),
        ConnectionError::ConnectionClosed(close) => {
            format!("connection aborted by the peer: {close}")
        }
        ConnectionError::ApplicationClosed(close) => {
            format!("connection closed by the peer: {close}")
        }
        ConnectionError::Reset => "connection reset by the peer (did it restart?)".into(),
        ConnectionError::TimedOut => "timed out: no answer from the peer".into(),
        ConnectionError::LocallyClosed => "connection closed locally".into(),
        ConnectionError::CidsExhausted => "out of connection ids".into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on failure by design
mod tests {
    use super::*;
    use quinn::{ApplicationClose, ConnectionClose, TransportErrorCode};

    fn closed(alert: u8) -> ConnectionError {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: Default::default(),
        })
    }

    #[test]
    fn alpn_matches_the_protocol() {
        assert_eq!(ALPN, crate::protocol::ALPN);
    }

    #[test]
    fn certificate_alerts_are_named() {
        for (alert, name) in [
            (0x2a, "bad_certificate"),
            (0x2c, "certificate_revoked"),
            (0x2d, "certificate_expired"),
            (0x30, "unknown_ca"),
            (0x33, "decrypt_error"),
            (0x74, "certificate_required"),
        ] {
            let e = closed(alert);
            let text = describe_connection_error(&e);
            assert!(
                text.starts_with("certificate refused by the peer ("),
                "{text}"
            );
            assert!(text.contains(name), "{text}");
            assert!(is_certificate_error(&e));
        }
        let alpn = closed(0x78);
        let text = describe_connection_error(&alpn);
        assert!(text.contains("no_application_protocol"), "{text}");
        assert!(!is_certificate_error(&alpn));
    }

    #[test]
    fn other_errors_are_one_line() {
        let app = ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: VarInt::from_u32(3),
            reason: (&b"role not allowed"[..]).into(),
        });
        assert_eq!(
            describe_connection_error(&app),
            "connection closed by the peer: role not allowed (code 3)"
        );
        let plain = ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::PROTOCOL_VIOLATION,
            frame_type: None,
            reason: Default::default(),
        });
        assert!(!is_certificate_error(&plain));
        for e in [
            app,
            plain,
            ConnectionError::TimedOut,
            ConnectionError::Reset,
        ] {
            assert!(!describe_connection_error(&e).contains('\n'));
        }
    }
}
