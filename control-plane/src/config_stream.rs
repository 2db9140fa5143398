//! `weft.config.v1.Config`: the per-sidecar config stream (`Watch`:
//! registration, then a versioned snapshot on every change) and `Ack`
//! (ACK, or NACK with the sidecar's error).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use weft_proto::config::v1::config_server::Config;
use weft_proto::config::v1::{AckRequest, AckResponse, Snapshot, WatchRequest};

use crate::registry::{Registration, Registry};
use crate::server::require_peer;

/// The `weft.config.v1.Config` gRPC service.
pub struct ConfigService {
    pub registry: Arc<Registry>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

#[tonic::async_trait]
impl Config for ConfigService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let r: Result<Response<Self::WatchStream>, Status> = async {
            let (id, svid_expires) = require_peer(&req)?;
            let req = req.into_inner();
            weft_config::registration::check_registration(&id, &req.service).map_err(|e| match e {
                weft_config::registration::RegistrationError::BadName(_) => Status::invalid_argument(e.to_string()),
                _ => Status::permission_denied(e.to_string()),
            })?;
            if req.inbound_address.parse::<SocketAddr>().is_err() {
                return Err(Status::invalid_argument(format!(
                    "inbound_address {:?} is not host:port (an IP address and port)",
                    req.inbound_address
                )));
            }
            let guard = self.registry.register(Registration {
                spiffe_id: id,
                service: req.service,
                address: req.inbound_address,
                admin_address: req.admin_address,
                labels: req.labels,
                svid_expires,
            });
            let registry = self.registry.clone();
            let mut changes = registry.subscribe();
            let stream = async_stream::stream! {
                // Held for the life of the stream: dropping it deregisters.
                let _guard = guard;
                loop {
                    changes.borrow_and_update();
                    yield Ok(registry.snapshot());
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            };
            Ok(Response::new(Box::pin(stream) as Self::WatchStream))
        }
        .await;
        self.metrics.rpc("Watch", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let r: Result<Response<AckResponse>, Status> = async {
            let (id, _) = require_peer(&req)?;
            let req = req.into_inner();
            self.registry.ack(&id, &req.inbound_address, req.version, req.error);
            Ok(Response::new(AckResponse {}))
        }
        .await;
        self.metrics.rpc("Ack", r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        r
    }
}
