//! `switchboard chat --agent`: the support agent's console. While it runs the agent is
//! online (a presence device session, AVAILABLE until `/away`), so the desk routes
//! consultations here; new consultations and every message of the agent's consultations
//! appear live, and typed lines go to the current consultation. People are shown and
//! typed by username; consultations by their number in `/list` or the short id shown.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use switchboard_proto::messaging::v1 as pb;
use switchboard_proto::presence::v1 as presence_pb;
use tokio::sync::mpsc;

use super::keyboard::{self, Key, Keyboard, say};
use super::online::Online;
use super::{
    Client, In, Names, Out, Session, authed, describe, next_instance, people, status_message,
};

const HELP: &str = "commands: /list, /use <number or id>, /close [resolution], /transfer <agent> [note], /away, /available, /help";

/// Characters of a consultation id the console shows (its end: ids start with a time).
const SHORT: usize = 6;

/// What the console knows of the agent's consultations.
#[derive(Default)]
struct Desk {
    me: String,
    current: Option<String>,
    topics: HashMap<String, String>,
    positions: HashMap<String, u64>,
    /// What the last `/list` showed, in its order (for `/use <number>`).
    listed: Vec<String>,
    names: Names,
}

/// The end of `id` the console shows.
fn short(id: &str) -> &str {
    let cut = id
        .char_indices()
        .rev()
        .nth(SHORT - 1)
        .map(|(i, _)| i)
        .unwrap_or(0);
    &id[cut..]
}

impl Desk {
    fn label(&self, id: &str) -> String {
        match self.topics.get(id) {
            Some(t) => format!("{t} …{}", short(id)),
            None => format!("…{}", short(id)),
        }
    }

