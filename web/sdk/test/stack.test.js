// The SDK against real servers over gRPC-Web: auth, presence and two messaging instances
// started by the Rust test `grpc_web::the_web_sdk_serves_a_guest_and_an_agent_on_a_real_stack`,
// which passes their URLs and an agent's credentials in SWITCHBOARD_STACK (JSON). Without
// it (a plain `npm test`) this file is skipped; the Rust test insists nothing is.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Code, PresenceState, Switchboard } from "../dist/index.js";

const stack = process.env.SWITCHBOARD_STACK ? JSON.parse(process.env.SWITCHBOARD_STACK) : undefined;
const skip = stack === undefined && "needs SWITCHBOARD_STACK (run by the Rust test)";

/** Waits (bounded, 10 s) until `check` returns something. */
async function until(check, what) {
  for (let i = 0; i < 400; i++) {
    const v = check();
    if (v) return v;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.fail(`never: ${what}`);
}

test("a guest is routed to an agent, and they talk, type and read over gRPC-Web", { skip }, async () => {
  const endpoints = { auth: stack.auth, presence: stack.presence, messaging: stack.messaging };
  const agent = await Switchboard.login({ endpoints }, stack.agent.username, stack.agent.password);
  const agentDevice = agent.online(PresenceState.AVAILABLE);
  const agentSeen = { messages: [], typing: [], receipts: [], events: [] };
  const agentFeed = agent.follow("all", {
    message: (m) => agentSeen.messages.push(m),
    typing: (t) => agentSeen.typing.push(t),
    receipt: (r) => agentSeen.receipts.push(r),
    event: (e) => agentSeen.events.push(e),
  });

  const guest = await Switchboard.guest({ endpoints }, "Ada");
  assert.equal(guest.user.displayName, "Ada");
  const opened = await guest.desk.open("parcel", "where is my parcel?");
  const id = opened.conversation.id;
  const seen = { messages: [], events: [], typing: [], receipts: [] };
  const feed = guest.follow([{ conversationId: id }], {
    message: (m) => seen.messages.push(m),
    event: (e) => seen.events.push(e),
    typing: (t) => seen.typing.push(t),
    receipt: (r) => seen.receipts.push(r),
  });
  // Routed to the one agent online (perhaps before the feed opened: the event may have
  // come and gone, the conversation says it); the agent's feed follows the consultation.
  let assigned = "";
  for (let i = 0; i < 100 && assigned === ""; i++) {
    assigned = (await guest.conversation(id)).consultation?.agentId ?? "";
    if (assigned === "") await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(assigned, agent.user.id, "assigned to the agent");
  await until(() => agentSeen.messages.some((m) => m.conversationId === id), "the agent sees the first message");

  const answer = await agent.send(id, "on its way");
  await until(() => seen.messages.some((m) => m.seq === answer.seq), "the guest sees the answer");
  assert.deepEqual(
    seen.messages.map((m) => [Number(m.seq), m.body]),
    [
      [1, "where is my parcel?"],
      [2, "on its way"],
    ],
  );

  await guest.typing(id);
  await until(() => agentSeen.typing.some((t) => t.userId === guest.user.id), "typing reaches the agent");
  await guest.read(id, 2n);
  await until(
    () => agentSeen.receipts.some((r) => r.userId === guest.user.id && r.readSeq === 2n),
    "the receipt reaches the agent",
  );

  // Bad input shows the server's own message; a forbidden action too.
  await assert.rejects(guest.send(id, ""), (e) => e.code === Code.InvalidArgument && /body/.test(e.rawMessage));
  await assert.rejects(
    guest.send(id, "x".repeat(16 * 1024 + 1)),
    (e) => e.code === Code.InvalidArgument && /16384/.test(e.rawMessage),
  );
  await assert.rejects(guest.desk.queue(), (e) => e.code === Code.PermissionDenied && e.rawMessage.length > 0);

  // Closing shows on the guest's side; the conversation is read-only after.
  await agent.desk.close(opened.consultation.id, "delivered tomorrow");
  await until(() => seen.events.some((e) => e.conversation?.consultation?.resolution === "delivered tomorrow"), "closed");
  await assert.rejects(guest.send(id, "one more"), (e) => e.code === Code.FailedPrecondition);

  // The guest keeps it all as an account.
  const account = await guest.upgrade(`ada_${Date.now() % 1_000_000}`, "right password");
  assert.equal(account.id, opened.consultation.customerId);
  const history = await guest.history(id);
  assert.equal(history.length, 2);

  feed.close();
  agentFeed.close();
  await agentDevice.end();
});
