// Switchboard in the browser: a small typed layer over the clients generated from proto/
// (web/gen, `buf generate`) and @connectrpc/connect-web's gRPC-Web transport.
//
//   const sb = await Switchboard.guest({ auth, presence, messaging: [m1, m2] }, "Ada");
//   const feed = sb.follow([{ conversationId }], { message: (m) => show(m) });
//   await sb.send(conversationId, "hello");
//
// What it takes care of:
// - tokens: login, guest sessions, refresh before expiry (one refresh at a time), upgrade
//   of a guest to an account, logout;
// - `follow`: a Subscribe stream that resumes by itself, on the next messaging instance
//   when one goes away, from the last seq and epoch of every conversation, so the
//   handler sees each message once, in order, whatever breaks;
// - `send`: an idempotency key per message, kept across retries (UNAVAILABLE, a lost
//   connection, RESOURCE_EXHAUSTED with its retry hint), so a retry never stores twice;
// - typing, receipts, presence (a Session stream, state changes, goodbye) and the desk.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import type { Client, Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AuthService } from "../../gen/switchboard/auth/v1/auth_pb.js";
import type { TokenPair, User } from "../../gen/switchboard/auth/v1/auth_pb.js";
import {
  ConsultationState,
  ConversationEventKind,
  ConversationKind,
  MessagingService,
  SupportService,
} from "../../gen/switchboard/messaging/v1/messaging_pb.js";
import type {
  Consultation,
  Conversation,
  ConversationEvent,
  FrameError,
  Message,
  Receipt,
  TypingEvent,
} from "../../gen/switchboard/messaging/v1/messaging_pb.js";
import { PresenceService, PresenceState } from "../../gen/switchboard/presence/v1/presence_pb.js";
import type { UserPresence } from "../../gen/switchboard/presence/v1/presence_pb.js";

export { Code, ConnectError, ConsultationState, ConversationEventKind, ConversationKind, PresenceState };
export type { Consultation, Conversation, ConversationEvent, Message, Receipt, TypingEvent, User, UserPresence };

/** Where the services are: one URL each, and every messaging instance to fail over to. */
export interface Endpoints {
  auth: string;
  presence: string;
  messaging: string[];
}

/** How the SDK reaches a URL and waits; tests replace them. */
export interface Options {
  endpoints: Endpoints;
  /** A transport for one base URL running `interceptors` on every call (default:
   *  gRPC-Web over fetch). */
  transport?: (baseUrl: string, interceptors: Interceptor[]) => Transport;
  /** Most attempts of one send, typing or read before its error is thrown (default 8). */
  attempts?: number;
  /** Unix milliseconds now (default Date.now). */
  now?: () => number;
  /** Waits `ms` (default setTimeout). */
  sleep?: (ms: number) => Promise<void>;
}

/** A conversation to follow, from the last seq the client has (0: from the start). */
export interface Position {
  conversationId: string;
  since?: bigint;
  epoch?: string;
}

/** What a feed reports; every handler is optional. */
export interface Handlers {
  /** A message, each exactly once and in seq order per conversation. */
  message?: (m: Message) => void;
  receipt?: (r: Receipt) => void;
  typing?: (t: TypingEvent) => void;
  /** Membership and desk changes (assigned, transferred, closed, queue moves). */
  event?: (e: ConversationEvent) => void;
  /** History older than the position asked for is gone: messages resume from `oldestSeq`. */
  resync?: (conversationId: string, oldestSeq: bigint) => void;
  /** A subscription the server refused (not a member, a bad id…); the others go on. */
  refused?: (e: FrameError) => void;
  /** The history replay of a conversation is over; live messages follow. */
  recovered?: (conversationId: string) => void;
  /** The stream broke and is being opened again (on `instance`). */
  reconnecting?: (instance: string, cause: unknown) => void;
  /** The feed stopped for good (logged out, closed): the error, if any. */
  stopped?: (cause?: unknown) => void;
}

