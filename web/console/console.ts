// The agent console: log in, set availability, see the queue and one's consultations,
// talk in them (typing, read marks), transfer one with a note, close one with a
// resolution. Endpoints come from the page's sb_auth, sb_presence and sb_messaging query
// parameters (or the script tag's data-* attributes).

import {
  ConsultationState,
  ConversationEventKind,
  ConversationKind,
  PresenceState,
  Switchboard,
} from "../sdk/src/index.js";
import type { Consultation, Conversation, Feed, PresenceDevice } from "../sdk/src/index.js";
import { MessageList, el, endpoints, part, showError, throttled, typingIndicator } from "../ui/dom.js";

const root = document.body;
const config = endpoints(document.currentScript);
let sb: Switchboard | undefined;
let device: PresenceDevice | undefined;
let feed: Feed | undefined;
let selected = "";
const consultations = new Map<string, { conversation: string; consultation: Consultation }>();
const lists = new Map<string, MessageList>();
const names = new Map<string, string>();

function error(e: unknown): void {
  showError(part(root, "error"), e);
}

async function name(userId: string): Promise<string> {
  if (!names.has(userId) && sb) {
    for (const u of await sb.users([userId])) names.set(u.id, u.displayName || u.username);
  }
  return names.get(userId) ?? userId.slice(0, 8);
}

function list(conversationId: string): MessageList {
  let l = lists.get(conversationId);
  if (!l && sb) {
    l = new MessageList(sb.user.id, (id) => names.get(id) ?? "Customer");
    lists.set(conversationId, l);
  }
  if (!l) throw new Error("not logged in");
  return l;
}

/** Redraws "My consultations" from what is known. */
async function drawMine(): Promise<void> {
  const mine = part(root, "mine");
  const items = [];
  for (const [id, { consultation: c }] of consultations) {
    if (c.agentId !== sb?.user.id || c.state !== ConsultationState.ASSIGNED) continue;
    const item = el(
      "li",
      { "data-conversation": id, class: id === selected ? "selected" : "" },
      el("strong", {}, await name(c.customerId)),
      ` ${c.topic}`,
    );
    item.addEventListener("click", () => void select(id));
    items.push(item);
  }
  mine.replaceChildren(...items);
}

async function drawQueue(): Promise<void> {
  if (!sb) return;
  try {
    const queue = await sb.desk.queue();
    const items = [];
    for (const c of queue) {
      const accept = el("button", { "data-sb": "accept" }, "Accept");
      accept.addEventListener("click", () => {
        void sb?.desk
          .accept(c.id)
          .then(() => refresh())
          .catch(error);
      });
      items.push(el("li", { "data-id": c.id }, `#${c.queuePosition} ${await name(c.customerId)}: ${c.topic} `, accept));
    }
    part(root, "queue").replaceChildren(...items);
  } catch (e) {
    error(e);
  }
}

async function refresh(): Promise<void> {
  if (!sb) return;
  const all: Conversation[] = await sb.conversations();
  for (const c of all) {
    if (c.kind === ConversationKind.SUPPORT && c.consultation) {
      consultations.set(c.id, { conversation: c.id, consultation: c.consultation });
    }
  }
  await Promise.all([drawMine(), drawQueue()]);
}

async function select(id: string): Promise<void> {
  if (!sb) return;
  selected = id;
  const entry = consultations.get(id);
  part(root, "chat").hidden = false;
  part(root, "chat-title").textContent = entry ? `${await name(entry.consultation.customerId)}: ${entry.consultation.topic}` : id;
  part(root, "messages-slot").replaceChildren(list(id).element);
  // History the feed has not shown yet (it follows from the read position).
  for (const m of await sb.history(id)) list(id).add(m);
  list(id).relabel();
  const last = list(id).last();
  if (last > 0n) await sb.read(id, last).catch(() => {});
  await drawMine();
}

async function login(): Promise<void> {
  part(root, "error").hidden = true;
  try {
    const value = (n: string) => part<HTMLInputElement>(root, n).value;
    sb = await Switchboard.login({ endpoints: config }, value("username"), value("password"));
    part(root, "login-form").hidden = true;
    part(root, "desk").hidden = false;
    part(root, "me").textContent = sb.user.displayName || sb.user.username;
    device = sb.online(state());
    const typing = typingIndicator(part(root, "typing"));
    const me = sb.user.id;
    feed = sb.follow("all", {
      message: (m) => {
        list(m.conversationId).add(m);
        if (m.conversationId === selected && m.senderId !== me) void sb?.read(selected, m.seq).catch(() => {});
      },
      receipt: (r) => {
        if (r.userId !== me) list(r.conversationId).readUpTo(r.readSeq);
      },
      typing: (t) => {
        if (t.userId !== me && t.conversationId === selected) void name(t.userId).then(typing);
      },
      event: (e) => {
        const c = e.conversation?.consultation;
        if (e.conversation && c) consultations.set(e.conversation.id, { conversation: e.conversation.id, consultation: c });
        if (e.kind === ConversationEventKind.CONSULTATION_CLOSED && e.conversation?.id === selected) {
          part(root, "chat").hidden = true;
        }
        void drawMine();
        void drawQueue();
      },
      stopped: (e) => e && error(e),
    });
    await refresh();
    // Events say what changed as it happens; this catches what a reconnecting feed missed.
    setInterval(() => void refresh().catch(error), 3000);
  } catch (e) {
    error(e);
  }
}

function state(): PresenceState {
  const v = part<HTMLSelectElement>(root, "availability").value;
  return v === "away" ? PresenceState.AWAY : v === "busy" ? PresenceState.BUSY : PresenceState.AVAILABLE;
}

async function send(): Promise<void> {
  const input = part<HTMLInputElement>(root, "input");
  part(root, "error").hidden = true;
  try {
    if (!sb || selected === "") return;
    list(selected).add(await sb.send(selected, input.value));
    input.value = "";
  } catch (e) {
    error(e);
  }
}

async function transfer(): Promise<void> {
  part(root, "error").hidden = true;
  try {
    const entry = consultations.get(selected);
    if (!sb || !entry) return;
    const to = part<HTMLInputElement>(root, "transfer-to").value.trim();
    const [agent] = await sb.users([], [to]);
    if (!agent) throw new Error(`no agent named ${to}`);
    await sb.desk.transfer(entry.consultation.id, agent.id, part<HTMLInputElement>(root, "transfer-note").value);
    part(root, "chat").hidden = true;
    selected = "";
    await refresh();
  } catch (e) {
    error(e);
  }
}

async function close(): Promise<void> {
  part(root, "error").hidden = true;
  try {
    const entry = consultations.get(selected);
    if (!sb || !entry) return;
    await sb.desk.close(entry.consultation.id, part<HTMLInputElement>(root, "resolution").value);
    part(root, "chat").hidden = true;
    selected = "";
    await refresh();
  } catch (e) {
    error(e);
  }
}

const on = (name: string, event: string, run: () => Promise<void>) =>
  part(root, name).addEventListener(event, (e) => {
    e.preventDefault();
    void run();
  });
on("login-form", "submit", login);
on("composer", "submit", send);
on("transfer-form", "submit", transfer);
on("close-form", "submit", close);
part(root, "availability").addEventListener("change", () => void device?.setState(state()).catch(error));
const notice = throttled(() => void (selected && sb?.typing(selected).catch(() => {})));
part(root, "input").addEventListener("input", notice);
window.addEventListener("pagehide", () => {
  feed?.close();
  void device?.end();
});
