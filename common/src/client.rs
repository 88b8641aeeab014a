//! The calling side of a connection (agent or operator): connect, say hello, make requests.
//!
//! Errors are one line each and name the coordinator; a certificate the coordinator refuses
//! shows up under TLS 1.3 only on first use, so every stream failure goes through
//! [`describe_connection_error`](crate::describe_connection_error).

use std::net::SocketAddr;

use crate::protocol::frame::{read_frame, read_frame_or_chunk, write_frame, FrameError, Incoming};
use crate::protocol::{ErrorCode, Hello, HelloReply, Request, Response, PROTOCOL_VERSION};
use crate::transport::{self, Credentials};

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect or the handshake was refused.
    #[error("{0}")]
    Connect(String),
    /// The connection broke.
    #[error("connection to coordinator lost: {0}")]
    Lost(String),
    /// The coordinator refused the hello.
    #[error("coordinator refused the connection: {0}")]
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
    /// The coordinator answered something unexpected.
    #[error("unexpected reply from coordinator: {0}")]
    Unexpected(String),
}

/// A stream failure, described with the connection's close reason when there is one (that is
/// where a refused certificate shows).
fn lost(conn: &quinn::Connection, what: impl std::fmt::Display) -> ClientError {
    match conn.close_reason() {
        Some(reason) => ClientError::Lost(transport::describe_connection_error(&reason)),
        None => ClientError::Lost(what.to_string()),
    }
}

/// A connection to the coordinator after a successful hello.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    identity: String,
}

impl Client {
    /// Connects, checks the protocol version and learns the identity the coordinator read
    /// from our certificate.
    pub async fn connect(
        creds: &Credentials,
        addr: SocketAddr,
        server_name: &str,
        software: &str,
    ) -> Result<Self, ClientError> {
        let endpoint =
            transport::client_endpoint(creds).map_err(|e| ClientError::Connect(e.to_string()))?;
        let conn = transport::connect(&endpoint, addr, server_name)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&conn, e))?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            software: software.to_owned(),
        };
        write_frame(&mut send, &hello)
            .await
            .map_err(|e| lost(&conn, e))?;
        let reply: Option<HelloReply> = read_frame(&mut recv).await.map_err(|e| lost(&conn, e))?;
        match reply {
            Some(HelloReply::Welcome { identity, .. }) => Ok(Self {
                endpoint,
                conn,
                identity,
            }),
            Some(HelloReply::Refused { reason }) => Err(ClientError::Refused(reason)),
            None => Err(lost(&conn, "connection closed during hello")),
        }
    }

    /// The identity the coordinator sees (`agent/NAME`).
    pub fn identity(&self) -> &str {
        &self.identity
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

    /// [`Client::reply`] for a stream of chunks: a chunk's envelope stays in the buffer its
    /// frame was read into.
    pub async fn reply_or_chunk(
        &self,
        recv: &mut quinn::RecvStream,
    ) -> Result<Incoming<Response>, ClientError> {
        let frame = match read_frame_or_chunk::<Response, _>(recv).await {
            Ok(Some(Incoming::Message(m))) => Ok(Some(m)),
            Ok(Some(chunk)) => return Ok(chunk),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        self.settle(frame).map(Incoming::Message)
    }

    /// A read reply as the caller sees it.
    fn settle(&self, frame: Result<Option<Response>, FrameError>) -> Result<Response, ClientError> {
        match frame {
            Ok(Some(Response::Error { code, message })) => {
                Err(ClientError::Remote { code, message })
            }
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.lost("stream ended without a reply")),
            Err(FrameError::Io(e)) => Err(self.lost(e)),
            Err(e) => Err(ClientError::Frame(e)),
        }
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

impl ClientError {
    /// The exit code class ([`crate::exit`]): 10 when the coordinator did not answer, 11 when
    /// it refused us; `None` for every other failure.
    pub fn exit_class(&self) -> Option<u8> {
        match self {
            ClientError::Connect(_) => Some(crate::exit::UNREACHABLE),
            ClientError::Refused(_) => Some(crate::exit::REFUSED),
            ClientError::Lost(m) if m.contains("certificate") => Some(crate::exit::REFUSED),
            _ => None,
        }
    }
}