/** A live feed; `close` ends it. */
export interface Feed {
  close(): void;
  /** The position of each conversation seen so far. */
  positions(): Map<string, Position>;
  /** The messaging instance the feed is on now. */
  instance(): string;
}

/** Codes worth trying again on another instance, with the same idempotency key. */
function retriable(e: ConnectError): boolean {
  return [Code.Unavailable, Code.DeadlineExceeded, Code.Unknown, Code.Aborted, Code.ResourceExhausted].includes(e.code);
}

/** How long the server asked to wait before a retry (`retry-after-ms`), if it did. */
export function retryAfterMs(e: ConnectError): number | undefined {
  const v = e.metadata.get("retry-after-ms");
  const n = v === null ? NaN : Number(v);
  return Number.isFinite(n) && n >= 0 ? n : undefined;
}

function asConnectError(e: unknown): ConnectError {
  return ConnectError.from(e);
}

/** A session: tokens kept fresh, and clients for every service on its behalf. */
export class Switchboard {
  private readonly opts: Required<Omit<Options, "endpoints">> & { endpoints: Endpoints };
  private tokens: TokenPair;
  private refreshing: Promise<void> | undefined;
  private current = 0;
  private readonly auth: Client<typeof AuthService>;
  private readonly messagingClients: Client<typeof MessagingService>[];
  private readonly supportClients: Client<typeof SupportService>[];
  private readonly presenceClient: Client<typeof PresenceService>;
  /** The signed-in user. */
  user: User;

  private constructor(opts: Options, tokens: TokenPair, user: User) {
    this.opts = {
      transport: defaultTransport,
      attempts: 8,
      now: () => Date.now(),
      sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
      ...opts,
    };
    if (this.opts.endpoints.messaging.length === 0) {
      throw new Error("endpoints.messaging needs at least one URL");
    }
    this.tokens = tokens;
    this.user = user;
    const authed: Interceptor = (next) => async (req) => {
      req.header.set("authorization", `Bearer ${await this.accessToken()}`);
      return next(req);
    };
    const { endpoints, transport } = this.opts;
    this.auth = createClient(AuthService, transport(endpoints.auth, []));
    const messaging = endpoints.messaging.map((u) => transport(u, [authed]));
    this.messagingClients = messaging.map((t) => createClient(MessagingService, t));
    this.supportClients = messaging.map((t) => createClient(SupportService, t));
    this.presenceClient = createClient(PresenceService, transport(endpoints.presence, [authed]));
  }

  /** Logs in with a username and password. */
  static async login(opts: Options, username: string, password: string): Promise<Switchboard> {
    const auth = createClient(AuthService, (opts.transport ?? defaultTransport)(opts.endpoints.auth, []));
    const r = await auth.login({ username, password });
    return new Switchboard(opts, need(r.tokens, "tokens"), need(r.user, "user"));
  }

  /** Starts a guest session (no account) shown to agents as `displayName`. */
  static async guest(opts: Options, displayName = ""): Promise<Switchboard> {
    const auth = createClient(AuthService, (opts.transport ?? defaultTransport)(opts.endpoints.auth, []));
    const r = await auth.startGuestSession({ displayName });
    return new Switchboard(opts, need(r.tokens, "tokens"), need(r.user, "user"));
  }

  /** A valid access token, refreshed first when it expires within a minute. */
  async accessToken(): Promise<string> {
    const expires = Number(this.tokens.accessTokenExpiresAt?.seconds ?? 0n) * 1000;
    if (expires - this.opts.now() < 60_000) {
      await this.refresh();
    }
    return this.tokens.accessToken;
  }

  /** Exchanges the refresh token for a new pair; concurrent callers share one exchange. */
  async refresh(): Promise<void> {
    this.refreshing ??= (async () => {
      try {
        const r = await this.auth.refresh({ refreshToken: this.tokens.refreshToken });
        this.tokens = need(r.tokens, "tokens");
      } finally {
        this.refreshing = undefined;
      }
    })();
    return this.refreshing;
  }

