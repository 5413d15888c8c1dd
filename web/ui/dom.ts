// What the widget and the console share: endpoints from the page, element helpers, and a
// message list that shows each message once, in seq order, with read marks.

import type { Endpoints, Message } from "../sdk/src/index.js";

/** Endpoints from the script tag's `data-auth`, `data-presence` and `data-messaging`
 *  (comma-separated), else from the page's `sb_auth`, `sb_presence`, `sb_messaging`
 *  query parameters. */
export function endpoints(script: HTMLOrSVGScriptElement | null): Endpoints {
  const query = new URLSearchParams(location.search);
  const data = script instanceof HTMLScriptElement ? script.dataset : {};
  const pick = (name: "auth" | "presence" | "messaging") => data[name] ?? query.get(`sb_${name}`) ?? "";
  const e = {
    auth: pick("auth"),
    presence: pick("presence"),
    messaging: pick("messaging")
      .split(",")
      .map((u) => u.trim())
      .filter((u) => u !== ""),
  };
  if (e.auth === "" || e.presence === "" || e.messaging.length === 0) {
    throw new Error("Switchboard needs data-auth, data-presence and data-messaging (or sb_* query parameters)");
  }
  return e;
}

/** An element with attributes (`data-sb` names it for tests and styles) and children. */
export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  e.append(...children);
  return e;
}

/** The element named `name` under `root`. */
export function part<T extends HTMLElement = HTMLElement>(root: ParentNode, name: string): T {
  const e = root.querySelector<T>(`[data-sb="${name}"]`);
  if (e === null) throw new Error(`no [data-sb=${name}]`);
  return e;
}

/** Shows an error's own message (the server's, for a refused call) in `where`. */
export function showError(where: HTMLElement, e: unknown): void {
  const raw = (e as { rawMessage?: string }).rawMessage;
  where.textContent = raw ?? (e instanceof Error ? e.message : String(e));
  where.hidden = false;
}

/** A conversation's messages as a list: each seq once, in order, read marks on mine. */
export class MessageList {
  readonly element = el("ol", { "data-sb": "messages", class: "sb-messages" });
  private readonly seqs = new Set<bigint>();

  constructor(
    private readonly me: string,
    private readonly name: (userId: string) => string,
  ) {}

  /** Adds `m` in its place unless it is there already. */
  add(m: Message): void {
    if (this.seqs.has(m.seq)) return;
    this.seqs.add(m.seq);
    const mine = m.senderId === this.me;
    const item = el(
      "li",
      {
        "data-seq": m.seq.toString(),
        "data-mine": String(mine),
        "data-sender": m.senderId,
        class: mine ? "sb-mine" : "sb-theirs",
      },
      el("span", { class: "sb-who" }, mine ? "You" : this.name(m.senderId)),
      el("span", { "data-sb": "body", class: "sb-body" }, m.body),
      el("span", { "data-sb": "read", class: "sb-read", hidden: "" }, "✓ read"),
    );
    const later = [...this.element.children].find((c) => BigInt((c as HTMLElement).dataset.seq ?? "0") > m.seq);
    this.element.insertBefore(item, later ?? null);
    item.scrollIntoView?.({ block: "nearest" });
  }

  /** Labels the others' messages again (names learnt since they were shown). */
  relabel(): void {
    for (const c of this.element.querySelectorAll<HTMLElement>('li[data-mine="false"]')) {
      const who = c.querySelector(".sb-who");
      if (who) who.textContent = this.name(c.dataset.sender ?? "");
    }
  }

  /** Marks my messages up to `seq` as read by the other side. */
  readUpTo(seq: bigint): void {
    for (const c of this.element.querySelectorAll<HTMLElement>('li[data-mine="true"]')) {
      if (BigInt(c.dataset.seq ?? "0") <= seq) part(c, "read").hidden = false;
    }
  }

  /** The newest seq shown. */
  last(): bigint {
    return [...this.seqs].reduce((a, b) => (b > a ? b : a), 0n);
  }

  clear(): void {
    this.seqs.clear();
    this.element.replaceChildren();
  }
}

/** Shows "… is typing" in `where` for three seconds after each call. */
export function typingIndicator(where: HTMLElement): (who: string) => void {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return (who) => {
    where.textContent = `${who} is typing…`;
    where.hidden = false;
    clearTimeout(timer);
    timer = setTimeout(() => (where.hidden = true), 3000);
  };
}

/** `send` at most once every two seconds (typing notices are rate-limited anyway). */
export function throttled(send: () => void): () => void {
  let last = 0;
  return () => {
    const now = Date.now();
    if (now - last > 2000) {
      last = now;
      send();
    }
  };
}
