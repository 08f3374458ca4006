//! How this process reaches NATS: the server URLs, TLS (`tls://` URLs, a CA, a client
//! certificate) and NATS authentication (a `.creds` file, or a user and password or a token
//! in the URL). async-nats reads none of the credentials in a URL, so they are taken out here
//! and handed to it as options; nothing here ever prints a secret.

use std::path::PathBuf;

use async_nats::{ConnectError, ConnectErrorKind, ConnectOptions, ServerAddr};

use super::error::BusError;
use crate::Common;

/// The servers and the options every connection attempt uses.
pub(super) struct Link {
    pub servers: Vec<ServerAddr>,
    user: Option<(String, String)>,
    token: Option<String>,
    tls: bool,
    ca: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
    creds: Option<String>,
}

impl Link {
    pub fn from_common(common: &Common) -> Result<Link, BusError> {
        let mut link = Link {
            servers: Vec::new(),
            user: None,
            token: None,
            tls: false,
            ca: None,
            client: None,
            creds: None,
        };
        for url in common.nats_url.iter() {
            let server = url
                .parse::<ServerAddr>()
                .map_err(|source| BusError::InvalidUrl {
                    url: redact(url),
                    source,
                })?;
            link.tls |= server.tls_required();
            match (server.username(), server.password()) {
                (Some(user), Some(pass)) => link.user = Some((user.into(), pass.into())),
                (Some(token), None) => link.token = Some(token.into()),
                _ => {}
            }
            link.servers.push(server);
        }
        let pem = |setting: &'static str, path: &str| -> Result<Option<PathBuf>, BusError> {
            if path.is_empty() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(path).map_err(|err| BusError::Link {
                setting,
                message: format!("cannot read {path:?}: {err}"),
            })?;
            if !text.contains("-----BEGIN") {
                return Err(BusError::Link {
                    setting,
                    message: format!("{path:?} is not a PEM file"),
                });
            }
            Ok(Some(PathBuf::from(path)))
        };
        link.ca = pem("FANOUT_NATS_TLS_CA", &common.nats_tls_ca)?;
        let cert = pem("FANOUT_NATS_TLS_CERT", &common.nats_tls_cert)?;
        let key = pem("FANOUT_NATS_TLS_KEY", &common.nats_tls_key)?;
        link.client = cert.zip(key);
        link.tls |= link.ca.is_some() || link.client.is_some();
        if !common.nats_creds.is_empty() {
            let creds =
                std::fs::read_to_string(&common.nats_creds).map_err(|err| BusError::Link {
                    setting: "FANOUT_NATS_CREDS",
                    message: format!("cannot read {:?}: {err}", common.nats_creds),
                })?;
            // Parsed now, so that a broken file stops start-up here.
            ConnectOptions::with_credentials(&creds).map_err(|err| BusError::Link {
                setting: "FANOUT_NATS_CREDS",
                message: format!("{:?} is not a NATS .creds file: {err}", common.nats_creds),
            })?;
            link.creds = Some(creds);
        }
        Ok(link)
    }

    /// `options` with this link's TLS and authentication.
    pub fn options(&self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some(creds) = &self.creds {
            options = options
                .credentials(creds)
                .expect("checked when the link was read");
        }
        if let Some((user, pass)) = &self.user {
            options = options.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if self.tls {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options
    }
}

/// Whether a first connection attempt failed for a reason retrying cannot fix.
pub(super) fn is_fatal(err: &ConnectError) -> bool {
    matches!(
        err.kind(),
        ConnectErrorKind::Authentication
            | ConnectErrorKind::AuthorizationViolation
            | ConnectErrorKind::Tls
            | ConnectErrorKind::ServerParse
    ) || is_certificate(err)
}

/// rustls reports a certificate it refuses as an I/O error.
fn is_certificate(err: &ConnectError) -> bool {
    err.kind() == ConnectErrorKind::Io && err.to_string().contains("certificate")
}

/// What to tell the operator about a refused connection.
pub(super) fn explain(err: &ConnectError) -> String {
    let hint = match err.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            "check the user and password or token in FANOUT_NATS_URL, or FANOUT_NATS_CREDS"
        }
        _ if is_certificate(err) => {
            "check FANOUT_NATS_TLS_CA (it must sign the server's certificate) and the server's \
             name in FANOUT_NATS_URL (its certificate must name it)"
        }
        ConnectErrorKind::Tls => {
            "check FANOUT_NATS_TLS_CA (it must sign the server's certificate), the server's name \
             in FANOUT_NATS_URL, and FANOUT_NATS_TLS_CERT / FANOUT_NATS_TLS_KEY if the server \
             verifies clients"
        }
        _ => "check FANOUT_NATS_URL",
    };
    format!("{err} ({hint})")
}

/// `url` without its password or token, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("nats://u:secret@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("tls://token@h"), "tls://***@h");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn credentials_come_out_of_the_url() {
        let common = Common {
            nats_url: "tls://ada:pw@127.0.0.1:4222,nats://127.0.0.1:4223".into(),
            ..Common::default()
        };
        let link = Link::from_common(&common).unwrap();
        assert!(link.tls);
        assert_eq!(link.user, Some(("ada".into(), "pw".into())));
        let common = Common {
            nats_tls_ca: "/nonexistent/ca.pem".into(),
            ..Common::default()
        };
        let err = Link::from_common(&common).err().unwrap().to_string();
        assert!(err.contains("FANOUT_NATS_TLS_CA"), "{err}");
    }

    #[test]
    fn a_creds_file_is_checked_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.creds");
        std::fs::write(&path, "not a creds file").unwrap();
        let common = Common {
            nats_creds: path.display().to_string(),
            ..Common::default()
        };
        let err = Link::from_common(&common).err().unwrap().to_string();
        assert!(
            err.contains("FANOUT_NATS_CREDS") && err.contains(".creds"),
            "{err}"
        );
        let common = Common {
            nats_creds: dir.path().join("missing.creds").display().to_string(),
            ..Common::default()
        };
        let err = Link::from_common(&common).err().unwrap().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn a_token_in_the_url_is_a_token() {
        let common = Common {
            nats_url: "nats://s3cr3t@127.0.0.1:4222".into(),
            ..Common::default()
        };
        let link = Link::from_common(&common).unwrap();
        assert_eq!(link.token.as_deref(), Some("s3cr3t"));
        assert!(link.user.is_none() && !link.tls);
    }
}
