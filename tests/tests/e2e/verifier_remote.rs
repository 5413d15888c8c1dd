//! The token verifier as presence and messaging use it: keys fetched from auth over gRPC
//! (`GetJwks`), revocations followed over Redis, in a process that is not auth.

use std::sync::Arc;
use std::time::Duration;

use switchboard_common::shutdown::CancellationToken;
use switchboard_common::token::{GrpcKeySource, Role, TokenError, Verifier};
use switchboard_proto::auth::v1 as pb;
use switchboard_tests::auth::{redis_revocation_follower, register_and_login};
use switchboard_tests::instance::{AuthOptions, InProcess, auth_client, channel, spawn_auth};
use switchboard_tests::redis::RedisServer;
use tonic::Request;

async fn login(auth: &InProcess, name: &str) -> pb::TokenPair {
    register_and_login(&mut auth_client(auth), name)
        .await
        .expect("register and login")
}

#[tokio::test]
async fn a_remote_verifier_fetches_keys_from_auth_and_follows_logouts() {
    let redis = RedisServer::spawn().expect("redis");
    let auth_a = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth a");
    let auth_b = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth b");

    // "Another service": its own Redis connections, keys from auth A over gRPC.
    let shutdown = CancellationToken::new();
    let list = redis_revocation_follower(&redis.url(), &shutdown).await;
    let verifier = Verifier::new(Arc::new(GrpcKeySource::new(channel(auth_a.addr))), list);

    // A token signed by B's key: the verifier has never seen it and fetches the set from A.
    let tokens = login(&auth_b, "lena").await;
    let caller = verifier
        .verify(&tokens.access_token)
        .await
        .expect("verified with fetched keys");
    assert_eq!(caller.role, Role::Customer);
    assert_eq!(caller.session_id, tokens.session_id);

    // Logout on B reaches this process within 2 s.
    let mut logout = Request::new(pb::LogoutRequest {});
    logout.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", tokens.access_token)
            .parse()
            .expect("ascii"),
    );
    auth_client(&auth_b).logout(logout).await.expect("logout");
    let revoked = switchboard_tests::eventually(Duration::from_secs(2), || async {
        (verifier.verify(&tokens.access_token).await == Err(TokenError::Revoked)).then_some(())
    })
    .await;
    assert!(
        revoked.is_some(),
        "logout did not reach the remote verifier within 2 s"
    );

    // With auth gone, a token with an unknown key is UNAVAILABLE (retriable), not accepted.
    let auth_c = spawn_auth(Some(&redis), AuthOptions::default())
        .await
        .expect("auth c");
    let other = login(&auth_c, "mona").await;
    auth_a.stop().await.expect("stop a");
    tokio::time::sleep(switchboard_common::token::REFETCH_INTERVAL).await;
    let err = verifier
        .verify(&other.access_token)
        .await
        .expect_err("unknown key accepted without auth");
    assert_eq!(err, TokenError::KeysUnavailable);
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    shutdown.cancel();
}