    /// The consultation `which` names: a number of the last `/list`, a full id, or the
    /// short id (or any unique end of an id) shown.
    fn find(&self, which: &str) -> anyhow::Result<String> {
        let which = which.trim().trim_start_matches('…');
        if let Ok(n) = which.parse::<usize>()
            && n >= 1
            && n <= self.listed.len()
        {
            return Ok(self.listed[n - 1].clone());
        }
        let known = self
            .topics
            .keys()
            .chain(self.listed.iter())
            .filter(|id| !which.is_empty() && id.ends_with(which));
        let mut matches: Vec<&String> = known.collect();
        matches.sort();
        matches.dedup();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => anyhow::bail!("no consultation {which:?}; /list shows yours"),
            _ => anyhow::bail!("{which:?} matches several consultations; type more of it"),
        }
    }

    fn describe(&self, c: &pb::Consultation) -> String {
        describe(c, &self.names).replacen(&c.id, &format!("…{}", short(&c.id)), 1)
    }

    async fn event(&mut self, client: &Client, s: &Session, e: &pb::ConversationEvent) {
        let Some(c) = e.conversation.as_ref().and_then(|c| c.consultation.clone()) else {
            return;
        };
        self.topics.insert(c.id.clone(), c.topic.clone());
        self.names
            .learn(client, s, std::slice::from_ref(&c.agent_id))
            .await;
        let mine = c.agent_id == self.me;
        match pb::ConversationEventKind::try_from(e.kind) {
            Ok(pb::ConversationEventKind::ConsultationAssigned) if mine => {
                say!("(new consultation) {}", self.describe(&c));
                self.current.get_or_insert(c.id.clone());
            }
            Ok(pb::ConversationEventKind::ConsultationTransferred) if mine => {
                say!("(transferred to you) {}", self.describe(&c));
                self.current.get_or_insert(c.id.clone());
            }
            Ok(pb::ConversationEventKind::ConsultationTransferred) => {
                say!(
                    "({} now handled by {})",
                    self.label(&c.id),
                    self.names.get(&c.agent_id)
                );
                if self.current.as_deref() == Some(c.id.as_str()) {
                    self.current = None;
                }
            }
            Ok(pb::ConversationEventKind::ConsultationClosed) => {
                say!("(closed) {}: {}", self.label(&c.id), c.resolution);
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
            desk.listed.push(c.id.clone());
            say!("({}, yours) {}", desk.listed.len(), desk.describe(k));
            desk.current.get_or_insert(c.id.clone());
        }
    }
    let mut keys = Keyboard::open();
    let mut typing_sent: Option<tokio::time::Instant> = None;
    // Online (so the desk routes here) only once the stream hears this agent's events.
    let mut online: Option<Online> = None;
    let mut which = 0usize;
    let mut backoff = Duration::from_millis(200);
    let mut wait_first = false;
    loop {
        // Connect (after a pause when the last connection dropped); Ctrl-D quits meanwhile.
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
                    key = keys.next() => match key {
                        Key::Line(_) => say!("(reconnecting; type that again in a moment)"),
                        Key::Typing => {}
                        Key::End => return Ok(()),
                    },
                }
            }
        };
        let (session, tx, mut inbound) = opened?;
        wait_first = true;
        let frame = |f: In| pb::ConnectRequest { frame: Some(f) };
        let subscribe = pb::Subscribe {
            all_conversations: true,
            positions: desk.positions.clone(),
            ..Default::default()
        };
        let _ = tx.send(frame(In::Subscribe(subscribe))).await;
        // The stream is registered for events once a ping has come back.
        let _ = tx.send(frame(In::Ping(pb::Ping { nonce: 1 }))).await;
        loop {
            tokio::select! {
                key = keys.next() => match key {
                    Key::Line(line) => {
                        command(client, &session, &mut desk, online.as_mut(), &tx, line.trim()).await;
                    }
                    // The customer of the current consultation sees the agent typing.
                    Key::Typing => {
                        if let Some(id) = desk.current.clone()
                            && typing_sent.is_none_or(|t| t.elapsed() >= Duration::from_secs(3))
                        {
                            typing_sent = Some(tokio::time::Instant::now());
                            let typing = pb::Typing { conversation_id: id };
                            let _ = tx.send(pb::ConnectRequest { frame: Some(In::Typing(typing)) }).await;
                        }
                    }
                    Key::End => return Ok(()),
                },
                _ = async {
                    match online.as_mut() {
                        Some(o) => o.needs_healing().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let token = client.session().await.map(|s| s.access_token)?;
                    if let Some(o) = online.as_mut() {
                        o.heal(&token).await;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(r)) => match r.frame {
                        Some(Out::Message(m)) => {
                            desk.positions.insert(m.conversation_id.clone(), m.seq);
                            let line = desk.names.line(client, &session, &m).await;
                            keyboard::show(&format!("[{}] {line}", desk.label(&m.conversation_id)));
                            backoff = Duration::from_millis(200);
                        }
                        Some(Out::ConversationEvent(e)) => desk.event(client, &session, &e).await,
                        Some(Out::SendResult(pb::SendResult { result: Some(pb::send_result::Result::Error(e)), .. })) => {
                            say!("(not sent: {})", e.message);
                        }
                        Some(Out::Error(e)) => say!("({})", e.message),
                        Some(Out::Pong(_)) if online.is_none() => {
                            online = Some(Online::start(client, &session.access_token, presence_pb::PresenceState::Available).await);
                            say!("online and AVAILABLE as {}; {HELP}", session.username);
                        }
                        _ => {}
                    },
                    Err(status) if status.code() == tonic::Code::Unauthenticated => {
                        // Only a session that still lives resumes (SessionEnded otherwise).
                        if let Err(e) = client.refreshed().await {
                            if e.downcast_ref::<super::SessionEnded>().is_some() {
                                return Err(e);
                            }
                            say!("({e:#}; retrying)");
                        } else {
                            wait_first = false;
                        }
                        break;
                    }
                    Ok(None) | Err(_) => {
                        say!("(connection lost; resuming)");
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
    session: &Session,
    desk: &mut Desk,
    online: Option<&mut Online>,
    stream: &mpsc::Sender<pb::ConnectRequest>,
    line: &str,
) {
    let token = session.access_token.as_str();
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim();
    let result: anyhow::Result<()> = async {
        match word {
            "" => {}
            "/help" => say!("{HELP}"),
            "/away" | "/available" => {
                let state = if word == "/away" {
                    presence_pb::PresenceState::Away
                } else {
                    presence_pb::PresenceState::Available
                };
                online
                    .context("not online yet; try again in a moment")?
                    .set(state)
                    .await;
            }
            "/list" => {
                let mine = assigned(client, token, &desk.me).await?;
                desk.listed.clear();
                if mine.is_empty() {
                    say!("(no consultations assigned to you)");
                }
                for c in mine {
                    if let Some(k) = &c.consultation {
                        desk.topics.insert(c.id.clone(), k.topic.clone());
                        desk.listed.push(c.id.clone());
                        let mark = if desk.current.as_deref() == Some(c.id.as_str()) {
                            "*"
                        } else {
                            " "
                        };
                        say!("{mark} {}. {}", desk.listed.len(), desk.describe(k));
                    }
                }
            }
            "/use" => {
                let id = desk.find(rest)?;
                say!("(now in {})", desk.label(&id));
                desk.current = Some(id);
            }
            "/close" | "/transfer" => {
                let id = desk
                    .current
                    .clone()
                    .context("no current consultation; /list and /use <number>")?;
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
                    anyhow::ensure!(!to.is_empty(), "/transfer <agent's username> [note]");
                    let to_agent_id = people::resolve(client, session, &[to.to_owned()])
                        .await?
                        .remove(0);
                    support
                        .transfer_consultation(authed(
                            pb::TransferConsultationRequest {
                                consultation_id: id,
                                to_agent_id,
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
                    desk.names
                        .learn(client, session, std::slice::from_ref(&c.agent_id))
                        .await;
                    say!("{}", desk.describe(&c));
                }
                desk.current = None;
            }
            w if w.starts_with('/') => say!("unknown command; {HELP}"),
            _ => {
                let id = desk
                    .current
                    .clone()
                    .context("no current consultation; /list and /use <number>")?;
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
        say!("({e:#})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consultations_are_found_by_number_full_id_or_the_short_id_shown() {
        let mut desk = Desk::default();
        for (id, topic) in [
            ("01a2-aaaa-111111", "order 42"),
            ("01a2-bbbb-222222", "refund"),
        ] {
            desk.topics.insert(id.into(), topic.into());
            desk.listed.push(id.into());
        }
        assert_eq!(desk.find("2").ok().as_deref(), Some("01a2-bbbb-222222"));
        assert_eq!(
            desk.find("111111").ok().as_deref(),
            Some("01a2-aaaa-111111")
        );
        assert_eq!(
            desk.find("…222222").ok().as_deref(),
            Some("01a2-bbbb-222222")
        );
        assert_eq!(
            desk.find("01a2-aaaa-111111").ok().as_deref(),
            Some("01a2-aaaa-111111")
        );
        assert!(desk.find("3").is_err(), "no third consultation");
        assert!(desk.find("").is_err());
        assert!(desk.find("2222229").is_err());
        assert_eq!(short("01a2-bbbb-222222"), "222222");
        assert_eq!(short("ab"), "ab");
        assert_eq!(desk.label("01a2-aaaa-111111"), "order 42 …111111");
    }
}
