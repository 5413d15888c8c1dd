// Unit tests of the SDK (web/sdk/src, built to web/sdk/dist by esbuild) against
// in-memory servers: @connectrpc/connect's router transport stands in for two messaging
// instances, an auth and a presence, so a test decides exactly when a stream breaks,
// which instance answers and what it says. The real servers are the Rust tests' business
// (grpc_web::the_web_sdk_…); here it is the SDK's own logic: resume, dedupe, failover,
// idempotent retries, token refresh.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { AuthService, TokenPairSchema, UserSchema } from "../../gen/switchboard/auth/v1/auth_pb.js";
import { MessagingService, MessageSchema } from "../../gen/switchboard/messaging/v1/messaging_pb.js";
import { PresenceService } from "../../gen/switchboard/presence/v1/presence_pb.js";
import { Switchboard } from "../dist/index.js";

const AUTH = "https://auth.test";
const M1 = "https://m1.test";
const M2 = "https://m2.test";
const PRESENCE = "https://presence.test";

/** A token pair whose access token expires `inMs` from now. */
function pair(n, inMs = 15 * 60_000) {
  return create(TokenPairSchema, {
    accessToken: `access-${n}`,
    accessTokenExpiresAt: timestampFromMs(Date.now() + inMs),
    refreshToken: `refresh-${n}`,
    sessionId: "s",
  });
}

function message(conversationId, seq) {
  return create(MessageSchema, { id: `m${seq}`, conversationId, seq: BigInt(seq), body: `#${seq}` });
}

/** Auth that logs anyone in and counts refreshes; `firstTtlMs` is the first token's life. */
function fakeAuth(state, firstTtlMs) {
  return (router) =>
    router.service(AuthService, {
      login: () => ({ tokens: pair(0, firstTtlMs), user: create(UserSchema, { id: "u1", username: "ada" }) }),
      startGuestSession: (req) => ({
        tokens: pair(0, firstTtlMs),
        user: create(UserSchema, { id: "g1", username: "guest-00", displayName: req.displayName }),
      }),
      refresh: (req) => {
        state.refreshes.push(req.refreshToken);
        return { tokens: pair(state.refreshes.length) };
      },
    });
}

/** Options with in-memory services: `routes[url]` is what answers at that URL. */
function options(routes, sleeps = []) {
  return {
    endpoints: { auth: AUTH, presence: PRESENCE, messaging: [M1, M2] },
    transport: (url, interceptors) => {
      // A URL a test leaves out answers UNIMPLEMENTED to everything.
      const r = routes[url] ?? (() => {});
      return createRouterTransport(r, { transport: { interceptors } });
    },
    sleep: async (ms) => {
      sleeps.push(ms);
    },
  };
}

