// Customer sessions from Node against the real daemon and emulator: every session op,
// its errors, withBrokerAuth by handle, and the storefront kit over Fetch API requests.

import assert from "node:assert/strict";
import { inspect } from "node:util";
import { after, before, describe, test } from "node:test";

import {
  BrokerClient,
  InvalidCredentials,
  RateLimited,
  Storefront,
  StorefrontError,
  UnknownApp,
  UnknownSession,
  withBrokerAuth,
} from "../src/index.js";
import { DEMO_PASSWORD, DEMO_USER, Emulator, startBroker } from "./support.js";

type Broker = Awaited<ReturnType<typeof startBroker>>;

const GRAPHQL = { operationName: "UserGet", query: "query UserGet { getUser { email } }" };

describe("customer sessions", () => {
  let broker: Broker;
  let client: BrokerClient;
  let emulator: Emulator;
  before(async () => {
    broker = await startBroker({ profiles: [], login: [], apps: { shop: { login_burst_per_username: 100 }, other: {} } });
    emulator = broker.emulator;
    client = new BrokerClient({ socketPath: broker.daemon.socket });
  });
  after(async () => {
    client.close();
    await broker.close();
  });

  const userGet = (fetch: typeof globalThis.fetch) =>
    fetch(`${emulator.url}/graphql`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-ApiKey": "demo-api-key" },
      body: JSON.stringify(GRAPHQL),
    });

  test("login, token, info, logout: the handle is the session's only name and never shows", async () => {
    const session = await client.sessionLogin({ app: "shop", username: DEMO_USER, password: DEMO_PASSWORD, remember: true });
    assert.match(session.handle, /^[A-Za-z0-9_-]{43}$/);
    assert.equal(session.username, DEMO_USER);
    assert.equal(session.remember, true);
    assert.doesNotMatch(inspect(session) + JSON.stringify(session), new RegExp(session.handle));

    const token = await client.sessionToken({ app: "shop", handle: session.handle, minValid: 60 });
    assert.ok(token.expiresIn() >= 60);
    const info = await client.sessionInfo(session);
    assert.equal(info.username, DEMO_USER);
    assert.equal(info.remember, true);

    await client.sessionLogout(session);
    await assert.rejects(client.sessionToken(session), UnknownSession);
    await assert.rejects(client.sessionInfo(session), UnknownSession);
  });

  test("another app's handle, an unknown app, a wrong password", async () => {
    const session = await client.sessionLogin({ app: "shop", username: DEMO_USER, password: DEMO_PASSWORD });
    await assert.rejects(client.sessionToken({ app: "other", handle: session.handle }), UnknownSession);
    await assert.rejects(client.sessionToken({ app: "nope", handle: session.handle }), UnknownApp);
    await assert.rejects(client.sessionLogin({ app: "shop", username: DEMO_USER, password: "wrong" }), InvalidCredentials);
    await client.sessionLogout(session);
  });

  test("register, list, and log out everywhere (admin)", async () => {
    const username = `reg-${process.pid}@example.com`;
    const first = await client.sessionRegister({ app: "shop", username, password: "pw-1", user: { newsletter: false } });
    await client.sessionLogin({ app: "shop", username, password: "pw-1" });
    const listed = await client.sessions({ app: "shop", username });
    assert.equal(listed.length, 2);
    assert.ok(listed.every((s) => /^[0-9a-f]{8}$/.test(s.session) && s.username === username));
    assert.ok(!JSON.stringify(listed).includes(first.handle));
    assert.equal(await client.sessionEnd({ app: "shop", username }), 2);
    await assert.rejects(client.sessionToken(first), UnknownSession);
  });

  test("too many attempts for one customer (the app's default limit): RateLimited with retryAfter", async () => {
    const username = `limited-${process.pid}@example.com`;
    let limited: unknown = null;
    for (let i = 0; i < 20 && limited === null; i++) {
      await client.sessionLogin({ app: "other", username, password: "wrong" }).catch((error: unknown) => {
        if (!(error instanceof InvalidCredentials)) limited = error;
      });
    }
    assert.ok(limited instanceof RateLimited, String(limited));
    assert.ok(limited.retryAfter !== null && limited.retryAfter > 0 && limited.retryAfter <= 86_400);
  });

  test("withBrokerAuth by session: the customer's bearer, one forced refresh and retry on a 401", async () => {
    const session = await client.sessionLogin({ app: "shop", username: DEMO_USER, password: DEMO_PASSWORD });
    const fetch = withBrokerAuth(globalThis.fetch, { session, client });
    const ok = await userGet(fetch);
    assert.equal(ok.status, 200);
    assert.equal(((await ok.json()) as { data: { getUser: { email: string } } }).data.getUser.email, DEMO_USER);

    const before = await client.sessionToken(session);
    await emulator.control("POST", "faults", { kind: "status", status: 401, match: "POST /graphql", times: 1 });
    const retried = await userGet(fetch);
    assert.equal(retried.status, 200, "the retry with a fresh bearer went through");
    const afterwards = await client.sessionToken(session);
    assert.notEqual(afterwards.token, before.token, "the 401 forced a refresh");

    await client.sessionLogout(session);
    await assert.rejects(userGet(fetch), UnknownSession);
  });

  test("the storefront kit over Fetch API requests (Next.js, Nitro)", async () => {
    const shop = new Storefront({ app: "shop", client });
    const origin = "https://shop.example";
    const post = (path: string, headers: Record<string, string> = {}) =>
      new Request(`${origin}${path}`, { method: "POST", headers: { Origin: origin, ...headers } });

    await assert.rejects(
      shop.login(post("/login", { Origin: "https://evil.example" }), { username: DEMO_USER, password: DEMO_PASSWORD }),
      (error: unknown) => error instanceof StorefrontError && error.status === 403,
    );
    await assert.rejects(
      shop.login(post("/login"), { username: DEMO_USER, password: "wrong" }),
      (error: unknown) => error instanceof StorefrontError && error.status === 401,
    );
    const { session, setCookie } = await shop.login(post("/login"), { username: DEMO_USER, password: DEMO_PASSWORD });
    assert.match(setCookie, /^__Host-geins-session=[\w-]{43}; Path=\/; HttpOnly; Secure; SameSite=Lax$/);
    const cookie = setCookie.split(";")[0]!;

    const page = new Request(`${origin}/account`, { headers: { Cookie: `theme=dark; ${cookie}` } });
    const customer = await shop.customer(page);
    assert.equal(customer.session.handle, session.handle);
    assert.equal((await userGet(customer.fetch)).status, 200);

    const cleared = await shop.logout(post("/logout", { Cookie: cookie }));
    assert.match(cleared, /^__Host-geins-session=; .*Max-Age=0$/);
    const refused = await shop.customer(page).catch((error: unknown) => error);
    assert.ok(refused instanceof StorefrontError && refused.status === 401);
    const response = refused.toResponse();
    assert.equal(response.status, 401);
    assert.equal(response.headers.get("set-cookie"), cleared, "a dead session's cookie is cleared");
    await assert.rejects(shop.customer(new Request(`${origin}/account`)), (error: unknown) => {
      return error instanceof StorefrontError && error.status === 401 && error.headers.length === 0;
    });
  });
});
