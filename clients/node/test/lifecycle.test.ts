// Watch across rotations, reconnecting after a daemon restart, and what the client sends
// again when a connection dies under a call.

import assert from "node:assert/strict";
import { createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { BrokerClient, BrokerNotRunning, NotLoggedIn } from "../src/index.js";
import { FrameDecoder, encode, type Message } from "../src/protocol.js";
import { removeTmp, shortTmp, startBroker } from "./support.js";

describe("watch and restarts against the daemon", () => {
  let broker: Awaited<ReturnType<typeof startBroker>>;
  before(async () => {
    // A 3 s bearer rotated at half its life: a rotation every 1.5 s.
    broker = await startBroker({ emulatorArgs: ["--token-ttl", "3"], profile: { refresh_at: 0.5, jitter: 0 } });
  });
  after(async () => broker.close());

  test("watch yields the current token, then each of three rotations; break ends it", async () => {
    const client = new BrokerClient({ socketPath: broker.daemon.socket });
    const seen: string[] = [];
    for await (const event of client.watch()) {
      assert.equal(event.event, "token");
      assert.ok(event.token !== null && event.token.expiresIn() > 0);
      seen.push(event.token.token);
      if (seen.length === 4) break;
    }
    assert.equal(new Set(seen).size, 4);
    // The watch's own connection is gone; the daemon is still there for the client.
    assert.equal((await client.hello()).version, 1);
    client.close();
  });

  test("watch ends cleanly on abort, and tells of a logout", async () => {
    const client = new BrokerClient({ socketPath: broker.daemon.socket });
    const controller = new AbortController();
    const events: string[] = [];
    const watching = (async () => {
      for await (const event of client.watch({ signal: controller.signal })) {
        events.push(event.event);
        if (events.length === 1) await client.logout();
        if (event.event === "logged_out") controller.abort();
      }
    })();
    await watching;
    assert.deepEqual(events, ["token", "logged_out"]);
    await assert.rejects(client.token(), NotLoggedIn);
    await client.login({ username: "demo@example.com", password: "demo-password", remember: true });
    client.close();
  });

  test("after a daemon restart the same client goes on, even for a call it may not repeat", async () => {
    const client = new BrokerClient({ socketPath: broker.daemon.socket });
    const before = await client.token();
    await broker.daemon.stop();
    await broker.daemon.start();
    // The first call after the restart is `refresh`, which is never sent twice: it
    // succeeds only because the connection the old daemon closed was noticed before
    // anything was sent on it.
    const refreshed = await client.refresh();
    assert.equal(refreshed.profile, "default");
    assert.notEqual((await client.token()).token, before.token);
    // While the daemon is down, calls say so; once it is back they go through again.
    await broker.daemon.stop();
    await assert.rejects(client.hello(), BrokerNotRunning);
    await broker.daemon.start();
    assert.equal((await client.hello()).version, 1);
    client.close();
  });

  test("a watch hears the daemon stop", async () => {
    const client = new BrokerClient({ socketPath: broker.daemon.socket });
    const iterator = client.watch();
    assert.equal((await iterator.next()).value?.event, "token");
    const next = assert.rejects(iterator.next(), BrokerNotRunning);
    await broker.daemon.stop();
    await next;
    await broker.daemon.start();
  });
});

describe("a connection that dies under a call", () => {
  let dir: string;
  let server: Server;
  const received: Message[] = [];
  let connections = 0;
  let hangUpOn: (n: number) => boolean = () => false;
  before(async () => {
    dir = shortTmp();
    server = createServer((socket: Socket) => {
      const n = ++connections;
      const decoder = new FrameDecoder();
      socket.on("data", (data) => {
        for (const message of decoder.feed(data)) {
          received.push(message);
          if (hangUpOn(n)) {
            socket.destroy();
            return;
          }
          socket.write(encode({ id: message["id"], ok: true, profile: "default", token: "a.b.c", expires_at: 2e9 }));
        }
      });
    });
    await new Promise<void>((done) => server.listen(join(dir, "broker.sock"), done));
  });
  after(async () => {
    await new Promise<void>((done) => server.close(() => done()));
    removeTmp(dir);
  });

  test("an idempotent call is sent once more on a new connection", async () => {
    received.length = 0;
    connections = 0;
    hangUpOn = (n) => n === 1;
    const client = new BrokerClient({ socketPath: join(dir, "broker.sock") });
    assert.equal((await client.token()).token, "a.b.c");
    assert.equal(connections, 2);
    assert.deepEqual(
      received.map((m) => m["op"]),
      ["token", "token"],
    );
    client.close();
  });

  test("a call that changes a session is not: BrokerNotRunning, sent once", async () => {
    received.length = 0;
    connections = 0;
    hangUpOn = () => true;
    const client = new BrokerClient({ socketPath: join(dir, "broker.sock") });
    await assert.rejects(client.logout(), BrokerNotRunning);
    assert.deepEqual(
      received.map((m) => m["op"]),
      ["logout"],
    );
    client.close();
  });

  test("a busy daemon's connection-level error reaches the call", async () => {
    const busyDir = shortTmp();
    const busy = createServer((socket) => {
      socket.end(encode({ id: null, ok: false, error: { code: "busy", message: "too many connections" } }));
    });
    await new Promise<void>((done) => busy.listen(join(busyDir, "broker.sock"), done));
    const client = new BrokerClient({ socketPath: join(busyDir, "broker.sock") });
    await assert.rejects(client.hello(), { name: "Busy", code: "busy" });
    client.close();
    await new Promise<void>((done) => busy.close(() => done()));
    removeTmp(busyDir);
  });

  test("an unreadable answer is BadFrame", async () => {
    const badDir = shortTmp();
    const bad = createServer((socket) => socket.on("data", () => socket.write(Buffer.from("00000001c1", "hex"))));
    await new Promise<void>((done) => bad.listen(join(badDir, "broker.sock"), done));
    const client = new BrokerClient({ socketPath: join(badDir, "broker.sock") });
    await assert.rejects(client.hello(), { name: "BadFrame", code: "bad_frame" });
    client.close();
    await new Promise<void>((done) => bad.close(() => done()));
    removeTmp(badDir);
  });
});
