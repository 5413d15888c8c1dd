//! The gRPC adapter: wire types in, validated calls into [`Auth`], wire types out.

use std::sync::Arc;

use switchboard_common::token::{Caller, Role};
use switchboard_proto::auth::v1 as pb;
use switchboard_proto::auth::v1::auth_service_server::AuthService;
use tonic::{Request, Response, Status};

use crate::account::UserRecord;
use crate::domain::{Auth, Tokens};
use crate::store::AuthStore;

/// Methods that need no access token.
pub const PUBLIC_METHODS: &[&str] = &[
    "/switchboard.auth.v1.AuthService/Register",
    "/switchboard.auth.v1.AuthService/Login",
    "/switchboard.auth.v1.AuthService/Refresh",
    "/switchboard.auth.v1.AuthService/GetJwks",
    "/switchboard.auth.v1.AuthService/StartGuestSession",
];

/// `switchboard.auth.v1.AuthService` over an [`Auth`].
pub struct AuthGrpc<S> {
    auth: Arc<Auth<S>>,
}

impl<S> AuthGrpc<S> {
    /// Serves `auth`.
    pub fn new(auth: Arc<Auth<S>>) -> Self {
        Self { auth }
    }
}

/// The verified caller the auth layer put into the request.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    Ok(switchboard_common::server::caller(req)?)
}

fn timestamp_secs(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    }
}

fn user(u: &UserRecord) -> pb::User {
    pb::User {
        id: u.id.clone(),
        username: u.username.clone(),
        display_name: u.display_name.clone(),
        role: u.role.to_proto(),
        created_at: Some(prost_types::Timestamp {
            seconds: (u.created_at_ms / 1000) as i64,
            nanos: ((u.created_at_ms % 1000) * 1_000_000) as i32,
        }),
    }
}

fn tokens(t: Tokens) -> pb::TokenPair {
    pb::TokenPair {
        access_token: t.access_token,
        access_token_expires_at: Some(timestamp_secs(t.access_expires_at)),
        refresh_token: t.refresh_token,
        refresh_token_expires_at: Some(timestamp_secs(t.refresh_expires_at)),
        session_id: t.session_id,
    }
}

use switchboard_proto::prost_types;

#[tonic::async_trait]
impl<S: AuthStore> AuthService for AuthGrpc<S> {
    #[tracing::instrument(skip_all)]
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let u = self
            .auth
            .register(&r.username, &r.password, &r.display_name, peer)
            .await?;
        tracing::info!(user_id = %u.id, "registered");
        Ok(Response::new(pb::RegisterResponse {
            user: Some(user(&u)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let outcome = self.auth.login(&r.username, &r.password, peer).await;
        let result = match &outcome {
            Ok(_) => "success",
            Err(crate::error::Error::RateLimited { .. }) => "limited",
            Err(crate::error::Error::BadCredentials) => "failure",
            Err(_) => "error",
        };
        metrics::counter!(switchboard_common::metrics::LOGINS, "result" => result).increment(1);
        let (t, u) = outcome?;
        tracing::info!(user_id = %u.id, session_id = %t.session_id, "logged in");
        Ok(Response::new(pb::LoginResponse {
            tokens: Some(tokens(t)),
            user: Some(user(&u)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn start_guest_session(
        &self,
        req: Request<pb::StartGuestSessionRequest>,
    ) -> Result<Response<pb::StartGuestSessionResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let (t, u) = self.auth.start_guest(&r.display_name, peer).await?;
        tracing::info!(user_id = %u.id, session_id = %t.session_id, "guest session started");
        Ok(Response::new(pb::StartGuestSessionResponse {
            tokens: Some(tokens(t)),
            user: Some(user(&u)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn upgrade_guest(
        &self,
        req: Request<pb::UpgradeGuestRequest>,
    ) -> Result<Response<pb::UpgradeGuestResponse>, Status> {
        let c = caller(&req)?;
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let (t, u) = self
            .auth
            .upgrade_guest(&c, &r.username, &r.password, &r.display_name, peer)
            .await?;
        tracing::info!(user_id = %u.id, session_id = %t.session_id, "guest upgraded to an account");
        Ok(Response::new(pb::UpgradeGuestResponse {
            tokens: Some(tokens(t)),
            user: Some(user(&u)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn refresh(
        &self,
        req: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let t = self.auth.refresh(&req.into_inner().refresh_token).await?;
        Ok(Response::new(pb::RefreshResponse {
            tokens: Some(tokens(t)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn logout(
        &self,
        req: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let c = caller(&req)?;
        self.auth.logout(&c).await?;
        tracing::info!(user_id = %c.user_id, session_id = %c.session_id, "logged out");
        Ok(Response::new(pb::LogoutResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn get_jwks(
        &self,
        _req: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let keys = self.auth.jwks().await?;
        Ok(Response::new(pb::GetJwksResponse {
            keys: keys
                .into_iter()
                .map(|k| pb::Jwk {
                    kid: k.kid,
                    kty: "OKP".into(),
                    crv: "Ed25519".into(),
                    alg: "EdDSA".into(),
                    x: k.x,
                    r#use: "sig".into(),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let c = caller(&req)?;
        let u = self.auth.whoami(&c).await?;
        Ok(Response::new(pb::WhoAmIResponse {
            user: Some(user(&u)),
            session_id: c.session_id,
            access_token_expires_at: Some(timestamp_secs(c.expires_at)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_users(
        &self,
        req: Request<pb::GetUsersRequest>,
    ) -> Result<Response<pb::GetUsersResponse>, Status> {
        let r = req.into_inner();
        let found = self.auth.users(&r.user_ids, &r.usernames).await?;
        Ok(Response::new(pb::GetUsersResponse {
            users: found.users.iter().map(user).collect(),
            missing_ids: found.missing_ids,
            missing_usernames: found.missing_usernames,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn set_role(
        &self,
        req: Request<pb::SetRoleRequest>,
    ) -> Result<Response<pb::SetRoleResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let u = self
            .auth
            .set_role(&c, &r.user_id, Role::from_proto(r.role))
            .await?;
        tracing::info!(admin = %c.user_id, user_id = %u.id, role = u.role.as_str(), "role changed");
        Ok(Response::new(pb::SetRoleResponse {
            user: Some(user(&u)),
        }))
    }
}
