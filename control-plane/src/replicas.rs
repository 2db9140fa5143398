//! What control-plane replicas share through etcd (`--store etcd://...`):
//!
//! - **Registrations**: every sidecar stream this replica holds is a key
//!   `/weft/registrations/<replica>/<n>` under this replica's lease (TTL
//!   `--registration-ttl`, kept alive every third of it). A replica that dies
//!   stops keeping its lease alive: its sidecars stay in discovery until the
//!   lease runs out, time enough for them to reconnect to another replica.
//! - **Replicas**: each replica also writes `/weft/replicas/<replica>`
//!   ([`ReplicaInfo`]) under the same lease, so `weft status` asked of any
//!   replica lists every live one and the sidecars each holds.
//! - **Acks**: each replica also writes `/weft/acks/<replica>` ([`AckRecord`])
//!   under the same lease: the acked and nacked config versions of every
//!   sidecar it holds, with the version they count in (versions are per
//!   replica). One key per replica, rewritten at most once per
//!   [`ACKS_INTERVAL`] and only when something changed, so `weft status`
//!   through any replica tells whether every sidecar is in sync.
//! - **Following**: every replica reads the registration prefix and
//!   `/weft/config`, then watches `/weft/` from that revision on, and feeds
//!   the other replicas' registrations ([`Registry::set_shared`]) and the
//!   stored mesh config ([`Registry::set_mesh_config`]) into the registry.
//!
//! When etcd does not answer, nothing in memory is dropped: sidecars keep
//! their streams and snapshots, [`StoreHealth`] says why writes are refused.
//! When it answers again, the lease is re-granted, every held registration
//! re-written, the old lease revoked (dropping what ended meanwhile), and the
//! follower reads everything afresh before watching again.
//!
//! **Recovery grace**: an etcd that was away (stopped, paused, out of
//! quorum) may expire every replica's lease as it comes back, deleting all
//! their registrations before their replicas could renew. So while this
//! replica's etcd calls fail, and for [`recovery_grace`] after etcd answers
//! again, removals of other replicas' registrations (watch DELETE events,
//! keys missing in a re-read) are held: callers keep those endpoints while
//! their replicas register them again. At the end of the grace whatever etcd
//! then holds is the truth: a sidecar really gone meanwhile disappears then.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_certs::SpiffeId;
use weft_proto::etcd::event::EventType;
use weft_proto::etcd::watch_request::RequestUnion;
use weft_proto::etcd::{LeaseKeepAliveRequest, LeaseRevokeRequest, WatchCreateRequest, WatchRequest};

use crate::metrics::Metrics;
use crate::registry::{LocalAcks, LocalChange, Registration, Registry};
use crate::store::etcd::{prefix_end, Etcd, StoredConfig, CALL_TIMEOUT, CONFIG_KEY, PREFIX};
use crate::store::health::StoreHealth;
use crate::store::StoreError;

/// Prefix of every replica's registrations.
pub const REGISTRATIONS: &str = "/weft/registrations/";
/// Prefix of the replicas' own records ([`ReplicaInfo`]).
pub const REPLICAS: &str = "/weft/replicas/";
/// Prefix of the replicas' ack records ([`AckRecord`]), one key per replica.
pub const ACKS: &str = "/weft/acks/";

/// How often a replica rewrites its ack record at most (only when changed):
/// a join storm of 10,000 sidecars ACKing is one write a second, not 10,000.
pub const ACKS_INTERVAL: Duration = Duration::from_secs(1);

/// NACK reasons in an ack record: each cut to this many bytes, and at most
/// [`MAX_REASONS`] distinct ones (sidecars rejecting one version usually
/// share the reason); the rest point at the replica's own `weft status`.
const MAX_REASON: usize = 256;
const MAX_REASONS: usize = 32;

/// The largest ack record written, in bytes: etcd refuses requests above
/// 1.5 MiB (its default `--max-request-bytes`). About 40 bytes a sidecar,
/// so 10,000 sidecars make about 400 KB.
const MAX_ACK_RECORD: usize = 1024 * 1024;

