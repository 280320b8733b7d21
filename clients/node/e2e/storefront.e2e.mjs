// The storefront kit proven in a real browser: Debian's chromium (playwright-core) against
// the example storefront, the real daemon and the emulator, all real processes.
//
// One browser process runs every scenario, each in browser contexts of its own (a context
// is a separate cookie jar: another customer, or another browser). Screenshots of the
// account page go to $E2E_OUTPUT (default e2e/output/).
//
// No chromium here: the suite says so and is skipped, except under CI=true, where it fails.

import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { BrokerClient } from "geins-broker-client";

import {
  CHROMIUM,
  CHROMIUM_ARGS,
  Daemon,
  Emulator,
  missing,
  outputDir,
  removeTmp,
  shortTmp,
  startAttacker,
  startStorefront,
  stop,
} from "./harness.mjs";

const TOKEN_TTL = 20;
const FANOUT_SECONDS = Number(process.env.E2E_FANOUT_SECONDS ?? 90);
const PASSWORD = "correct horse battery staple";
const COOKIE = "__Host-geins-session";

const why = missing();
if (why !== null && process.env.CI === "true") throw new Error(`the browser suite cannot run under CI: ${why}`);
if (why !== null) console.error(`\n!!!!! BROWSER SUITE SKIPPED: ${why} !!!!!\n`);

