// BrokerClient against the real daemon and emulator: every op, every error class the daemon
// can be made to send, pipelining, abort and timeout.

import assert from "node:assert/strict";
import { inspect } from "node:util";
import { after, before, describe, test } from "node:test";

import {
  BadRequest,
  BrokerClient,
  BrokerError,
  BrokerNotRunning,
  Forbidden,
  InvalidCredentials,
  LoginRequired,
  NotLoggedIn,
  TokenCache,
  type Token,
  ProtocolError,
  Timeout,
  Unavailable,
  UnknownOp,
  UnknownProfile,
  UpstreamError,
  UpstreamUnavailable,
} from "../src/index.js";
import { parseNothing } from "../src/results.js";
import { DEMO_PASSWORD, DEMO_USER, startBroker } from "./support.js";

type Broker = Awaited<ReturnType<typeof startBroker>>;

/** A min_valid the held token cannot meet but a new one can (under the 900 s lifetime). */
const outlive = (token: Token): number => (token.expiresIn() + 900) / 2;

describe("every op against the daemon", () => {
  let broker: Broker;
  let client: BrokerClient;
  before(async () => {
    broker = await startBroker({ profiles: ["default", "idle", "other"], login: ["default", "other"], profile: { request_timeout: 1 } });
    client = new BrokerClient({ socketPath: broker.daemon.socket });
  });
  after(async () => {
    client.close();
    await broker.close();
  });

  test("hello names the server and its ops", async () => {
    const hello = await client.hello({ client: "node-test" });
    assert.equal(hello.version, 1);
    assert.match(hello.server, /^geins-broker\//);
    assert.ok(hello.ops.includes("token") && hello.ops.includes("watch"));
  });

  test("token, and a token that must last longer makes the daemon refresh", async () => {
    const first = await client.token();
    assert.equal(first.profile, "default");
    assert.match(first.token, /^[\w-]+\.[\w-]+\.[\w-]+$/);
    assert.ok(first.expiresIn() > 60);
    const lasting = await client.token({ profile: "default", minValid: outlive(first) });
    assert.notEqual(lasting.token, first.token);
    assert.ok(lasting.expiresAt > first.expiresAt);
  });

  test("a token never shows in inspect or JSON", async () => {
    const token = await client.token();
    assert.ok(!inspect(token).includes(token.token));
    assert.ok(!JSON.stringify(token).includes(token.token));
    assert.ok(!inspect({ nested: [token] }, { depth: 5 }).includes(token.token));
    assert.equal(token.authorization, `Bearer ${token.token}`);
  });

  test("a request over the daemon's 64 KiB limit is refused before it is sent", async () => {
    const user = { note: "x".repeat(70_000) };
    await assert.rejects(client.register({ profile: "idle", username: "big@example.com", password: "pw", user }), (error: unknown) => {
      assert.ok(error instanceof BadRequest);
      assert.match(error.message, /over the 65536 limit/);
      return true;
    });
    assert.equal((await client.hello()).version, 1);
  });

  test("a TokenCache shows no token either", async () => {
    const cache = new TokenCache({ client });
    const token = await cache.get();
    assert.ok(!inspect(cache, { depth: 10 }).includes(token.token));
    assert.ok(!inspect(client, { depth: 10 }).includes(token.token));
  });

  test("user, status", async () => {
    const user = await client.user();
    assert.equal(user.username, DEMO_USER);
    assert.equal(user.profile, "default");
    const status = await client.status();
    const states = Object.fromEntries(status.profiles.map((p) => [p.profile, p.state]));
    assert.deepEqual(states, { default: "active", idle: "logged_out", other: "active" });
    assert.ok(!JSON.stringify(status).includes((await client.token()).token));
  });

  test("refresh, change password and back, logout and login", async () => {
    const before = await client.token({ profile: "other" });
    const refreshed = await client.refresh({ profile: "other" });
    assert.equal(refreshed.username, DEMO_USER);
    assert.notEqual((await client.token({ profile: "other" })).token, before.token);
    await client.changePassword({ profile: "other", password: DEMO_PASSWORD, newPassword: "changed-pw" });
    await client.changePassword({ profile: "other", password: "changed-pw", newPassword: DEMO_PASSWORD });
    // A password change ends the user's other sessions at Geins: "default" logs in again.
    await client.login({ username: DEMO_USER, password: DEMO_PASSWORD });
    await client.logout({ profile: "other" });
    await assert.rejects(client.token({ profile: "other" }), NotLoggedIn);
    const session = await client.login({ profile: "other", username: DEMO_USER, password: DEMO_PASSWORD, remember: true });
    assert.equal(session.profile, "other");
    assert.ok(session.expiresAt > Date.now() / 1000);
  });

  test("register a new user", async () => {
    const session = await client.register({
      profile: "idle",
      username: "node-new@example.com",
      password: "a-new-password",
      user: { newsletter: true, customerType: "PERSON" },
    });
    assert.equal(session.username, "node-new@example.com");
    assert.equal((await client.user({ profile: "idle" })).username, "node-new@example.com");
    await assert.rejects(
      client.register({ profile: "idle", username: "node-new@example.com", password: "x" }),
      InvalidCredentials,
    );
    await client.logout({ profile: "idle" });
  });

  test("pipelined calls on one connection are matched by id", async () => {
    const answers = await Promise.all([
      client.token(),
      client.user(),
      client.hello(),
      client.token({ profile: "nope" }).catch((e: unknown) => e),
      client.status(),
      client.token({ profile: "other" }),
    ]);
    assert.equal(answers[0].profile, "default");
    assert.equal(answers[1].username, DEMO_USER);
    assert.equal(answers[2].version, 1);
    assert.ok(answers[3] instanceof UnknownProfile);
    assert.equal(answers[4].profiles.length, 3);
    assert.equal(answers[5].profile, "other");
  });

  describe("errors, one class per code", () => {
    const expectError = async (
      promise: Promise<unknown>,
      cls: new (...a: never[]) => BrokerError,
      code: string,
      family?: new (...a: never[]) => BrokerError,
    ) => {
      await assert.rejects(promise, (error: unknown) => {
        assert.ok(error instanceof cls, `${inspect(error)} is not a ${cls.name}`);
        if (family) assert.ok(error instanceof family);
        assert.equal(error.code, code);
        assert.ok(error.message.length > 0);
        return true;
      });
    };

    test("unknown_profile, not_logged_in, bad_request, unknown_op", async () => {
      await expectError(client.token({ profile: "nope" }), UnknownProfile, "unknown_profile");
      await expectError(client.user({ profile: "idle" }), NotLoggedIn, "not_logged_in");
      await expectError(client.token({ minValid: 1e9 }), BadRequest, "bad_request", ProtocolError);
      await expectError(client.call({ fields: { op: "frobnicate" }, idempotent: true }, parseNothing), UnknownOp, "unknown_op", ProtocolError);
      // The connection stays up after each of them.
      assert.equal((await client.hello()).version, 1);
    });

    test("invalid_credentials, and the password is in no message", async () => {
      await assert.rejects(
        client.login({ profile: "idle", username: DEMO_USER, password: "wrong-secret-pw" }),
        (error: unknown) => {
          assert.ok(error instanceof InvalidCredentials);
          assert.equal(error.code, "invalid_credentials");
          assert.ok(!error.message.includes("wrong-secret-pw"));
          assert.ok(!inspect(error).includes("wrong-secret-pw"));
          return true;
        },
      );
    });

    test("upstream_unavailable, upstream_error, timeout: Geins failing under a refresh", async () => {
      await broker.emulator.control("POST", "faults", { kind: "status", match: "GET /api", status: 503, times: 1 });
      await expectError(client.refresh(), UpstreamUnavailable, "upstream_unavailable", Unavailable);
      await broker.emulator.control("POST", "faults", { kind: "status", match: "GET /api", status: 404, times: 1 });
      await expectError(client.refresh(), UpstreamError, "upstream_error");
      await broker.emulator.control("POST", "faults", { kind: "latency", match: "GET /api", seconds: 3, times: 1 });
      await expectError(client.refresh(), Timeout, "timeout", Unavailable);
      await broker.emulator.control("DELETE", "faults");
      assert.equal((await client.refresh()).profile, "default");
    });

    test("login_required once Geins ends the session", async () => {
      await client.login({ profile: "idle", username: DEMO_USER, password: DEMO_PASSWORD });
      await broker.emulator.control("POST", "revoke", { username: DEMO_USER });
      await expectError(client.refresh({ profile: "idle" }), LoginRequired, "login_required");
      const idle = (await client.status()).profiles.find((p) => p.profile === "idle");
      assert.equal(idle?.state, "login_required");
      // Every session of the demo user ended: log the others in again for later tests.
      for (const profile of ["default", "other"]) {
        await client.login({ profile, username: DEMO_USER, password: DEMO_PASSWORD });
      }
      await client.logout({ profile: "idle" });
    });
  });

  describe("abort and timeout", () => {
    test("a call past its timeout rejects with Timeout; the connection goes on", async () => {
      await broker.emulator.control("POST", "faults", { kind: "latency", match: "GET /api", seconds: 0.8, times: 1 });
      const held = await client.token();
      await assert.rejects(client.token({ minValid: outlive(held), timeout: 100 }), (error: unknown) => {
        assert.ok(error instanceof Timeout);
        assert.match(error.message, /did not answer within 100 ms/);
        return true;
      });
      assert.equal((await client.hello()).version, 1);
      await broker.emulator.control("DELETE", "faults");
    });

    test("an aborted call rejects with the signal's reason; an aborted signal sends nothing", async () => {
      await broker.emulator.control("POST", "faults", { kind: "latency", match: "GET /api", seconds: 0.8, times: 1 });
      const held = await client.token();
      const controller = new AbortController();
      const pending = client.token({ minValid: outlive(held), signal: controller.signal });
      setTimeout(() => controller.abort(), 50);
      await assert.rejects(pending, { name: "AbortError" });
      await assert.rejects(client.hello({ signal: AbortSignal.abort(new Error("gone")) }), { message: "gone" });
      assert.equal((await client.hello()).version, 1);
      await broker.emulator.control("DELETE", "faults");
    });
  });

  test("after close, calls in flight fail and later calls connect again", async () => {
    await broker.emulator.control("POST", "faults", { kind: "latency", match: "GET /api", seconds: 0.5, times: 1 });
    const held = await client.token();
    const pending = client.token({ minValid: outlive(held) });
    await new Promise((done) => setTimeout(done, 50));
    client.close();
    await assert.rejects(pending, BrokerNotRunning);
    assert.equal((await client.hello()).version, 1);
    await broker.emulator.control("DELETE", "faults");
  });
});

test("no daemon: BrokerNotRunning naming the socket", async () => {
  const client = new BrokerClient({ socketPath: "/tmp/gbn-none/broker.sock" });
  await assert.rejects(client.hello(), (error: unknown) => {
    assert.ok(error instanceof BrokerNotRunning);
    assert.equal(error.code, "not_running");
    assert.match(error.message, /gbn-none\/broker.sock/);
    return true;
  });
});

test("Forbidden is a BrokerError with code forbidden", () => {
  const error = new Forbidden("uid 65534 may not read profile 'default'");
  assert.equal(error.code, "forbidden");
  assert.equal(error.name, "Forbidden");
  assert.ok(error instanceof BrokerError);
});
