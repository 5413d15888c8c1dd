//! Helpers for talking to auth in tests: attaching tokens, registering and logging in.

use std::sync::Arc;

use switchboard_common::bus::RedisBus;
use switchboard_common::redis_conn;
use switchboard_common::revocation::{RedisRevocations, RevocationList, follow};
use switchboard_common::shutdown::CancellationToken;
use switchboard_proto::auth::v1 as pb;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// `msg` with `authorization: Bearer <token>`.
pub fn authed<T>(msg: T, token: &str) -> Request<T> {
    with_authorization(msg, &format!("Bearer {token}"))
}

/// `msg` with a raw `authorization` value (for malformed-header tests).
pub fn with_authorization<T>(msg: T, value: &str) -> Request<T> {
    let mut req = Request::new(msg);
    let value = value
        .parse()
        .unwrap_or_else(|e| panic!("authorization value {value:?} is not ASCII: {e}"));
    req.metadata_mut().insert("authorization", value);
    req
}

/// Registers `name` (display name = username).
pub async fn register(
    c: &mut AuthServiceClient<Channel>,
    name: &str,
    password: &str,
) -> Result<pb::User, Status> {
    let req = pb::RegisterRequest {
        username: name.into(),
        password: password.into(),
        display_name: String::new(),
    };
    Ok(c.register(req).await?.into_inner().user.unwrap_or_default())
}

/// Logs in; the token pair.
pub async fn login(
    c: &mut AuthServiceClient<Channel>,
    name: &str,
    password: &str,
) -> Result<pb::TokenPair, Status> {
    let req = pb::LoginRequest {
        username: name.into(),
        password: password.into(),
    };
    Ok(c.login(req).await?.into_inner().tokens.unwrap_or_default())
}

/// Registers `name` with a fixed password and logs in.
pub async fn register_and_login(
    c: &mut AuthServiceClient<Channel>,
    name: &str,
) -> Result<pb::TokenPair, Status> {
    register(c, name, "right password").await?;
    login(c, name, "right password").await
}

/// What another service's process holds: its own bus and a revocation list following Redis.
pub async fn redis_revocation_follower(
    redis_url: &str,
    shutdown: &CancellationToken,
) -> Arc<RevocationList> {
    let client =
        redis::Client::open(redis_url).unwrap_or_else(|e| panic!("bad redis url {redis_url}: {e}"));
    let conn = redis_conn::node(&client).unwrap_or_else(|e| panic!("redis manager: {e}"));
    let list = Arc::new(RevocationList::default());
    let bus = RedisBus::start(client, conn.clone(), shutdown.clone());
    follow(
        list.clone(),
        Arc::new(bus),
        Arc::new(RedisRevocations::new(conn)),
        shutdown.clone(),
    )
    .await;
    list
}

/// A registered, logged-in user.
#[derive(Debug, Clone)]
pub struct Person {
    /// User id.
    pub id: String,
    /// Username.
    pub name: String,
    /// Access token (carrying the role the user had at login).
    pub token: String,
}

/// Logs in the configured first admin, waiting for auth to create it.
pub async fn first_admin(c: &AuthServiceClient<Channel>, name: &str, password: &str) -> Person {
    let tokens = crate::eventually(std::time::Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { login(&mut c, name, password).await.ok() }
    })
    .await
    .unwrap_or_else(|| panic!("first admin {name} never could log in"));
    let me = c
        .clone()
        .who_am_i(authed(pb::WhoAmIRequest {}, &tokens.access_token))
        .await
        .unwrap_or_else(|e| panic!("whoami of the admin: {e}"))
        .into_inner()
        .user
        .unwrap_or_default();
    Person {
        id: me.id,
        name: name.into(),
        token: tokens.access_token,
    }
}

/// Registers `name`, gives it `role` with `admin`'s token (unless CUSTOMER), then logs in,
/// so the token carries the role.
pub async fn person(
    c: &AuthServiceClient<Channel>,
    name: &str,
    role: pb::Role,
    admin: Option<&Person>,
) -> Result<Person, Status> {
    let mut c = c.clone();
    let user = register(&mut c, name, "right password").await?;
    if role != pb::Role::Customer {
        let admin = admin.ok_or_else(|| Status::failed_precondition("roles need an admin"))?;
        c.set_role(authed(
            pb::SetRoleRequest {
                user_id: user.id.clone(),
                role: role as i32,
            },
            &admin.token,
        ))
        .await?;
    }
    let tokens = login(&mut c, name, "right password").await?;
    Ok(Person {
        id: user.id,
        name: name.into(),
        token: tokens.access_token,
    })
}

/// A guest: a session from StartGuestSession shown to others as `display_name`.
pub async fn guest(c: &AuthServiceClient<Channel>, display_name: &str) -> Result<Person, Status> {
    let reply = c
        .clone()
        .start_guest_session(pb::StartGuestSessionRequest {
            display_name: display_name.into(),
        })
        .await?
        .into_inner();
    let user = reply
        .user
        .ok_or_else(|| Status::internal("no user in the reply"))?;
    let tokens = reply
        .tokens
        .ok_or_else(|| Status::internal("no tokens in the reply"))?;
    Ok(Person {
        id: user.id,
        name: user.username,
        token: tokens.access_token,
    })
}
