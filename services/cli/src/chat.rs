//! `switchboard chat <conversation>`: an interactive line-mode chat.
//!
//! While it runs the user is online (a presence session; `/away`, `/available`). It shows
//! the last `--history` messages and then everything live with its time, others' typing
//! and read receipts, and moves the user's read position as messages are shown (so unread
//! counts drop). At a terminal it reads keystrokes ([`keyboard`]) and tells the others
//! when the user is typing. It resumes from the last seq seen after any disconnect, trying the
//! messaging instances in turn; lines not yet acknowledged are sent again with the same
//! idempotency key, so nothing is lost or doubled. Ctrl-D quits at any time, also while
//! reconnecting. A session that auth no longer knows (logout, or a restarted embedded
//! stack) ends the chat with "log in again" and exit code 2.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::presence::v1::PresenceState;
use tokio::time::Instant;

use super::keyboard::{self, Key, Keyboard, say};
use super::online::Online;
use super::{Client, In, Names, Out, authed, next_instance, status_message};

const HELP: &str = "type a line to send it; /away, /available, /help; Ctrl-D to quit";

/// Typing notices go out at most this often while someone types.
const TYPING_EVERY: Duration = Duration::from_secs(3);

/// How long Ctrl-D waits for the lines still unconfirmed before quitting anyway.
const QUIT_WAIT: Duration = Duration::from_secs(5);

/// What one typed line means.
enum Typed {
    Nothing,
    Text(String),
    Command(&'static str),
    Unknown,
}

fn typed(line: String) -> Typed {
    match line.trim() {
        "" => Typed::Nothing,
        "/away" => Typed::Command("away"),
        "/available" => Typed::Command("available"),
        "/help" => Typed::Command("help"),
        // `//text` sends `/text`.
        w if w.starts_with("//") => Typed::Text(w[1..].to_owned()),
        w if w.starts_with('/') => Typed::Unknown,
        _ => Typed::Text(line),
    }
}

/// The state of one chat across reconnects.
struct Chat {
    conversation: String,
    me: String,
    names: Names,
    online: Online,
    /// Lines sent but not yet confirmed: idempotency key, body.
    pending: Vec<(String, String)>,
    last_seq: u64,
    read_seq: u64,
    /// Others' read positions, as last shown.
    receipts: HashMap<String, u64>,
    /// The consultation as last shown (state, queue position, agent), if this is one.
    desk: Option<(i32, u32, String)>,
}

impl Chat {
    fn send_frame(&mut self, key: String, body: String) -> pb::ConnectRequest {
        pb::ConnectRequest {
            frame: Some(In::Send(pb::Send {
                conversation_id: self.conversation.clone(),
                client_msg_id: key,
                body,
                metadata: HashMap::new(),
            })),
        }
    }

    /// A typed line: queued for sending (returned as a frame) or a command carried out.
    async fn line(&mut self, line: String) -> Option<pb::ConnectRequest> {
        match typed(line) {
            Typed::Nothing => None,
            Typed::Unknown => {
                say!("(unknown command; {HELP}; start a line with // to send one starting with /)");
                None
            }
            Typed::Command("away") => {
                self.online.set(PresenceState::Away).await;
                say!("(away)");
                None
            }
            Typed::Command("available") => {
                self.online.set(PresenceState::Available).await;
                say!("(available)");
                None
            }
            Typed::Command(_) => {
                say!("({HELP})");
                None
            }
            Typed::Text(body) => {
                let key = uuid::Uuid::now_v7().to_string();
                self.pending.push((key.clone(), body.clone()));
                Some(self.send_frame(key, body))
            }
        }
    }

