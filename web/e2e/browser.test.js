// The widget and the agent console in a real headless Chromium (Debian's, driven by
// playwright-core), against real servers: the Rust test
// `browser::the_widget_and_the_console_in_chromium` starts auth, presence and two messaging
// processes with CORS for the pages' origin, serves web/public, and passes everything in
// SWITCHBOARD_BROWSER (JSON): the pages' origin, the endpoints, the agents' credentials,
// a customer's username, the messaging processes' PIDs (to kill one) and where to put
// the screenshots. Without it this file is skipped; the Rust test insists nothing is.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const env = process.env.SWITCHBOARD_BROWSER ? JSON.parse(process.env.SWITCHBOARD_BROWSER) : undefined;
const skip = env === undefined && "needs SWITCHBOARD_BROWSER (run by the Rust test)";
const TIMEOUT = 15_000;

function page(name) {
  const q = new URLSearchParams({
    sb_auth: env.auth,
    sb_presence: env.presence,
    sb_messaging: env.messaging.join(","),
  });
  return `${env.origin}/${name}?${q}`;
}

/** The widget's rendered messages: [seq, body] in the order shown. */
async function rendered(p) {
  return p.$$eval('[data-sb="widget"] [data-sb="messages"] li', (items) =>
    items.map((li) => [Number(li.dataset.seq), li.querySelector('[data-sb="body"]').textContent]),
  );
}

/** Waits until the widget shows a message with `body`. */
async function shows(p, scope, body) {
  await p.locator(`${scope} [data-sb="messages"] li`, { hasText: body }).first().waitFor({ timeout: TIMEOUT });
}

async function login(context, agent) {
  const p = await context.newPage();
  await p.goto(page("console.html"));
  await p.fill('[data-sb="username"]', agent.username);
  await p.fill('[data-sb="password"]', agent.password);
  await p.click('[data-sb="login"]');
  await p.locator('[data-sb="desk"]').waitFor({ timeout: TIMEOUT });
  return p;
}

test("a guest and two agents: the queue, routing, talk both ways, typing, receipts, a crash, transfer, close", { skip }, async () => {
  const browser = await chromium.launch({
    executablePath: env.chromium,
    args: ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
  try {
    const errors = [];
    const watch = (p, who) => p.on("pageerror", (e) => errors.push(`${who}: ${e.message}`));
    // The visitor opens the widget on the shop page while no agent is online: first in line.
    const shopContext = await browser.newContext();
    const shop = await shopContext.newPage();
    watch(shop, "widget");
    await shop.goto(page("shop.html"));
    await shop.fill('[data-sb="name"]', "Ada");
    await shop.fill('[data-sb="topic"]', "Where is my parcel");
    await shop.fill('[data-sb="first"]', "It was due yesterday");
    await shop.click('[data-sb="start"]');
    const status = shop.locator('[data-sb="status"]');
    await status.filter({ hasText: "you are number 1 in line" }).waitFor({ timeout: TIMEOUT });

    // Eve logs into the console (and so comes online): the consultation is routed to her.
    const eve = await login(await browser.newContext(), env.agents[0]);
    watch(eve, "console");
    await status.filter({ hasText: `Talking with ${env.agents[0].display}` }).waitFor({ timeout: TIMEOUT });

    // Eve sees it in her consultations, opens it, types and answers.
    const mine = eve.locator('[data-sb="mine"] li', { hasText: "Ada" });
    await mine.waitFor({ timeout: TIMEOUT });
    await mine.click();
    await shows(eve, '[data-sb="chat"]', "It was due yesterday");
    await eve.locator('[data-sb="input"]').pressSequentially("Let me look", { delay: 20 });
    await shop.locator('[data-sb="typing"]', { hasText: `${env.agents[0].display} is typing` }).waitFor({ timeout: TIMEOUT });
    await eve.click('[data-sb="send"]');
    await shows(shop, '[data-sb="widget"]', "Let me look");
    // The widget reads it (the page is visible): Eve's message shows as read.
    await eve
      .locator('[data-sb="chat"] li[data-mine="true"]', { hasText: "Let me look" })
      .locator('[data-sb="read"]')
      .waitFor({ state: "visible", timeout: TIMEOUT });
    await shop.fill('[data-sb="input"]', "Thanks!");
    await shop.click('[data-sb="send"]');
    await shows(eve, '[data-sb="chat"]', "Thanks!");
    await shop.screenshot({ path: `${env.screenshots}/widget.png` });
    await eve.screenshot({ path: `${env.screenshots}/console.png` });

    // Bad input from the page shows the server's own message.
    const error = shop.locator('[data-sb="error"]');
    await shop.fill('[data-sb="input"]', "");
    await shop.click('[data-sb="send"]');
    await error.filter({ hasText: /body/ }).waitFor({ timeout: TIMEOUT });
    await shop.fill('[data-sb="input"]', "x".repeat(16 * 1024 + 1));
    await shop.click('[data-sb="send"]');
    await error.filter({ hasText: /16384/ }).waitFor({ timeout: TIMEOUT });
    // A forbidden action from the console: handing the consultation to a customer.
    await eve.fill('[data-sb="transfer-to"]', env.customer);
    await eve.click('[data-sb="transfer"]');
    await eve.locator('[data-sb="error"]').filter({ hasText: /agent/i }).waitFor({ timeout: TIMEOUT });

    // The instance both pages are on dies (kill -9) mid-conversation: they go on on the
    // other, and the widget shows every message once, in order.
    process.kill(env.messagingPids[0], "SIGKILL");
    await eve.fill('[data-sb="input"]', "Found it: it ships today");
    await eve.click('[data-sb="send"]');
    await shows(shop, '[data-sb="widget"]', "Found it: it ships today");
    await shop.fill('[data-sb="input"]', "Great");
    await shop.click('[data-sb="send"]');
    await shows(eve, '[data-sb="chat"]', "Great");
    const shown = await rendered(shop);
    assert.deepEqual(
      shown.map(([, body]) => body),
      ["It was due yesterday", "Let me look", "Thanks!", "Found it: it ships today", "Great"],
    );
    assert.deepEqual(
      shown.map(([seq]) => seq),
      [1, 2, 3, 4, 5],
      "every message once, in seq order",
    );

    // Eve hands it to Fay with a note; the customer sees the transfer; Fay closes it.
    const fay = await login(await browser.newContext(), env.agents[1]);
    watch(fay, "console 2");
    await eve.fill('[data-sb="transfer-to"]', env.agents[1].username);
    await eve.fill('[data-sb="transfer-note"]', "parcel question, almost done");
    await eve.click('[data-sb="transfer"]');
    await status.filter({ hasText: `Transferred to ${env.agents[1].display}` }).waitFor({ timeout: TIMEOUT });
    const hers = fay.locator('[data-sb="mine"] li', { hasText: "Ada" });
    await hers.waitFor({ timeout: TIMEOUT });
    await hers.click();
    await shows(fay, '[data-sb="chat"]', "Great");
    await fay.fill('[data-sb="resolution"]', "ships today");
    await fay.click('[data-sb="close"]');
    await status.filter({ hasText: "Closed: ships today" }).waitFor({ timeout: TIMEOUT });
    assert.equal(await shop.locator('[data-sb="composer"]').isHidden(), true, "no composer once closed");
    assert.deepEqual(errors, [], "no script errors in the pages");
  } finally {
    await browser.close();
  }
});