/** Waits (bounded) until `check` holds. */
async function until(check, what) {
  for (let i = 0; i < 200; i++) {
    if (check()) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  assert.fail(`never: ${what}`);
}

test("a feed resumes on the other instance from its last seq and shows every message once", async () => {
  const asked = [];
  const auth = { refreshes: [] };
  const routes = {
    [AUTH]: fakeAuth(auth),
    // The first instance sends 1 to 3, then goes away mid-stream.
    [M1]: (router) =>
      router.service(MessagingService, {
        async *subscribe(req) {
          asked.push(["m1", req.subscriptions.map((s) => [s.conversationId, s.sinceSeq, s.epoch])]);
          yield { frame: { case: "subscribed", value: { conversationId: "c1", lastSeq: 3n, epoch: "e1" } } };
          for (const s of [1, 2, 3]) yield { frame: { case: "message", value: message("c1", s) } };
          throw new ConnectError("instance draining", Code.Unavailable);
        },
      }),
    // The other one replays from what it is asked, and repeats 3 (as a sloppy server might).
    [M2]: (router) =>
      router.service(MessagingService, {
        async *subscribe(req, ctx) {
          asked.push(["m2", req.subscriptions.map((s) => [s.conversationId, s.sinceSeq, s.epoch])]);
          assert.equal(ctx.requestHeader.get("authorization"), "Bearer access-0");
          for (const s of [3, 4, 5]) yield { frame: { case: "message", value: message("c1", s) } };
          yield { frame: { case: "recovered", value: { conversationId: "c1", fromSeq: 4n, toSeq: 5n } } };
          await new Promise((_, fail) => ctx.signal.addEventListener("abort", () => fail(ctx.signal.reason)));
        },
      }),
  };
  const sb = await Switchboard.login(options(routes), "ada", "pw");
  const seen = [];
  const reconnects = [];
  let recovered = 0;
  const feed = sb.follow([{ conversationId: "c1" }], {
    message: (m) => seen.push(Number(m.seq)),
    reconnecting: (instance) => reconnects.push(instance),
    recovered: () => recovered++,
  });
  await until(() => recovered === 1, "recovered on m2");
  assert.deepEqual(seen, [1, 2, 3, 4, 5]);
  assert.deepEqual(reconnects, [M2]);
  assert.deepEqual(asked, [
    ["m1", [["c1", 0n, ""]]],
    ["m2", [["c1", 3n, "e1"]]],
  ]);
  assert.equal(feed.instance(), M2);
  assert.equal(feed.positions().get("c1").since, 5n);
  feed.close();
});

test("a send keeps its idempotency key across retries and instances", async () => {
  const keys = [];
  const sleeps = [];
  const routes = {
    [AUTH]: fakeAuth({ refreshes: [] }),
    [M1]: (router) =>
      router.service(MessagingService, {
        sendMessage(req) {
          keys.push(["m1", req.clientMsgId]);
          throw new ConnectError("storage is unavailable; retry shortly", Code.Unavailable);
        },
      }),
    [M2]: (router) =>
      router.service(MessagingService, {
        sendMessage(req, ctx) {
          keys.push(["m2", req.clientMsgId]);
          if (keys.length === 2) {
            ctx.responseHeader.set("retry-after-ms", "250");
            throw new ConnectError("sending too fast", Code.ResourceExhausted);
          }
          return { message: message(req.conversationId, 7), duplicate: false };
        },
      }),
  };
  const sb = await Switchboard.login(options(routes, sleeps), "ada", "pw");
  const m = await sb.send("c1", "hello");
  assert.equal(m.seq, 7n);
  assert.equal(keys.length, 3);
  assert.deepEqual(
    keys.map(([at]) => at),
    ["m1", "m2", "m2"],
    "failed over on UNAVAILABLE, stayed on RESOURCE_EXHAUSTED",
  );
  assert.equal(new Set(keys.map(([, k]) => k)).size, 1, "one key for every attempt");
  assert.equal(sleeps[1], 250, "the server's retry hint is honoured");
});

test("bad input is not retried and keeps the server's message", async () => {
  let calls = 0;
  const routes = {
    [AUTH]: fakeAuth({ refreshes: [] }),
    [M1]: (router) =>
      router.service(MessagingService, {
        sendMessage() {
          calls++;
          throw new ConnectError("body must be 1 byte to 16 KiB of UTF-8", Code.InvalidArgument);
        },
      }),
    [M2]: () => {},
  };
  const sb = await Switchboard.login(options(routes), "ada", "pw");
  await assert.rejects(sb.send("c1", ""), (e) => {
    assert.equal(e.code, Code.InvalidArgument);
    assert.match(e.rawMessage, /16 KiB/);
    return true;
  });
  assert.equal(calls, 1);
});

test("a token about to expire is refreshed once for concurrent calls, and an expired stream goes on", async () => {
  const auth = { refreshes: [] };
  const tokens = [];
  let opened = 0;
  const routes = {
    [AUTH]: fakeAuth(auth, 30_000),
    [M1]: (router) =>
      router.service(MessagingService, {
        markRead(req, ctx) {
          tokens.push(ctx.requestHeader.get("authorization"));
          return { readSeq: req.seq };
        },
        async *subscribe(_req, ctx) {
          opened++;
          tokens.push(ctx.requestHeader.get("authorization"));
          if (opened === 1) throw new ConnectError("access token expired", Code.Unauthenticated);
          yield { frame: { case: "message", value: message("c1", 1) } };
          await new Promise((_, fail) => ctx.signal.addEventListener("abort", () => fail(ctx.signal.reason)));
        },
      }),
    [M2]: () => {},
  };
  const sb = await Switchboard.guest(options(routes), "Ada");
  assert.equal(sb.user.displayName, "Ada");
  // The first token has 30 s left, under the minute: refreshed first, once for both.
  await Promise.all([sb.read("c1", 1n), sb.read("c1", 2n)]);
  assert.deepEqual(auth.refreshes, ["refresh-0"]);
  assert.deepEqual(tokens, ["Bearer access-1", "Bearer access-1"]);
  const seen = [];
  const feed = sb.follow([{ conversationId: "c1" }], { message: (m) => seen.push(m.seq) });
  await until(() => seen.length === 1, "a message after the refresh");
  assert.equal(opened, 2);
  assert.deepEqual(auth.refreshes, ["refresh-0", "refresh-1"], "the expired stream refreshed its token");
  feed.close();
});

test("a feed whose session is over stops and says why", async () => {
  const routes = {
    [AUTH]: (router) =>
      router.service(AuthService, {
        login: () => ({ tokens: pair(0), user: create(UserSchema, { id: "u1" }) }),
        refresh: () => {
          throw new ConnectError("refresh token is unknown, expired or revoked", Code.Unauthenticated);
        },
      }),
    [M1]: (router) =>
      router.service(MessagingService, {
        // eslint-disable-next-line require-yield
        async *subscribe() {
          throw new ConnectError("session revoked", Code.Unauthenticated);
        },
      }),
    [M2]: () => {},
  };
  const sb = await Switchboard.login(options(routes), "ada", "pw");
  let stopped;
  sb.follow([{ conversationId: "c1" }], { stopped: (e) => (stopped = e ?? "closed") });
  await until(() => stopped !== undefined, "stopped");
  assert.equal(stopped.code, Code.Unauthenticated);
});

test("presence: online in a state, steered by the session id, and a goodbye", async () => {
  const calls = [];
  const routes = {
    [AUTH]: fakeAuth({ refreshes: [] }),
    [M1]: () => {},
    [M2]: () => {},
    [PRESENCE]: (router) =>
      router.service(PresenceService, {
        async *session(req, ctx) {
          calls.push(["session", req.state.state]);
          yield { frame: { case: "connected", value: { sessionId: "p1", heartbeatIntervalSeconds: 10, ttlSeconds: 30 } } };
          await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve));
        },
        setSessionState(req) {
          calls.push(["set", req.sessionId, req.state.state, req.state.customText]);
          return {};
        },
        endSession(req) {
          calls.push(["end", req.sessionId]);
          return {};
        },
      }),
  };
  const sb = await Switchboard.login(options(routes), "ada", "pw");
  const { PresenceState } = await import("../dist/index.js");
  const device = sb.online(PresenceState.AWAY);
  await device.setState(PresenceState.BUSY, "on a call");
  await device.end();
  assert.deepEqual(calls, [
    ["session", PresenceState.AWAY],
    ["set", "p1", PresenceState.BUSY, "on a call"],
    ["end", "p1"],
  ]);
});
