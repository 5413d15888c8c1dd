//! `switchboard-server` (all three services in one process, on one embedded engine) and
//! `make run`'s script, as real processes.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_request::Frame as In;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use switchboard_proto::presence::v1::presence_service_client::PresenceServiceClient;
use switchboard_tests::auth::{authed, register_and_login};
use switchboard_tests::instance::{
    ChildService, assert_bad_config_exits_64, assert_help_lists, channel,
};
use switchboard_tests::messaging::Connection;
use tonic::Code;

const ANY_PORT: &str = "127.0.0.1:0";

fn server() -> ChildService {
    ChildService::spawn(
        "switchboard-server",
        &[
            ("AUTH_ADDR", ANY_PORT.into()),
            ("PRESENCE_ADDR", ANY_PORT.into()),
            ("MESSAGING_ADDR", ANY_PORT.into()),
        ],
    )
    .expect("switchboard-server starts")
}

fn addr_of(server: &ChildService, field: &str) -> SocketAddr {
    server
        .logged_addr(field)
        .unwrap_or_else(|| panic!("{field} not logged:\n{}", server.output()))
}

/// Waits up to `limit` for `child` to exit; its status, stderr and stdout.
fn finished(mut child: std::process::Child, limit: Duration) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn logout_at_auth_ends_the_session_at_messaging_and_presence_within_2_s() {
    let server = server();
    let (auth, presence, messaging) = (
        addr_of(&server, "auth_addr"),
        addr_of(&server, "presence_addr"),
        server.addr,
    );
    let mut auth_client = AuthServiceClient::new(channel(auth));
    let tokens = register_and_login(&mut auth_client, "alice")
        .await
        .expect("register and login");
    let token = tokens.access_token;

    // A messaging stream (registered once a ping round-trips) and a presence device.
    let mut conn = Connection::open(channel(messaging), &token)
        .await
        .expect("messaging stream");
    conn.send(In::Ping(pb::Ping { nonce: 1 }))
        .await
        .expect("ping");
    conn.until(Duration::from_secs(5), |f| {
        if let Out::Pong(_) = f { Some(()) } else { None }
    })
    .await
    .expect("pong");
    let mut device = switchboard_tests::presence::connect(channel(presence), &token).await;

    let t0 = Instant::now();
    auth_client
        .logout(authed(auth_pb::LogoutRequest {}, &token))
        .await
        .expect("logout");
    let status = conn.ended(Duration::from_secs(2)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{}", status.message());
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match device.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the presence stream ends within 2 s")
    .expect("with a status");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));

    // And the token is refused for new calls on both.
    let refused = PresenceServiceClient::new(channel(presence))
        .get(authed(
            switchboard_proto::presence::v1::GetRequest {
                user_ids: vec!["x".into()],
            },
            &token,
        ))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = Connection::open(channel(messaging), &token).await;
    assert!(refused.is_err(), "a revoked token opened a stream");
}

#[test]
fn a_service_token_is_made_for_the_desk_when_unset() {
    // Messaging asks presence for available agents with the shared token; in one process
    // nobody has to set it.
    let server = server();
    assert!(
        !server.output().contains("SERVICE_TOKEN is unset"),
        "{}",
        server.output()
    );
}

#[test]
fn a_busy_port_stops_it_before_anything_is_served_and_names_the_port() {
    let taken = TcpListener::bind(ANY_PORT).expect("bind");
    let busy = taken.local_addr().expect("addr");
    let child = switchboard_tests::instance::command("switchboard-server")
        .expect("binary")
        .env("AUTH_ADDR", ANY_PORT)
        .env("PRESENCE_ADDR", busy.to_string())
        .env("MESSAGING_ADDR", ANY_PORT)
        .env("METRICS_ADDR", "off")
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (code, stderr, _) = finished(child, Duration::from_secs(10));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&busy.to_string()) && stderr.contains("presence"),
        "{stderr}"
    );
}

