//! A small etcd v3 client over the generated stubs in `mesh_proto::etcd`: key-value reads and
//! writes, transactions, leases kept alive, watches that resume where they stopped, and the
//! election API.
//!
//! Members: one lazily connected channel per `--etcd-endpoints` URL (`http://` or `https://`,
//! TLS through the same rustls dialer as the rest of the mesh). A call goes to the member that
//! answered last; a member that cannot be reached is skipped for the next one. Only reads and
//! requests that never reached a member move on: a write that timed out may have been applied,
//! so it is reported, not repeated.
//!
//! Auth: with a user and password, a token from `Auth.Authenticate` rides on every call (the
//! `token` metadata etcd expects) and is fetched again when etcd says it expired.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::{
    dial::Dialer,
    etcd::{
        etcdserverpb::{
            self as pb, auth_client::AuthClient, kv_client::KvClient, lease_client::LeaseClient,
            maintenance_client::MaintenanceClient, watch_client::WatchClient,
        },
        mvccpb::{self, KeyValue},
        v3electionpb::{self as election, election_client::ElectionClient},
    },
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status, transport::Channel};

/// What went wrong talking to etcd, in words an operator can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd endpoint {0:?} is not valid: {1}")]
    Endpoint(String, String),
    #[error("no etcd member answered ({0}): are the --etcd-endpoints up?")]
    Unreachable(String),
    #[error(
        "etcd did not answer {what} within {timeout:?}: is a majority of its members up? (a write \
         may or may not have been applied)"
    )]
    Timeout { what: String, timeout: Duration },
    #[error("etcd refused {what}: {message}")]
    Refused { what: String, message: String },
}

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Trusted roots (PEM) for `https://` endpoints, and a client certificate (chain, key PEM).
    pub ca_pem: Option<String>,
    pub client_cert: Option<(String, String)>,
    /// etcd's auth: a user and password.
    pub user: Option<(String, String)>,
    /// Every unary call's deadline.
    pub timeout: Duration,
}

struct Inner {
    members: Vec<(String, Channel)>,
    /// The member that answered last.
    current: AtomicUsize,
    user: Option<(String, String)>,
    token: Mutex<Option<String>>,
    timeout: Duration,
}

/// A handle to the etcd cluster; cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

/// The key range `[prefix, prefix+1)`: every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// What a followed prefix did: its whole content (at the start, and again whenever the watch
/// lost its place) or the changes since.
#[derive(Debug)]
pub enum Update {
    Snapshot { kvs: Vec<KeyValue>, revision: i64 },
    Events { events: Vec<mvccpb::Event>, revision: i64 },
}

impl Etcd {
    /// Channels to every member (connected on first use), and a token when a user is given.
    /// Fails only on a malformed endpoint or a refused login; an unreachable cluster shows on
    /// the first call.
    pub async fn connect(opts: EtcdOptions) -> Result<Etcd, EtcdError> {
        if opts.endpoints.is_empty() {
            return Err(EtcdError::Endpoint(String::new(), "give at least one --etcd-endpoints URL".into()));
        }
        let dialer = match &opts.ca_pem {
            Some(ca) => {
                let client = opts.client_cert.as_ref().map(|(c, k)| (c.as_str(), k.as_str()));
                let config = Arc::new(
                    mesh_proto::dial::client_config(ca, client)
                        .map_err(|e| EtcdError::Endpoint("TLS".into(), e.to_string()))?,
                );
                Dialer::tls(Arc::new(move || Ok(config.clone())))
            }
            None => Dialer::plaintext(),
        };
        let mut members = Vec::new();
        for url in &opts.endpoints {
            let endpoint = Dialer::endpoint(url)
                .map_err(|e| EtcdError::Endpoint(url.clone(), e.to_string()))?
                .connect_timeout(opts.timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            let channel =
                dialer.connect_lazy(endpoint).map_err(|e| EtcdError::Endpoint(url.clone(), e.to_string()))?;
            members.push((url.clone(), channel));
        }
        let etcd = Etcd {
            inner: Arc::new(Inner {
                members,
                current: AtomicUsize::new(0),
                user: opts.user,
                token: Mutex::new(None),
                timeout: opts.timeout,
            }),
        };
        if etcd.inner.user.is_some() {
            etcd.authenticate().await?;
        }
        Ok(etcd)
    }

    async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some((name, password)) = self.inner.user.clone() else { return Ok(()) };
        let token = self
            .call("authenticate", false, move |ch, _| {
                let (name, password) = (name.clone(), password.clone());
                async move {
                    AuthClient::new(ch).authenticate(pb::AuthenticateRequest { name, password }).await
                }
            })
            .await?
            .token;
        *self.inner.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
        Ok(())
    }

