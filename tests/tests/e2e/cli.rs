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
    presence: String,
}

impl Person {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = switchboard_tests::instance::command("switchboard").expect("cli binary");
        cmd.args(args)
            .env("SWITCHBOARD_CONFIG_DIR", self.dir.path())
            .env("SWITCHBOARD_AUTH_URL", &self.auth)
            .env("SWITCHBOARD_MESSAGING_URL", &self.messaging)
            .env("SWITCHBOARD_PRESENCE_URL", &self.presence)
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
    read_lines(child.stdout.take().expect("stdout"))
}

/// Reads lines of `pipe` on a thread.
fn read_lines(stdout: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
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
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("chat never printed {needle:?}; it printed {seen:#?}");
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
        presence: "http://127.0.0.1:1".into(),
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
    // Sent before or after the chat subscribes, the message is shown (history, then live).
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

#[test]
fn a_customer_opens_a_consultation_and_an_agent_console_answers_and_closes_it() {
    let redis = RedisServer::spawn().expect("redis");
    let auth = ChildService::spawn(
        "switchboard-auth",
        &[
            ("REDIS_URL", redis.url()),
            ("AUTH_ARGON2_MEMORY_KIB", "1024".into()),
            ("AUTH_ARGON2_ITERATIONS", "1".into()),
            ("AUTH_ADMIN_USERNAME", "cliadmin".into()),
            ("AUTH_ADMIN_PASSWORD", "cli admin password".into()),
        ],
    )
    .expect("auth");
    let token = (
        "SERVICE_TOKEN",
        "cli-test-service-token-0123456789abcdef".to_string(),
    );
    let common = [
        ("REDIS_URL", redis.url()),
        ("AUTH_URL", format!("http://{}", auth.addr)),
        token.clone(),
    ];
    let presence = ChildService::spawn("switchboard-presence", &common).expect("presence");
    let mut env = common.to_vec();
    env.push(("PRESENCE_URL", format!("http://{}", presence.addr)));
    let messaging = ChildService::spawn("switchboard-messaging", &env).expect("messaging");

    let mut customer = person(&auth, &[&messaging]);
    let mut agent = person(&auth, &[&messaging]);
    for p in [&mut customer, &mut agent] {
        p.presence = format!("http://{}", presence.addr);
    }
    customer.run(&["register", "clicustomer"]);
    customer.run(&["login", "clicustomer"]);
    let agent_id = agent.run(&["register", "cliagent"]);
    let agent_id = agent_id
        .split(['(', ')'])
        .nth(1)
        .expect("registered prints the id")
        .to_owned();
    // An admin makes the account an agent with `set-role`; nobody else can.
    let admin = person(&auth, &[&messaging]);
    let login = admin
        .cmd(&["login", "cliadmin"])
        .env("SWITCHBOARD_PASSWORD", "cli admin password")
        .output()
        .expect("run");
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    let failure = |p: &Person, args: &[&str]| {
        let out = p.cmd(args).output().expect("run");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let denied = failure(&customer, &["set-role", &agent_id, "agent"]);
    assert!(denied.contains("PermissionDenied"), "{denied}");
    let bad_role = failure(&admin, &["set-role", &agent_id, "boss"]);
    assert!(bad_role.contains("customer, agent, admin"), "{bad_role}");
    let nobody = uuid::Uuid::now_v7().to_string();
    let unknown = failure(&admin, &["set-role", &nobody, "agent"]);
    assert!(unknown.contains("NotFound"), "{unknown}");
    // Not an id, so a username: one nobody has.
    let nameless = failure(&admin, &["set-role", "no-such-user", "agent"]);
    assert!(
        nameless.contains("no user named no-such-user"),
        "{nameless}"
    );
    let done = admin.run(&["set-role", &agent_id, "agent"]);
    assert_eq!(done, format!("{agent_id} cliagent is now agent"));
    agent.run(&["login", "cliagent"]);

    let mut console = agent
        .cmd(&["chat", "--agent"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent console");
    let out = lines(&mut console);
    let err = read_lines(console.stderr.take().expect("stderr"));
    expect_line(&err, "online and AVAILABLE");

    let opened = customer.run(&["support", "open", "order 42", "where", "is", "it?"]);
    let id = opened.split_whitespace().next().expect("id").to_owned();
    expect_line(&err, "(new consultation)");
    expect_line(&out, "clicustomer: where is it?");
    let mut stdin = console.stdin.take().expect("stdin");
    writeln!(stdin, "it ships today").expect("type");
    expect_line(&out, "cliagent: it ships today");
    let history = customer.run(&["history", &id]);
    assert!(history.contains("cliagent: it ships today"), "{history}");

    // Customers cannot work the queue.
    let out_queue = customer.cmd(&["support", "queue"]).output().expect("run");
    assert!(!out_queue.status.success());
    assert!(
        String::from_utf8_lossy(&out_queue.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&out_queue.stderr)
    );

    writeln!(stdin, "/close shipped").expect("type");
    expect_line(&err, "CLOSED");
    let late = customer
        .cmd(&["send", &id, "thanks"])
        .output()
        .expect("run");
    assert!(!late.status.success(), "a closed consultation is read-only");
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("FailedPrecondition"),
        "{}",
        String::from_utf8_lossy(&late.stderr)
    );
    drop(stdin);
    let status = console.wait().expect("console exits at end of input");
    assert!(status.success());
}

/// A free loopback port (bound and released; the test binds it again right away).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// `switchboard-server` (the embedded default) on these three addresses.
fn embedded(addrs: &[String; 3]) -> ChildService {
    ChildService::spawn(
        "switchboard-server",
        &[
            ("AUTH_ADDR", addrs[0].clone()),
            ("PRESENCE_ADDR", addrs[1].clone()),
            ("MESSAGING_ADDR", addrs[2].clone()),
            ("AUTH_ARGON2_MEMORY_KIB", "1024".into()),
            ("AUTH_ARGON2_ITERATIONS", "1".into()),
        ],
    )
    .expect("switchboard-server")
}

fn person_of(addrs: &[String; 3]) -> Person {
    Person {
        dir: tempfile::tempdir().expect("dir"),
        auth: format!("http://{}", addrs[0]),
        presence: format!("http://{}", addrs[1]),
        messaging: format!("http://{}", addrs[2]),
    }
}

/// The id `register` printed: `registered NAME (ID)`.
fn registered_id(p: &Person, name: &str) -> String {
    p.run(&["register", name])
        .split(['(', ')'])
        .nth(1)
        .expect("registered prints the id")
        .to_owned()
}

fn unread(p: &Person, conversation: &str) -> u64 {
    let list = p.run(&["conversations"]);
    let line = list
        .lines()
        .find(|l| l.starts_with(conversation))
        .unwrap_or_else(|| panic!("{conversation} not listed:\n{list}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no unread count in {line:?}"))
}

/// Waits up to `limit` for `child` to exit; its exit code.
fn exit_code(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn chat_shows_recent_history_with_times_goes_online_and_reading_drops_unread_counts() {
    let addrs = [free_addr(), free_addr(), free_addr()];
    let _server = embedded(&addrs);
    let (alice, bob) = (person_of(&addrs), person_of(&addrs));
    registered_id(&alice, "alice");
    let bob_id = registered_id(&bob, "bob");
    alice.run(&["login", "alice"]);
    bob.run(&["login", "bob"]);
    let conversation = alice.run(&["direct", &bob_id]);
    for text in ["one", "two", "three"] {
        alice.run(&["send", &conversation, text]);
    }
    assert_eq!(unread(&bob, &conversation), 3);

    // Alice watches; Bob's chat shows only the last two, each with its time.
    let mut alice_chat = alice
        .cmd(&["chat", &conversation, "--history", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("alice chat");
    let alice_err = read_lines(alice_chat.stderr.take().expect("stderr"));
    expect_line(&alice_err, "chat in");
    let mut chat = bob
        .cmd(&["chat", &conversation, "--history", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chat");
    let rx = lines(&mut chat);
    let first = rx.recv_timeout(Duration::from_secs(20)).expect("a line");
    assert!(
        first.starts_with("[#2 ") && first.ends_with("] alice: two"),
        "{first}"
    );
    let time = first
        .trim_start_matches("[#2 ")
        .split(']')
        .next()
        .unwrap_or_default();
    assert!(
        time.len() == 5 && time.as_bytes()[2] == b':',
        "not HH:MM: {time:?}"
    );
    expect_line(&rx, "alice: three");
    // Shown means read: the unread count drops, and Alice sees the receipt.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while unread(&bob, &conversation) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "unread count never dropped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    expect_line(&alice_err, "(bob read up to #3)");

    // Bob is online while the chat runs (Alice asks presence), and away after /away.
    let alice_token = {
        let raw = std::fs::read(alice.dir.path().join("session.json")).expect("session");
        let v: serde_json::Value = serde_json::from_slice(&raw).expect("json");
        v["access_token"].as_str().expect("token").to_owned()
    };
    let state_of_bob = || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            use switchboard_proto::presence::v1 as p;
            let mut c = p::presence_service_client::PresenceServiceClient::new(
                switchboard_tests::instance::channel(addrs[1].parse().expect("addr")),
            );
            let got = c
                .get(switchboard_tests::auth::authed(
                    p::GetRequest {
                        user_ids: vec![bob_id.clone()],
                    },
                    &alice_token,
                ))
                .await
                .expect("presence get")
                .into_inner();
            got.presences.first().map(|u| u.state).unwrap_or_default()
        })
    };
    use switchboard_proto::presence::v1::PresenceState;
    assert_eq!(state_of_bob(), PresenceState::Available as i32);
    let mut stdin = chat.stdin.take().expect("stdin");
    writeln!(stdin, "/away").expect("type");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while state_of_bob() != PresenceState::Away as i32 {
        assert!(std::time::Instant::now() < deadline, "never away");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stdin);
    assert_eq!(exit_code(&mut chat, Duration::from_secs(10)), Some(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while state_of_bob() != PresenceState::Offline as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "still online after the chat ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(alice_chat.stdin.take());
    assert_eq!(exit_code(&mut alice_chat, Duration::from_secs(10)), Some(0));
}

#[test]
fn a_restarted_embedded_stack_ends_a_running_chat_with_log_in_again_and_exit_code_2() {
    let addrs = [free_addr(), free_addr(), free_addr()];
    let mut server = embedded(&addrs);
    let (alice, bob) = (person_of(&addrs), person_of(&addrs));
    registered_id(&alice, "alice");
    let bob_id = registered_id(&bob, "bob");
    alice.run(&["login", "alice"]);
    bob.run(&["login", "bob"]);
    let conversation = alice.run(&["direct", &bob_id]);
    let mut chat = bob
        .cmd(&["chat", &conversation])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat");
    let err = read_lines(chat.stderr.take().expect("stderr"));
    expect_line(&err, "chat in");

    // Every account and key is gone with the process; the new one knows nobody.
    server.kill();
    let _again = embedded(&addrs);
    assert_eq!(exit_code(&mut chat, Duration::from_secs(30)), Some(2));
    expect_line(&err, "log in again");
    drop(chat.stdin.take());
}

#[test]
fn ctrl_d_quits_a_chat_even_while_it_is_reconnecting() {
    let addrs = [free_addr(), free_addr(), free_addr()];
    let mut server = embedded(&addrs);
    let bob = person_of(&addrs);
    registered_id(&bob, "bob");
    bob.run(&["login", "bob"]);
    let group = bob.run(&["group", "solo"]);
    let mut chat = bob
        .cmd(&["chat", &group])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat");
    let err = read_lines(chat.stderr.take().expect("stderr"));
    expect_line(&err, "chat in");
    let mut stdin = chat.stdin.take().expect("stdin");
    let mut console = bob
        .cmd(&["chat", "--agent"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("console");
    let console_err = read_lines(console.stderr.take().expect("stderr"));
    expect_line(&console_err, "online and AVAILABLE");
    server.kill();
    // (Whether the stream was up yet or not, it is now trying to connect.)
    expect_line(&err, "retrying");
    // A line typed now waits for the connection; Ctrl-D leaves at once and says so.
    writeln!(stdin, "are you there?").expect("type");
    drop(stdin);
    assert_eq!(exit_code(&mut chat, Duration::from_secs(5)), Some(0));
    expect_line(&err, "not sent");
    // The agent console too.
    expect_line(&console_err, "connection lost");
    drop(console.stdin.take());
    assert_eq!(exit_code(&mut console, Duration::from_secs(5)), Some(0));
}

#[test]
fn logging_out_elsewhere_ends_a_running_chat_with_exit_code_2() {
    let addrs = [free_addr(), free_addr(), free_addr()];
    let _server = embedded(&addrs);
    let bob = person_of(&addrs);
    registered_id(&bob, "bob");
    bob.run(&["login", "bob"]);
    let group = bob.run(&["group", "solo"]);
    let mut chat = bob
        .cmd(&["chat", &group])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat");
    let err = read_lines(chat.stderr.take().expect("stderr"));
    expect_line(&err, "chat in");
    // In the one-process default, auth's logout reaches messaging's stream.
    bob.run(&["logout"]);
    assert_eq!(exit_code(&mut chat, Duration::from_secs(10)), Some(2));
    // "session ended: log in again", or "not logged in: log in" if the chat looked at its
    // session file after `logout` removed it.
    expect_line(&err, "log in");
    drop(chat.stdin.take());
}

#[test]
fn a_customer_follows_the_desk_live_queue_place_agent_by_name_transfer_and_close() {
    let addrs = [free_addr(), free_addr(), free_addr()];
    let _server = ChildService::spawn(
        "switchboard-server",
        &[
            ("AUTH_ADDR", addrs[0].clone()),
            ("PRESENCE_ADDR", addrs[1].clone()),
            ("MESSAGING_ADDR", addrs[2].clone()),
            ("AUTH_ARGON2_MEMORY_KIB", "1024".into()),
            ("AUTH_ARGON2_ITERATIONS", "1".into()),
            ("AUTH_ADMIN_USERNAME", "deskadmin".into()),
            ("AUTH_ADMIN_PASSWORD", "desk admin password".into()),
        ],
    )
    .expect("switchboard-server");
    let admin = person_of(&addrs);
    // The first admin is made just after the server starts listening.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let login = admin
            .cmd(&["login", "deskadmin"])
            .env("SWITCHBOARD_PASSWORD", "desk admin password")
            .output()
            .expect("run");
        if login.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&login.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (agent1, agent2, early, carol) = (
        person_of(&addrs),
        person_of(&addrs),
        person_of(&addrs),
        person_of(&addrs),
    );
    for (p, name) in [
        (&agent1, "agent1"),
        (&agent2, "agent2"),
        (&early, "early"),
        (&carol, "carol"),
    ] {
        registered_id(p, name);
        p.run(&["login", name]);
    }
    // Roles by username.
    assert!(
        admin
            .run(&["set-role", "agent1", "agent"])
            .ends_with("agent1 is now agent")
    );
    admin.run(&["set-role", "Agent2", "agent"]);
    agent1.run(&["login", "agent1"]);
    agent2.run(&["login", "agent2"]);

    // Nobody is online at the desk: both wait, Carol second.
    let first = early.run(&["support", "open", "first", "hi"]);
    let first = first.split_whitespace().next().expect("id").to_owned();
    let opened = carol.run(&["support", "open", "order 42", "where", "is", "it?"]);
    assert!(opened.contains("(position 2 in the queue)"), "{opened}");
    let id = opened.split_whitespace().next().expect("id").to_owned();
    let mut chat = carol
        .cmd(&["chat", &id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat");
    let notices = read_lines(chat.stderr.take().expect("stderr"));
    let _shown = lines(&mut chat);
    expect_line(&notices, "(position 2 in the queue");
    early.run(&["support", "close", &first, "never", "mind"]);
    expect_line(&notices, "(position 1 in the queue)");

    // agent1 comes online and gets it; hands it to agent2 by name; agent2 closes it.
    let console = |p: &Person| {
        let mut c = p
            .cmd(&["chat", "--agent"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("console");
        let err = read_lines(c.stderr.take().expect("stderr"));
        expect_line(&err, "online and AVAILABLE");
        (c, err)
    };
    let (mut one, one_err) = console(&agent1);
    expect_line(&notices, "(agent1 joined)");
    expect_line(&one_err, "(new consultation)");
    let (mut two, two_err) = console(&agent2);
    let mut one_in = one.stdin.take().expect("stdin");
    writeln!(one_in, "/list").expect("type");
    expect_line(&one_err, "1. …");
    writeln!(one_in, "/use 1").expect("type");
    expect_line(&one_err, "(now in order 42");
    writeln!(one_in, "/transfer agent2 over to you").expect("type");
    expect_line(&notices, "(transferred to agent2)");
    expect_line(&two_err, "(transferred to you)");
    let mut two_in = two.stdin.take().expect("stdin");
    writeln!(two_in, "/close shipped today").expect("type");
    expect_line(&notices, "(closed: shipped today)");
    assert_eq!(exit_code(&mut chat, Duration::from_secs(10)), Some(0));
    drop((one_in, two_in));
    assert_eq!(exit_code(&mut one, Duration::from_secs(10)), Some(0));
    assert_eq!(exit_code(&mut two, Duration::from_secs(10)), Some(0));

    // The list shows people by name: a direct chat is the other person.
    let direct = carol.run(&["direct", "agent1"]);
    let listed = carol.run(&["conversations"]);
    let line = listed
        .lines()
        .find(|l| l.starts_with(&direct))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(line.ends_with("agent1"), "{line}");
    let unknown = carol.cmd(&["direct", "nobody-here"]).output().expect("run");
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no user named nobody-here"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}

#[test]
fn scripts_get_one_json_object_per_command_and_shells_get_completions() {
    let addrs = [free_addr(), free_addr(), free_addr()];
    let _server = embedded(&addrs);
    let dana = person_of(&addrs);
    registered_id(&person_of(&addrs), "erin");
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = dana.run(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
    };
    assert_eq!(json(&["register", "dana"])["user"]["username"], "dana");
    assert_eq!(json(&["login", "dana"])["user"]["role"], "customer");
    let group = json(&["group", "plans", "erin"])["conversation_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let sent = json(&["send", &group, "lunch", "at", "noon"]);
    assert_eq!(sent["message"]["seq"], 1);
    assert_eq!(sent["message"]["sender"]["username"], "dana");
    assert!(
        sent["message"]["sent_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let history = json(&["history", &group]);
    assert_eq!(history["messages"][0]["body"], "lunch at noon");
    let list = json(&["conversations"]);
    let c = &list["conversations"][0];
    assert_eq!(
        (c["id"].as_str(), c["kind"].as_str()),
        (Some(group.as_str()), Some("group"))
    );
    let members: Vec<&str> = c["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["username"].as_str())
        .collect();
    assert!(
        members.contains(&"erin") && members.contains(&"dana"),
        "{members:?}"
    );
    assert_eq!(json(&["whoami"])["user"]["username"], "dana");
    // A refusal is still text on stderr, with a failing exit code.
    let refused = dana
        .cmd(&["--output", "json", "send", &group, ""])
        .output()
        .expect("run");
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stdout.is_empty());
    assert_eq!(json(&["logout"])["logged_out"], true);

    for shell in ["bash", "zsh", "fish"] {
        let script = dana.run(&["completions", shell]);
        assert!(
            script.contains("switchboard") && script.contains("conversations"),
            "{shell}: {script}"
        );
    }
}

#[test]
fn at_a_terminal_chat_reads_keys_says_who_is_typing_takes_long_pastes_and_restores_the_terminal() {
    let addrs = [free_addr(), free_addr(), free_addr()];
    let _server = embedded(&addrs);
    let (alice, bob) = (person_of(&addrs), person_of(&addrs));
    registered_id(&alice, "alice");
    registered_id(&bob, "bob");
    alice.run(&["login", "alice"]);
    bob.run(&["login", "bob"]);
    let conversation = alice.run(&["direct", "bob"]);
    let mut watching = alice
        .cmd(&["chat", &conversation, "--history", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("alice chat");
    let notices = read_lines(watching.stderr.take().expect("stderr"));
    let shown = lines(&mut watching);
    expect_line(&notices, "chat in");

    // Bob at a keyboard: a pseudo-terminal driven by tests/python/pty_chat.py.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/pty_chat.py");
    let cli = binary("switchboard").expect("cli");
    let env = bob.cmd(&[]);
    let typist = switchboard_tests::instance::isolate(&mut Command::new("python3"))
        .arg(script)
        .arg(cli)
        .args(["chat", &conversation, "--history", "0"])
        .envs(env.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 pty_chat.py");
    expect_line(&notices, "(bob is typing…)");
    expect_line(&shown, "bob: hi");
    expect_line(&shown, &format!("bob: {}", "y".repeat(10_000)));
    let out = typist.wait_with_output().expect("pty driver");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pty driver printed {:?} ({e}); stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["steps_ok"], true, "{report}");
    assert_eq!(report["exit"], 0, "{report}");
    assert_eq!(
        report["restored"], true,
        "the terminal was left without line editing"
    );
    drop(watching.stdin.take());
    assert_eq!(exit_code(&mut watching, Duration::from_secs(10)), Some(0));
}
