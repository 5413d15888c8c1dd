//! `switchboard`: the command-line client. Register, log in (the session is kept in the
//! user's config directory and refreshed automatically), list conversations, send, read
//! history, and `chat`: an interactive line-mode chat that shows incoming messages live and
//! resumes after a dropped connection, on the same or another messaging instance.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use switchboard_proto::auth::v1 as auth_pb;
use switchboard_proto::auth::v1::auth_service_client::AuthServiceClient;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::messaging::v1::connect_request::Frame as In;
use switchboard_proto::messaging::v1::connect_response::Frame as Out;
use switchboard_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use switchboard_proto::messaging::v1::support_service_client::SupportServiceClient;

mod agent;
mod chat;
mod keyboard;
mod online;
mod output;
mod people;
use people::Names;
use tokio::sync::mpsc;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

/// Switchboard command-line client.
#[derive(Parser)]
#[command(name = "switchboard", version, about)]
struct Cli {
    /// The auth service.
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    auth_url: String,
    /// Messaging instances, comma-separated; `chat` moves to the next one when a connection drops.
    #[arg(
        long,
        env = "SWITCHBOARD_MESSAGING_URL",
        default_value = "http://127.0.0.1:50053",
        global = true
    )]
    messaging_url: String,
    /// The presence service (`chat --agent` keeps you online there while it runs).
    #[arg(
        long,
        env = "SWITCHBOARD_PRESENCE_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    presence_url: String,
    /// Where the session is kept (default: the user's config directory + /switchboard).
    #[arg(long, env = "SWITCHBOARD_CONFIG_DIR", global = true)]
    config_dir: Option<PathBuf>,
    /// How the non-interactive commands print their result: lines, or one JSON object.
    #[arg(
        long,
        env = "SWITCHBOARD_OUTPUT",
        value_enum,
        default_value_t,
        global = true
    )]
    output: output::Format,
    #[command(subcommand)]
    command: Command,
}

/// A role, as `set-role` takes it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    /// Talks in conversations and opens consultations.
    Customer,
    /// Also answers consultations at the support desk.
    Agent,
    /// Everything an agent may do, and `set-role`.
    Admin,
}

