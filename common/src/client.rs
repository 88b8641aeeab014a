//! The calling side of a connection (agent or operator): connect, say hello, make requests.
//!
//! Errors are one line each and name the coordinator; a certificate the coordinator refuses
//! shows up under TLS 1.3 only on first use, so every stream failure goes through
//! [`describe_connection_error`](crate::describe_connection_error).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use crate::exit::{REFUSED as EXIT_REFUSED, UNREACHABLE as EXIT_UNREACHABLE};
use crate::protocol::frame::{read_frame, write_frame, FrameError};
use crate::protocol::{close, ErrorCode, Hello, HelloReply, Request, Response, PROTOCOL_VERSION};
use crate::transport::{self, Credentials};
use crate::AgentName;

mod exchanges;
pub use exchanges::{ReadItem, ReadStream, SnapshotRead};

/// How long resolving the coordinator's address and the QUIC handshake may take together.
/// Nothing answers a QUIC packet sent to a closed UDP port, so without this limit a coordinator
/// that is down would cost the whole idle timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The local endpoint could not be set up (credentials, UDP socket).
    #[error("{0}")]
    Connect(String),
    /// No connection to the coordinator: its address does not resolve, nothing answers, or
    /// the connection ended before the hello for another reason than a refusal.
    #[error("{0}")]
    Unreachable(String),
    /// The connection broke after the hello.
    #[error("connection to coordinator lost: {0}")]
    Lost(String),
    /// The coordinator refused us: a certificate (ours, or its own that we refused), our role,
    /// the protocol version or one of its limits; the text names the coordinator.
    #[error("{0}")]
    Refused(String),
    /// A frame could not be read or written.
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    /// The coordinator answered with an error.
    #[error("{message}")]
    Remote {
        /// Its kind.
        code: ErrorCode,
        /// Its text.
        message: String,
    },
    /// The coordinator answered a request with a reply of the wrong kind.
    #[error("unexpected reply from coordinator to {request}: {reply}")]
    Unexpected {
        /// The request's kind ([`Request::kind`]).
        request: &'static str,
        /// The reply's kind ([`Response::kind`]).
        reply: &'static str,
    },
}

impl ClientError {
    /// `reply` is not an answer to `request`.
    pub fn unexpected(request: &Request, reply: &Response) -> Self {
        ClientError::Unexpected {
            request: request.kind(),
            reply: reply.kind(),
        }
    }

    /// The exit code this error calls for, when it is not a plain failure:
    /// [`EXIT_UNREACHABLE`] (10) or [`EXIT_REFUSED`] (11).
    ///
    /// Through `anyhow`, find it with
    /// `err.chain().find_map(|e| e.downcast_ref::<ClientError>())`.
    pub fn exit_class(&self) -> Option<u8> {
        match self {
            ClientError::Unreachable(_) => Some(EXIT_UNREACHABLE),
            ClientError::Refused(_) => Some(EXIT_REFUSED),
            _ => None,
        }
    }
}

/// A stream failure, described with the connection's close reason when there is one (that is
/// where a refused certificate shows).
fn lost(conn: &quinn::Connection, what: impl std::fmt::Display) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::Lost(transport::describe_connection_error(&reason)),
        None => ClientError::Lost(what.to_string()),
    }
}

/// A read reply as the caller sees it: a `Response::Error` becomes [`ClientError::Remote`],
/// a stream that ends early or breaks is [`ClientError::Lost`].
fn settle(
    conn: &quinn::Connection,
    frame: Result<Option<Response>, FrameError>,
) -> Result<Response, ClientError> {
    match frame {
        Ok(Some(Response::Error { code, message })) => Err(ClientError::Remote { code, message }),
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(lost(conn, "stream ended without a reply")),
        Err(FrameError::Io(e)) => Err(lost(conn, e)),
        Err(e) => Err(ClientError::Frame(e)),
    }
}