#[test]
fn help_and_bad_configuration() {
    assert_help_lists(
        "switchboard-server",
        &[
            "AUTH_ADDR",
            "PRESENCE_ADDR",
            "MESSAGING_ADDR",
            "METRICS_ADDR",
            "REDIS_URL",
            "REDIS_CLUSTER_URLS",
        ],
    );
    // The services' own variables are checked too, all at once.
    assert_bad_config_exits_64(
        "switchboard-server",
        &[
            ("AUTH_ADDR", "here"),
            ("AUTH_ACCESS_TTL_SECS", "5"),
            ("MESSAGING_MAX_GROUP_MEMBERS", "lots"),
            ("PRESENCE_TTL_SECS", "forever"),
        ],
        &[
            "AUTH_ADDR=\"here\"",
            "AUTH_ACCESS_TTL_SECS",
            "MESSAGING_MAX_GROUP_MEMBERS=\"lots\"",
            "PRESENCE_TTL_SECS=\"forever\"",
        ],
    );
    assert_bad_config_exits_64(
        "switchboard-server",
        &[
            ("AUTH_ADDR", ANY_PORT),
            ("PRESENCE_ADDR", ANY_PORT),
            ("MESSAGING_ADDR", ANY_PORT),
            ("METRICS_ADDR", "off"),
            ("AUTH_ACCESS_TTL_SECS", "5"),
            ("MESSAGING_MAX_GROUP_MEMBERS", "lots"),
            ("PRESENCE_TTL_SECS", "forever"),
        ],
        &[
            "AUTH_ACCESS_TTL_SECS",
            "MESSAGING_MAX_GROUP_MEMBERS=\"lots\"",
            "PRESENCE_TTL_SECS=\"forever\"",
        ],
    );
}

/// `make run`'s script, from the repository root.
fn run_script() -> Command {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut cmd = Command::new("bash");
    switchboard_tests::instance::isolate(&mut cmd);
    cmd.arg(format!("{root}/deploy/local/run.sh"))
        .current_dir(root)
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn free_port() -> String {
    let l = TcpListener::bind(ANY_PORT).expect("bind");
    l.local_addr().expect("addr").to_string()
}

#[test]
fn make_run_refuses_a_busy_port_and_prints_no_banner() {
    let taken = TcpListener::bind(ANY_PORT).expect("bind");
    let busy = taken.local_addr().expect("addr").to_string();
    let child = run_script()
        .env("AUTH_ADDR", free_port())
        .env("PRESENCE_ADDR", free_port())
        .env("MESSAGING_ADDR", &busy)
        .spawn()
        .expect("spawn");
    let (code, stderr, stdout) = finished(child, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&busy), "{stderr}");
    assert!(!stdout.contains("Switchboard is running"), "{stdout}");
}

/// `make run`'s script on these ports (plus `env`), and the banner it printed, once it has
/// (the script keeps running; stop it with SIGTERM).
fn start_make_run(ports: &[String; 3], env: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut child = run_script()
        .env("AUTH_ADDR", &ports[0])
        .env("PRESENCE_ADDR", &ports[1])
        .env("MESSAGING_ADDR", &ports[2])
        // The web pages' server, where they are built: never the default 8080 here.
        .env("WEB_ADDR", free_port())
        .env("METRICS_ADDR", ANY_PORT)
        .envs(env.iter().copied())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = String::new();
    while !banner.contains("Ctrl-C stops everything.") {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                banner.push_str(&line);
                banner.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("no banner within 60 s; got:\n{banner}");
            }
        }
    }
    (child, banner)
}