impl From<RoleArg> for auth_pb::Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Customer => Self::Customer,
            RoleArg::Agent => Self::Agent,
            RoleArg::Admin => Self::Admin,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create an account (the password is read from SWITCHBOARD_PASSWORD or asked for).
    Register {
        /// 3 to 32 of a-z 0-9 _ . -
        username: String,
        /// Name shown to others.
        #[arg(long, default_value = "")]
        display_name: String,
    },
    /// Log in and keep the session for the other commands.
    Login {
        /// Your username.
        username: String,
    },
    /// End the session everywhere and forget it here.
    Logout,
    /// Show who you are logged in as (your user id is what others add you with).
    Whoami,
    /// Admins: give a user a role (e.g. make an account a support agent). The user's
    /// next login or token refresh carries it.
    SetRole {
        /// The user: a username, or an id.
        user: String,
        /// The new role.
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// List your conversations, most recently active first.
    Conversations,
    /// Open (or find) the direct conversation with someone; prints its id.
    Direct {
        /// The other person: a username, or an id.
        user: String,
    },
    /// Create a group; prints its id.
    Group {
        /// Title.
        title: String,
        /// Members besides you: usernames or ids.
        members: Vec<String>,
    },
    /// Send one message.
    Send {
        /// Conversation id.
        conversation: String,
        /// The text.
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// Show the newest messages.
    History {
        /// Conversation id.
        conversation: String,
        /// How many (1 to 200).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Chat interactively: incoming messages appear live; each line you type is sent.
    /// While it runs you are online (`/away`, `/available`); what you see moves your read
    /// position. With --agent: the support agent's console instead (see `chat --help`).
    Chat {
        /// Conversation id (not with --agent).
        #[arg(required_unless_present = "agent")]
        conversation: Option<String>,
        /// How many earlier messages to show first (0 for none).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        history: u64,
        /// Agent console: be online and AVAILABLE for the desk while it runs, see new
        /// consultations and their messages as they come. Lines go to the current
        /// consultation; commands: /list, /use NUMBER-OR-ID, /close RESOLUTION,
        /// /transfer AGENT NOTE, /away, /available, /help.
        #[arg(long, conflicts_with = "conversation")]
        agent: bool,
    },
    /// The support desk: open consultations (customers), work the queue (agents).
    #[command(subcommand)]
    Support(SupportCommand),
    /// Print a shell completion script, e.g. `source <(switchboard completions bash)`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum SupportCommand {
    /// Customers: open a consultation; prints its id (chat in it with `switchboard chat <id>`).
    Open {
        /// What it is about (1 to 128 characters).
        topic: String,
        /// Your first message.
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// Agents: consultations waiting for an agent, oldest first.
    Queue,
    /// Agents: take a waiting consultation.
    Accept {
        /// Consultation id.
        consultation: String,
    },
    /// The assigned agent: hand a consultation to another (online) agent.
    Transfer {
        /// Consultation id.
        consultation: String,
        /// The other agent: a username, or an id.
        to_agent: String,
        /// A note for the other agent.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Customer or assigned agent: close a consultation (it becomes read-only).
    Close {
        /// Consultation id.
        consultation: String,
        /// How it ended.
        resolution: Vec<String>,
    },
}

/// The stored session.
#[derive(Serialize, Deserialize)]
struct Session {
    user_id: String,
    username: String,
    access_token: String,
    access_expires_at: i64,
    refresh_token: String,
}

struct Client {
    cli_auth: String,
    presence: String,
    messaging: Vec<String>,
    path: PathBuf,
}

fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad URL {url}"))?
        .connect_timeout(Duration::from_secs(3))
        // Chat lines are small frames: never hold one back for the server's delayed ACK.
        .tcp_nodelay(true)
        .connect_lazy())
}

fn authed<T>(msg: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("token is not ASCII")?,
    );
    Ok(req)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("SWITCHBOARD_PASSWORD") {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password("password: ").context("cannot read the password");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// The stored session is over: logged out, revoked, or unknown to auth (an embedded
/// stack that restarted forgets every account). Exit code 2.
/// Also when there is no stored session at all (never logged in, or logged out here).
#[derive(Debug)]
enum SessionEnded {
    /// No stored session.
    NotLoggedIn,
    /// Auth refused it; why.
    Ended(String),
}

impl std::fmt::Display for SessionEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLoggedIn => {
                write!(
                    f,
                    "not logged in: log in with `switchboard login <username>`"
                )
            }
            Self::Ended(why) => write!(
                f,
                "session ended: log in again with `switchboard login <username>` ({why})"
            ),
        }
    }
}

impl std::error::Error for SessionEnded {}

/// Exit code when the session has ended.
const EXIT_SESSION_ENDED: u8 = 2;

/// A refused call made with the session's token; UNAUTHENTICATED means the session ended.
fn status_message(e: tonic::Status) -> anyhow::Error {
    if e.code() == tonic::Code::Unauthenticated {
        return SessionEnded::Ended(e.message().to_owned()).into();
    }
    plain_status(e)
}

/// A refused call made without a session (register, login): said as it is.
fn plain_status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

/// Whether a refused refresh means the session is over (not that auth is unreachable).
fn ends_session(e: &tonic::Status) -> bool {
    !matches!(
        e.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    )
}

impl Client {
    fn auth(&self) -> anyhow::Result<AuthServiceClient<Channel>> {
        Ok(AuthServiceClient::new(channel(&self.cli_auth)?))
    }

    fn support(&self) -> anyhow::Result<SupportServiceClient<Channel>> {
        Ok(SupportServiceClient::new(channel(&self.messaging[0])?))
    }

    fn messaging(&self, which: usize) -> anyhow::Result<MessagingServiceClient<Channel>> {
        Ok(MessagingServiceClient::new(channel(
            &self.messaging[which % self.messaging.len()],
        )?))
    }