/// One replica's sidecars' config ACK state, as JSON at `/weft/acks/<id>`.
/// Short field names keep it compact: it holds every sidecar of a replica.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AckRecord {
    /// The config version the replica served, which the versions below count in.
    #[serde(rename = "v")]
    pub version: u64,
    /// The mesh config revision it served (0: none stored).
    #[serde(rename = "r", default)]
    pub config_revision: i64,
    /// Distinct NACK reasons, indexed by [`AckEntry`]'s third field.
    #[serde(rename = "e", default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Per sidecar inbound address (`host:port`, as registered).
    #[serde(rename = "s", default)]
    pub sidecars: BTreeMap<String, AckEntry>,
    /// True when the sidecars did not fit in [`MAX_ACK_RECORD`] and were left out.
    #[serde(rename = "t", default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// A sidecar's (acked version, nacked version, index of the NACK reason in
/// [`AckRecord::reasons`]); versions 0: none yet; the index means something
/// only when the nacked version is not 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckEntry(pub u64, pub u64, pub u32);

impl AckRecord {
    /// The record of `acks`, within the size limits above.
    pub fn from_local(acks: &LocalAcks, replica: &str) -> Self {
        let mut record =
            AckRecord { version: acks.version, config_revision: acks.config_revision, ..Default::default() };
        let mut index: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
        for (address, acked, nacked, reason) in &acks.sidecars {
            let mut at = 0;
            if *nacked > 0 {
                at = match index.get(reason.as_str()) {
                    Some(i) => *i,
                    None if record.reasons.len() < MAX_REASONS => {
                        record.reasons.push(cut(reason, MAX_REASON));
                        index.insert(reason, record.reasons.len() as u32 - 1);
                        record.reasons.len() as u32 - 1
                    }
                    None => {
                        if record.reasons.len() == MAX_REASONS {
                            record.reasons.push(format!(
                                "(more reasons than an ack record holds: `weft status` through replica {replica} itself shows it)"
                            ));
                        }
                        MAX_REASONS as u32
                    }
                };
            }
            record.sidecars.insert(address.clone(), AckEntry(*acked, *nacked, at));
        }
        record
    }

    /// The record as JSON, at most [`MAX_ACK_RECORD`] bytes (without its
    /// sidecars, marked truncated, when they do not fit).
    pub fn to_json(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("serializes");
        if json.len() <= MAX_ACK_RECORD {
            return json;
        }
        let short = AckRecord { sidecars: BTreeMap::new(), reasons: Vec::new(), truncated: true, ..self.clone() };
        serde_json::to_vec(&short).expect("serializes")
    }