#[test]
fn make_run_starts_one_process_says_state_is_lost_and_stops_it_on_sigterm() {
    let ports = [free_port(), free_port(), free_port()];
    let (child, banner) = start_make_run(&ports, &[]);
    assert!(
        banner.contains("embedded in-memory engine") && banner.contains("lost when this stops"),
        "{banner}"
    );
    // One process serves all three ports.
    let servers = Command::new("pgrep")
        .args(["-P", &child.id().to_string(), "-f", "switchboard-"])
        .output()
        .expect("pgrep");
    let pids = String::from_utf8_lossy(&servers.stdout).into_owned();
    assert_eq!(pids.lines().count(), 1, "children: {pids:?}");
    for port in &ports {
        assert!(
            std::net::TcpStream::connect(port).is_ok(),
            "{port} not served"
        );
    }

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let (_, stderr, _) = finished(child, Duration::from_secs(20));
    let stopped = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&ports[2]).is_ok() {
        assert!(
            Instant::now() < stopped,
            "still served after the script ended: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The repository's root, as `run.sh` prints it.
fn repo_root() -> String {
    std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .expect("repository root")
        .display()
        .to_string()
}

#[test]
fn the_readme_shows_exactly_what_make_run_prints() {
    let out = Command::new("bash")
        .arg(format!("{}/deploy/local/run.sh", repo_root()))
        .arg("--banner")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("run.sh --banner");
    assert!(out.status.success());
    let banner = String::from_utf8_lossy(&out.stdout).replace(&repo_root(), "/path/to/switchboard");
    let readme = std::fs::read_to_string(format!("{}/README.md", repo_root())).expect("README");
    assert!(
        readme.contains(banner.trim()),
        "README.md does not show what `make run` prints; it prints:\n{banner}"
    );
}

/// The walk-through `make run` printed: (terminal number, its lines), block by block.
fn walk_through(banner: &str) -> Vec<(u32, Vec<String>)> {
    let mut blocks = Vec::new();
    let mut terminal = None;
    let mut block: Vec<String> = Vec::new();
    let started = banner
        .find("First five minutes")
        .expect("a walk-through in the banner");
    for line in banner[started..].lines() {
        // The browser pages close the banner: addresses to open, not commands to run.
        if line.starts_with("The same desk in a browser") {
            break;
        }
        if let Some(cmd) = line.strip_prefix("  ") {
            block.push(cmd.to_owned());
            continue;
        }
        if let Some(t) = terminal
            && !block.is_empty()
        {
            blocks.push((t, std::mem::take(&mut block)));
        }
        if let Some(n) = line
            .split("Terminal ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
        {
            terminal = Some(n);
        }
    }
    blocks
}

#[test]
fn the_walk_through_make_run_prints_works_line_by_line() {
    let ports = [free_port(), free_port(), free_port()];
    let (child, banner) = start_make_run(
        &ports,
        &[
            ("AUTH_ARGON2_MEMORY_KIB", "1024"),
            ("AUTH_ARGON2_ITERATIONS", "1"),
        ],
    );
    let blocks = walk_through(&banner);
    assert!(blocks.len() >= 6, "{blocks:?}");

    // Each block runs in a fresh shell with what that terminal set before; the
    // interactive chats run only the command that finds their conversation.
    let dirs = tempfile::tempdir().expect("dir");
    let mut setup: std::collections::HashMap<u32, Vec<String>> = Default::default();
    let mut outputs = Vec::new();
    for (terminal, lines) in &blocks {
        let mut script: Vec<String> = setup.get(terminal).cloned().unwrap_or_default();
        for line in lines {
            let line = line.replace("/tmp/sb-", &format!("{}/sb-", dirs.path().display()));
            let line = match line.strip_prefix("switchboard chat \"$(") {
                Some(inner) => inner.trim_end_matches(")\"").to_owned(),
                None => line.replace(" && switchboard chat --agent", ""),
            };
            assert!(!line.contains("switchboard chat"), "interactive: {line}");
            if line.starts_with("export ")
                || line.split('=').next().is_some_and(|v| {
                    !v.is_empty() && v.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                })
            {
                setup.entry(*terminal).or_default().push(line.clone());
            }
            script.push(line);
        }
        let out = switchboard_tests::instance::isolate(&mut Command::new("bash"))
            .args(["-e", "-o", "pipefail", "-c", &script.join("\n")])
            .current_dir(dirs.path())
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "terminal {terminal}:\n{}\nfailed:\n{}\n{}",
            script.join("\n"),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let all = outputs.join("\n");
    for expected in [
        "registered alice",
        "logged in as bob",
        "sent #1",
        // Alice's own message is not unread for her.
        "0 unread  bob",
        "PRESENCE_STATE_",
        "rpc Connect",
        "agent1 is now agent",
        "logged in as carol",
    ] {
        assert!(all.contains(expected), "{expected:?} not in:\n{all}");
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = finished(child, Duration::from_secs(20));
}