    fn save(&self, session: &Session) -> anyhow::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&self.path, serde_json::to_vec_pretty(session)?)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }

    /// Creates (or, for a direct one, finds) a conversation; its id.
    async fn create_conversation(
        &self,
        kind: pb::ConversationKind,
        title: String,
        member_ids: Vec<String>,
    ) -> anyhow::Result<String> {
        let s = self.session().await?;
        let req = pb::CreateConversationRequest {
            kind: kind as i32,
            title,
            member_ids,
        };
        let c = self
            .messaging(0)?
            .create_conversation(authed(req, &s.access_token)?)
            .await
            .map_err(status_message)?;
        Ok(c.into_inner().conversation.context("no conversation")?.id)
    }

    /// The session with a fresh access token (refreshed when it expires within a minute).
    async fn session(&self) -> anyhow::Result<Session> {
        let session = self.stored()?;
        if session.access_expires_at - now_secs() < 60 {
            return self.refresh(session).await;
        }
        Ok(session)
    }

    /// The session after a refresh, whatever its token's age: a token was refused, and
    /// this tells whether the session lives on ([`SessionEnded`] if not).
    async fn refreshed(&self) -> anyhow::Result<Session> {
        let session = self.stored()?;
        self.refresh(session).await
    }

    /// The stored session; [`SessionEnded::NotLoggedIn`] when there is none (also when
    /// `switchboard logout` ran meanwhile with the same config directory).
    fn stored(&self) -> anyhow::Result<Session> {
        let raw = std::fs::read(&self.path).map_err(|_| SessionEnded::NotLoggedIn)?;
        serde_json::from_slice(&raw).context("session file is corrupt; log in again")
    }

    async fn refresh(&self, mut session: Session) -> anyhow::Result<Session> {
        {
            let tokens = self
                .auth()?
                .refresh(auth_pb::RefreshRequest {
                    refresh_token: session.refresh_token.clone(),
                })
                .await
                .map_err(|e| {
                    if ends_session(&e) {
                        anyhow::Error::from(SessionEnded::Ended(e.message().to_owned()))
                    } else {
                        anyhow::anyhow!("cannot reach auth at {}: {}", self.cli_auth, e.message())
                    }
                })?
                .into_inner()
                .tokens
                .context("no tokens")?;
            session.access_token = tokens.access_token;
            session.access_expires_at = tokens
                .access_token_expires_at
                .map(|t| t.seconds)
                .unwrap_or(0);
            session.refresh_token = tokens.refresh_token;
            self.save(&session)?;
        }
        Ok(session)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<SessionEnded>().is_some() => {
            eprintln!("switchboard: {e}");
            ExitCode::from(EXIT_SESSION_ENDED)
        }
        Err(e) => {
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = match cli.config_dir {
        Some(d) => d,
        None => std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .context("no config directory: set SWITCHBOARD_CONFIG_DIR")?
            .join("switchboard"),
    };
    let client = Client {
        cli_auth: cli.auth_url,
        presence: cli.presence_url,
        messaging: cli
            .messaging_url
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        path: dir.join("session.json"),
    };
    if client.messaging.is_empty() {
        bail!("--messaging-url is empty");
    }
    let json = cli.output == output::Format::Json;
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "switchboard",
                &mut std::io::stdout(),
            );
        }
        Command::Register {
            username,
            display_name,
        } => {
            let password = password()?;
            let user = client
                .auth()?
                .register(auth_pb::RegisterRequest {
                    username,
                    password,
                    display_name,
                })
                .await
                .map_err(plain_status)?
                .into_inner()
                .user
                .context("no user")?;
            if json {
                output::print(serde_json::json!({ "user": output::user(&user) }));
            } else {
                println!("registered {} ({})", user.username, user.id);
            }
        }
        Command::Login { username } => {
            let password = password()?;
            let r = client
                .auth()?
                .login(auth_pb::LoginRequest { username, password })
                .await
                .map_err(plain_status)?
                .into_inner();
            let (user, tokens) = (r.user.context("no user")?, r.tokens.context("no tokens")?);
            client.save(&Session {
                user_id: user.id.clone(),
                username: user.username.clone(),
                access_token: tokens.access_token,
                access_expires_at: tokens
                    .access_token_expires_at
                    .map(|t| t.seconds)
                    .unwrap_or(0),
                refresh_token: tokens.refresh_token,
            })?;
            if json {
                output::print(serde_json::json!({ "user": output::user(&user) }));
            } else {
                println!("logged in as {} ({})", user.username, user.id);
            }
        }
        Command::Logout => {
            let s = client.session().await?;
            client
                .auth()?
                .logout(authed(auth_pb::LogoutRequest {}, &s.access_token)?)
                .await
                .map_err(status_message)?;
            std::fs::remove_file(&client.path)?;
            if json {
                output::print(serde_json::json!({ "logged_out": true }));
            } else {
                println!("logged out");
            }
        }
        Command::Whoami => {
            let s = client.session().await?;
            let me = client
                .auth()?
                .who_am_i(authed(auth_pb::WhoAmIRequest {}, &s.access_token)?)
                .await
                .map_err(status_message)?;
            let user = me.into_inner().user.context("no user")?;
            if json {
                output::print(serde_json::json!({ "user": output::user(&user) }));
            } else {
                println!("{} {} ({})", user.id, user.username, user.display_name);
            }
        }
        Command::SetRole { user, role } => {
            let s = client.session().await?;
            let user_id = people::resolve(&client, &s, &[user]).await?.remove(0);
            let req = auth_pb::SetRoleRequest {
                user_id,
                role: auth_pb::Role::from(role) as i32,
            };
            let user = client
                .auth()?
                .set_role(authed(req, &s.access_token)?)
                .await
                .map_err(status_message)?
                .into_inner()
                .user
                .context("no user")?;
            let role = auth_pb::Role::try_from(user.role)
                .map(|r| r.as_str_name().trim_start_matches("ROLE_").to_lowercase())
                .unwrap_or_else(|_| user.role.to_string());
            if json {
                output::print(serde_json::json!({ "user": output::user(&user) }));
            } else {
                println!("{} {} is now {role}", user.id, user.username);
            }
        }
        Command::Conversations => {
            let s = client.session().await?;
            let list = client
                .messaging(0)?
                .list_conversations(authed(
                    pb::ListConversationsRequest::default(),
                    &s.access_token,
                )?)
                .await
                .map_err(status_message)?
                .into_inner();
            let mut names = Names::default();
            let ids: Vec<String> = list
                .conversations
                .iter()
                .flat_map(|c| c.member_ids.iter().cloned())
                .collect();
            names.learn(&client, &s, &ids).await;
            if json {
                let all: Vec<_> = list
                    .conversations
                    .iter()
                    .map(|c| output::conversation(c, &names))
                    .collect();
                output::print(serde_json::json!({ "conversations": all }));
                return Ok(());
            }
            for c in list.conversations {
                let kind = pb::ConversationKind::try_from(c.kind)
                    .map(|k| k.as_str_name())
                    .unwrap_or("?");
                // A direct chat is the other person; a consultation its topic.
                let title = match (&c.consultation, c.title.is_empty()) {
                    (Some(k), _) => k.topic.clone(),
                    (None, false) => c.title.clone(),
                    (None, true) => {
                        let others: Vec<&str> = c
                            .member_ids
                            .iter()
                            .filter(|m| **m != s.user_id)
                            .map(|m| names.get(m))
                            .collect();
                        if others.is_empty() {
                            String::from("(just you)")
                        } else {
                            others.join(", ")
                        }
                    }
                };
                println!(
                    "{}  {:<26} {:>4} unread  {}",
                    c.id,
                    kind.trim_start_matches("CONVERSATION_KIND_"),
                    c.unread_count,
                    title
                );
            }
        }
        Command::Direct { user } => {
            let s = client.session().await?;
            let members = people::resolve(&client, &s, &[user]).await?;
            let id = client
                .create_conversation(pb::ConversationKind::Direct, String::new(), members)
                .await?;
            if json {
                output::print(serde_json::json!({ "conversation_id": id }));
            } else {
                println!("{id}");
            }
        }
        Command::Group { title, members } => {
            let s = client.session().await?;
            let members = people::resolve(&client, &s, &members).await?;
            let id = client
                .create_conversation(pb::ConversationKind::Group, title, members)
                .await?;
            if json {
                output::print(serde_json::json!({ "conversation_id": id }));
            } else {
                println!("{id}");
            }
        }
        Command::Send { conversation, text } => {
            let s = client.session().await?;
            let req = pb::SendMessageRequest {
                conversation_id: conversation,
                client_msg_id: uuid::Uuid::now_v7().to_string(),
                body: text.join(" "),
                metadata: HashMap::new(),
            };
            let m = client
                .messaging(0)?
                .send_message(authed(req, &s.access_token)?)
                .await
                .map_err(status_message)?;
            let m = m.into_inner().message.context("no message")?;
            if json {
                let mut names = Names::default();
                names
                    .learn(&client, &s, std::slice::from_ref(&m.sender_id))
                    .await;
                output::print(serde_json::json!({ "message": output::message(&m, &names) }));
            } else {
                println!("sent #{}", m.seq);
            }
        }
        Command::History {
            conversation,
            limit,
        } => {
            let s = client.session().await?;
            let req = pb::ListMessagesRequest {
                conversation_id: conversation,
                limit,
                ..Default::default()
            };
            let page = client
                .messaging(0)?
                .list_messages(authed(req, &s.access_token)?)
                .await
                .map_err(status_message)?;
            let mut names = Names::default();
            let messages = page.into_inner().messages;
            if json {
                let senders: Vec<String> = messages.iter().map(|m| m.sender_id.clone()).collect();
                names.learn(&client, &s, &senders).await;
                let all: Vec<_> = messages
                    .iter()
                    .map(|m| output::message(m, &names))
                    .collect();
                output::print(serde_json::json!({ "messages": all }));
            } else {
                for m in messages {
                    println!("{}", names.line(&client, &s, &m).await);
                }
            }
        }
        Command::Chat {
            conversation: Some(conversation),
            agent: false,
            history,
        } => chat::chat(&client, &conversation, history).await?,
        Command::Chat { .. } => agent::console(&client).await?,
        Command::Support(command) => support(&client, command, json).await?,
    }
    Ok(())
}

