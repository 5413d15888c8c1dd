//! The customer widget and the agent console in a real headless Chromium (Debian's
//! `chromium`, driven by playwright-core from `web/node_modules`): auth and presence in
//! process, two messaging instances as processes (one is killed with SIGKILL by the
//! browser script mid-conversation), all on one Redis with CORS for the pages' origin;
//! the pages are `web/public`, served on loopback by Python's `http.server`. The script is
//! `web/e2e/browser.test.js`; its screenshots land in `target/screenshots/`.

use std::time::Duration;

use switchboard_proto::auth::v1 as auth_pb;
use switchboard_tests::auth::{first_admin, person};
use switchboard_tests::instance::{
    AuthOptions, ChildService, SERVICE_TOKEN, auth_client, spawn_auth, spawn_presence_with,
};
use switchboard_tests::redis::RedisServer;

/// A child process killed (and reaped) when dropped.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Python's static file server for `dir` on `port` (loopback), once it answers.
async fn serve(dir: &std::path::Path, port: u16) -> Reaped {
    let child = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .arg("--directory")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let server = Reaped(child);
    let up = switchboard_tests::eventually(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    assert!(up.is_some(), "the static server never answered on {port}");
    server
}

#[tokio::test]
async fn the_widget_and_the_console_in_chromium() {
    let root = switchboard_tests::deploy::repo_root();
    let web = root.join("web");
    let chromium = std::path::Path::new("/usr/bin/chromium");
    for needed in [
        chromium.to_path_buf(),
        web.join("node_modules/playwright-core"),
    ] {
        assert!(
            needed.exists(),
            "{} is missing: run make deps",
            needed.display()
        );
    }
    // The pages, built as `npm run build` builds them (buf generate first, for web/gen).
    if let Err(e) = switchboard_tests::web::build() {
        panic!("{e}");
    }

    let port = switchboard_tests::free_port().expect("port");
    let origin = format!("http://127.0.0.1:{port}");
    let _pages = serve(&web.join("public"), port).await;

    let redis = RedisServer::spawn().expect("redis");
    let auth = spawn_auth(
        Some(&redis),
        AuthOptions {
            admin: Some(("browseradmin".into(), "admin password".into())),
            cors_allowed_origins: vec![origin.clone()],
            ..AuthOptions::default()
        },
    )
    .await
    .expect("auth");
    let cors = origin.clone();
    let presence = spawn_presence_with(
        Some(&redis),
        auth.addr,
        Duration::from_secs(30),
        Duration::from_secs(1),
        Duration::from_secs(5),
        move |config| {
            config.server.cors_allowed_origins =
                vec![http::HeaderValue::from_str(&cors).expect("origin")];
        },
    )
    .await
    .expect("presence");
    let mut messaging = Vec::new();
    for _ in 0..2 {
        messaging.push(
            ChildService::spawn(
                "switchboard-messaging",
                &[
                    ("REDIS_URL", redis.url()),
                    ("AUTH_URL", format!("http://{}", auth.addr)),
                    ("PRESENCE_URL", format!("http://{}", presence.addr)),
                    ("SERVICE_TOKEN", SERVICE_TOKEN.into()),
                    ("CORS_ALLOWED_ORIGINS", origin.clone()),
                    ("MESSAGING_SUPPORT_RECHECK_SECS", "1".into()),
                ],
            )
            .expect("messaging"),
        );
    }

    let accounts = auth_client(&auth);
    let admin = first_admin(&accounts, "browseradmin", "admin password").await;
    let mut agents = Vec::new();
    for name in ["agent_eve", "agent_fay"] {
        let agent = person(&accounts, name, auth_pb::Role::Agent, Some(&admin))
            .await
            .expect("agent");
        agents.push(serde_json::json!({
            "username": agent.name,
            "password": "right password",
            "display": agent.name,
        }));
    }
    let customer = person(&accounts, "carl_shopper", auth_pb::Role::Customer, None)
        .await
        .expect("customer");
    let screenshots = root.join("target/screenshots");
    std::fs::create_dir_all(&screenshots).expect("screenshot dir");
    let described = serde_json::json!({
        "origin": origin,
        "chromium": chromium,
        "auth": format!("http://{}", auth.addr),
        "presence": format!("http://{}", presence.addr),
        "messaging": messaging.iter().map(|m| format!("http://{}", m.addr)).collect::<Vec<_>>(),
        "messagingPids": messaging.iter().map(ChildService::pid).collect::<Vec<_>>(),
        "agents": agents,
        "customer": customer.name,
        "screenshots": screenshots,
    })
    .to_string();

    let mut node = tokio::process::Command::new("node");
    node.args([
        "--test",
        "--test-timeout=120000",
        "--test-force-exit",
        "e2e/",
    ])
    .current_dir(&web)
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("HOME", std::env::var("HOME").unwrap_or_default())
    .env("SWITCHBOARD_BROWSER", &described)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), node.output())
        .await
        .expect("the browser test ran over three minutes")
        .expect("node");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let logs: Vec<String> = messaging.iter().map(|m| m.output()).collect();
    assert!(
        out.status.success(),
        "the browser test failed:\n{report}\nmessaging logs:\n{}",
        logs.join("\n---\n")
    );
    assert!(report.contains("# pass 1"), "one test passed:\n{report}");
    assert!(report.contains("# skipped 0"), "nothing skipped:\n{report}");
    for shot in ["widget.png", "console.png"] {
        let len = std::fs::metadata(screenshots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "{shot} was not taken ({len} bytes)");
    }
}
