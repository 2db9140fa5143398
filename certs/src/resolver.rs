//! A certificate resolver whose SVID can be swapped atomically: a rotation
//! changes what the next handshake presents, and leaves open connections be.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::error::Result;
use crate::svid::Svid;

#[derive(Debug, Default)]
pub struct SvidResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl SvidResolver {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn with_svid(svid: &Svid) -> Result<Arc<Self>> {
        let r = Self::new();
        r.set(svid)?;
        Ok(r)
    }

    /// Replaces the SVID used by new handshakes.
    pub fn set(&self, svid: &Svid) -> Result<()> {
        let key = crate::crypto::provider().key_provider.load_private_key(svid.key_der())?;
        self.current.store(Some(Arc::new(CertifiedKey::new(svid.chain.clone(), key))));
        Ok(())
    }

    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}