    /// A Read frame if the shown messages moved the read position.
    fn read_frame(&mut self) -> Option<pb::ConnectRequest> {
        if self.last_seq <= self.read_seq {
            return None;
        }
        self.read_seq = self.last_seq;
        Some(pb::ConnectRequest {
            frame: Some(In::Read(pb::Read {
                conversation_id: self.conversation.clone(),
                seq: self.last_seq,
            })),
        })
    }
}

/// Runs the chat until Ctrl-D (or end of input), or until the session ends.
pub(crate) async fn chat(client: &Client, conversation: &str, history: u64) -> anyhow::Result<()> {
    let session = client.session().await?;
    let conv = client
        .messaging(0)?
        .get_conversation(authed(
            pb::GetConversationRequest {
                conversation_id: conversation.to_owned(),
            },
            &session.access_token,
        )?)
        .await
        .map_err(status_message)?
        .into_inner()
        .conversation
        .context("no conversation")?;
    let mut chat = Chat {
        conversation: conversation.to_owned(),
        me: session.user_id.clone(),
        names: Names::default(),
        online: Online::start(client, &session.access_token, PresenceState::Available).await,
        pending: Vec::new(),
        last_seq: conv.last_seq.saturating_sub(history),
        read_seq: conv.read_seq,
        receipts: HashMap::new(),
        desk: None,
    };
    let title = if conv.title.is_empty() {
        conversation.to_owned()
    } else {
        conv.title.clone()
    };
    if conv.read_only {
        say!("({title} is closed: read-only)");
    }
    say!("chat in {title}; {HELP}");
    if let Some(k) = &conv.consultation {
        show_desk(&mut chat, client, &session, k).await;
    }

    let mut keys = Keyboard::open();
    let mut typing_sent: Option<Instant> = None;
    let mut which = 0usize;
    let mut backoff = Duration::from_millis(200);
    let mut wait_first = false;
    // Set once input has ended: quit when every line is confirmed, or at this instant.
    let mut quit_by: Option<Instant> = None;
    loop {
        // Connect (after a pause, when the last connection dropped), reading the keyboard
        // meanwhile: typed lines queue up, and Ctrl-D quits at once.
        let opened = {
            let open = async {
                if wait_first {
                    next_instance(&mut which, &mut backoff).await;
                }
                client.open_stream(&mut which, &mut backoff).await
            };
            tokio::pin!(open);
            loop {
                tokio::select! {
                    r = &mut open => break r,
                    key = keys.next(), if quit_by.is_none() => match key {
                        Key::Line(line) => { let _ = chat.line(line).await; }
                        Key::Typing => {}
                        Key::End => {
                            if !chat.pending.is_empty() {
                                say!("({} unconfirmed line(s) not sent)", chat.pending.len());
                            }
                            return Ok(());
                        }
                    },
                    _ = async { match quit_by { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                        say!("({} unconfirmed line(s) may not have been sent)", chat.pending.len());
                        return Ok(());
                    }
                }
            }
        };
        let (session, tx, mut inbound) = opened?;
        wait_first = true;
        let subscribe = pb::Subscribe {
            conversation_id: conversation.to_owned(),
            since_seq: chat.last_seq,
            ..Default::default()
        };
        let _ = tx
            .send(pb::ConnectRequest {
                frame: Some(In::Subscribe(subscribe)),
            })
            .await;
        for (key, body) in chat.pending.clone() {
            let frame = chat.send_frame(key, body);
            let _ = tx.send(frame).await;
        }
        let mut live = false;
        loop {
            tokio::select! {
                key = keys.next(), if quit_by.is_none() => match key {
                    Key::Line(line) => {
                        if let Some(frame) = chat.line(line).await {
                            let _ = tx.send(frame).await;
                        }
                    }
                    Key::Typing => {
                        if typing_sent.is_none_or(|t| t.elapsed() >= TYPING_EVERY) {
                            typing_sent = Some(Instant::now());
                            let typing = pb::Typing { conversation_id: conversation.to_owned() };
                            let _ = tx.send(pb::ConnectRequest { frame: Some(In::Typing(typing)) }).await;
                        }
                    }
                    Key::End => {
                        if chat.pending.is_empty() {
                            return Ok(());
                        }
                        quit_by = Some(Instant::now() + QUIT_WAIT);
                    }
                },
                _ = async { match quit_by { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    say!("({} unconfirmed line(s) may not have been sent)", chat.pending.len());
                    return Ok(());
                }
                _ = chat.online.needs_healing() => {
                    let token = client.session().await.map(|s| s.access_token)?;
                    chat.online.heal(&token).await;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(r)) => match r.frame {
                        Some(Out::Message(m)) if m.seq > chat.last_seq => {
                            chat.last_seq = m.seq;
                            keyboard::show(&chat.names.line(client, &session, &m).await);
                            backoff = Duration::from_millis(200);
                            if live && let Some(read) = chat.read_frame() {
                                let _ = tx.send(read).await;
                            }
                        }
                        Some(Out::Recovered(_)) => {
                            live = true;
                            // Whatever the desk did while this stream was not listening.
                            if chat.desk.is_some() && desk_now(&mut chat, client, &session).await {
                                return Ok(());
                            }
                            if let Some(read) = chat.read_frame() {
                                let _ = tx.send(read).await;
                            }
                        }
                        Some(Out::SendResult(r)) => {
                            if let Some(pb::send_result::Result::Error(e)) = &r.result {
                                say!("(not sent: {})", e.message);
                            }
                            chat.pending.retain(|(k, _)| *k != r.client_msg_id);
                            if quit_by.is_some() && chat.pending.is_empty() {
                                return Ok(());
                            }
                        }
                        Some(Out::Receipt(r)) if r.user_id != chat.me => {
                            let shown = chat.receipts.entry(r.user_id.clone()).or_default();
                            if r.read_seq > *shown {
                                *shown = r.read_seq;
                                let name = chat.names.name(client, &session, &r.user_id).await;
                                say!("({name} read up to #{})", r.read_seq);
                            }
                        }
                        Some(Out::ConversationEvent(e)) => {
                            let closed = desk_news(&mut chat, client, &session, &e).await;
                            if closed {
                                return Ok(());
                            }
                        }
                        Some(Out::Typing(t)) if t.user_id != chat.me => {
                            let name = chat.names.name(client, &session, &t.user_id).await;
                            say!("({name} is typing…)");
                        }
                        Some(Out::Error(e)) => {
                            // Not being (or no longer being) allowed in the conversation ends
                            // the chat; anything else is said and the chat goes on.
                            if matches!(tonic::Code::from_i32(e.code), tonic::Code::NotFound | tonic::Code::PermissionDenied) {
                                bail!("{}", e.message);
                            }
                            say!("(refused: {})", e.message);
                        }
                        Some(Out::Resync(r)) => {
                            say!("(history before #{} is gone; continuing from there)", r.oldest_seq);
                            chat.last_seq = r.oldest_seq.saturating_sub(1);
                            wait_first = false;
                            break;
                        }
                        _ => {}
                    },
                    Err(status) if status.code() == tonic::Code::Unauthenticated => {
                        // Expired, revoked or signed by a key nobody knows any more: a
                        // refresh tells which; only a live session resumes.
                        client.refreshed().await?;
                        wait_first = false;
                        break;
                    }
                    Ok(None) | Err(_) => {
                        say!("(connection lost; resuming after #{})", chat.last_seq);
                        break;
                    }
                },
            }
        }
    }
}

/// Shows the consultation's state if it differs from what was last shown.
async fn show_desk(
    chat: &mut Chat,
    client: &Client,
    session: &super::Session,
    k: &pb::Consultation,
) {
    let now = (k.state, k.queue_position, k.agent_id.clone());
    if chat.desk.as_ref() == Some(&now) {
        return;
    }
    let first = chat.desk.is_none();
    chat.desk = Some(now);
    match pb::ConsultationState::try_from(k.state) {
        Ok(pb::ConsultationState::Queued) if first => say!(
            "(position {} in the queue; an agent will join)",
            k.queue_position
        ),
        Ok(pb::ConsultationState::Queued) => {
            say!("(position {} in the queue)", k.queue_position)
        }
        Ok(pb::ConsultationState::Assigned) => {
            let agent = chat.names.name(client, session, &k.agent_id).await;
            say!(
                "{}",
                if first {
                    format!("(with {agent})")
                } else {
                    format!("({agent} joined)")
                }
            );
        }
        _ => {}
    }
}

/// Reads the consultation again (events sent while the stream was down are not replayed);
/// `true` if it is closed.
async fn desk_now(chat: &mut Chat, client: &Client, session: &super::Session) -> bool {
    let read = async {
        client
            .messaging(0)
            .ok()?
            .get_conversation(
                authed(
                    pb::GetConversationRequest {
                        conversation_id: chat.conversation.clone(),
                    },
                    &session.access_token,
                )
                .ok()?,
            )
            .await
            .ok()?
            .into_inner()
            .conversation?
            .consultation
    };
    let Some(k) = read.await else {
        return false;
    };
    if k.state == pb::ConsultationState::Closed as i32 {
        closed(&k);
        return true;
    }
    show_desk(chat, client, session, &k).await;
    false
}

fn closed(k: &pb::Consultation) {
    if k.resolution.is_empty() {
        say!("(closed)");
    } else {
        say!("(closed: {})", k.resolution);
    }
}

/// Says what the desk did with this chat's consultation; `true` once it is closed (the
/// chat ends there).
async fn desk_news(
    chat: &mut Chat,
    client: &Client,
    session: &super::Session,
    e: &pb::ConversationEvent,
) -> bool {
    let Some(c) = e
        .conversation
        .as_ref()
        .filter(|c| c.id == chat.conversation)
    else {
        return false;
    };
    let Some(k) = &c.consultation else {
        return false;
    };
    match pb::ConversationEventKind::try_from(e.kind) {
        Ok(pb::ConversationEventKind::ConsultationTransferred) => {
            let agent = chat.names.name(client, session, &k.agent_id).await;
            say!("(transferred to {agent})");
            chat.desk = Some((k.state, k.queue_position, k.agent_id.clone()));
        }
        Ok(pb::ConversationEventKind::ConsultationClosed) => {
            closed(k);
            return true;
        }
        Ok(
            pb::ConversationEventKind::ConsultationQueueMoved
            | pb::ConversationEventKind::ConsultationAssigned,
        ) => show_desk(chat, client, session, k).await,
        _ => {}
    }
    false
}