/// One line about a consultation (the agent by name if `names` knows it).
fn describe(c: &pb::Consultation, names: &Names) -> String {
    let state = pb::ConsultationState::try_from(c.state)
        .map(|s| s.as_str_name().trim_start_matches("CONSULTATION_STATE_"))
        .unwrap_or("?");
    let mut line = format!("{}  {:<8} {}", c.id, state, c.topic);
    if c.queue_position > 0 {
        line.push_str(&format!("  (position {} in the queue)", c.queue_position));
    }
    if !c.agent_id.is_empty() {
        line.push_str(&format!("  agent {}", names.get(&c.agent_id)));
    }
    if !c.transfer_note.is_empty() {
        line.push_str(&format!("  note: {}", c.transfer_note));
    }
    line
}

/// Prints the consultation a desk call answered with, or its error.
async fn print_consultation(
    client: &Client,
    s: &Session,
    json: bool,
    reply: Result<Option<pb::Consultation>, tonic::Status>,
) -> anyhow::Result<()> {
    let c = reply.map_err(status_message)?.context("no consultation")?;
    let mut names = Names::default();
    names
        .learn(client, s, &[c.agent_id.clone(), c.customer_id.clone()])
        .await;
    if json {
        output::print(serde_json::json!({ "consultation": output::consultation(&c, &names) }));
    } else {
        println!("{}", describe(&c, &names));
    }
    Ok(())
}

