//! Mutual TLS over loopback QUIC with certificates from `fleetvault-certs`: an agent of the
//! fleet is identified, an agent of another CA is refused with a readable reason.

#![allow(clippy::unwrap_used)] // tests panic on failure by design

use std::net::SocketAddr;
use std::path::PathBuf;

use fleetvault_certs::{Ca, IssuedCert, Role};
use fleetvault_common::{
    client_endpoint, connect, describe_connection_error, is_certificate_error, peer_identity,
    server_endpoint, Credentials, TransportError,
};

fn credentials(ca: &Ca, leaf: &IssuedCert) -> Credentials {
    Credentials {
        ca_pem: ca.cert_pem().into_bytes(),
        cert_pem: leaf.cert_pem.clone().into_bytes(),
        key_pem: leaf.key_pem.clone().into_bytes(),
    }
}

fn coordinator(ca: &Ca) -> quinn::Endpoint {
    let cert = ca
        .issue(
            Role::Coordinator,
            "coord",
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
        )
        .unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    server_endpoint(listen, &credentials(ca, &cert)).unwrap()
}

#[tokio::test]
async fn fleet_agent_is_identified_by_its_certificate() {
    let ca = Ca::create("test fleet CA").unwrap();
    let server = coordinator(&ca);
    let addr = server.local_addr().unwrap();

    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let identity = peer_identity(&conn).unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut data = recv.read_to_end(1024).await.unwrap();
            data.reverse();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            // Keep the connection until the agent has read the reply and closed.
            conn.closed().await;
            identity
        }
    });

    let agent = ca.issue(Role::Agent, "db-01", &[]).unwrap();
    let client = client_endpoint(&credentials(&ca, &agent)).unwrap();
    let conn = connect(&client, addr, "localhost").await.unwrap();
    assert_eq!(
        peer_identity(&conn).unwrap().to_string(),
        "coordinator/coord"
    );
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"hello fleet").await.unwrap();
    send.finish().unwrap();
    assert_eq!(recv.read_to_end(1024).await.unwrap(), b"teelf olleh");
    conn.close(0u32.into(), b"done");

    let identity = accept.await.unwrap();
    assert_eq!(identity.to_string(), "agent/db-01");
    assert_eq!(identity.role, Role::Agent);
    client.wait_idle().await;
    server.close(0u32.into(), b"");
}

#[tokio::test]
async fn agent_of_another_ca_is_refused() {
    refused_with("another CA", "unknown_ca").await;
}

#[tokio::test]
async fn agent_of_another_ca_with_the_same_name_is_refused() {
    // Chain building finds the fleet CA by name, then the signature fails.
    refused_with("test fleet CA", "decrypt_error").await;
}

/// An agent whose certificate comes from a CA named `other_ca_name` connects; the coordinator
/// must refuse it and both sides must say why in terms of certificates.
async fn refused_with(other_ca_name: &str, alert: &str) {
    let ca = Ca::create("test fleet CA").unwrap();
    let server = coordinator(&ca);
    let addr = server.local_addr().unwrap();
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await.unwrap().await }
    });

    let other = Ca::create(other_ca_name).unwrap();
    let agent = other.issue(Role::Agent, "db-01", &[]).unwrap();
    // The agent trusts the fleet CA, so the coordinator's certificate is fine for it.
    let creds = Credentials {
        ca_pem: ca.cert_pem().into_bytes(),
        cert_pem: agent.cert_pem.into_bytes(),
        key_pem: agent.key_pem.into_bytes(),
    };
    let client = client_endpoint(&creds).unwrap();

    let reason = match connect(&client, addr, "localhost").await {
        Err(e) => {
            assert!(matches!(e, TransportError::CertificateRefused(_)), "{e}");
            e.to_string()
        }
        // TLS 1.3: the refusal arrives after the client's handshake completed.
        Ok(conn) => {
            let exchange = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(b"hello").await?;
                send.finish()?;
                recv.read_to_end(1024).await?;
                Ok::<_, Box<dyn std::error::Error>>(())
            };
            assert!(
                exchange.await.is_err(),
                "a refused agent could use a stream"
            );
            let closed = conn.closed().await;
            assert!(is_certificate_error(&closed), "{closed}");
            describe_connection_error(&closed)
        }
    };
    assert!(
        reason.contains("certificate refused by the peer"),
        "{reason}"
    );
    assert!(reason.contains(alert), "{reason}");

    let server_side = accept.await.unwrap().unwrap_err();
    let text = describe_connection_error(&server_side);
    assert!(text.starts_with("peer certificate refused"), "{text}");
    assert!(text.contains(alert), "{text}");
    eprintln!("agent sees: {reason}\ncoordinator sees: {text}");
    server.close(0u32.into(), b"");
}

#[tokio::test]
async fn wrong_server_name_is_refused_by_the_client() {
    let ca = Ca::create("test fleet CA").unwrap();
    let server = coordinator(&ca);
    let addr = server.local_addr().unwrap();
    tokio::spawn({
        let server = server.clone();
        async move {
            if let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        }
    });
    let agent = ca.issue(Role::Agent, "db-01", &[]).unwrap();
    let client = client_endpoint(&credentials(&ca, &agent)).unwrap();
    let err = connect(&client, addr, "elsewhere.example")
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::CertificateRefused(_)),
        "{err}"
    );
    assert!(err.to_string().contains("certificate"), "{err}");
    eprintln!("agent sees: {err}");
    server.close(0u32.into(), b"");
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "fleetvault-transport-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(unix)]
#[test]
fn credentials_load_checks_files() {
    use std::os::unix::fs::PermissionsExt;

    let ca = Ca::create("test fleet CA").unwrap();
    let agent = ca.issue(Role::Agent, "db-01", &[]).unwrap();
    let dir = TempDir::new("load");
    let (ca_path, cert_path, key_path) = (
        dir.0.join("ca.pem"),
        dir.0.join("agent.pem"),
        dir.0.join("agent.key"),
    );
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    std::fs::write(&cert_path, &agent.cert_pem).unwrap();
    std::fs::write(&key_path, &agent.key_pem).unwrap();

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Credentials::load(&ca_path, &cert_path, &key_path).unwrap_err();
    assert!(
        matches!(err, TransportError::KeyPermissions { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("agent.key"), "{err}");
    assert!(err.to_string().contains("644"), "{err}");

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let creds = Credentials::load(&ca_path, &cert_path, &key_path).unwrap();
    assert_eq!(creds.key_pem, agent.key_pem.as_bytes());

    let missing = dir.0.join("missing.pem");
    let err = Credentials::load(&missing, &cert_path, &key_path).unwrap_err();
    assert!(matches!(err, TransportError::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing.pem"), "{err}");

    // A key where the certificate should be.
    let err = Credentials::load(&ca_path, &key_path, &key_path).unwrap_err();
    assert!(err.to_string().contains("agent.key"), "{err}");
}
