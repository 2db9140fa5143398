//! The `--store` flag: `file` (the embedded store in `--state-dir`) or
//! `etcd://host:port[,host:port...]` (etcd v3 API, several members for
//! failover), and the TLS client options for etcd.

use std::path::PathBuf;
use std::str::FromStr;

/// Where the control plane's shared state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file`: one JSON file in the state directory (one control plane).
    File,
    /// `etcd://a:2379,b:2379`: etcd members' client addresses (`host:port`), tried in turn.
    Etcd { endpoints: Vec<String> },
}

/// A `--store` value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreUrlError {
    // The messages do not repeat the value: clap's "invalid value '...' for
    // '--store <STORE>'" in front of them names it already.
    #[error("expected `file` or `etcd://host:port[,host:port...]`")]
    Scheme(String),
    /// `why`: "is not host:port (…)", or that its port is out of range.
    #[error("{endpoint:?} {why}")]
    Endpoint { url: String, endpoint: String, why: &'static str },
}

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "file" {
            return Ok(Self::File);
        }
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(StoreUrlError::Scheme(s.into()));
        };
        let endpoints: Vec<String> = rest.trim_end_matches('/').split(',').map(|e| e.trim().to_string()).collect();
        for e in &endpoints {
            // A number, but not a port: say that, not "not host:port".
            if let Some((_, port)) = e.rsplit_once(':') {
                if !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && !matches!(port.parse::<u16>(), Ok(1..))
                {
                    let why = "has a port out of range: a port is 1-65535";
                    return Err(StoreUrlError::Endpoint { url: s.into(), endpoint: e.clone(), why });
                }
            }
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok());
            if !ok {
                let why = "is not host:port (e.g. etcd://10.0.0.5:2379,10.0.0.6:2379)";
                return Err(StoreUrlError::Endpoint { url: s.into(), endpoint: e.clone(), why });
            }
        }
        Ok(Self::Etcd { endpoints })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File => f.write_str("file"),
            Self::Etcd { endpoints } => write!(f, "etcd://{}", endpoints.join(",")),
        }
    }
}

/// TLS towards etcd (its `--client-cert-auth`): all PEM files. Without a CA,
/// etcd is spoken to in plaintext.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// CA certificates that sign the etcd members' server certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PKCS#8, RSA or SEC1) for etcd's client-cert auth.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_and_etcd_urls() {
        assert_eq!("file".parse::<StoreUrl>(), Ok(StoreUrl::File));
        assert_eq!(
            "etcd://127.0.0.1:2379,etcd-1.example:2379".parse::<StoreUrl>(),
            Ok(StoreUrl::Etcd { endpoints: vec!["127.0.0.1:2379".into(), "etcd-1.example:2379".into()] })
        );
        assert!(matches!("etcd://127.0.0.1".parse::<StoreUrl>(), Err(StoreUrlError::Endpoint { .. })));
        let e = "etcd://127.0.0.1:99999".parse::<StoreUrl>().unwrap_err();
        assert_eq!(e.to_string(), "\"127.0.0.1:99999\" has a port out of range: a port is 1-65535");
        let e = "etcd://127.0.0.1:0".parse::<StoreUrl>().unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        assert!(matches!("etcd://".parse::<StoreUrl>(), Err(StoreUrlError::Endpoint { .. })));
        assert!(matches!("etcd://h:99999".parse::<StoreUrl>(), Err(StoreUrlError::Endpoint { .. })));
        let err = "http://127.0.0.1:2379".parse::<StoreUrl>().unwrap_err().to_string();
        assert!(err.contains("expected `file` or `etcd://host:port"), "{err}");
    }
}