async fn support(client: &Client, command: SupportCommand, json: bool) -> anyhow::Result<()> {
    let s = client.session().await?;
    let token = &s.access_token;
    let mut desk = client.support()?;
    match command {
        SupportCommand::Open { topic, text } => {
            let r = desk
                .open_consultation(authed(
                    pb::OpenConsultationRequest {
                        topic,
                        first_message: text.join(" "),
                    },
                    token,
                )?)
                .await
                .map_err(status_message)?
                .into_inner();
            let id = r
                .consultation
                .as_ref()
                .map(|c| c.id.clone())
                .unwrap_or_default();
            print_consultation(client, &s, json, Ok(r.consultation)).await?;
            eprintln!("chat in it with: switchboard chat {id}");
        }
        SupportCommand::Queue => {
            let q = desk
                .list_queue(authed(pb::ListQueueRequest { limit: 0 }, token)?)
                .await
                .map_err(status_message)?
                .into_inner();
            let mut names = Names::default();
            let customers: Vec<String> = q
                .consultations
                .iter()
                .map(|c| c.customer_id.clone())
                .collect();
            names.learn(client, &s, &customers).await;
            if json {
                let all: Vec<_> = q
                    .consultations
                    .iter()
                    .map(|c| output::consultation(c, &names))
                    .collect();
                output::print(serde_json::json!({ "consultations": all }));
                return Ok(());
            }
            if q.consultations.is_empty() {
                eprintln!("the queue is empty");
            }
            for c in q.consultations {
                println!(
                    "{}  (from {})",
                    describe(&c, &names),
                    names.get(&c.customer_id)
                );
            }
        }
        SupportCommand::Accept { consultation } => {
            let req = pb::AcceptConsultationRequest {
                consultation_id: consultation,
            };
            let r = desk.accept_consultation(authed(req, token)?).await;
            print_consultation(client, &s, json, r.map(|r| r.into_inner().consultation)).await?;
        }
        SupportCommand::Transfer {
            consultation,
            to_agent,
            note,
        } => {
            let to_agent_id = people::resolve(client, &s, &[to_agent]).await?.remove(0);
            let req = pb::TransferConsultationRequest {
                consultation_id: consultation,
                to_agent_id,
                note,
            };
            let r = desk.transfer_consultation(authed(req, token)?).await;
            print_consultation(client, &s, json, r.map(|r| r.into_inner().consultation)).await?;
        }
        SupportCommand::Close {
            consultation,
            resolution,
        } => {
            let req = pb::CloseConsultationRequest {
                consultation_id: consultation,
                resolution: resolution.join(" "),
            };
            let r = desk.close_consultation(authed(req, token)?).await;
            print_consultation(client, &s, json, r.map(|r| r.into_inner().consultation)).await?;
        }
    }
    Ok(())
}

