//! `switchboard chat --agent`: the support agent's console. While it runs the agent is
//! online (a presence device session, AVAILABLE until `/away`), so the desk routes
//! consultations here; new consultations and every message of the agent's consultations
//! appear live, and typed lines go to the current consultation.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::presence::v1 as presence_pb;
use tokio::sync::mpsc;

use super::online::Online;
use super::{Client, In, Names, Out, authed, describe, next_instance, status_message, stdin_lines};

const HELP: &str = "commands: /list, /use <id>, /close [resolution], /transfer <agent id> [note], /away, /available, /help";

/// What the console knows of the agent's consultations.
#[derive(Default)]
struct Desk {
    me: String,
    current: Option<String>,
    topics: HashMap<String, String>,
    positions: HashMap<String, u64>,
}

impl Desk {
    fn label(&self, id: &str) -> String {
        let short: String = id
            .chars()
            .rev()
            .take(6)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        match self.topics.get(id) {
            Some(t) => format!("{t} …{short}"),
            None => format!("…{short}"),
        }
    }

    fn event(&mut self, e: &pb::ConversationEvent) {
        let Some(c) = e.conversation.as_ref().and_then(|c| c.consultation.clone()) else {
            return;
        };
        self.topics.insert(c.id.clone(), c.topic.clone());
        let mine = c.agent_id == self.me;
        match pb::ConversationEventKind::try_from(e.kind) {
            Ok(pb::ConversationEventKind::ConsultationAssigned) if mine => {
                eprintln!("(new consultation) {}", describe(&c));
                self.current.get_or_insert(c.id.clone());
            }
            Ok(pb::ConversationEventKind::ConsultationTransferred) if mine => {
                eprintln!("(transferred to you) {}", describe(&c));
                self.current.get_or_insert(c.id.clone());
            }
            Ok(pb::ConversationEventKind::ConsultationTransferred) => {
                eprintln!("({} now handled by {})", self.label(&c.id), c.agent_id);
                if self.current.as_deref() == Some(c.id.as_str()) {
                    self.current = None;
                }
            }
            Ok(pb::ConversationEventKind::ConsultationClosed) => {
                eprintln!("(closed) {}: {}", self.label(&c.id), c.resolution);
                if self.current.as_deref() == Some(c.id.as_str()) {
                    self.current = None;
                }
            }
            _ => {}
        }
    }
}

/// The agent's assigned consultations now.
async fn assigned(client: &Client, token: &str, me: &str) -> anyhow::Result<Vec<pb::Conversation>> {
    let list = client
        .messaging(0)?
        .list_conversations(authed(
            pb::ListConversationsRequest {
                page_size: 100,
                page_token: String::new(),
            },
            token,
        )?)
        .await
        .map_err(status_message)?
        .into_inner();
    Ok(list
        .conversations
        .into_iter()
        .filter(|c| {
            c.consultation.as_ref().is_some_and(|k| {
                k.agent_id == me && k.state == pb::ConsultationState::Assigned as i32
            })
        })
        .collect())
}

