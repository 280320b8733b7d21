// TokenCache (single flight) and withBrokerAuth (sign, and retry once after a 401) against
// the real daemon; the API answering 401 is a small HTTP server of the test's own.

import assert from "node:assert/strict";
import { createServer, type IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";

import { BrokerClient, TokenCache, brokerFetch, withBrokerAuth, type Token } from "../src/index.js";
import { startBroker } from "./support.js";

/** A real client that counts the token requests it sends. */
class CountingClient extends BrokerClient {
  tokenCalls = 0;
  override token(options?: Parameters<BrokerClient["token"]>[0]): Promise<Token> {
    this.tokenCalls++;
    return super.token(options);
  }
}

describe("TokenCache and withBrokerAuth", () => {
  let broker: Awaited<ReturnType<typeof startBroker>>;
  before(async () => {
    broker = await startBroker();
  });
  after(async () => broker.close());

  test("100 concurrent callers, one request; then answers from memory", async () => {
    const client = new CountingClient({ socketPath: broker.daemon.socket });
    const cache = new TokenCache({ client, minValid: 60 });
    const tokens = await Promise.all(Array.from({ length: 100 }, () => cache.get()));
    assert.equal(client.tokenCalls, 1);
    assert.equal(new Set(tokens.map((t) => t.token)).size, 1);
    await Promise.all(Array.from({ length: 100 }, () => cache.get()));
    assert.equal(client.tokenCalls, 1);
    cache.invalidate();
    await Promise.all(Array.from({ length: 100 }, () => cache.get()));
    assert.equal(client.tokenCalls, 2);
    client.close();
  });

  test("a token with less than minValid left is asked for again", async () => {
    const client = new CountingClient({ socketPath: broker.daemon.socket });
    let now = Date.now() / 1000;
    const cache = new TokenCache({ client, minValid: 60, clock: () => now });
    const first = await cache.get();
    now = first.expiresAt - 30;
    await cache.get();
    assert.equal(client.tokenCalls, 2);
    client.close();
  });

  test("a failed request reaches every waiter, and the next get tries again", async () => {
    const client = new CountingClient({ socketPath: broker.daemon.socket });
    const cache = new TokenCache({ client, profile: "nope" });
    const results = await Promise.allSettled(Array.from({ length: 10 }, () => cache.get()));
    assert.ok(results.every((r) => r.status === "rejected"));
    assert.equal(client.tokenCalls, 1);
    await assert.rejects(cache.get());
    assert.equal(client.tokenCalls, 2);
    client.close();
  });

  test("one waiter's abort leaves the others their token", async () => {
    const cache = new TokenCache({ client: new BrokerClient({ socketPath: broker.daemon.socket }) });
    const controller = new AbortController();
    const aborted = cache.get({ signal: controller.signal });
    const other = cache.get();
    controller.abort();
    await assert.rejects(aborted, { name: "AbortError" });
    assert.equal((await other).profile, "default");
    cache.client.close();
  });

  describe("a fetch signed by the broker", () => {
    let server: ReturnType<typeof createServer>;
    let url = "";
    const seen: { authorization: string; body: string }[] = [];
    let refuse: (authorization: string) => boolean = () => false;
    const body = async (request: IncomingMessage) => {
      let text = "";
      for await (const chunk of request) text += String(chunk);
      return text;
    };
    before(async () => {
      server = createServer((request, response) => {
        void body(request).then((text) => {
          const authorization = request.headers.authorization ?? "";
          seen.push({ authorization, body: text });
          response.statusCode = refuse(authorization) ? 401 : 200;
          response.end("{}");
        });
      });
      await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
      url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/graphql`;
    });
    after(() => new Promise<void>((done) => server.close(() => done())));

    test("adds the bearer; on a 401 forces a refresh and sends once more", async () => {
      const client = new BrokerClient({ socketPath: broker.daemon.socket });
      const held = await client.token();
      refuse = (authorization) => authorization === held.authorization;
      seen.length = 0;
      const signed = withBrokerAuth(fetch, { client });
      const response = await signed(url, { method: "POST", body: '{"query":"{ getUser { email } }"}' });
      assert.equal(response.status, 200);
      assert.equal(seen.length, 2);
      assert.equal(seen[0]!.authorization, held.authorization);
      const now = await client.token();
      assert.notEqual(now.token, held.token);
      assert.equal(seen[1]!.authorization, now.authorization);
      assert.equal(seen[1]!.body, seen[0]!.body);
      client.close();
    });

    test("a second 401 is handed back after exactly two tries", async () => {
      const client = new BrokerClient({ socketPath: broker.daemon.socket });
      refuse = () => true;
      seen.length = 0;
      const response = await withBrokerAuth(fetch, { client })(url);
      assert.equal(response.status, 401);
      assert.equal(seen.length, 2);
      client.close();
    });

    test("brokerFetch finds the daemon through $GEINS_BROKER_SOCKET", async () => {
      process.env["GEINS_BROKER_SOCKET"] = broker.daemon.socket;
      refuse = () => false;
      seen.length = 0;
      const response = await brokerFetch(url, { headers: { "X-Other": "kept" } });
      assert.equal(response.status, 200);
      const current = await new BrokerClient({ socketPath: broker.daemon.socket }).token();
      assert.equal(seen[0]!.authorization, current.authorization);
      delete process.env["GEINS_BROKER_SOCKET"];
    });
  });
});
