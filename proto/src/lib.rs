//! weft's gRPC protocol. The `.proto` sources live in `proto/proto/`.

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("weft.identity.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("weft.admin.v1");
    }
}

pub mod config {
    pub mod v1 {
        tonic::include_proto!("weft.config.v1");
    }
}

/// The SPIFFE Workload API. Its proto has no package, so the service is the
/// bare `SpiffeWorkloadAPI` and the generated code lands in `_.rs`.
pub mod workload {
    tonic::include_proto!("_");
}

/// The etcd v3 API subset the control plane's etcd store uses (clients only):
/// `KV`, `Watch` and `Lease` of package `etcdserverpb`.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

pub mod channel;
