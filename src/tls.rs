//! Connections to a Redis, plain or TLS (`rediss://`), for `serve --upstream-redis` and
//! `tail --resp`: rustls with its default provider, aws-lc-rs (ring lacks the post-quantum key
//! exchange rustls now prefers).
//!
//! The connector is built once, before the first connection, so that an unreadable or empty CA
//! file, or a client key that does not parse, stops `replhub serve` (or `tail`) with a message
//! naming the file instead of failing every reconnect. The server's certificate is checked against the
//! system's trusted roots (`rustls-native-certs`: `/etc/ssl/certs` on Debian) or, with
//! a CA file (`--upstream-redis-ca`, `tail --ca`), against that file's certificates alone, as
//! `redis-cli --cacert` does;
//! and against the URL's host, a DNS name or an IP address.
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::BytesMut;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::RedisTls;

/// A connection to a Redis: plain TCP, or TLS over it.
pub(crate) trait RedisIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RedisIo for T {}
pub(crate) type RedisStream = Box<dyn RedisIo>;

/// Connects to `addr` (`TCP_NODELAY`), with the TLS handshake when `tls` is given. The error
/// says which step failed.
pub(crate) async fn connect(addr: &str, tls: Option<&RedisTlsConnector>) -> Result<RedisStream, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    Ok(match tls {
        Some(tls) => Box::new(tls.connect(tcp).await.map_err(|e| format!("TLS handshake failed: {e}"))?),
        None => Box::new(tcp),
    })
}

/// Writes all of `buf` and flushes (with TLS, the records rustls still holds). Cancel-safe:
/// what was written is gone from `buf`, and a flush cut short is repeated by the next call.
pub(crate) async fn write_out<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    while !buf.is_empty() {
        if w.write_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
    }
    w.flush().await
}

/// What dialing a `rediss://` Redis needs: the connector and the name to check.
#[derive(Clone)]
pub(crate) struct RedisTlsConnector {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for RedisTlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTlsConnector").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl RedisTlsConnector {
    /// Loads the roots and the client certificate `tls` names.
    pub(crate) fn new(tls: &RedisTls) -> anyhow::Result<Self> {
        let server_name = ServerName::try_from(tls.server_name.clone())
            .with_context(|| format!("{:?} is not a DNS name or an IP address", tls.server_name))?;
        let roots = match &tls.ca_file {
            Some(path) => roots_from(path)?,
            None => system_roots()?,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("rustls: no protocol version")?
            .with_root_certificates(roots);
        let config = match &tls.client_cert {
            Some((cert, key)) => {
                let chain = certs_from(cert, "client certificate")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("client key {}: no PEM private key", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .context("the client certificate and key do not make a usable pair")?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Self { connector: TlsConnector::from(Arc::new(config)), server_name })
    }

    /// The TLS handshake over a connected socket.
    async fn connect(&self, tcp: TcpStream) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connector.connect(self.server_name.clone(), tcp).await
    }
}

/// The certificates of a PEM file, at least one.
fn certs_from(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{what} {}: cannot read it", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} {}: not a PEM file", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{what} {}: no PEM certificate in it", path.display());
    Ok(certs)
}

/// A root store of exactly the certificates in `path`.
fn roots_from(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from(path, "CA file")? {
        roots
            .add(cert)
            .with_context(|| format!("CA file {}: a certificate rustls cannot use", path.display()))?;
    }
    Ok(roots)
}

/// The system's trusted roots; an error if there are none (then nothing could be verified).
fn system_roots() -> anyhow::Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!(error = %e, "while loading the system's trusted certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    anyhow::ensure!(
        added > 0,
        "the system has no trusted root certificates (install ca-certificates, or name a CA file)"
    );
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tls(ca: Option<PathBuf>) -> RedisTls {
        RedisTls { server_name: "redis.internal".into(), ca_file: ca, client_cert: None }
    }

    fn temp(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("replhub-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let e = RedisTlsConnector::new(&tls(Some("/nonexistent/ca.pem".into()))).unwrap_err();
        assert!(format!("{e:#}").contains("CA file /nonexistent/ca.pem"), "{e:#}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let path = temp("empty.pem", "not a certificate\n");
        let e = RedisTlsConnector::new(&tls(Some(path.clone()))).unwrap_err();
        assert!(format!("{e:#}").contains("no PEM certificate"), "{e:#}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_ca_file_and_a_client_certificate_make_a_connector() {
        let ca = rcgen::generate_simple_self_signed(vec!["redis.internal".into()]).unwrap();
        let client = rcgen::generate_simple_self_signed(vec!["replhub".into()]).unwrap();
        let ca_path = temp("ca.pem", &ca.cert.pem());
        let cert_path = temp("client.pem", &client.cert.pem());
        let key_path = temp("client.key", &client.signing_key.serialize_pem());
        let mut t = tls(Some(ca_path.clone()));
        t.client_cert = Some((cert_path.clone(), key_path.clone()));
        let c = RedisTlsConnector::new(&t).expect("connector");
        assert_eq!(c.server_name, ServerName::try_from("redis.internal").unwrap());
        // A file with no key in it is caught at start.
        t.client_cert = Some((cert_path.clone(), cert_path.clone()));
        let e = RedisTlsConnector::new(&t).unwrap_err();
        assert!(format!("{e:#}").contains("client key"), "{e:#}");
        for p in [ca_path, cert_path, key_path] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn an_ip_address_is_a_server_name() {
        let mut t = tls(None);
        t.server_name = "127.0.0.1".into();
        let ca = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let path = temp("ip-ca.pem", &ca.cert.pem());
        t.ca_file = Some(path.clone());
        let c = RedisTlsConnector::new(&t).expect("connector");
        assert!(matches!(c.server_name, ServerName::IpAddress(_)));
        let _ = std::fs::remove_file(path);
    }
}
