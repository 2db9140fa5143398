//! Connection failures to the control plane, as one line an operator can act
//! on: what went wrong and which flag to change, without transport prefixes
//! ("transport error", "error trying to connect") or Rust debug output.
//!
//! The failures come wrapped by hyper, tonic and `std::io::Error`, so
//! [`classify`] walks the whole source chain (and into `io::Error`'s inner
//! error, which `source()` skips) for the TCP error or the rustls error
//! (RFC 8446 alerts, certificate errors, and weft's [`PeerRejected`]).

use std::error::Error as StdError;

use rustls::{AlertDescription, CertificateError};

use crate::verify::PeerRejected;

/// What went wrong connecting to the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// TCP connection refused: nothing listens there.
    Refused,
    /// TCP failed otherwise (timeout, no route), with the OS's reason.
    Unreachable(String),
    /// The peer answered something that is not TLS (e.g. the admin port's plain HTTP).
    NotTls,
    /// The control plane's certificate does not chain to our trust bundle
    /// (unknown issuer, or an issuer of the same name whose signature fails).
    UnknownIssuer,
    /// The control plane's certificate has expired (or is not valid yet).
    ServerCertExpired,
    /// The control plane proved a SPIFFE ID other than the one expected.
    WrongId { got: String, want: String },
    /// The control plane refused our certificate (TLS alert it sent), e.g. `unknown CA`.
    OurCertRejected(String),
    /// Another TLS failure, in rustls' words.
    Tls(String),
}

/// The first failure found in `err`'s source chain, if it is one of the above.
pub fn classify(err: &(dyn StdError + 'static)) -> Option<Failure> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(f) = e.downcast_ref::<rustls::Error>().and_then(from_rustls) {
            return Some(f);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(f) = io.get_ref().and_then(|inner| classify(inner)) {
                return Some(f);
            }
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return Some(Failure::Refused),
                // tokio's timeout says only "deadline has elapsed".
                std::io::ErrorKind::TimedOut => {
                    return Some(Failure::Unreachable(
                        "no answer within the connect timeout (something listens there but does not speak TLS, \
                         or the host drops packets)"
                            .into(),
                    ))
                }
                std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable
                | std::io::ErrorKind::AddrNotAvailable => return Some(Failure::Unreachable(io_reason(io))),
                _ => {}
            }
        }
        cur = e.source();
    }
    None
}

fn from_rustls(e: &rustls::Error) -> Option<Failure> {
    use rustls::Error as E;
    Some(match e {
        E::InvalidMessage(_) => Failure::NotTls,
        // Two PKIs of one trust domain have issuers of the same name, so a
        // certificate of the other one fails on its signature, not its issuer.
        E::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            Failure::UnknownIssuer
        }
        E::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => Failure::ServerCertExpired,
        E::InvalidCertificate(CertificateError::Other(other)) => match other.0.downcast_ref::<PeerRejected>() {
            Some(PeerRejected::WrongId { got, want }) => Failure::WrongId { got: got.to_string(), want: want.clone() },
            Some(r @ PeerRejected::NotSvid(_)) => Failure::Tls(r.to_string()),
            None => Failure::Tls(other.0.to_string()),
        },
        E::AlertReceived(alert) => Failure::OurCertRejected(alert_text(*alert)),
        other => Failure::Tls(other.to_string()),
    })
}

/// An alert the peer sent, in words (RFC 8446 §6.2 names, spaced).
fn alert_text(a: AlertDescription) -> String {
    match a {
        AlertDescription::UnknownCA => "unknown CA".into(),
        AlertDescription::CertificateExpired => "certificate expired".into(),
        AlertDescription::BadCertificate => "bad certificate".into(),
        AlertDescription::CertificateRequired => "certificate required".into(),
        AlertDescription::AccessDenied => "access denied".into(),
        AlertDescription::DecryptError => "decrypt error".into(),
        AlertDescription::HandshakeFailure => "handshake failure".into(),
        other => format!("{other:?}"),
    }
}

/// An I/O error's reason without Rust's " (os error N)" suffix.
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Who is connecting, for the flag names in the message: the operator CLI
/// trusts `--pki`'s trust bundle and proves `--pki`'s operator certificate;
/// a sidecar trusts `--trust-bundle` and proves its SVID (from `--token-file`,
/// kept in `--state-dir`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Operator,
    Sidecar,
}

/// A connection failure to the control plane at `addr`, as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct ControlPlaneError {
    /// The `--control-plane` address as given.
    pub addr: String,
    pub failure: Failure,
    pub client: Client,
}

impl ControlPlaneError {
    /// `Some` when `err`'s chain holds a failure [`classify`] knows.
    pub fn from_error(addr: &str, client: Client, err: &(dyn StdError + 'static)) -> Option<Self> {
        classify(err).map(|failure| Self { addr: addr.to_string(), failure, client })
    }

    fn message(&self) -> String {
        let addr = &self.addr;
        let (trust, ours) = match self.client {
            Client::Operator => ("--pki's trust-bundle.pem", "--pki's operator certificate"),
            Client::Sidecar => ("--trust-bundle", "this sidecar's SVID (in --state-dir)"),
        };
        match &self.failure {
            Failure::Refused => format!(
                "control plane unreachable at {addr}: connection refused (is it running? --control-plane should name \
                 its --listen address)"
            ),
            Failure::Unreachable(why) => format!("control plane unreachable at {addr}: {why}"),
            Failure::NotTls => format!(
                "{addr} is not a weft control plane's gRPC port (it answered plain HTTP?); --control-plane should \
                 name the control plane's --listen address, not its --admin address"
            ),
            Failure::UnknownIssuer => format!(
                "the control plane at {addr} has a certificate that {trust} does not trust (another mesh's PKI?); \
                 point {} at the PKI the control plane uses",
                if self.client == Client::Operator { "--pki" } else { "--trust-bundle" }
            ),
            Failure::ServerCertExpired => format!(
                "the control plane at {addr} presented an expired (or not yet valid) certificate: check the clocks, \
                 and that its issuer (--pki issuer.crt) has not expired"
            ),
            Failure::WrongId { got, want } => format!(
                "the control plane at {addr} proved SPIFFE ID {got}, not {want}: --control-plane names a different \
                 process or mesh, or {trust} is from another trust domain"
            ),
            Failure::OurCertRejected(alert) => format!(
                "the control plane at {addr} refused {ours} ({alert}): {}",
                match self.client {
                    Client::Operator => "use the --pki directory `weft certs init` wrote for this control plane",
                    Client::Sidecar => "remove --state-dir's saved SVID and join again with a fresh --token-file",
                }
            ),
            Failure::Tls(why) => format!("TLS with the control plane at {addr} failed: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_in_the_chain_are_found() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(classify(&refused), Some(Failure::Refused));
        let plain = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        assert_eq!(classify(&plain), Some(Failure::NotTls));
        let e = ControlPlaneError::from_error("127.0.0.1:1", Client::Operator, &refused).expect("known");
        assert_eq!(
            e.to_string(),
            "control plane unreachable at 127.0.0.1:1: connection refused (is it running? --control-plane should \
             name its --listen address)"
        );
    }

    #[test]
    fn another_pki_of_the_same_trust_domain_is_an_unknown_issuer() {
        let bad_sig = rustls::Error::InvalidCertificate(CertificateError::BadSignature);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, bad_sig);
        assert_eq!(classify(&io), Some(Failure::UnknownIssuer));
    }

    #[test]
    fn os_error_suffix_is_dropped() {
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(io_reason(&e), "No such file or directory");
    }
}