/// Whether a connection ended because the coordinator (or we, of its certificate) refused it,
/// rather than because it could not be reached.
fn is_refusal(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => [
            close::NOT_AUTHORIZED,
            close::VERSION_MISMATCH,
            close::LIMIT_REACHED,
        ]
        .iter()
        .any(|&code| c.error_code == code.into()),
        other => transport::is_certificate_error(other),
    }
}

/// A connection error before the hello was answered, as the caller sees it.
fn before_hello(display: &str, e: &quinn::ConnectionError) -> ClientError {
    if matches!(e, quinn::ConnectionError::TimedOut) {
        return no_answer(display);
    }
    let reason = transport::describe_connection_error(e);
    if is_refusal(e) {
        ClientError::Refused(format!(
            "coordinator {display} refused the connection: {reason}"
        ))
    } else {
        ClientError::Unreachable(format!("cannot connect to {display}: {reason}"))
    }
}

/// A stream failure during the hello: the connection's close reason when there is one.
fn hello_failed(
    conn: &quinn::Connection,
    display: &str,
    what: impl std::fmt::Display,
) -> ClientError {
    match conn.close_reason() {
        Some(reason) => before_hello(display, &reason),
        None => ClientError::Unreachable(format!(
            "cannot connect to {display}: {what} during the hello"
        )),
    }
}

fn no_answer(display: &str) -> ClientError {
    ClientError::Unreachable(format!(
        "no answer from {display} (UDP) in {} s: is the coordinator running and the port open?",
        CONNECT_TIMEOUT.as_secs()
    ))
}

/// A connection to the coordinator after a successful hello.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    identity: String,
    /// The name in `identity` when it is an agent's, parsed once at the hello.
    agent: Option<AgentName>,
    protocol: u32,
}

impl Client {
    /// Resolves `address` (`host:port`, as configured), connects and says hello; errors name
    /// `address`. Resolution and handshake together give up after [`CONNECT_TIMEOUT`].
    pub async fn dial(
        creds: &Credentials,
        address: &str,
        server_name: &str,
        software: &str,
    ) -> Result<Self, ClientError> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let resolved = match timeout_at(deadline, tokio::net::lookup_host(address)).await {
            Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| {
                ClientError::Unreachable(format!(
                    "coordinator address {address} resolves to nothing"
                ))
            })?,
            Ok(Err(e)) => {
                return Err(ClientError::Unreachable(format!(
                    "cannot resolve coordinator address {address}: {e}"
                )))
            }
            Err(_) => {
                return Err(ClientError::Unreachable(format!(
                    "cannot resolve coordinator address {address} in {} s: is DNS reachable?",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
        };
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            software: software.to_owned(),
        };
        Self::handshake(creds, resolved, address, server_name, hello, deadline).await
    }

    /// Connects to a resolved address (errors name it), checks the protocol version and
    /// learns the identity the coordinator read from our certificate. The handshake gives up
    /// after [`CONNECT_TIMEOUT`].
    pub async fn connect(
        creds: &Credentials,
        addr: SocketAddr,
        server_name: &str,
        software: &str,
    ) -> Result<Self, ClientError> {
        Self::connect_speaking(creds, addr, server_name, software, PROTOCOL_VERSION).await
    }

    /// [`Client::connect`] saying `protocol` in the hello instead of [`PROTOCOL_VERSION`]:
    /// how tests play an older (or newer) peer. Only the hello is of that version: the
    /// caller sends what that version sends.
    pub async fn connect_speaking(
        creds: &Credentials,
        addr: SocketAddr,
        server_name: &str,
        software: &str,
        protocol: u32,
    ) -> Result<Self, ClientError> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let hello = Hello {
            protocol,
            software: software.to_owned(),
        };
        Self::handshake(creds, addr, &addr.to_string(), server_name, hello, deadline).await
    }