    /// A sidecar's (acked, nacked, NACK reason), by inbound address.
    pub fn get(&self, address: &str) -> Option<(u64, u64, String)> {
        let AckEntry(acked, nacked, at) = *self.sidecars.get(address)?;
        let reason =
            if nacked > 0 { self.reasons.get(at as usize).cloned().unwrap_or_default() } else { String::new() };
        Some((acked, nacked, reason))
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A replica as it registers itself in etcd (JSON at `/weft/replicas/<id>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Its `--listen` address, as given (may be a wildcard).
    pub listen: String,
    /// Its hostname.
    #[serde(default)]
    pub host: String,
    /// Start time, seconds since the Unix epoch.
    #[serde(default)]
    pub started_at: i64,
}

/// A registration as stored in etcd (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct StoredRegistration {
    spiffe_id: String,
    service: String,
    address: String,
    #[serde(default)]
    admin_address: String,
    #[serde(default)]
    labels: std::collections::HashMap<String, String>,
    /// SVID expiry, seconds since the Unix epoch (0: unknown).
    #[serde(default)]
    svid_expires_at: i64,
    /// The services it declared it calls (omitted when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    calls: Vec<String>,
}

impl StoredRegistration {
    fn from_registration(r: &Registration) -> Self {
        Self {
            spiffe_id: r.spiffe_id.to_string(),
            service: r.service.clone(),
            address: r.address.clone(),
            admin_address: r.admin_address.clone(),
            labels: r.labels.clone(),
            svid_expires_at: r.svid_expires.map(weft_certs::svid::unix_secs).unwrap_or(0),
            calls: r.calls.clone(),
        }
    }

    fn into_registration(self) -> Option<Registration> {
        Some(Registration {
            spiffe_id: SpiffeId::parse(&self.spiffe_id).ok()?,
            service: self.service,
            address: self.address,
            admin_address: self.admin_address,
            labels: self.labels,
            svid_expires: (self.svid_expires_at > 0)
                .then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(self.svid_expires_at as u64)),
            calls: self.calls,
        })
    }
}

/// This replica's view of what is shared: the revision of the mesh config
/// it serves (0: none from etcd yet), its own copy of that config, the
/// other replicas and their sidecars (for `weft status`).
#[derive(Default)]
pub struct SharedState {
    pub config_revision: AtomicI64,
    /// This replica's ID (`<start unix seconds>-<random>`).
    pub replica: String,
    /// The stored config this replica serves, as read from etcd: what
    /// `weft get config` answers (marked stale) while etcd is away.
    pub config: Mutex<Option<StoredConfig>>,
    /// Every live replica by ID (this one included once etcd answered).
    pub replicas: Mutex<BTreeMap<String, ReplicaInfo>>,
    /// The other replicas' sidecars: (replica ID, registration).
    pub remote: Mutex<Vec<(String, Registration)>>,
    /// The other replicas' ack records, by replica ID.
    pub acks: Mutex<BTreeMap<String, Arc<AckRecord>>>,
}

impl SharedState {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored config this replica serves (None: none read yet).
    pub fn config(&self) -> Option<StoredConfig> {
        Self::lock(&self.config).clone()
    }

    /// Every live replica, by ID.
    pub fn replicas(&self) -> BTreeMap<String, ReplicaInfo> {
        Self::lock(&self.replicas).clone()
    }

    /// The other replicas' sidecars: (replica ID, registration).
    pub fn remote(&self) -> Vec<(String, Registration)> {
        Self::lock(&self.remote).clone()
    }

    /// The other replicas' ack records, by replica ID.
    pub fn acks(&self) -> BTreeMap<String, Arc<AckRecord>> {
        Self::lock(&self.acks).clone()
    }
}

/// The replica ID in a registration key `/weft/registrations/<replica>/<n>`.
fn replica_of(key: &[u8]) -> String {
    let rest = key.strip_prefix(REGISTRATIONS.as_bytes()).unwrap_or(key);
    let id = rest.split(|b| *b == b'/').next().unwrap_or_default();
    String::from_utf8_lossy(id).into_owned()
}

/// How long removals of other replicas' registrations are held after etcd
/// came back: the registration TTL (time for every replica to notice its
/// lease is gone and register again), at least 10 s.
pub fn recovery_grace(ttl: Duration) -> Duration {
    ttl.max(Duration::from_secs(10))
}

/// Starts the registration writer and the follower for this replica and
/// waits (at most `first_sync`) until the follower has read etcd once, so a
/// new replica serves the stored config from its first snapshot.
pub async fn start(
    etcd: Etcd,
    registry: Arc<Registry>,
    health: Arc<StoreHealth>,
    metrics: Arc<Metrics>,
    ttl: Duration,
    first_sync: Duration,
    listen: std::net::SocketAddr,
) -> Arc<SharedState> {
    let started_at = weft_certs::svid::unix_secs(SystemTime::now());
    let replica = started_at.to_string() + "-" + &crate::tokens::generate()[8..24];
    let shared = Arc::new(SharedState { replica: replica.clone(), ..Default::default() });
    let me = ReplicaInfo { listen: listen.to_string(), host: hostname(), started_at };
    let me = (format!("{REPLICAS}{replica}"), serde_json::to_vec(&me).expect("serializes"));
    // Until the stored config is read, streams wait rather than serve none.
    registry.expect_stored_config();
    let (tx, rx) = mpsc::unbounded_channel();
    registry.publish_local_changes(tx);
    let held = Held {
        own: format!("{REGISTRATIONS}{replica}/"),
        me,
        acks: format!("{ACKS}{replica}"),
        replica: replica.clone(),
    };
    tokio::spawn(hold_registrations(etcd.clone(), rx, ttl, held, registry.clone(), health.clone()));
    let (synced_tx, synced) = tokio::sync::oneshot::channel();
    let reach = etcd.reach.clone();
    let endpoints = etcd.endpoints.clone();
    let follower = Follower {
        etcd,
        registry,
        health,
        metrics,
        own: format!("{REGISTRATIONS}{replica}/"),
        shared: shared.clone(),
        grace: recovery_grace(ttl),
    };
    tokio::spawn(follower.run(synced_tx));
    match tokio::time::timeout(first_sync, synced).await {
        Ok(_) => tracing::info!(%replica, "replica joined: registrations and the mesh config read from etcd"),
        Err(_) => tracing::warn!(
            %replica,
            "etcd did not answer within {first_sync:?}: config streams wait until it does (sidecars keep their last config)"
        ),
    }
    tokio::spawn(warn_until_answered(reach, endpoints));
    shared
}

/// How often [`warn_until_answered`] repeats itself.
const NEVER_ANSWERED_EVERY: Duration = Duration::from_secs(10);

/// An etcd that never answered since start-up is more likely a wrong
/// address or TLS setting than an outage: says so until it answers.
async fn warn_until_answered(reach: Arc<crate::store::etcd::Reachability>, endpoints: String) {
    let address = endpoints.trim_start_matches("etcd://").to_string();
    loop {
        if reach.ever_answered() {
            return;
        }
        tracing::warn!(
            "etcd at {address} has not answered since start-up: check the --store address and port, and \
             --store-ca/--store-cert/--store-key (TLS) against how etcd listens"
        );
        tokio::time::sleep(NEVER_ANSWERED_EVERY).await;
    }
}

/// This host's name, for people reading `weft status` (empty if unknown).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// The keys one replica holds under its lease.
struct Held {
    /// Its registration prefix (`/weft/registrations/<id>/`).
    own: String,
    /// Its record: key and value.
    me: (String, Vec<u8>),
    /// Its ack record's key.
    acks: String,
    replica: String,
}

/// Keeps this replica's record, registrations and ack record in etcd under
/// one lease.
async fn hold_registrations(
    etcd: Etcd,
    mut changes: mpsc::UnboundedReceiver<LocalChange>,
    ttl: Duration,
    keys: Held,
    registry: Arc<Registry>,
    health: Arc<StoreHealth>,
) {
    let Held { own, me, .. } = &keys;
    let mut held: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    // The generation of the ack record in etcd under the current lease.
    let mut acks_written: Option<u64> = None;
    let mut acks_tick = tokio::time::interval(ACKS_INTERVAL);
    acks_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease: Option<i64> = None;
    // A lease given up while etcd was away: revoked once a new one holds
    // every registration, which drops the keys of streams that ended meanwhile.
    let mut stale: Option<i64> = None;
    let mut registered_once = false;
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            change = changes.recv() => {
                let Some(change) = change else { return };
                let result = match change {
                    LocalChange::Registered(n, reg) => {
                        let value = serde_json::to_vec(&StoredRegistration::from_registration(&reg)).expect("serializes");
                        held.insert(n, value.clone());
                        match lease {
                            Some(l) => etcd.put(&format!("{own}{n}"), value, l).await,
                            None => Ok(()),
                        }
                    }
                    LocalChange::Deregistered(n) => {
                        held.remove(&n);
                        match lease {
                            Some(_) => etcd.delete(&format!("{own}{n}")).await,
                            None => Ok(()),
                        }
                    }
                };
                if let Err(e) = result {
                    // Written again in full under a new lease once etcd answers.
                    stale = stale.or(lease.take());
                    tracing::debug!(error = %e, "registration write failed");
                }
            }
            _ = acks_tick.tick() => {
                let Some(l) = lease else { continue };
                let generation = registry.acks_generation();
                if acks_written == Some(generation) {
                    continue;
                }
                let local = registry.local_acks();
                let value = AckRecord::from_local(&local, &keys.replica).to_json();
                match etcd.put(&keys.acks, value, l).await {
                    Ok(()) => acks_written = Some(local.generation),
                    Err(e) => {
                        stale = stale.or(lease.take());
                        tracing::debug!(error = %e, "ack record write failed");
                    }
                }
            }
            _ = tick.tick() => {
                match lease {
                    Some(l) => match keep_alive_twice(&etcd, l).await {
                        Ok(true) => health.report_up(),
                        Ok(false) => {
                            tracing::warn!(lease = l, "registration lease expired (etcd was away longer than its TTL); registering again");
                            lease = None;
                            // At once: other replicas hold this one's
                            // removed registrations only for a grace.
                            tick.reset_immediately();
                        }
                        Err(e) => {
                            health.report_down(e.to_string());
                            stale = stale.or(lease.take());
                        }
                    },
                    None => match register_all(&etcd, own, me, &held, ttl).await {
                        Ok(l) => {
                            if registered_once {
                                tracing::info!(lease = l, sidecars = held.len(), "registered this replica's {} sidecars again under a new lease", held.len());
                            }
                            registered_once = true;
                            lease = Some(l);
                            // Written again under the new lease at the next tick.
                            acks_written = None;
                            if let Some(old) = stale.take() {
                                let mut client = etcd.lease.clone();
                                let _ = etcd.call(client.lease_revoke(LeaseRevokeRequest { id: old })).await;
                            }
                            health.report_up();
                        }
                        Err(e) => health.report_down(e.to_string()),
                    },
                }
            }
        }
    }
}

/// Grants a lease and writes this replica's record and every held
/// registration under it.
async fn register_all(
    etcd: &Etcd,
    own: &str,
    me: &(String, Vec<u8>),
    held: &BTreeMap<u64, Vec<u8>>,
    ttl: Duration,
) -> Result<i64, StoreError> {
    let lease = etcd.grant(ttl).await?;
    etcd.put(&me.0, me.1.clone(), lease).await?;
    for (n, value) in held {
        etcd.put(&format!("{own}{n}"), value.clone(), lease).await?;
    }
    Ok(lease)
}

/// [`keep_alive`], tried again once on failure: a member going away fails
/// one call, and the next one goes to another member.
async fn keep_alive_twice(etcd: &Etcd, lease: i64) -> Result<bool, StoreError> {
    match keep_alive(etcd, lease).await {
        Err(_) => keep_alive(etcd, lease).await,
        alive => alive,
    }
}

/// One keep-alive of `lease`: Ok(false) when etcd says it is gone.
async fn keep_alive(etcd: &Etcd, lease: i64) -> Result<bool, StoreError> {
    let req = tokio_stream::once(LeaseKeepAliveRequest { id: lease });
    let mut stream = etcd.call(etcd.lease.clone().lease_keep_alive(req)).await?;
    match tokio::time::timeout(CALL_TIMEOUT, stream.message()).await {
        Ok(Ok(Some(r))) => Ok(r.ttl > 0),
        Ok(Ok(None)) => Err(etcd.unavailable("lease keep-alive stream ended")),
        Ok(Err(s)) => Err(etcd.unavailable(format!("lease keep-alive: {}", s.message()))),
        Err(_) => Err(etcd.unavailable(format!("lease keep-alive: no answer within {CALL_TIMEOUT:?}"))),
    }
}

/// Sleeps until `at`, or forever (None).
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What the follower keeps across re-reads.
#[derive(Default)]
struct Others {
    /// Other replicas' registrations as etcd holds them, by key.
    etcd: BTreeMap<Vec<u8>, Registration>,
    published: Published,
}

/// Reads and watches etcd into the registry.
struct Follower {
    etcd: Etcd,
    registry: Arc<Registry>,
    health: Arc<StoreHealth>,
    metrics: Arc<Metrics>,
    /// This replica's own registration prefix (those are in the registry already).
    own: String,
    shared: Arc<SharedState>,
    /// [`recovery_grace`].
    grace: Duration,
}

/// Other replicas' registrations as published, and the removals held
/// during a recovery grace.
#[derive(Default)]
struct Published {
    /// What the registry was last given: etcd's keys and the held ones.
    view: BTreeMap<Vec<u8>, Registration>,
    /// Removed from etcd during a grace, still published.
    held: BTreeMap<Vec<u8>, Registration>,
    /// Held removals cancelled (registered again) in this grace.
    cancelled: usize,
}

impl Follower {
    async fn run(self, synced: tokio::sync::oneshot::Sender<()>) {
        let mut synced = Some(synced);
        let mut others = Others::default();
        let mut failures = 0u32;
        loop {
            match self.follow(&mut others, &mut synced).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    // One failure is often a member going away: retry on the
                    // next one before saying the store is down.
                    if failures > 1 {
                        self.health.report_down(e.to_string());
                    }
                    tracing::debug!(error = %e, "etcd watch ended");
                    let backoff = Duration::from_millis(200 * u64::from(failures.min(10)));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// Reads the registrations and the config, then watches from there
    /// until the watch fails (an error) or is cancelled by etcd.
    async fn follow(
        &self,
        state: &mut Others,
        synced: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), StoreError> {
        let Others { etcd: others, published } = state;
        // Replicas first: the watch starts after this read, and replays
        // (idempotently) whatever changed between the two reads.
        let (replica_kvs, revision) = self.etcd.get_prefix(REPLICAS).await?;
        let mut replicas = BTreeMap::new();
        for kv in replica_kvs {
            self.put_replica(&mut replicas, &kv.key, &kv.value);
        }
        *SharedState::lock(&self.shared.replicas) = replicas;
        let (kvs, _) = self.etcd.get_prefix(REGISTRATIONS).await?;
        others.clear();
        for kv in kvs {
            self.put_registration(others, kv.key, &kv.value);
        }
        self.publish_others(others, published);
        let (ack_kvs, _) = self.etcd.get_prefix(ACKS).await?;
        let mut acks = BTreeMap::new();
        for kv in ack_kvs {
            self.put_acks(&mut acks, &kv.key, &kv.value);
        }
        *SharedState::lock(&self.shared.acks) = acks;
        match self.etcd.get(CONFIG_KEY).await? {
            Some(kv) => self.apply_config(&kv.value, kv.mod_revision),
            None => self.registry.config_settled(),
        }
        self.health.report_up();
        if let Some(tx) = synced.take() {
            let _ = tx.send(());
        }
        let (tx, rx) = mpsc::channel(1);
        let create = WatchCreateRequest {
            key: PREFIX.as_bytes().to_vec(),
            range_end: prefix_end(PREFIX.as_bytes()),
            start_revision: revision + 1,
            progress_notify: false,
        };
        tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) })
            .await
            .expect("receiver alive");
        // `tx` lives as long as the watch: closing the request side ends it.
        let mut stream = self.etcd.call(self.etcd.watch.clone().watch(ReceiverStream::new(rx))).await?;
        loop {
            // Wakes up when held removals are due.
            let due = match published.held.is_empty() {
                true => None,
                false => Some(self.etcd.reach.removal_hold(self.grace).unwrap_or_else(std::time::Instant::now)),
            };
            let message = tokio::select! {
                m = stream.message() => m,
                _ = sleep_until(due) => {
                    self.publish_others(others, published);
                    continue;
                }
            };
            let resp = match message {
                Ok(Some(r)) => r,
                Ok(None) => return Err(self.etcd.unavailable("watch stream ended")),
                Err(s) => return Err(self.etcd.unavailable(format!("watch: {}", s.message()))),
            };
            if resp.canceled || resp.compact_revision > 0 {
                // Read everything afresh (compacted: events were lost).
                return Err(self.etcd.unavailable(format!("watch cancelled: {}", resp.cancel_reason)));
            }
            let mut registrations_changed = false;
            for ev in resp.events {
                let Some(kv) = ev.kv else { continue };
                if kv.key.starts_with(REGISTRATIONS.as_bytes()) {
                    registrations_changed = true;
                    if ev.r#type == EventType::Delete as i32 {
                        others.remove(&kv.key);
                    } else {
                        self.put_registration(others, kv.key, &kv.value);
                    }
                } else if kv.key.starts_with(REPLICAS.as_bytes()) {
                    let mut replicas = SharedState::lock(&self.shared.replicas);
                    if ev.r#type == EventType::Delete as i32 {
                        let id = String::from_utf8_lossy(&kv.key[REPLICAS.len()..]).into_owned();
                        replicas.remove(&id);
                    } else {
                        self.put_replica(&mut replicas, &kv.key, &kv.value);
                    }
                } else if kv.key.starts_with(ACKS.as_bytes()) {
                    let mut acks = SharedState::lock(&self.shared.acks);
                    if ev.r#type == EventType::Delete as i32 {
                        acks.remove(&*String::from_utf8_lossy(&kv.key[ACKS.len()..]));
                    } else {
                        self.put_acks(&mut acks, &kv.key, &kv.value);
                    }
                } else if kv.key == CONFIG_KEY.as_bytes() && ev.r#type == EventType::Put as i32 {
                    self.apply_config(&kv.value, kv.mod_revision);
                }
            }
            if registrations_changed {
                self.publish_others(others, published);
            }
        }
    }

    /// The other replicas' registrations to the registry (endpoints) and
    /// to the shared state (status): those in etcd (`others`), plus, during
    /// a recovery grace, those removed from etcd meanwhile.
    fn publish_others(&self, others: &BTreeMap<Vec<u8>, Registration>, published: &mut Published) {
        let holding = self.etcd.reach.removal_hold(self.grace).is_some();
        if holding {
            let mut newly = 0;
            for (key, reg) in &published.view {
                if !others.contains_key(key) && !published.held.contains_key(key) {
                    published.held.insert(key.clone(), reg.clone());
                    newly += 1;
                }
            }
            if newly > 0 {
                tracing::info!(
                    held = published.held.len(),
                    "etcd was away: holding the removal of {newly} other replicas' registrations for up to {:?} after it answers, so their replicas can register them again",
                    self.grace
                );
            }
        }
        let before = published.held.len();
        published.held.retain(|key, _| !others.contains_key(key));
        published.cancelled += before - published.held.len();
        if before > 0 && published.held.is_empty() {
            tracing::info!(
                cancelled = published.cancelled,
                "every held removal cancelled: their replicas registered them again"
            );
            published.cancelled = 0;
        } else if !holding && !published.held.is_empty() {
            tracing::info!(
                applied = published.held.len(),
                cancelled = published.cancelled,
                "recovery grace over: {} held removals applied (not registered again), {} cancelled",
                published.held.len(),
                published.cancelled
            );
            published.held.clear();
            published.cancelled = 0;
        }
        let mut view = others.clone();
        view.extend(published.held.iter().map(|(k, r)| (k.clone(), r.clone())));
        self.registry.set_shared(view.values().cloned().collect());
        *SharedState::lock(&self.shared.remote) = view.iter().map(|(k, r)| (replica_of(k), r.clone())).collect();
        published.view = view;
    }

    fn put_replica(&self, replicas: &mut BTreeMap<String, ReplicaInfo>, key: &[u8], value: &[u8]) {
        let id = String::from_utf8_lossy(&key[REPLICAS.len()..]).into_owned();
        match serde_json::from_slice::<ReplicaInfo>(value) {
            Ok(info) => {
                replicas.insert(id, info);
            }
            Err(e) => tracing::warn!(replica = %id, error = %e, "unreadable replica record in etcd; ignored"),
        }
    }

    /// Another replica's ack record (this one's own is the registry itself).
    fn put_acks(&self, acks: &mut BTreeMap<String, Arc<AckRecord>>, key: &[u8], value: &[u8]) {
        let id = String::from_utf8_lossy(&key[ACKS.len()..]).into_owned();
        if id == self.shared.replica {
            return;
        }
        match serde_json::from_slice::<AckRecord>(value) {
            Ok(record) => {
                acks.insert(id, Arc::new(record));
            }
            Err(e) => tracing::warn!(replica = %id, error = %e, "unreadable ack record in etcd; ignored"),
        }
    }

    fn put_registration(&self, others: &mut BTreeMap<Vec<u8>, Registration>, key: Vec<u8>, value: &[u8]) {
        if key.starts_with(self.own.as_bytes()) {
            return;
        }
        match serde_json::from_slice::<StoredRegistration>(value).ok().and_then(StoredRegistration::into_registration) {
            Some(reg) => {
                others.insert(key, reg);
            }
            None => tracing::warn!(key = %String::from_utf8_lossy(&key), "unreadable registration in etcd; ignored"),
        }
    }

    /// Validates the stored config again (this replica's rules) and serves
    /// it; a config this replica rejects changes nothing here.
    fn apply_config(&self, yaml: &[u8], revision: i64) {
        if self.shared.config_revision.load(Ordering::Acquire) == revision {
            return;
        }
        match weft_config::parse(&String::from_utf8_lossy(yaml)) {
            Ok(cfg) => {
                self.registry.set_stored_config(crate::config_file::to_json(&cfg), revision);
                *SharedState::lock(&self.shared.config) =
                    Some(StoredConfig { yaml: String::from_utf8_lossy(yaml).into_owned(), revision });
                self.shared.config_revision.store(revision, Ordering::Release);
                self.metrics.config_reload("applied");
                tracing::info!(revision, "mesh config from etcd applied");
            }
            Err(errs) => {
                self.metrics.config_reload("rejected");
                tracing::error!(revision, "stored mesh config rejected: {errs}; keeping the last good config");
                self.registry.set_config_error(format!("stored config at revision {revision}: {errs}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(n: usize, reason: impl Fn(usize) -> Option<String>) -> LocalAcks {
        LocalAcks {
            generation: 1,
            version: 123_456,
            config_revision: 98_765,
            sidecars: (0..n)
                .map(|i| {
                    let address = format!("10.{}.{}.{}:15006", i / 65536, (i / 256) % 256, i % 256);
                    match reason(i) {
                        Some(r) => (address, 123_455, 123_456, r),
                        None => (address, 123_456, 0, String::new()),
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn an_ack_record_of_10000_sidecars_stays_far_below_etcds_request_limit() {
        // Every tenth one rejecting, each with its own long reason: at most
        // MAX_REASONS reasons are kept, each cut.
        let local = acks(10_000, |i| (i % 10 == 0).then(|| format!("route {i}: {}", "x".repeat(2000))));
        let record = AckRecord::from_local(&local, "r1");
        let json = record.to_json();
        assert!(json.len() < 600 * 1024, "{} bytes", json.len());
        let back: AckRecord = serde_json::from_slice(&json).unwrap();
        assert!(!back.truncated);
        assert_eq!((back.version, back.config_revision, back.sidecars.len()), (123_456, 98_765, 10_000));
        assert_eq!(back.reasons.len(), MAX_REASONS + 1);
        assert!(back.reasons.iter().all(|r| r.len() <= MAX_REASON + "…".len()));
        assert_eq!(back.get("10.0.0.1:15006"), Some((123_456, 0, String::new())));
        let (acked, nacked, reason) = back.get("10.0.0.0:15006").unwrap();
        assert_eq!((acked, nacked), (123_455, 123_456));
        assert!(reason.starts_with("route 0: xxx"), "{reason}");
        let (_, _, late) = back.get("10.0.3.232:15006").unwrap();
        assert!(late.contains("weft status` through replica r1"), "{late}");
        assert_eq!(back.get("10.9.9.9:1"), None);
    }

    #[test]
    fn one_reason_shared_by_many_sidecars_is_stored_once() {
        let record = AckRecord::from_local(&acks(100, |_| Some("bad route".into())), "r1");
        assert_eq!(record.reasons, ["bad route"]);
        let json = String::from_utf8(record.to_json()).unwrap();
        assert_eq!(json.matches("bad route").count(), 1, "{json}");
    }

    #[test]
    fn a_record_that_would_not_fit_is_written_without_its_sidecars() {
        let record = AckRecord::from_local(&acks(40_000, |_| None), "r1");
        let json = record.to_json();
        assert!(json.len() < 1024, "{} bytes", json.len());
        let back: AckRecord = serde_json::from_slice(&json).unwrap();
        assert!(back.truncated && back.sidecars.is_empty());
        assert_eq!(back.version, 123_456);
    }
}