describe("the storefront in a real browser", { skip: why ?? false }, () => {
  let dir, emulator, daemon, shop, browser, admin, attacker;
  const customers = new Map(); // email -> the context logged in as them

  before(async () => {
    const { chromium } = await import("playwright-core");
    dir = shortTmp();
    emulator = await Emulator.start(TOKEN_TTL);
    daemon = new Daemon(dir, emulator);
    await daemon.start();
    shop = await startStorefront(daemon, emulator);
    attacker = await startAttacker();
    // launch() gives the browser a fresh temporary profile (user data dir) of its own.
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
    // The test runs as an admin of the daemon (its own uid): it may list an app's sessions.
    admin = new BrokerClient({ socketPath: daemon.socket });
  });

  after(async () => {
    admin?.close();
    await browser?.close();
    await attacker?.close();
    await stop(shop?.process);
    await daemon?.stop();
    await stop(emulator?.process);
    if (dir) removeTmp(dir);
  });

  const email = (name) => `${name}-${process.pid}@example.com`;

  async function fillAndSubmit(page, path, username, { remember = false } = {}) {
    await page.goto(`${shop.url}${path}`);
    await page.fill('input[name="username"]', username);
    await page.fill('input[name="password"]', PASSWORD);
    if (remember) await page.check('input[name="remember"]');
    const [response] = await Promise.all([
      page.waitForResponse((r) => r.request().method() === "POST" && r.url() === `${shop.url}${path}`),
      page.click('[data-testid="submit"]'),
    ]);
    await page.waitForLoadState("load");
    return response;
  }

  async function sessionCookie(context) {
    return (await context.cookies(shop.url)).find((c) => c.name === COOKIE) ?? null;
  }

  async function registered(name, { remember = false } = {}) {
    const context = await browser.newContext();
    const page = await context.newPage();
    await fillAndSubmit(page, "/register", email(name), { remember });
    assert.equal(page.url(), `${shop.url}/account`);
    customers.set(email(name), context);
    return { context, page };
  }

  /** Load the fan-out page; what it showed. */
  async function fanout(page) {
    const response = await page.goto(`${shop.url}/fanout`);
    const path = new URL(page.url()).pathname;
    if (path !== "/fanout" || response.status() !== 200) return { path, status: response.status() };
    return {
      path: "/fanout",
      answered: await page.textContent('[data-testid="answered"]'),
      emails: await page.textContent('[data-testid="emails"]'),
    };
  }

  test("register, log out, log in with remember me: the account page shows the customer", async () => {
    const { context, page } = await registered("ann");
    assert.equal(await page.textContent('[data-testid="email"]'), email("ann"));
    const first = await sessionCookie(context);
    assert.ok(first, "no session cookie after register");
    assert.equal(first.expires, -1, "not remembered: a session cookie");

    await page.click('[data-testid="logout"]');
    await page.waitForURL(`${shop.url}/login`);
    assert.equal(await sessionCookie(context), null, "logout leaves the cookie");
    await page.goto(`${shop.url}/account`);
    assert.equal(page.url(), `${shop.url}/login`, "logged out, the account page sends to login");
    assert.deepEqual(await admin.sessions({ app: "shop", username: email("ann") }), []);

    const response = await fillAndSubmit(page, "/login", email("ann"), { remember: true });
    assert.equal(response.status(), 303);
    assert.equal(page.url(), `${shop.url}/account`);
    assert.equal(await page.textContent('[data-testid="email"]'), email("ann"));
    assert.match(await page.textContent('[data-testid="order-count"]'), /^0 orders$/);
    const remembered = await sessionCookie(context);
    assert.ok(remembered.expires > Date.now() / 1000 + 86_400, "remembered: the cookie outlives the browser");
    assert.notEqual(remembered.value, first.value, "a new login is a new handle");
    await page.screenshot({ path: join(outputDir(), "account-ann.png"), fullPage: true });
  });

  test("the cookie's attributes are as documented", async () => {
    const context = await browser.newContext();
    const page = await context.newPage();
    await emulator.control("POST", "users", { username: email("cid"), password: PASSWORD });
    await emulator.control("POST", "orders", { username: email("cid"), count: 3 });
    const response = await fillAndSubmit(page, "/login", email("cid"), { remember: true });
    const header = await response.headerValue("set-cookie");
    assert.match(header, /^__Host-geins-session=[A-Za-z0-9_-]{43}; Path=\/; HttpOnly; Secure; SameSite=Lax; Max-Age=\d+$/);
    const maxAge = Number(/Max-Age=(\d+)/.exec(header)[1]);
    const info = await admin.sessions({ app: "shop", username: email("cid") });
    assert.equal(info.length, 1);
    assert.ok(Math.abs(info[0].endsAt - (Date.now() / 1000 + maxAge)) < 5, "Max-Age is the session's end");
    const cookie = await sessionCookie(context);
    assert.deepEqual(
      { httpOnly: cookie.httpOnly, secure: cookie.secure, sameSite: cookie.sameSite, path: cookie.path, domain: cookie.domain },
      { httpOnly: true, secure: true, sameSite: "Lax", path: "/", domain: "127.0.0.1" },
    );
    // HttpOnly: the page's scripts cannot read it.
    assert.equal(await page.evaluate(() => document.cookie), "");
    assert.equal(await page.textContent('[data-testid="order-count"]'), "3 orders");
    await page.screenshot({ path: join(outputDir(), "account-cid.png"), fullPage: true });
    customers.set(email("cid"), context);
  });

  test("a login POST from another origin is refused, and so is a forged logout", async () => {
    const context = await browser.newContext();
    const page = await context.newPage();
    attacker.page("/login-csrf", `${shop.url}/login`, { username: email("cid"), password: PASSWORD, remember: "on" });
    const [refused] = await Promise.all([
      page.waitForResponse((r) => r.url() === `${shop.url}/login`),
      page.goto(`${attacker.url}/login-csrf`),
    ]);
    assert.equal(refused.status(), 403);
    assert.equal(await refused.headerValue("set-cookie"), null);
    assert.equal(await sessionCookie(context), null);
    await context.close();

    const victim = customers.get(email("cid"));
    const victimPage = await victim.newPage();
    attacker.page("/logout-csrf", `${shop.url}/logout`, {});
    const [forged] = await Promise.all([
      victimPage.waitForResponse((r) => r.url() === `${shop.url}/logout`),
      victimPage.goto(`${attacker.url}/logout-csrf`),
    ]);
    assert.equal(forged.status(), 403);
    await victimPage.goto(`${shop.url}/account`);
    assert.equal(await victimPage.textContent('[data-testid="email"]'), email("cid"), "still logged in");
    await victimPage.close();
  });

  test("two customers in two browser contexts never see each other's data", async () => {
    const { page: dee } = await registered("dee");
    const { page: eve } = await registered("eve");
    for (let round = 0; round < 10; round++) {
      const [d, e] = await Promise.all([fanout(dee), fanout(eve)]);
      assert.deepEqual(d, { path: "/fanout", answered: "20 of 20 answered", emails: email("dee") });
      assert.deepEqual(e, { path: "/fanout", answered: "20 of 20 answered", emails: email("eve") });
    }
    await Promise.all([dee.goto(`${shop.url}/account`), eve.goto(`${shop.url}/account`)]);
    assert.equal(await dee.textContent('[data-testid="email"]'), email("dee"));
    assert.equal(await eve.textContent('[data-testid="email"]'), email("eve"));
  });

  test(`two tabs reload the fan-out page for ${FANOUT_SECONDS} s with ${TOKEN_TTL}-s bearers: no failure, no re-login, one refresh per rotation`, async () => {
    const { context } = await registered("fay");
    const tabs = [await context.newPage(), await context.newPage()];
    const before = { counts: await emulator.counts(), fay: await emulator.sessionsOf(email("fay")) };
    const deadline = Date.now() + FANOUT_SECONDS * 1000;
    const loads = await Promise.all(
      tabs.map(async (tab) => {
        const seen = [];
        while (Date.now() < deadline) seen.push(await fanout(tab));
        return seen;
      }),
    );
    const afterwards = { counts: await emulator.counts(), fay: await emulator.sessionsOf(email("fay")) };
    const delta = (route) => (afterwards.counts[route] ?? 0) - (before.counts[route] ?? 0);
    const all = loads.flat();
    const bad = all.filter((l) => l.path !== "/fanout" || l.answered !== "20 of 20 answered" || l.emails !== email("fay"));
    assert.deepEqual(bad.slice(0, 3), [], `${bad.length} of ${all.length} loads failed`);
    assert.ok(all.length >= 20, `only ${all.length} loads`);
    assert.equal(delta("POST /login"), 0, "no customer logged in again");
    const rotations = afterwards.fay.rotations - before.fay.rotations;
    const refreshes = delta("GET /login");
    assert.equal(refreshes, afterwards.fay.all_rotations - before.fay.all_rotations, "every refresh rotated: none raced");
    // 20-s bearers rotate at most every ~10 s (at 75% of their life, or at 10 s left for a
    // request): one refresh per rotation, not per tab or per request.
    assert.ok(rotations >= FANOUT_SECONDS / TOKEN_TTL - 1, `${rotations} rotations in ${FANOUT_SECONDS} s`);
    assert.ok(rotations <= FANOUT_SECONDS / (TOKEN_TTL / 2) + 2, `${rotations} rotations in ${FANOUT_SECONDS} s`);
    console.error(`# fan-out: ${all.length} page loads (${all.length * 20} Merchant API calls), ${rotations} rotations, ${refreshes} refreshes in all`);
  });

  test("logout in one tab while the other fans out: the other is logged out and stays out", async () => {
    const { context, page: loggingOut } = await registered("gus");
    const fanning = await context.newPage();
    assert.equal((await fanout(fanning)).path, "/fanout");
    let stop = false;
    const loads = (async () => {
      const seen = [];
      while (!stop) seen.push(await fanout(fanning));
      return seen;
    })();
    await new Promise((done) => setTimeout(done, 1000));
    await loggingOut.click('[data-testid="logout"]');
    await loggingOut.waitForURL(`${shop.url}/login`);
    // Keep reloading for a while: nothing may bring the session back.
    await new Promise((done) => setTimeout(done, 3000));
    stop = true;
    const seen = await loads;
    const firstOut = seen.findIndex((l) => l.path !== "/fanout");
    assert.ok(firstOut > 0, "the fanning tab was never logged out");
    assert.deepEqual(
      seen.slice(firstOut).filter((l) => l.path !== "/login"),
      [],
      "once out, every load lands on /login",
    );
    assert.equal(await sessionCookie(context), null);
    assert.deepEqual(await admin.sessions({ app: "shop", username: email("gus") }), [], "gone at the broker");
    assert.equal((await emulator.sessionsOf(email("gus"))).live, 0, "gone at Geins");
  });

  test("a daemon restart while logged in: the customer stays logged in", async () => {
    const context = customers.get(email("ann"));
    const page = await context.newPage();
    await page.goto(`${shop.url}/account`);
    assert.equal(await page.textContent('[data-testid="email"]'), email("ann"));
    await daemon.stop();
    await daemon.start();
    await page.goto(`${shop.url}/account`);
    assert.equal(page.url(), `${shop.url}/account`);
    assert.equal(await page.textContent('[data-testid="email"]'), email("ann"));
    await page.screenshot({ path: join(outputDir(), "account-ann-after-restart.png"), fullPage: true });
    const fanned = await fanout(page);
    assert.equal(fanned.answered, "20 of 20 answered");
  });
});
