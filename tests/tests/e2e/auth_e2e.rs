//! Auth end to end: two auth instances on one real Redis, over real gRPC.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use switchboard_auth::signing::{Keyring, generate_pem};
use switchboard_common::token::{Role, now_secs};
use switchboard_proto::auth::v1 as pb;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use switchboard_tests::auth::{authed, login, register, with_authorization};
use switchboard_tests::instance::AuthOptions;
use switchboard_tests::stack::{Stack, StackOptions};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Two auth instances on one Redis.
async fn pair(options: AuthOptions) -> Stack {
    Stack::start(StackOptions {
        auth: options,
        auth_instances: 2,
        messaging: 0,
        ..Default::default()
    })
    .await
}

async fn whoami(
    c: &mut AuthServiceClient<Channel>,
    token: &str,
) -> Result<pb::WhoAmIResponse, Status> {
    c.who_am_i(authed(pb::WhoAmIRequest {}, token))
        .await
        .map(|r| r.into_inner())
}

/// Waits up to 2 s (the contract for logout) until `token` is refused by `client`.
async fn refused_within_2s(c: &mut AuthServiceClient<Channel>, token: &str) -> Status {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match whoami(c, token).await {
            Err(s) => return s,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            Ok(_) => panic!("token still accepted 2 s after its session was revoked"),
        }
    }
}