  /** A guest becomes an account under the same id (its consultations stay its own). */
  async upgrade(username: string, password: string, displayName = ""): Promise<User> {
    const token = await this.accessToken();
    const r = await this.auth.upgradeGuest(
      { username, password, displayName },
      { headers: { authorization: `Bearer ${token}` } },
    );
    this.tokens = need(r.tokens, "tokens");
    this.user = need(r.user, "user");
    return this.user;
  }

  /** Ends the session everywhere. */
  async logout(): Promise<void> {
    const token = await this.accessToken();
    await this.auth.logout({}, { headers: { authorization: `Bearer ${token}` } });
  }

  /** The messaging instance calls go to now. */
  instance(): string {
    return this.opts.endpoints.messaging[this.current];
  }

  private failover(from: number): void {
    if (this.current === from) {
      this.current = (from + 1) % this.messagingClients.length;
    }
  }

  /** Runs `call` on the current messaging instance, failing over and retrying what may
   *  be retried (the same request each time, so an idempotency key stays the same). */
  private async retrying<T>(call: (i: number) => Promise<T>): Promise<T> {
    let last: ConnectError | undefined;
    for (let attempt = 0; attempt < this.opts.attempts; attempt++) {
      const i = this.current;
      try {
        return await call(i);
      } catch (e) {
        const err = asConnectError(e);
        if (err.code === Code.Unauthenticated && attempt === 0) {
          await this.refresh();
          continue;
        }
        if (!retriable(err)) throw err;
        last = err;
        if (err.code !== Code.ResourceExhausted) this.failover(i);
        await this.opts.sleep(retryAfterMs(err) ?? backoff(attempt));
      }
    }
    throw last ?? new ConnectError("no attempt made", Code.Internal);
  }

  /** Stores a message (once, however often it is retried) and returns it with its seq. */
  async send(conversationId: string, body: string, metadata: Record<string, string> = {}): Promise<Message> {
    const clientMsgId = crypto.randomUUID();
    const r = await this.retrying((i) =>
      this.messagingClients[i].sendMessage({ conversationId, clientMsgId, body, metadata }),
    );
    return need(r.message, "message");
  }

  /** Tells the members the caller is typing (rate-limited by the server: a refusal for
   *  typing too often is dropped, the next keystroke will do). */
  async typing(conversationId: string): Promise<void> {
    try {
      await this.messagingClients[this.current].sendTyping({ conversationId });
    } catch (e) {
      const err = asConnectError(e);
      if (err.code === Code.ResourceExhausted) return;
      if (err.code === Code.Unavailable) this.failover(this.current);
      throw err;
    }
  }

  /** Marks everything up to `seq` read; members see a Receipt. */
  async read(conversationId: string, seq: bigint): Promise<bigint> {
    const r = await this.retrying((i) => this.messagingClients[i].markRead({ conversationId, seq }));
    return r.readSeq;
  }

  /** History of a conversation after `afterSeq`, oldest first (at most `limit`). */
  async history(conversationId: string, afterSeq = 0n, limit = 200): Promise<Message[]> {
    const r = await this.retrying((i) =>
      this.messagingClients[i].listMessages({ conversationId, afterSeq, limit }),
    );
    return r.messages;
  }

  /** The caller's conversations, most recently active first. */
  async conversations(): Promise<Conversation[]> {
    const r = await this.retrying((i) => this.messagingClients[i].listConversations({ pageSize: 100 }));
    return r.conversations;
  }

  /** One conversation. */
  async conversation(conversationId: string): Promise<Conversation> {
    const r = await this.retrying((i) => this.messagingClients[i].getConversation({ conversationId }));
    return need(r.conversation, "conversation");
  }

