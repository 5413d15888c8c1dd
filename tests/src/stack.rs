//! A whole Switchboard for one test: a private Redis (or Redis Cluster) and the instances
//! of each service the test asks for, in the test's process, each configured from explicit defaults (never the
//! environment). Messaging instance `i` routes the desk with presence instance `i` (modulo
//! how many there are), with the shared service token.

use std::time::Duration;

use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use switchboard_proto::messaging::v1::support_service_client::SupportServiceClient;
use tonic::transport::Channel;

use crate::auth::{Person, first_admin, person};
use crate::instance::{
    AuthOptions, InProcess, MessagingOptions, auth_client, spawn_auth_on, spawn_messaging_on,
    spawn_presence_on,
};
use crate::redis::{Backing, RedisCluster, RedisServer};

/// What to start.
#[derive(Clone)]
pub struct StackOptions {
    /// Whether Redis keeps an append-only file, so a test can stop and start it without
    /// losing data.
    pub durable_redis: bool,
    /// A Redis Cluster (three masters, three replicas) instead of one Redis.
    pub cluster: bool,
    /// Auth's settings. `admin` here creates the first admin.
    pub auth: AuthOptions,
    /// Auth instances (at least one).
    pub auth_instances: usize,
    /// Presence instances.
    pub presence: usize,
    /// A presence session's TTL, the sweep interval and the reconnect grace.
    pub presence_timing: (Duration, Duration, Duration),
    /// Messaging instances.
    pub messaging: usize,
    /// Their settings (`presence` is filled in per instance when there is presence).
    pub messaging_options: MessagingOptions,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            durable_redis: false,
            cluster: false,
            auth: AuthOptions::default(),
            auth_instances: 1,
            presence: 0,
            presence_timing: (
                Duration::from_secs(30),
                Duration::from_millis(500),
                Duration::ZERO,
            ),
            messaging: 2,
            messaging_options: MessagingOptions::default(),
        }
    }
}

/// The running stack; everything stops when it is dropped.
pub struct Stack {
    /// The private Redis, or Redis Cluster.
    pub redis: Backing,
    /// Auth instances; the others verify tokens with the first.
    pub auth: Vec<InProcess>,
    /// Presence instances.
    pub presence: Vec<InProcess>,
    /// Messaging instances.
    pub messaging: Vec<InProcess>,
    /// The first admin, logged in, when [`StackOptions::auth`] named one.
    pub admin: Option<Person>,
}

impl Stack {
    /// Starts it (panics with the cause if a part cannot start: a test cannot go on then).
    pub async fn start(options: StackOptions) -> Self {
        let redis = if options.cluster {
            Backing::Cluster(RedisCluster::spawn().expect("redis cluster"))
        } else {
            Backing::One(RedisServer::spawn_with(options.durable_redis).expect("redis"))
        };
        let mut auth = Vec::new();
        for _ in 0..options.auth_instances.max(1) {
            auth.push(
                spawn_auth_on(redis.engine(), options.auth.clone())
                    .await
                    .expect("auth"),
            );
        }
        let verifier = auth[0].addr;
        let mut presence = Vec::new();
        let (ttl, sweep, grace) = options.presence_timing;
        for _ in 0..options.presence {
            presence.push(
                spawn_presence_on(redis.engine(), verifier, (ttl, sweep, grace), |_| {})
                    .await
                    .expect("presence"),
            );
        }
        let mut messaging = Vec::new();
        for i in 0..options.messaging {
            let mut o = options.messaging_options.clone();
            if !presence.is_empty() {
                o.presence = Some(presence[i % presence.len()].addr);
            }
            messaging.push(
                spawn_messaging_on(redis.engine(), verifier, o)
                    .await
                    .expect("messaging"),
            );
        }
        let admin = match &options.auth.admin {
            Some((name, password)) => {
                Some(first_admin(&auth_client(&auth[0]), name, password).await)
            }
            None => None,
        };
        Self {
            redis,
            auth,
            presence,
            messaging,
            admin,
        }
    }

    /// A new user with `role` (the admin grants roles other than customer), logged in.
    pub async fn person(&self, name: &str, role: auth_pb::Role) -> Person {
        person(&self.accounts(0), name, role, self.admin.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// `AuthService` on auth instance `i` (modulo their number).
    pub fn accounts(&self, i: usize) -> AuthServiceClient<Channel> {
        auth_client(&self.auth[i % self.auth.len()])
    }

    /// `SupportService` on messaging instance `i` (modulo their number).
    pub fn support(&self, i: usize) -> SupportServiceClient<Channel> {
        SupportServiceClient::new(self.messaging[i % self.messaging.len()].channel())
    }

    /// `MessagingService` on messaging instance `i` (modulo their number).
    pub fn chat(&self, i: usize) -> MessagingServiceClient<Channel> {
        MessagingServiceClient::new(self.messaging[i % self.messaging.len()].channel())
    }
}
