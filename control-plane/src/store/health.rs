//! Whether the store answers: `None` up, `Some(reason)` unreachable. The etcd
//! sessions report into it; `/ready`, `weft status` and the
//! `weft_control_plane_store_up` gauge read it. The file store is always up.

use tokio::sync::watch;

/// The store's reachability, shared by everything that talks to it.
pub struct StoreHealth {
    /// `--store` as given, e.g. `etcd://127.0.0.1:2379`.
    pub store: String,
    state: watch::Sender<Option<String>>,
}

impl StoreHealth {
    /// Up until told otherwise.
    pub fn new(store: String) -> Self {
        Self { store, state: watch::channel(None).0 }
    }

    pub fn report_up(&self) {
        self.state.send_if_modified(|s| {
            if s.is_some() {
                tracing::info!("store is reachable again");
            }
            s.take().is_some()
        });
    }

    /// `reason`: what failed, for `/ready` and `weft status`.
    pub fn report_down(&self, reason: String) {
        self.state.send_if_modified(|s| {
            if s.is_none() {
                tracing::warn!(%reason, "store unreachable: serving what is in memory, refusing writes");
            }
            let changed = s.as_ref() != Some(&reason);
            *s = Some(reason);
            changed
        });
    }

    /// `None` when up, else why not.
    pub fn down_reason(&self) -> Option<String> {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.state.subscribe()
    }
}