  /** Public profiles by id and by username (what matched nobody is left out). */
  async users(userIds: string[], usernames: string[] = []): Promise<User[]> {
    const token = await this.accessToken();
    const r = await this.auth.getUsers({ userIds, usernames }, { headers: { authorization: `Bearer ${token}` } });
    return r.users;
  }

  /** The desk: consultations for customers and guests, the queue and its moves for agents. */
  get desk() {
    const support = (i: number) => this.supportClients[i];
    return {
      open: async (topic: string, firstMessage: string) => {
        // Not retried: an open has no idempotency key (see OpenConsultation).
        const r = await support(this.current).openConsultation({ topic, firstMessage });
        return { consultation: need(r.consultation, "consultation"), conversation: need(r.conversation, "conversation") };
      },
      queue: async (limit = 50) => (await this.retrying((i) => support(i).listQueue({ limit }))).consultations,
      accept: async (consultationId: string) =>
        need((await this.retrying((i) => support(i).acceptConsultation({ consultationId }))).consultation, "consultation"),
      transfer: async (consultationId: string, toAgentId: string, note: string) =>
        need(
          (await this.retrying((i) => support(i).transferConsultation({ consultationId, toAgentId, note }))).consultation,
          "consultation",
        ),
      close: async (consultationId: string, resolution: string) =>
        need((await this.retrying((i) => support(i).closeConsultation({ consultationId, resolution }))).consultation, "consultation"),
    };
  }

  /**
   * Follows conversations (or `"all"` of the caller's, including those it joins later) on
   * a Subscribe stream that opens again by itself from where it was, on the next
   * instance when one goes away. Each message reaches `handlers.message` once, in order.
   */
  follow(what: Position[] | "all", handlers: Handlers): Feed {
    const positions = new Map<string, Position>();
    if (what !== "all") for (const p of what) positions.set(p.conversationId, { since: 0n, ...p });
    const stop = new AbortController();
    let failures = 0;
    const run = async () => {
      while (!stop.signal.aborted) {
        const i = this.current;
        const healthy = { seen: false };
        try {
          const subscriptions =
            what === "all"
              ? [
                  {
                    allConversations: true,
                    positions: Object.fromEntries([...positions].map(([id, p]) => [id, p.since ?? 0n])),
                  },
                ]
              : [...positions.values()].map((p) => ({
                  conversationId: p.conversationId,
                  sinceSeq: p.since ?? 0n,
                  epoch: p.epoch ?? "",
                }));
          const stream = this.messagingClients[i].subscribe({ subscriptions }, { signal: stop.signal });
          for await (const r of stream) {
            healthy.seen = true;
            failures = 0;
            const f = r.frame;
            switch (f.case) {
              case "message": {
                const m = f.value;
                const p = positions.get(m.conversationId) ?? { conversationId: m.conversationId, since: 0n };
                // The server sends each seq once per stream; across streams a resume
                // starts after the last one handled, and this keeps it so.
                if (m.seq > (p.since ?? 0n)) {
                  p.since = m.seq;
                  positions.set(m.conversationId, p);
                  handlers.message?.(m);
                }
                break;
              }
              case "subscribed": {
                const p = positions.get(f.value.conversationId) ?? { conversationId: f.value.conversationId, since: 0n };
                p.epoch = f.value.epoch;
                positions.set(f.value.conversationId, p);
                break;
              }
              case "resync": {
                const p = { conversationId: f.value.conversationId, since: f.value.oldestSeq - 1n };
                positions.set(p.conversationId, p);
                handlers.resync?.(p.conversationId, f.value.oldestSeq);
                throw new Resubscribe();
              }
              case "recovered":
                handlers.recovered?.(f.value.conversationId);
                break;
              case "receipt":
                handlers.receipt?.(f.value);
                break;
              case "typing":
                handlers.typing?.(f.value);
                break;
              case "conversationEvent":
                handlers.event?.(f.value);
                break;
              case "error":
                handlers.refused?.(f.value);
                break;
              default:
                // Pong keep-alives and frames of later versions.
                break;
            }
          }
          // The server does not end a Subscribe stream without a status; go on from here.
        } catch (e) {
          if (stop.signal.aborted) break;
          if (e instanceof Resubscribe) continue;
          const err = asConnectError(e);
          if (err.code === Code.Unauthenticated) {
            // An expired token: refresh and go on. A revoked session: the refresh fails too.
            try {
              await this.refresh();
            } catch (again) {
              handlers.stopped?.(again);
              return;
            }
          } else if (!retriable(err) && err.code !== Code.Canceled) {
            handlers.stopped?.(err);
            return;
          } else if (err.code !== Code.ResourceExhausted) {
            this.failover(i);
          }
          if (!healthy.seen) failures++;
          handlers.reconnecting?.(this.instance(), err);
          await this.opts.sleep(retryAfterMs(err) ?? backoff(failures));
        }
      }
      handlers.stopped?.();
    };
    void run();
    return {
      close: () => stop.abort(),
      positions: () => new Map(positions),
      instance: () => this.instance(),
    };
  }

