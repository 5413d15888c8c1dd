//! The `switchboard` command-line client against real processes: two people chat through
//! two messaging instances, and `chat` resumes on the other instance after one is killed.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use switchboard_tests::instance::{ChildService, binary};
use switchboard_tests::redis::RedisServer;

struct Person {
    dir: tempfile::TempDir,
    auth: String,
    messaging: String,
}

impl Person {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary("switchboard").expect("cli binary"));
        cmd.args(args)
            .env("SWITCHBOARD_CONFIG_DIR", self.dir.path())
            .env("SWITCHBOARD_AUTH_URL", &self.auth)
            .env("SWITCHBOARD_MESSAGING_URL", &self.messaging)
            .env("SWITCHBOARD_PASSWORD", "cli password");
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("run switchboard");
        assert!(
            out.status.success(),
            "switchboard {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Reads `child`'s stdout lines on a thread.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn expect_line(rx: &mpsc::Receiver<String>, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!("chat never printed {needle:?}");
}

fn person(auth: &ChildService, messaging: &[&ChildService]) -> Person {
    Person {
        dir: tempfile::tempdir().expect("dir"),
        auth: format!("http://{}", auth.addr),
        messaging: messaging
            .iter()
            .map(|m| format!("http://{}", m.addr))
            .collect::<Vec<_>>()
            .join(","),
    }
}

#[test]
fn two_people_chat_through_two_instances_and_chat_resumes_after_a_crash() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = ChildService::spawn(
        "switchboard-auth",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_ARGON2_MEMORY_KIB", "1024".into()),
            ("AUTH_ARGON2_ITERATIONS", "1".into()),
        ],
    )
    .expect("auth");
    let env = [
        ("REDIS_URL", redis.url()),
        ("AUTH_URL", format!("http://{}", auth.addr)),
    ];
    let mut m1 = ChildService::spawn("switchboard-messaging", &env).expect("messaging 1");
    let m2 = ChildService::spawn("switchboard-messaging", &env).expect("messaging 2");

    let alice = person(&auth, &[&m2]);
    let bob = person(&auth, &[&m1, &m2]);
    for (p, name) in [(&alice, "alice"), (&bob, "bob")] {
        assert!(p.run(&["register", name]).contains(name));
        assert!(p.run(&["login", name]).contains(name));
        assert!(Path::new(&p.dir.path().join("session.json")).exists());
    }
    let bob_id = bob
        .run(&["whoami"])
        .split_whitespace()
        .next()
        .expect("id")
        .to_owned();
    let conversation = alice.run(&["direct", &bob_id]);
    let alice_whoami = alice.run(&["whoami"]);
    let alice_id = alice_whoami.split_whitespace().next().expect("id");
    assert_eq!(
        bob.run(&["direct", alice_id]),
        conversation,
        "the same pair got another conversation"
    );

    // Bob chats on instance 1; Alice sends through instance 2.
    let mut chat = bob
        .cmd(&["chat", &conversation])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chat");
    let rx = lines(&mut chat);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        alice
            .run(&["send", &conversation, "hello", "bob"])
            .starts_with("sent #1")
    );
    expect_line(&rx, "alice: hello bob");
    let mut stdin = chat.stdin.take().expect("stdin");
    writeln!(stdin, "hi alice").expect("type");
    expect_line(&rx, "bob: hi alice");

    // Instance 1 dies; the chat resumes on instance 2 and misses nothing.
    m1.kill();
    assert!(
        alice
            .run(&["send", &conversation, "are you there?"])
            .starts_with("sent #3")
    );
    expect_line(&rx, "alice: are you there?");
    writeln!(stdin, "still here").expect("type");
    expect_line(&rx, "bob: still here");
    drop(stdin);
    let status = chat.wait().expect("chat exits at end of input");
    assert!(status.success());

    let history = alice.run(&["history", &conversation]);
    let bodies: Vec<&str> = history.lines().collect();
    assert_eq!(bodies.len(), 4, "{history}");
    assert!(
        bodies[0].ends_with("alice: hello bob") && bodies[3].ends_with("bob: still here"),
        "{history}"
    );
    assert!(alice.run(&["conversations"]).contains(&conversation));
    alice.run(&["logout"]);
    let out = alice.cmd(&["whoami"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not logged in"));
}