/// Waits `backoff` (doubling it, up to 5 s) and moves on to the next messaging instance.
async fn next_instance(which: &mut usize, backoff: &mut Duration) {
    *which += 1;
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

impl Client {
    /// A Connect stream on messaging instance `which`, moving on to the next ones (with
    /// backoff) while they refuse; also the session it was opened with.
    async fn open_stream(
        &self,
        which: &mut usize,
        backoff: &mut Duration,
    ) -> anyhow::Result<(
        Session,
        mpsc::Sender<pb::ConnectRequest>,
        tonic::Streaming<pb::ConnectResponse>,
    )> {
        loop {
            let session = match self.session().await {
                Ok(s) => s,
                Err(e) if e.downcast_ref::<SessionEnded>().is_some() => return Err(e),
                Err(e) => {
                    keyboard::say!("({e:#}; retrying)");
                    next_instance(which, backoff).await;
                    continue;
                }
            };
            let (tx, rx) = mpsc::channel::<pb::ConnectRequest>(64);
            let stream = self
                .messaging(*which)?
                .connect(authed(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    &session.access_token,
                )?)
                .await;
            match stream {
                Ok(r) => return Ok((session, tx, r.into_inner())),
                Err(e) if e.code() == tonic::Code::Unauthenticated => {
                    // Refused token: a refresh says whether the session lives on.
                    match self.refreshed().await {
                        Ok(_) => {}
                        Err(e) if e.downcast_ref::<SessionEnded>().is_some() => return Err(e),
                        Err(e) => {
                            keyboard::say!("({e:#}; retrying)");
                            next_instance(which, backoff).await;
                        }
                    }
                }
                Err(e) => {
                    keyboard::say!(
                        "(cannot connect to {}: {}; retrying)",
                        self.messaging[*which % self.messaging.len()],
                        e.message()
                    );
                    next_instance(which, backoff).await;
                }
            }
        }
    }
}

/// When a message was sent, in local time: `14:02` today, `2026-11-30 14:02` before.
fn clock(at: Option<&prost_types::Timestamp>) -> String {
    use chrono::{Local, TimeZone};
    let Some(at) = at else {
        return String::from("--:--");
    };
    let Some(t) = Local
        .timestamp_opt(at.seconds, at.nanos.clamp(0, 999_999_999) as u32)
        .single()
    else {
        return String::from("--:--");
    };
    if t.date_naive() == Local::now().date_naive() {
        t.format("%H:%M").to_string()
    } else {
        t.format("%Y-%m-%d %H:%M").to_string()
    }
}