    /// `msg` as a request with the auth token (if any).
    fn request<T>(token: &Option<String>, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(t) = token
            && let Ok(v) = t.parse()
        {
            req.metadata_mut().insert("token", v);
        }
        req
    }

    fn token(&self) -> Option<String> {
        self.inner.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` against the current member, moving on to the next on a connection failure (and,
    /// when `idempotent`, also on a timeout); logs in again once if the token expired.
    async fn call<T, F, Fut>(&self, what: &str, idempotent: bool, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel, Option<String>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.inner.members.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut relogged = false;
        let mut failures = Vec::new();
        let mut attempt = 0;
        while attempt < n {
            let i = (start + attempt) % n;
            let (url, channel) = &self.inner.members[i];
            match tokio::time::timeout(self.inner.timeout, f(channel.clone(), self.token())).await {
                Ok(Ok(answer)) => {
                    self.inner.current.store(i, Ordering::Relaxed);
                    return Ok(answer.into_inner());
                }
                Ok(Err(s)) if unreachable(&s) => failures.push(format!("{url}: {}", s.message())),
                Ok(Err(s))
                    if s.code() == Code::Unauthenticated
                        && self.inner.user.is_some()
                        && !relogged
                        && what != "authenticate" =>
                {
                    relogged = true;
                    Box::pin(self.authenticate()).await?;
                    continue;
                }
                Ok(Err(s)) => {
                    return Err(EtcdError::Refused { what: what.into(), message: s.message().to_string() });
                }
                Err(_) if idempotent => failures.push(format!("{url}: timed out")),
                Err(_) => return Err(EtcdError::Timeout { what: what.into(), timeout: self.inner.timeout }),
            }
            attempt += 1;
        }
        Err(EtcdError::Unreachable(failures.join("; ")))
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let key = prefix.as_bytes().to_vec();
        let range_end = prefix_end(&key);
        let r = self
            .call("a read", true, |ch, t| {
                let req =
                    pb::RangeRequest { key: key.clone(), range_end: range_end.clone(), ..Default::default() };
                async move { KvClient::new(ch).range(Self::request(&t, req)).await }
            })
            .await?;
        Ok((r.kvs, r.header.map_or(0, |h| h.revision)))
    }

    /// One key, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let key = key.as_bytes().to_vec();
        let r = self
            .call("a read", true, |ch, t| {
                let req = pb::RangeRequest { key: key.clone(), ..Default::default() };
                async move { KvClient::new(ch).range(Self::request(&t, req)).await }
            })
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Writes `key` (under `lease`, 0 for none); the revision it was written at.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64, EtcdError> {
        let key = key.as_bytes().to_vec();
        let r = self
            .call("a write", false, |ch, t| {
                let req = pb::PutRequest { key: key.clone(), value: value.clone(), lease, prev_kv: false };
                async move { KvClient::new(ch).put(Self::request(&t, req)).await }
            })
            .await?;
        Ok(r.header.map_or(0, |h| h.revision))
    }

    /// Deletes `key`; the revision of the deletion (the store's revision if it did not exist).
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let key = key.as_bytes().to_vec();
        let r = self
            .call("a delete", false, |ch, t| {
                let req = pb::DeleteRangeRequest { key: key.clone(), ..Default::default() };
                async move { KvClient::new(ch).delete_range(Self::request(&t, req)).await }
            })
            .await?;
        Ok(r.header.map_or(0, |h| h.revision))
    }

    /// A transaction: whether its comparisons held, and the revision after it.
    pub async fn txn(&self, txn: pb::TxnRequest) -> Result<(bool, i64), EtcdError> {
        let r = self
            .call("a transaction", false, |ch, t| {
                let req = txn.clone();
                async move { KvClient::new(ch).txn(Self::request(&t, req)).await }
            })
            .await?;
        Ok((r.succeeded, r.header.map_or(0, |h| h.revision)))
    }

    /// Writes `key` only if its version (how often it was written since it was created) is
    /// `version` (0: only if it does not exist). `Ok(None)`: it had moved on.
    pub async fn put_if(&self, key: &str, value: Vec<u8>, version: i64) -> Result<Option<i64>, EtcdError> {
        let compare = pb::Compare {
            result: pb::compare::CompareResult::Equal.into(),
            target: pb::compare::CompareTarget::Version.into(),
            key: key.as_bytes().to_vec(),
            target_union: Some(pb::compare::TargetUnion::Version(version)),
        };
        self.put_when(key, value, compare).await
    }

    /// Writes `key`; the key's version before (0 if it did not exist).
    pub async fn put_versioned(&self, key: &str, value: Vec<u8>) -> Result<i64, EtcdError> {
        let key = key.as_bytes().to_vec();
        let r = self
            .call("a write", false, |ch, t| {
                let req = pb::PutRequest { key: key.clone(), value: value.clone(), lease: 0, prev_kv: true };
                async move { KvClient::new(ch).put(Self::request(&t, req)).await }
            })
            .await?;
        Ok(r.prev_kv.map_or(0, |kv| kv.version))
    }

    /// Writes `key` only if it exists (a record deleted meanwhile stays deleted). `Ok(None)`:
    /// it did not exist.
    pub async fn put_if_exists(&self, key: &str, value: Vec<u8>) -> Result<Option<i64>, EtcdError> {
        let compare = pb::Compare {
            result: pb::compare::CompareResult::Greater.into(),
            target: pb::compare::CompareTarget::Version.into(),
            key: key.as_bytes().to_vec(),
            target_union: Some(pb::compare::TargetUnion::Version(0)),
        };
        self.put_when(key, value, compare).await
    }

    async fn put_when(
        &self,
        key: &str,
        value: Vec<u8>,
        compare: pb::Compare,
    ) -> Result<Option<i64>, EtcdError> {
        let put = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                ..Default::default()
            })),
        };
        let (ok, rev) =
            self.txn(pb::TxnRequest { compare: vec![compare], success: vec![put], failure: vec![] }).await?;
        Ok(ok.then_some(rev))
    }

    /// Drops the history before `revision` (watches that start earlier read everything again).
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        self.call("a compaction", false, |ch, t| {
            let req = pb::CompactionRequest { revision, physical: false };
            async move { KvClient::new(ch).compact(Self::request(&t, req)).await }
        })
        .await?;
        Ok(())
    }

    /// A lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let ttl = ttl.as_secs().max(1) as i64;
        let r = self
            .call("a lease grant", false, |ch, t| {
                let req = pb::LeaseGrantRequest { ttl, id: 0 };
                async move { LeaseClient::new(ch).lease_grant(Self::request(&t, req)).await }
            })
            .await?;
        if !r.error.is_empty() {
            return Err(EtcdError::Refused { what: "a lease grant".into(), message: r.error });
        }
        Ok(r.id)
    }

    /// Revokes a lease (its keys go with it).
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("a lease revoke", false, |ch, t| {
            let req = pb::LeaseRevokeRequest { id: lease };
            async move { LeaseClient::new(ch).lease_revoke(Self::request(&t, req)).await }
        })
        .await?;
        Ok(())
    }

    /// The member streams go to: the one that answered last (index, URL, channel).
    fn member(&self) -> (usize, String, Channel) {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.members.len();
        let (url, channel) = &self.inner.members[i];
        (i, url.clone(), channel.clone())
    }

    /// Member `i` failed a stream: the next one gets the next attempt.
    fn skip(&self, i: usize) {
        self.inner.current.store((i + 1) % self.inner.members.len(), Ordering::Relaxed);
    }

    /// Keeps `lease` alive every `interval` until `stop`; returns when etcd says the lease is
    /// gone (expired or revoked) or `stop` fires. Connection failures are retried.
    pub async fn keep_alive(
        &self,
        lease: i64,
        interval: Duration,
        stop: CancellationToken,
    ) -> Result<(), EtcdError> {
        loop {
            let (tx, rx) = mpsc::channel(1);
            // etcd answers the call only once it has a request: the first goes in before.
            let _ = tx.try_send(pb::LeaseKeepAliveRequest { id: lease });
            let t = self.token();
            let (i, _, channel) = self.member();
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let mut client = LeaseClient::new(channel);
            let opened = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = client.lease_keep_alive(Self::request(&t, stream)) => r,
            };
            let mut answers = match opened {
                Ok(r) => r.into_inner(),
                Err(_) => {
                    self.skip(i);
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(interval / 2) => continue,
                    }
                }
            };
            let mut first = true;
            loop {
                if !std::mem::take(&mut first)
                    && tx.send(pb::LeaseKeepAliveRequest { id: lease }).await.is_err()
                {
                    break;
                }
                let answer = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    a = tokio::time::timeout(self.inner.timeout, answers.message()) => a,
                };
                match answer {
                    Ok(Ok(Some(a))) if a.ttl <= 0 => {
                        return Err(EtcdError::Refused {
                            what: "a lease keep-alive".into(),
                            message: "the lease expired".into(),
                        });
                    }
                    Ok(Ok(Some(_))) => {}
                    _ => break, // reconnect
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            self.skip(i);
        }
    }

    /// Follows every key under `prefix`: a snapshot first, then changes; after a broken watch it
    /// resumes from the next revision (or sends a fresh snapshot if etcd compacted past it).
    /// Ends when `stop` fires or the receiver is dropped.
    pub fn follow(&self, prefix: &str, stop: CancellationToken) -> mpsc::Receiver<Update> {
        let (tx, rx) = mpsc::channel(64);
        let etcd = self.clone();
        let prefix = prefix.to_string();
        mesh_runtime::spawn(tracing::info_span!("etcd_follow", %prefix), async move {
            let mut next: Option<i64> = None;
            while !stop.is_cancelled() {
                let from = match next {
                    Some(rev) => rev,
                    None => match etcd.range_prefix(&prefix).await {
                        Ok((kvs, revision)) => {
                            if tx.send(Update::Snapshot { kvs, revision }).await.is_err() {
                                return;
                            }
                            revision + 1
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read from etcd; retrying");
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                            }
                        }
                    },
                };
                next = etcd.watch_from(&prefix, from, &tx, &stop).await;
                if next.is_some() {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        });
        rx
    }

    /// Watches `prefix` from revision `from`, sending its events; returns the revision to resume
    /// from, or `None` when a new snapshot is needed (compacted, or the receiver is gone).
    async fn watch_from(
        &self,
        prefix: &str,
        from: i64,
        tx: &mpsc::Sender<Update>,
        stop: &CancellationToken,
    ) -> Option<i64> {
        let (req_tx, req_rx) = mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision: from,
                progress_notify: true,
                ..Default::default()
            })),
        };
        req_tx.try_send(create).ok()?;
        let (i, url, channel) = self.member();
        let stream = tokio_stream::wrappers::ReceiverStream::new(req_rx);
        let mut client = WatchClient::new(channel);
        let opened = tokio::select! {
            _ = stop.cancelled() => return Some(from),
            r = client.watch(Self::request(&self.token(), stream)) => r,
        };
        let mut answers = match opened {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(member = %url, error = %e.message(), "etcd watch failed; trying the next member");
                self.skip(i);
                return Some(from);
            }
        };
        let mut next = from;
        loop {
            let answer = tokio::select! {
                _ = stop.cancelled() => return Some(next),
                a = answers.message() => a,
            };
            match answer {
                Ok(Some(w)) if w.compact_revision > 0 => {
                    tracing::warn!(
                        compacted = w.compact_revision,
                        "etcd compacted past our watch; reading everything again"
                    );
                    return None;
                }
                Ok(Some(w)) if w.canceled => {
                    tracing::warn!(reason = %w.cancel_reason, "etcd canceled our watch; reading everything again");
                    return None;
                }
                Ok(Some(w)) => {
                    let revision = w.header.map_or(0, |h| h.revision);
                    if w.events.is_empty() {
                        continue; // created, or a progress notification
                    }
                    next = w
                        .events
                        .iter()
                        .filter_map(|e| e.kv.as_ref())
                        .map(|kv| kv.mod_revision)
                        .max()
                        .unwrap_or(revision)
                        + 1;
                    if tx.send(Update::Events { events: w.events, revision }).await.is_err() {
                        return None;
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(member = %url, "etcd watch broke; resuming on the next member");
                    self.skip(i);
                    return Some(next);
                }
            }
        }
    }

    /// Campaigns for `name` with `lease` until elected (or `stop`): the leader key to resign with.
    pub async fn campaign(
        &self,
        name: &str,
        lease: i64,
        value: &str,
        stop: &CancellationToken,
    ) -> Option<election::LeaderKey> {
        loop {
            let (i, _, channel) = self.member();
            let req = election::CampaignRequest {
                name: name.as_bytes().to_vec(),
                lease,
                value: value.as_bytes().to_vec(),
            };
            let mut client = ElectionClient::new(channel);
            let answer = tokio::select! {
                _ = stop.cancelled() => return None,
                a = client.campaign(Self::request(&self.token(), req)) => a,
            };
            match answer {
                Ok(r) => return r.into_inner().leader,
                Err(e) => {
                    tracing::warn!(error = %e.message(), "election campaign failed; trying again");
                    self.skip(i);
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    /// Who leads `name` now (the value it campaigned with).
    pub async fn leader(&self, name: &str) -> Result<Option<String>, EtcdError> {
        let name = name.as_bytes().to_vec();
        let r = self
            .call("a leader lookup", true, |ch, t| {
                let req = election::LeaderRequest { name: name.clone() };
                async move { ElectionClient::new(ch).leader(Self::request(&t, req)).await }
            })
            .await;
        match r {
            Ok(r) => Ok(r.kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned())),
            Err(EtcdError::Refused { message, .. }) if message.contains("no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Gives up leadership.
    pub async fn resign(&self, leader: election::LeaderKey) -> Result<(), EtcdError> {
        self.call("a resignation", false, |ch, t| {
            let req = election::ResignRequest { leader: Some(leader.clone()) };
            async move { ElectionClient::new(ch).resign(Self::request(&t, req)).await }
        })
        .await?;
        Ok(())
    }

    /// The version of the member that answers (a health check).
    pub async fn status(&self) -> Result<String, EtcdError> {
        let r = self
            .call("a status check", true, |ch, t| async move {
                MaintenanceClient::new(ch).status(Self::request(&t, pb::StatusRequest {})).await
            })
            .await?;
        Ok(r.version)
    }
}

/// Whether a call failed before any member took it (so another member may be tried).
fn unreachable(s: &Status) -> bool {
    s.code() == Code::Unavailable || (s.code() == Code::Unknown && s.message().contains("transport"))
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_range_ends_past_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/mesh/"), b"/mesh0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
