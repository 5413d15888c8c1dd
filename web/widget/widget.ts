// The customer chat widget: one <script> tag on any page,
//
//   <script src="https://chat.example/widget.js" data-auth="…" data-presence="…"
//           data-messaging="https://m1…,https://m2…"></script>
//
// A visitor gives a name, a topic and a first message; the widget starts a guest session,
// opens a consultation and shows its place in the queue, the agent's name once assigned,
// the conversation (each message once, in order, across reconnects and instances), the
// agent typing, read marks on the visitor's messages, transfers and the closing.

import {
  ConsultationState,
  ConversationEventKind,
  PresenceState,
  Switchboard,
} from "../sdk/src/index.js";
import type { Consultation, ConversationEvent, Endpoints } from "../sdk/src/index.js";
import { MessageList, el, endpoints, part, showError, throttled, typingIndicator } from "../ui/dom.js";
import { css } from "./style.js";

class Widget {
  private readonly root: HTMLElement;
  private sb: Switchboard | undefined;
  private conversationId = "";
  private list: MessageList | undefined;
  private readonly names = new Map<string, string>();

  constructor(private readonly endpoints: Endpoints) {
    this.root = el(
      "section",
      { "data-sb": "widget", class: "sb-widget", "aria-label": "Chat with us" },
      el("style", {}, css),
      el("header", { class: "sb-head" }, "Chat with us"),
      el(
        "form",
        { "data-sb": "start-form", class: "sb-start" },
        el("input", { "data-sb": "name", placeholder: "Your name", maxlength: "64" }),
        el("input", { "data-sb": "topic", placeholder: "What is it about?", required: "" }),
        el("textarea", { "data-sb": "first", placeholder: "Your question", required: "" }),
        el("button", { "data-sb": "start", type: "submit" }, "Start chat"),
      ),
      el("p", { "data-sb": "status", class: "sb-status", hidden: "" }),
      el("div", { "data-sb": "conversation", class: "sb-conversation", hidden: "" }),
      el("p", { "data-sb": "typing", class: "sb-typing", hidden: "" }),
      el(
        "form",
        { "data-sb": "composer", class: "sb-composer", hidden: "" },
        el("input", { "data-sb": "input", placeholder: "Type a message", autocomplete: "off" }),
        el("button", { "data-sb": "send", type: "submit" }, "Send"),
      ),
      el("p", { "data-sb": "error", class: "sb-error", role: "alert", hidden: "" }),
    );
    part(this.root, "start-form").addEventListener("submit", (e) => {
      e.preventDefault();
      void this.start();
    });
    part(this.root, "composer").addEventListener("submit", (e) => {
      e.preventDefault();
      void this.send();
    });
    const notice = throttled(() => void this.sb?.typing(this.conversationId).catch(() => {}));
    part(this.root, "input").addEventListener("input", notice);
  }

  mount(where: HTMLElement): void {
    where.append(this.root);
  }

  private error(e: unknown): void {
    showError(part(this.root, "error"), e);
  }

  private status(text: string): void {
    const s = part(this.root, "status");
    s.textContent = text;
    s.hidden = false;
  }

  private async name(userId: string): Promise<string> {
    if (!this.names.has(userId) && this.sb) {
      for (const u of await this.sb.users([userId])) this.names.set(u.id, u.displayName || u.username);
    }
    return this.names.get(userId) ?? "Agent";
  }

  private async start(): Promise<void> {
    part(this.root, "error").hidden = true;
    const value = (n: string) => part<HTMLInputElement>(this.root, n).value;
    try {
      this.sb ??= await Switchboard.guest({ endpoints: this.endpoints }, value("name"));
      const opened = await this.sb.desk.open(value("topic"), value("first"));
      this.conversationId = opened.conversation.id;
      const me = this.sb.user.id;
      this.list = new MessageList(me, (id) => this.names.get(id) ?? "Agent");
      part(this.root, "conversation").replaceChildren(this.list.element);
      part(this.root, "conversation").hidden = false;
      part(this.root, "start-form").hidden = true;
      part(this.root, "composer").hidden = false;
      this.sb.online(PresenceState.AVAILABLE);
      await this.show(opened.consultation);
      const typing = typingIndicator(part(this.root, "typing"));
      this.sb.follow([{ conversationId: this.conversationId }], {
        message: (m) => {
          this.list?.add(m);
          if (m.senderId !== me && document.visibilityState === "visible") {
            void this.sb?.read(this.conversationId, m.seq).catch(() => {});
          }
        },
        receipt: (r) => {
          if (r.userId !== me) this.list?.readUpTo(r.readSeq);
        },
        typing: (t) => {
          if (t.userId !== me) void this.name(t.userId).then(typing);
        },
        event: (e) => void this.event(e),
        refused: (e) => this.error({ rawMessage: e.message }),
        stopped: (e) => e && this.error(e),
      });
      // The assignment may have come before the feed opened: ask once.
      const now = await this.sb.conversation(this.conversationId);
      if (now.consultation) await this.show(now.consultation);
    } catch (e) {
      this.error(e);
    }
  }

  private async event(e: ConversationEvent): Promise<void> {
    const c = e.conversation?.consultation;
    if (!c || e.conversation?.id !== this.conversationId) return;
    if (e.kind === ConversationEventKind.CONSULTATION_TRANSFERRED) {
      this.status(`Transferred to ${await this.name(c.agentId)}`);
      return;
    }
    await this.show(c);
  }

  private async show(c: Consultation): Promise<void> {
    switch (c.state) {
      case ConsultationState.QUEUED:
        this.status(`Waiting for an agent: you are number ${c.queuePosition} in line`);
        break;
      case ConsultationState.ASSIGNED:
        this.status(`Talking with ${await this.name(c.agentId)}`);
        break;
      case ConsultationState.CLOSED:
        this.status(`Closed: ${c.resolution}`);
        part(this.root, "composer").hidden = true;
        break;
      default:
        break;
    }
  }

  private async send(): Promise<void> {
    const input = part<HTMLInputElement>(this.root, "input");
    part(this.root, "error").hidden = true;
    if (!this.sb) return;
    try {
      const m = await this.sb.send(this.conversationId, input.value);
      this.list?.add(m);
      input.value = "";
    } catch (e) {
      this.error(e);
    }
  }
}

const script = document.currentScript;
const widget = new Widget(endpoints(script));
const mount = () => {
  const host = el("div", { id: "switchboard-chat" });
  document.body.append(host);
  widget.mount(host);
};
if (document.body) mount();
else document.addEventListener("DOMContentLoaded", mount);