#[tokio::test]
async fn happy_path_across_two_instances_with_per_instance_keys() {
    let pair = pair(AuthOptions::default()).await;
    let (mut a, mut b) = (pair.accounts(0), pair.accounts(1));
    let alice = register(&mut a, "Alice", "correct horse")
        .await
        .expect("register");
    assert_eq!(alice.username, "alice", "usernames are case-folded");
    assert_eq!(alice.role, pb::Role::Customer as i32);

    // Signed by B's own key, verified by A after fetching B's published key.
    let tokens = login(&mut b, "ALICE", "correct horse")
        .await
        .expect("login");
    let me = whoami(&mut a, &tokens.access_token)
        .await
        .expect("whoami on the other instance");
    assert_eq!(me.user.expect("user").id, alice.id);
    assert_eq!(me.session_id, tokens.session_id);

    let jwks = a
        .get_jwks(pb::GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner();
    assert_eq!(
        jwks.keys.len(),
        2,
        "each instance publishes its key: {:?}",
        jwks.keys
    );
    assert!(
        jwks.keys
            .iter()
            .all(|k| k.kty == "OKP" && k.crv == "Ed25519" && k.alg == "EdDSA")
    );

    // Refresh on A, use the new pair on B.
    let next = a
        .refresh(pb::RefreshRequest {
            refresh_token: tokens.refresh_token.clone(),
        })
        .await
        .expect("refresh")
        .into_inner()
        .tokens
        .expect("tokens");
    assert_ne!(next.refresh_token, tokens.refresh_token);
    assert_eq!(next.session_id, tokens.session_id);
    whoami(&mut b, &next.access_token)
        .await
        .expect("refreshed token works on B");

    let bob = register(&mut b, "bob", "another pass")
        .await
        .expect("register");
    let missing = uuid::Uuid::now_v7().to_string();
    let users = a
        .get_users(authed(
            pb::GetUsersRequest {
                user_ids: vec![
                    bob.id.clone(),
                    missing.clone(),
                    alice.id.clone(),
                    bob.id.clone(),
                ],
                ..Default::default()
            },
            &next.access_token,
        ))
        .await
        .expect("get users")
        .into_inner();
    assert_eq!(
        users
            .users
            .iter()
            .map(|u| u.username.as_str())
            .collect::<Vec<_>>(),
        ["bob", "alice"]
    );
    assert_eq!(users.missing_ids, [missing]);

    // By username, as a person types it (folded like at login), on the other instance;
    // names no account could have are missing, not an error; a user asked twice is
    // listed once.
    let by_name = b
        .get_users(authed(
            pb::GetUsersRequest {
                user_ids: vec![alice.id.clone()],
                usernames: vec![
                    " Bob ".into(),
                    "carol".into(),
                    "ALICE".into(),
                    "not a name!".into(),
                    "x".repeat(1_000),
                ],
            },
            &next.access_token,
        ))
        .await
        .expect("get users by name")
        .into_inner();
    assert_eq!(
        by_name
            .users
            .iter()
            .map(|u| u.username.as_str())
            .collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    assert_eq!(
        by_name.missing_usernames,
        ["carol".to_owned(), "not a name!".into(), "x".repeat(1_000)]
    );
}

#[tokio::test]
async fn registration_refuses_bad_input_with_the_field_named() {
    let pair = pair(AuthOptions::default()).await;
    let mut a = pair.accounts(0);
    let cases = [
        ("ab", "long enough", "", Code::InvalidArgument, "username"),
        (
            "has space",
            "long enough",
            "",
            Code::InvalidArgument,
            "username",
        ),
        (
            &"x".repeat(33),
            "long enough",
            "",
            Code::InvalidArgument,
            "username",
        ),
        ("carol", "short", "", Code::InvalidArgument, "password"),
        (
            "carol",
            &"p".repeat(129),
            "",
            Code::InvalidArgument,
            "password",
        ),
        (
            "carol",
            "long enough",
            &"d".repeat(65),
            Code::InvalidArgument,
            "display_name",
        ),
    ];
    for (username, password, display, code, field) in cases {
        let err = a
            .register(pb::RegisterRequest {
                username: username.into(),
                password: password.into(),
                display_name: display.into(),
            })
            .await
            .expect_err("bad input accepted");
        assert_eq!(err.code(), code, "{username:?}/{password:?}: {err:?}");
        assert!(
            err.message().contains(field),
            "message {:?} does not name {field}",
            err.message()
        );
    }
    register(&mut a, "carol", "long enough")
        .await
        .expect("register");
    let mut b = pair.accounts(1);
    let dup = b
        .register(pb::RegisterRequest {
            username: "CAROL".into(),
            password: "long enough".into(),
            display_name: String::new(),
        })
        .await
        .expect_err("duplicate accepted");
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(dup.message().contains("carol"));
}

#[tokio::test]
async fn unknown_user_and_wrong_password_answer_identically() {
    let pair = pair(AuthOptions::default()).await;
    let mut a = pair.accounts(0);
    register(&mut a, "dave", "right password")
        .await
        .expect("register");
    let wrong = login(&mut a, "dave", "wrong password")
        .await
        .expect_err("wrong password accepted");
    let unknown = login(&mut a, "nobody", "wrong password")
        .await
        .expect_err("unknown user accepted");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(
        (wrong.code(), wrong.message()),
        (unknown.code(), unknown.message())
    );
    let empty = login(&mut a, "dave", "").await.expect_err("empty password");
    assert_eq!(empty.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn failed_logins_are_limited_per_username_across_instances() {
    let pair = pair(AuthOptions {
        per_user: 3,
        ..AuthOptions::default()
    })
    .await;
    let (mut a, mut b) = (pair.accounts(0), pair.accounts(1));
    register(&mut a, "erin", "right password")
        .await
        .expect("register");
    register(&mut a, "frank", "right password")
        .await
        .expect("register");
    for i in 0..3 {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        assert_eq!(
            login(c, "erin", "wrong password")
                .await
                .expect_err("wrong")
                .code(),
            Code::Unauthenticated
        );
    }
    // The limit is shared by the instances and holds even for the right password.
    let limited = login(&mut b, "erin", "right password")
        .await
        .expect_err("limited");
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert!(
        limited.message().contains("username"),
        "{}",
        limited.message()
    );
    let retry: u64 = limited
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms metadata");
    assert!(retry > 0 && retry <= 900_000, "retry-after-ms {retry}");
    // Other users are not affected, and a success resets nothing it should not.
    login(&mut a, "frank", "right password")
        .await
        .expect("other user unaffected");
}

#[tokio::test]
async fn failed_logins_are_limited_per_address() {
    let pair = pair(AuthOptions {
        per_user: 100,
        per_peer: 4,
        ..AuthOptions::default()
    })
    .await;
    let mut a = pair.accounts(0);
    for i in 0..4 {
        let e = login(&mut a, &format!("user{i}"), "wrong password")
            .await
            .expect_err("wrong");
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let limited = login(&mut pair.accounts(1), "user9", "wrong password")
        .await
        .expect_err("limited");
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert!(
        limited.message().contains("address"),
        "{}",
        limited.message()
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_with_unauthenticated() {
    let pem = generate_pem().expect("pem");
    let pair = pair(AuthOptions {
        signing_key_pem: Some(pem.clone()),
        ..AuthOptions::default()
    })
    .await;
    let (mut a, mut b) = (pair.accounts(0), pair.accounts(1));
    let user = register(&mut a, "gina", "right password")
        .await
        .expect("register");
    let good = login(&mut a, "gina", "right password")
        .await
        .expect("login")
        .access_token;
    whoami(&mut b, &good).await.expect("good token");

    let ours = Keyring::from_pem(&pem, 900).expect("keyring");
    let (expired, _) = ours
        .issue(&user.id, Role::Customer, "s-old", now_secs() - 3600)
        .expect("issue");
    let stranger = Keyring::generate(900).expect("other key");
    let (foreign, _) = stranger
        .issue(&user.id, Role::Admin, "s-x", now_secs())
        .expect("issue");
    // Our kid in the header, but signed by another key: swap the headers.
    let forged = {
        let good_header = good.split('.').next().expect("header");
        let mut parts = foreign.split('.');
        let _ = parts.next();
        format!(
            "{good_header}.{}.{}",
            parts.next().expect("claims"),
            parts.next().expect("sig")
        )
    };
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#, ours.public().kid)),
        URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"{}","role":"admin","sid":"s","iat":1,"exp":9999999999,"iss":"switchboard"}}"#,
            user.id
        ))
    );
    let cases: Vec<(String, &str)> = vec![
        (format!("Bearer {expired}"), "expired"),
        (format!("Bearer {foreign}"), "unknown key"),
        (format!("Bearer {forged}"), "invalid"),
        (format!("Bearer {alg_none}"), "malformed"),
        ("Bearer not.a.jwt".into(), "malformed"),
        ("Bearer".into(), "Bearer"),
        ("Basic dXNlcjpwYXNz".into(), "Bearer"),
        ("garbage".into(), "Bearer"),
    ];
    for (header, says) in cases {
        for c in [&mut a, &mut b] {
            let e = c
                .who_am_i(with_authorization(pb::WhoAmIRequest {}, &header))
                .await
                .expect_err("bad token accepted");
            assert_eq!(e.code(), Code::Unauthenticated, "{header}: {e:?}");
            assert!(
                e.message().contains(says),
                "{header}: message {:?} lacks {says:?}",
                e.message()
            );
        }
    }
    let missing = a
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(missing.message().contains("authorization"));
}

#[tokio::test]
async fn refresh_reuse_revokes_the_session_on_every_instance() {
    let pair = pair(AuthOptions::default()).await;
    let (mut a, mut b) = (pair.accounts(0), pair.accounts(1));
    register(&mut a, "hank", "right password")
        .await
        .expect("register");
    let first = login(&mut a, "hank", "right password")
        .await
        .expect("login");
    let second = a
        .refresh(pb::RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await
        .expect("refresh")
        .into_inner()
        .tokens
        .expect("tokens");
    whoami(&mut b, &second.access_token)
        .await
        .expect("fresh token works");

    // The spent token is presented again (a thief, or the victim after the thief).
    let reuse = b
        .refresh(pb::RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await
        .expect_err("re-use accepted");
    assert_eq!(reuse.code(), Code::Unauthenticated);
    assert!(
        reuse.message().contains("already used"),
        "{}",
        reuse.message()
    );

    // The whole session is dead: the newest refresh token and access tokens too.
    let after = a
        .refresh(pb::RefreshRequest {
            refresh_token: second.refresh_token,
        })
        .await
        .expect_err("revoked");
    assert_eq!(after.code(), Code::Unauthenticated);
    for c in [&mut a, &mut b] {
        let s = refused_within_2s(c, &second.access_token).await;
        assert!(s.message().contains("revoked"), "{}", s.message());
    }

    for bad in ["", "garbage", "0190a0b0-0000-7000-8000-000000000000.nope"] {
        let e = a
            .refresh(pb::RefreshRequest {
                refresh_token: bad.into(),
            })
            .await
            .expect_err("bad refresh token");
        let expected = if bad.is_empty() {
            Code::InvalidArgument
        } else {
            Code::Unauthenticated
        };
        assert_eq!(e.code(), expected, "{bad:?}");
    }
}

#[tokio::test]
async fn logout_is_refused_on_the_other_instance_within_two_seconds() {
    let pair = pair(AuthOptions::default()).await;
    let (mut a, mut b) = (pair.accounts(0), pair.accounts(1));
    register(&mut a, "ivy", "right password")
        .await
        .expect("register");
    let session = login(&mut a, "ivy", "right password").await.expect("login");
    let other = login(&mut b, "ivy", "right password")
        .await
        .expect("second session");
    whoami(&mut b, &session.access_token)
        .await
        .expect("valid before logout");

    a.logout(authed(pb::LogoutRequest {}, &session.access_token))
        .await
        .expect("logout");
    let s = refused_within_2s(&mut b, &session.access_token).await;
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("revoked"), "{}", s.message());
    let s = refused_within_2s(&mut a, &session.access_token).await;
    assert_eq!(s.code(), Code::Unauthenticated);
    let refresh = b
        .refresh(pb::RefreshRequest {
            refresh_token: session.refresh_token,
        })
        .await
        .expect_err("refresh");
    assert_eq!(refresh.code(), Code::Unauthenticated);
    // Only that session ended.
    whoami(&mut a, &other.access_token)
        .await
        .expect("other session unaffected");
}

#[tokio::test]
async fn roles_first_admin_and_set_role() {
    let options = AuthOptions {
        admin: Some(("root".into(), "admin password".into())),
        ..AuthOptions::default()
    };
    let pair = pair(options).await;
    let (mut a, mut b) = (pair.accounts(0), pair.accounts(1));
    // The first admin is created in the background at start.
    let admin = switchboard_tests::eventually(Duration::from_secs(5), || {
        let mut a = a.clone();
        async move { login(&mut a, "root", "admin password").await.ok() }
    })
    .await
    .expect("first admin can log in");
    let me = whoami(&mut b, &admin.access_token)
        .await
        .expect("whoami")
        .user
        .expect("user");
    assert_eq!(me.role, pb::Role::Admin as i32);

    let jo = register(&mut a, "joe", "right password")
        .await
        .expect("register");
    let jo_token = login(&mut a, "joe", "right password")
        .await
        .expect("login")
        .access_token;
    let denied = b
        .set_role(authed(
            pb::SetRoleRequest {
                user_id: jo.id.clone(),
                role: pb::Role::Admin as i32,
            },
            &jo_token,
        ))
        .await
        .expect_err("customer promoted itself");
    assert_eq!(denied.code(), Code::PermissionDenied);

    let agent = b
        .set_role(authed(
            pb::SetRoleRequest {
                user_id: jo.id.clone(),
                role: pb::Role::Agent as i32,
            },
            &admin.access_token,
        ))
        .await
        .expect("set role")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(agent.role, pb::Role::Agent as i32);
    let relogin = login(&mut a, "joe", "right password")
        .await
        .expect("login")
        .access_token;
    assert_eq!(
        whoami(&mut b, &relogin)
            .await
            .expect("whoami")
            .user
            .expect("user")
            .role,
        pb::Role::Agent as i32
    );

    let cases = [
        (
            uuid::Uuid::now_v7().to_string(),
            pb::Role::Agent as i32,
            Code::NotFound,
        ),
        (
            "no-such-user".to_string(),
            pb::Role::Agent as i32,
            Code::InvalidArgument,
        ),
        (
            "x".repeat(20_000),
            pb::Role::Agent as i32,
            Code::InvalidArgument,
        ),
        (
            jo.id.clone(),
            pb::Role::Unspecified as i32,
            Code::InvalidArgument,
        ),
        (jo.id.clone(), 42, Code::InvalidArgument),
        (
            me.id.clone(),
            pb::Role::Customer as i32,
            Code::FailedPrecondition,
        ),
    ];
    for (user_id, role, code) in cases {
        let e = a
            .set_role(authed(
                pb::SetRoleRequest {
                    user_id: user_id.clone(),
                    role,
                },
                &admin.access_token,
            ))
            .await
            .expect_err("bad set role");
        assert_eq!(e.code(), code, "{user_id} {role}: {e:?}");
    }
    let too_many = a
        .get_users(authed(
            pb::GetUsersRequest {
                user_ids: (0..300).map(|i| i.to_string()).collect(),
                usernames: (0..201).map(|i| format!("user{i}")).collect(),
            },
            &jo_token,
        ))
        .await
        .expect_err("501 ids and names");
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().contains("500"));
}

#[tokio::test]
async fn guests_are_limited_per_address_across_instances_and_cannot_log_in_or_take_roles() {
    use switchboard_common::status::reason_of;
    use switchboard_tests::bad_field;

    let options = AuthOptions {
        admin: Some(("groot".into(), "admin password".into())),
        guests_per_peer: 3,
        guest_ttl: Duration::from_secs(3600),
        ..AuthOptions::default()
    };
    let pair = pair(options).await;
    let (mut a, mut b) = (pair.accounts(0), pair.accounts(1));
    let start = |c: &mut AuthServiceClient<Channel>, name: &str| {
        let mut c = c.clone();
        let name = name.to_owned();
        async move {
            c.start_guest_session(pb::StartGuestSessionRequest { display_name: name })
                .await
                .map(|r| r.into_inner())
        }
    };

    // No token needed; a GUEST user with a reserved name and the name it gave.
    let first = start(&mut a, "  Visitor from the shop ")
        .await
        .expect("guest");
    let user = first.user.expect("user");
    let tokens = first.tokens.expect("tokens");
    assert_eq!(user.role, pb::Role::Guest as i32);
    assert!(user.username.starts_with("guest-"), "{}", user.username);
    assert_eq!(user.display_name, "Visitor from the shop");
    let me = whoami(&mut b, &tokens.access_token)
        .await
        .expect("the other instance knows the guest")
        .user
        .expect("user");
    assert_eq!(
        (me.id.as_str(), me.role),
        (user.id.as_str(), pb::Role::Guest as i32)
    );
    // Its session lasts AUTH_GUEST_SESSION_TTL_SECS, at the start and after a refresh.
    let in_an_hour = now_secs() as i64 + 3600;
    let expiry = |t: &pb::TokenPair| {
        t.refresh_token_expires_at
            .as_ref()
            .map(|e| e.seconds)
            .unwrap_or(0)
    };
    assert!((expiry(&tokens) - in_an_hour).abs() <= 5, "{tokens:?}");
    let refreshed = b
        .refresh(pb::RefreshRequest {
            refresh_token: tokens.refresh_token.clone(),
        })
        .await
        .expect("refresh")
        .into_inner()
        .tokens
        .expect("tokens");
    assert!(
        (expiry(&refreshed) - in_an_hour).abs() <= 5,
        "{refreshed:?}"
    );
    let second = start(&mut b, "").await.expect("second guest");
    assert_eq!(second.user.expect("user").display_name, "Guest");

    // A guest cannot log in (it has no password), and its names are reserved.
    let e = login(&mut a, &user.username, "any password at all")
        .await
        .expect_err("guest login");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(reason_of(&e).as_deref(), Some("BAD_CREDENTIALS"));
    let e = register(&mut a, "guest-0123456789abcdef", "right password")
        .await
        .expect_err("reserved name");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(bad_field(&e).as_deref(), Some("username"));

    // Nobody makes a guest an agent, or anyone a guest.
    let admin = switchboard_tests::eventually(Duration::from_secs(5), || {
        let mut a = a.clone();
        async move { login(&mut a, "groot", "admin password").await.ok() }
    })
    .await
    .expect("admin");
    let e = a
        .set_role(authed(
            pb::SetRoleRequest {
                user_id: user.id.clone(),
                role: pb::Role::Agent as i32,
            },
            &admin.access_token,
        ))
        .await
        .expect_err("guest promoted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let customer = register(&mut a, "plainjo", "right password")
        .await
        .expect("register");
    let e = a
        .set_role(authed(
            pb::SetRoleRequest {
                user_id: customer.id,
                role: pb::Role::Guest as i32,
            },
            &admin.access_token,
        ))
        .await
        .expect_err("made a guest");
    assert_eq!(bad_field(&e).as_deref(), Some("role"));

    // Bad input costs an attempt like any other; the fourth from this address (counted in
    // Redis, shared by both instances) is refused with a retry hint.
    let e = start(&mut a, &"n".repeat(65)).await.expect_err("long name");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(bad_field(&e).as_deref(), Some("display_name"));
    let e = start(&mut b, "one more").await.expect_err("over the limit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(reason_of(&e).as_deref(), Some("RATE_LIMITED"));
    assert!(
        e.message().contains("AUTH_GUESTS_PER_PEER"),
        "{}",
        e.message()
    );
    assert!(e.metadata().get("retry-after-ms").is_some(), "{e:?}");
}