  /**
   * Puts this device online in `state` for as long as the returned handle lives: a
   * Session stream, opened again if it breaks (within the server's reconnect grace the
   * device never looks offline). `end` is the goodbye: offline at once.
   */
  online(state: PresenceState = PresenceState.AVAILABLE, customText = "", deviceName = ""): PresenceDevice {
    return new PresenceDevice(this.presenceClient, { state, customText, deviceName }, this.opts.sleep);
  }
}

/** One device's presence (see [`Switchboard.online`]). */
export class PresenceDevice {
  private sessionId = "";
  private readonly stop = new AbortController();
  private readonly ready: Promise<void>;
  /** The device's presence after each change the server confirms. */
  onPresence?: (p: UserPresence) => void;

  constructor(
    private readonly client: Client<typeof PresenceService>,
    private state: { state: PresenceState; customText: string; deviceName: string },
    sleep: (ms: number) => Promise<void>,
  ) {
    let connected: () => void = () => {};
    this.ready = new Promise((r) => (connected = r));
    void (async () => {
      let failures = 0;
      while (!this.stop.signal.aborted) {
        try {
          const stream = this.client.session({ state: this.state }, { signal: this.stop.signal });
          for await (const r of stream) {
            failures = 0;
            if (r.frame.case === "connected") {
              this.sessionId = r.frame.value.sessionId;
              connected();
            } else if (r.frame.case === "presence") {
              this.onPresence?.(r.frame.value);
            }
          }
          return; // EndSession: the server ended it.
        } catch {
          if (this.stop.signal.aborted) return;
          await sleep(backoff(failures++));
        }
      }
    })();
  }

  /** Changes the device's state (and custom text). */
  async setState(state: PresenceState, customText = ""): Promise<void> {
    await this.ready;
    this.state = { ...this.state, state, customText };
    await this.client.setSessionState({ sessionId: this.sessionId, state: this.state });
  }

  /** The goodbye: offline at once, the stream ends. */
  async end(): Promise<void> {
    await this.ready;
    try {
      await this.client.endSession({ sessionId: this.sessionId });
    } finally {
      this.stop.abort();
    }
  }
}

/** Thrown inside a feed to open it again from the positions it has. */
class Resubscribe extends Error {}

function defaultTransport(baseUrl: string, interceptors: Interceptor[]): Transport {
  return createGrpcWebTransport({ baseUrl, interceptors });
}

/** Exponential back-off with jitter: 100 ms × 2^n, at most 5 s. */
export function backoff(n: number): number {
  const base = Math.min(5_000, 100 * 2 ** Math.min(n, 6));
  return base / 2 + Math.random() * (base / 2);
}

function need<T>(v: T | undefined, what: string): T {
  if (v === undefined) throw new ConnectError(`the server's answer has no ${what}`, Code.Internal);
  return v;
}