/// Runs the console until stdin ends.
pub(crate) async fn console(client: &Client) -> anyhow::Result<()> {
    let session = client.session().await?;
    let mut desk = Desk {
        me: session.user_id.clone(),
        ..Desk::default()
    };
    for c in assigned(client, &session.access_token, &desk.me).await? {
        desk.positions.insert(c.id.clone(), c.last_seq);
        if let Some(k) = &c.consultation {
            desk.topics.insert(c.id.clone(), k.topic.clone());
            eprintln!("(yours) {}", describe(k));
            desk.current.get_or_insert(c.id.clone());
        }
    }
    let mut lines = stdin_lines();
    let mut online = Online::start(
        client,
        &session.access_token,
        presence_pb::PresenceState::Available,
    )
    .await;
    eprintln!("online and AVAILABLE as {}; {HELP}", session.username);
    let mut names = Names::default();
    let mut which = 0usize;
    let mut backoff = Duration::from_millis(200);
    loop {
        let (session, tx, mut inbound) = client.open_stream(&mut which, &mut backoff).await?;
        let frame = |f: In| pb::ConnectRequest { frame: Some(f) };
        let subscribe = pb::Subscribe {
            all_conversations: true,
            positions: desk.positions.clone(),
            ..Default::default()
        };
        let _ = tx.send(frame(In::Subscribe(subscribe))).await;
        loop {
            tokio::select! {
                line = lines.recv() => {
                    let Some(line) = line else { return Ok(()) };
                    command(client, &session.access_token, &mut desk, &mut online, &tx, line.trim()).await;
                }
                _ = online.needs_healing() => {
                    let token = client.session().await.map(|s| s.access_token)?;
                    online.heal(&token).await;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(r)) => match r.frame {
                        Some(Out::Message(m)) => {
                            desk.positions.insert(m.conversation_id.clone(), m.seq);
                            let line = names.line(client, &session, &m).await;
                            println!("[{}] {line}", desk.label(&m.conversation_id));
                            backoff = Duration::from_millis(200);
                        }
                        Some(Out::ConversationEvent(e)) => desk.event(&e),
                        Some(Out::SendResult(pb::SendResult { result: Some(pb::send_result::Result::Error(e)), .. })) => {
                            eprintln!("(not sent: {})", e.message);
                        }
                        Some(Out::Error(e)) => eprintln!("({})", e.message),
                        _ => {}
                    },
                    Err(status) if status.code() == tonic::Code::Unauthenticated => {
                        // Only a session that still lives resumes (SessionEnded otherwise).
                        if let Err(e) = client.refreshed().await {
                            if e.downcast_ref::<super::SessionEnded>().is_some() {
                                return Err(e);
                            }
                            eprintln!("({e:#}; retrying)");
                            next_instance(&mut which, &mut backoff).await;
                        }
                        break;
                    }
                    Ok(None) | Err(_) => {
                        eprintln!("(connection lost; resuming)");
                        next_instance(&mut which, &mut backoff).await;
                        break;
                    }
                },
            }
        }
    }
}

/// One typed line: a command or a message to the current consultation.
async fn command(
    client: &Client,
    token: &str,
    desk: &mut Desk,
    online: &mut Online,
    stream: &mpsc::Sender<pb::ConnectRequest>,
    line: &str,
) {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim();
    let result: anyhow::Result<()> = async {
        match word {
            "" => {}
            "/help" => eprintln!("{HELP}"),
            "/away" => online.set(presence_pb::PresenceState::Away).await,
            "/available" => online.set(presence_pb::PresenceState::Available).await,
            "/list" => {
                for c in assigned(client, token, &desk.me).await? {
                    if let Some(k) = &c.consultation {
                        let mark = if desk.current.as_deref() == Some(c.id.as_str()) {
                            "*"
                        } else {
                            " "
                        };
                        eprintln!("{mark} {}", describe(k));
                    }
                }
            }
            "/use" if !rest.is_empty() => {
                desk.current = Some(rest.to_owned());
                eprintln!("(now in {})", desk.label(rest));
            }
            "/close" | "/transfer" => {
                let id = desk
                    .current
                    .clone()
                    .context("no current consultation; /list and /use <id>")?;
                let mut support = client.support()?;
                let c = if word == "/close" {
                    support
                        .close_consultation(authed(
                            pb::CloseConsultationRequest {
                                consultation_id: id,
                                resolution: rest.to_owned(),
                            },
                            token,
                        )?)
                        .await
                        .map_err(status_message)?
                        .into_inner()
                        .consultation
                } else {
                    let (to, note) = rest.split_once(' ').unwrap_or((rest, ""));
                    support
                        .transfer_consultation(authed(
                            pb::TransferConsultationRequest {
                                consultation_id: id,
                                to_agent_id: to.to_owned(),
                                note: note.trim().to_owned(),
                            },
                            token,
                        )?)
                        .await
                        .map_err(status_message)?
                        .into_inner()
                        .consultation
                };
                if let Some(c) = c {
                    eprintln!("{}", describe(&c));
                }
                desk.current = None;
            }
            w if w.starts_with('/') => eprintln!("unknown command; {HELP}"),
            _ => {
                let id = desk
                    .current
                    .clone()
                    .context("no current consultation; /list and /use <id>")?;
                let send = pb::Send {
                    conversation_id: id,
                    client_msg_id: uuid::Uuid::now_v7().to_string(),
                    body: line.to_owned(),
                    metadata: HashMap::new(),
                };
                let _ = stream
                    .send(pb::ConnectRequest {
                        frame: Some(In::Send(send)),
                    })
                    .await;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("({e:#})");
    }
}