    async fn handshake(
        creds: &Credentials,
        addr: SocketAddr,
        display: &str,
        server_name: &str,
        hello: Hello,
        deadline: Instant,
    ) -> Result<Self, ClientError> {
        let endpoint =
            transport::client_endpoint(creds).map_err(|e| ClientError::Connect(e.to_string()))?;
        let connecting = endpoint
            .connect(addr, server_name)
            .map_err(|e| ClientError::Connect(format!("cannot connect to {display}: {e}")))?;
        let conn = match timeout_at(deadline, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(before_hello(display, &e)),
            Err(_) => return Err(no_answer(display)),
        };
        let failed = |e: &dyn std::fmt::Display| hello_failed(&conn, display, e);
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
        write_frame(&mut send, &hello)
            .await
            .map_err(|e| failed(&e))?;
        let reply: Option<HelloReply> = read_frame(&mut recv).await.map_err(|e| failed(&e))?;
        match reply {
            Some(HelloReply::Welcome {
                identity, protocol, ..
            }) => Ok(Self {
                endpoint,
                conn,
                agent: identity
                    .strip_prefix("agent/")
                    .and_then(|name| name.parse().ok()),
                identity,
                protocol,
            }),
            Some(HelloReply::Refused { reason }) => Err(ClientError::Refused(format!(
                "coordinator {display} refused the connection: {reason}"
            ))),
            None => Err(failed(&"connection closed")),
        }
    }

    /// The protocol version spoken on this connection (the coordinator's answer to ours).
    pub fn protocol(&self) -> u32 {
        self.protocol
    }

    /// The identity the coordinator sees (`agent/NAME`).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Our agent name, when the coordinator sees us as an agent ([`Client::identity`] is
    /// `agent/NAME`).
    pub fn agent_name(&self) -> Option<&AgentName> {
        self.agent.as_ref()
    }

    /// The underlying connection (for accepting pushed work).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Opens a stream and sends `req` as its first frame.
    pub async fn open(
        &self,
        req: &Request,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
        write_frame(&mut send, req)
            .await
            .map_err(|e| self.lost(e))?;
        Ok((send, recv))
    }

    /// Reads the next reply on a stream; a `Response::Error` becomes [`ClientError::Remote`]
    /// and a stream that ends early is an error.
    pub async fn reply(&self, recv: &mut quinn::RecvStream) -> Result<Response, ClientError> {
        self.settle(read_frame::<Response, _>(recv).await)
    }

    /// A read reply as the caller sees it.
    fn settle(&self, frame: Result<Option<Response>, FrameError>) -> Result<Response, ClientError> {
        settle(&self.conn, frame)
    }

