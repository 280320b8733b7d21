// Other uids: a reader the daemon refuses, and a socket planted by uid 65534 that the client
// must not send a byte to. Needs root and setpriv (CI runs as root); skipped otherwise.

import assert from "node:assert/strict";
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";
import { after, before, describe, test } from "node:test";

import { createServer } from "node:net";

import { BrokerClient, UntrustedSocket } from "../src/index.js";
import { FrameDecoder, encode } from "../src/protocol.js";
import { NOBODY, asNobody, canSwitchUid, forOtherUids, removeTmp, shortTmp, startBroker } from "./support.js";

const skip = canSwitchUid() ? false : "switching to another uid needs root and setpriv (CI runs as root)";

describe("another uid", { skip }, () => {
  let broker: Awaited<ReturnType<typeof startBroker>>;
  before(async () => {
    broker = await startBroker({ dirMode: 0o755, broker: { socket_mode: "0666" } });
    chmodSync(join(broker.dir, "run"), 0o755);
  });
  after(async () => broker.close());

  test("uid 65534 reaches the daemon, says hello, and is refused the token", async () => {
    const clientUrl = pathToFileURL(join(forOtherUids(), "src", "index.js")).href;
    const script = `
      const { BrokerClient } = await import(${JSON.stringify(clientUrl)});
      const client = new BrokerClient({ socketPath: process.argv[1] });
      const out = { hello: (await client.hello()).version };
      try { await client.token(); out.token = "served"; }
      catch (e) { out.token = { name: e.name, code: e.code, message: e.message }; }
      out.profiles = (await client.status()).profiles.length;
      client.close();
      console.log(JSON.stringify(out));`;
    const out = (await asNobody(script, [broker.daemon.socket])) as {
      hello: number;
      token: { name: string; code: string; message: string };
      profiles: number;
    };
    assert.equal(out.hello, 1);
    assert.equal(out.token.name, "Forbidden");
    assert.equal(out.token.code, "forbidden");
    assert.match(out.token.message, /65534/);
    assert.equal(out.profiles, 0);
  });
});

/** A listener run by uid 65534 in a directory it owns, recording every connection and byte. */
async function plantedSocket(dirMode: number): Promise<{ path: string; seen: () => string; stop: () => void }> {
  const top = shortTmp(0o755);
  const dir = join(top, "geins-broker");
  mkdirSync(dir);
  const script = `
    import { createServer } from "node:net";
    import { appendFileSync, chmodSync } from "node:fs";
    const [dir, mode] = process.argv.slice(1);
    const log = dir + "/seen";
    appendFileSync(log, "");
    createServer((socket) => {
      appendFileSync(log, "connect\\n");
      socket.on("data", (data) => appendFileSync(log, "data " + data.toString("hex") + "\\n"));
    }).listen(dir + "/broker.sock", () => {
      chmodSync(dir, Number(mode));
      console.log("listening");
    });`;
  // The directory is the attacker's: chown it to 65534 before it starts.
  chownSync(dir, NOBODY, NOBODY);
  const child = spawn(
    "setpriv",
    [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", process.execPath, "--input-type=module", "-e", script, "--", dir, String(dirMode)],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  const lines = createInterface({ input: child.stdout! });
  await new Promise<void>((done, fail) => {
    lines.once("line", () => done());
    child.once("exit", (code) => fail(new Error(`planted listener exited with ${code}`)));
  });
  return {
    path: join(dir, "broker.sock"),
    seen: () => readFileSync(join(dir, "seen"), "utf8"),
    stop: () => {
      child.kill("SIGKILL");
      removeTmp(top);
    },
  };
}

describe("a socket planted by another uid", { skip }, () => {
  for (const [what, mode] of [
    ["a 0777 directory", 0o777],
    ["a 0755 directory of uid 65534", 0o755],
  ] as const) {
    test(`${what}: the client refuses it, sending nothing`, async () => {
      const planted = await plantedSocket(mode);
      try {
        const client = new BrokerClient({ socketPath: planted.path });
        await assert.rejects(client.login({ username: "demo@example.com", password: "a-secret" }), (error: unknown) => {
          assert.ok(error instanceof UntrustedSocket);
          assert.equal(error.code, "untrusted_socket");
          assert.ok(!error.message.includes("a-secret"));
          return true;
        });
        await assert.rejects(client.token(), UntrustedSocket);
        // The same path in $GEINS_BROKER_SOCKET counts as given explicitly.
        await assert.rejects(new BrokerClient({ env: { GEINS_BROKER_SOCKET: planted.path } }).token(), UntrustedSocket);
        // The default search skips it; with nothing else there, it refuses it by name.
        const systemSockets = [`/run/user/${process.geteuid!()}/geins-broker/broker.sock`, "/run/geins-broker/broker.sock"];
        if (!systemSockets.some((p) => existsSync(p))) {
          const env = { XDG_RUNTIME_DIR: join(planted.path, "..", ".."), TMPDIR: "/nonexistent-gbn" };
          await assert.rejects(new BrokerClient({ env }).token(), (error: unknown) => {
            assert.ok(error instanceof UntrustedSocket);
            assert.ok(error.message.includes(planted.path));
            return true;
          });
        }
        // With a trusted socket further down the list, the search skips the planted one.
        const mine = shortTmp();
        const runtime = join(mine, `runtime-${process.geteuid!()}`, "geins-broker");
        mkdirSync(runtime, { recursive: true, mode: 0o700 });
        const server = createServer((socket) =>
          socket.on("data", (data) => {
            const [request] = new FrameDecoder().feed(data);
            socket.write(encode({ id: request!["id"], ok: true, v: 1, server: "trusted-fake", ops: [] }));
          }),
        );
        await new Promise<void>((done) => server.listen(join(runtime, "broker.sock"), done));
        try {
          const env = { XDG_RUNTIME_DIR: join(planted.path, "..", ".."), TMPDIR: mine };
          const client = new BrokerClient({ env });
          if (!systemSockets.slice(0, 1).some((p) => existsSync(p))) {
            assert.equal((await client.hello()).server, "trusted-fake");
          }
          client.close();
        } finally {
          await new Promise<void>((done) => server.close(() => done()));
          removeTmp(mine);
        }
        assert.equal(planted.seen(), "", "the planted listener saw a connection or bytes");
      } finally {
        planted.stop();
      }
    });
  }
});