    /// One request, one reply.
    pub async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.open(req).await?;
        let _ = send.finish();
        self.reply(&mut recv).await
    }

    /// Describes a stream failure, preferring the connection's close reason.
    pub fn lost(&self, what: impl std::fmt::Display) -> ClientError {
        lost(&self.conn, what)
    }

    /// Closes the connection (even while other handles to this client exist) and waits, at
    /// most a few seconds, until the peer has been told.
    pub async fn shutdown(&self) {
        self.conn
            .close(crate::protocol::close::NORMAL.into(), b"shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.endpoint.wait_idle())
            .await;
    }

    /// Closes the connection and waits until the peer has been told.
    pub async fn close(self) {
        self.conn
            .close(crate::protocol::close::NORMAL.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests panic on failure by design
mod tests {
    use std::time::Instant;

    use fleetvault_certs::{Ca, Role};
    use quinn::{ApplicationClose, ConnectionClose, ConnectionError, TransportErrorCode};

    use super::*;

    fn credentials(ca: &Ca, role: Role, name: &str, sans: &[String]) -> Credentials {
        let leaf = ca.issue(role, name, sans).unwrap();
        Credentials {
            ca_pem: ca.cert_pem().into_bytes(),
            cert_pem: leaf.cert_pem.into_bytes(),
            key_pem: leaf.key_pem.into_bytes(),
        }
    }

    #[test]
    fn errors_before_the_hello_are_classified_for_exit_codes() {
        let addr = "backup.example.com:7443";
        let timed_out = before_hello(addr, &ConnectionError::TimedOut);
        assert_eq!(timed_out.exit_class(), Some(EXIT_UNREACHABLE));
        assert_eq!(
            timed_out.to_string(),
            "no answer from backup.example.com:7443 (UDP) in 5 s: is the coordinator running and the port open?"
        );
        let reset = before_hello(addr, &ConnectionError::Reset);
        assert_eq!(reset.exit_class(), Some(EXIT_UNREACHABLE));
        assert!(reset.to_string().contains(addr), "{reset}");

        let unknown_ca = ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::crypto(48),
            frame_type: None,
            reason: Default::default(),
        });
        let refused = before_hello(addr, &unknown_ca);
        assert_eq!(refused.exit_class(), Some(EXIT_REFUSED));
        assert!(refused.to_string().contains("unknown_ca"), "{refused}");
        assert!(refused.to_string().contains(addr), "{refused}");

        let role = ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: close::NOT_AUTHORIZED.into(),
            reason: (&b"certificate not allowed here"[..]).into(),
        });
        assert_eq!(before_hello(addr, &role).exit_class(), Some(EXIT_REFUSED));
        let shutting_down = ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: close::SHUTTING_DOWN.into(),
            reason: (&b"coordinator shutting down"[..]).into(),
        });
        assert_eq!(
            before_hello(addr, &shutting_down).exit_class(),
            Some(EXIT_UNREACHABLE)
        );

        // After the hello: plain failures.
        assert_eq!(ClientError::Lost("timed out".into()).exit_class(), None);
        let remote = ClientError::Remote {
            code: ErrorCode::NotFound,
            message: "no such snapshot".into(),
        };
        assert_eq!(remote.exit_class(), None);
        assert_eq!(ClientError::Connect("bind".into()).exit_class(), None);
    }

    #[tokio::test]
    async fn a_silent_port_is_given_up_after_the_connect_timeout() {
        let ca = Ca::create("test fleet CA").unwrap();
        let creds = credentials(&ca, Role::Agent, "db-01", &[]);
        // Bound, so nothing else takes the port, and never read: no answer at all.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = silent.local_addr().unwrap().to_string();
        let started = Instant::now();
        let err = Client::dial(&creds, &address, "localhost", "test")
            .await
            .err()
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= CONNECT_TIMEOUT && took < CONNECT_TIMEOUT + Duration::from_secs(4),
            "{took:?}"
        );
        assert_eq!(err.exit_class(), Some(EXIT_UNREACHABLE), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("no answer from {address} (UDP) in 5 s")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_unreachable() {
        let ca = Ca::create("test fleet CA").unwrap();
        let creds = credentials(&ca, Role::Agent, "db-01", &[]);
        let err = Client::dial(&creds, "no-such-host.invalid:7443", "localhost", "test")
            .await
            .err()
            .unwrap();
        assert_eq!(err.exit_class(), Some(EXIT_UNREACHABLE), "{err}");
        assert!(
            err.to_string().contains("no-such-host.invalid:7443"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_certificate_refused_on_first_use_is_a_refusal() {
        let fleet = Ca::create("test fleet CA").unwrap();
        let server_creds = credentials(
            &fleet,
            Role::Coordinator,
            "coord",
            &["localhost".to_owned()],
        );
        let server =
            transport::server_endpoint("127.0.0.1:0".parse().unwrap(), &server_creds).unwrap();
        let port = server.local_addr().unwrap().port();
        let accept = tokio::spawn({
            let server = server.clone();
            async move { server.accept().await.unwrap().await }
        });
        // Trusts the fleet CA, proves itself with another CA's certificate.
        let other = Ca::create("another CA").unwrap();
        let mut creds = credentials(&other, Role::Agent, "db-01", &[]);
        creds.ca_pem = fleet.cert_pem().into_bytes();

        let address = format!("127.0.0.1:{port}");
        let err = Client::dial(&creds, &address, "localhost", "test")
            .await
            .err()
            .unwrap();
        assert_eq!(err.exit_class(), Some(EXIT_REFUSED), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&address) && text.contains("unknown_ca"),
            "{text}"
        );
        assert!(accept.await.unwrap().is_err());
        server.close(0u32.into(), b"");
    }
}
