// The Node codec, errors, socket search and trust rule against docs/protocol-vectors.json,
// which scripts/make_vectors.py writes from the Python codec the daemon runs.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { inspect } from "node:util";
import { describe, test } from "node:test";

import { calls, answer } from "../src/calls.js";
import * as errors from "../src/errors.js";
import { candidateSockets, checkTrusted, systemUser, trustedUids, type StatInfo } from "../src/paths.js";
import { FrameDecoder, encode, MAX_RESPONSE_SIZE, Op } from "../src/protocol.js";
import {
  parseCustomerSession,
  parseEnded,
  parseExpiresAt,
  parseNothing,
  parseSessionInfo,
  parseSessionListings,
  parseWatchEvent,
  sessionTokenParser,
} from "../src/results.js";
import { VECTORS_PATH } from "./support.js";

interface Vectors {
  requests: { call: string; args: Record<string, unknown>; idempotent: boolean; message: Record<string, unknown>; hex: string }[];
  answers: { name: string; message: Record<string, unknown>; hex: string }[];
  error_codes: { code: string; family: string; message: string; hex: string }[];
  bad_frames: { name: string; hex: string; max_size: number }[];
  watch: { request: string; stream: string; events: Record<string, unknown>[] };
  socket_paths: { env: Record<string, string>; candidates: string[]; explicit?: string }[];
  trust: { trusted_uids: number[]; cases: { name: string; directory: StatInfo | null; socket: StatInfo | null; accept: boolean }[] };
}

const vectors = JSON.parse(readFileSync(VECTORS_PATH, "utf8")) as Vectors;
const hex = (data: Uint8Array): string => Buffer.from(data).toString("hex");

/** The Node builder for each Python `calls` function, taking the vector's keyword arguments. */
function build(name: string, a: Record<string, unknown>) {
  const s = (k: string) => a[k] as string | undefined;
  switch (name) {
    case "hello":
      return calls.hello(s("client"));
    case "token":
      return calls.token(s("profile"), a["min_valid"] as number | undefined);
    case "user":
      return calls.user(s("profile"));
    case "status":
      return calls.status();
    case "login":
      return calls.login(s("username")!, s("password")!, s("profile"), a["remember"] as boolean | undefined);
    case "logout":
      return calls.logout(s("profile"));
    case "refresh":
      return calls.refresh(s("profile"));
    case "change_password":
      return calls.changePassword(s("password")!, s("new_password")!, s("profile"));
    case "register":
      return calls.register(
        s("username")!,
        s("password")!,
        s("profile"),
        a["remember"] as boolean | undefined,
        a["user"] as Record<string, unknown> | undefined,
      );
    case "watch":
      return calls.watch(s("profile"));
    case "session_login":
      return calls.sessionLogin(s("app")!, s("username")!, s("password")!, a["remember"] as boolean | undefined);
    case "session_register":
      return calls.sessionRegister(
        s("app")!,
        s("username")!,
        s("password")!,
        a["remember"] as boolean | undefined,
        a["user"] as Record<string, unknown> | undefined,
      );
    case "session_token":
      return calls.sessionToken(s("app")!, s("handle")!, a["min_valid"] as number | undefined);
    case "session_info":
      return calls.sessionInfo(s("app")!, s("handle")!);
    case "session_passwd":
      return calls.sessionPasswd(s("app")!, s("handle")!, s("password")!, s("new_password")!);
    case "session_logout":
      return calls.sessionLogout(s("app")!, s("handle")!);
    case "sessions":
      return calls.sessions(s("app")!, s("username"));
    case "session_end":
      return calls.sessionEnd(s("app")!, s("username")!);
    default:
      throw new Error(`no Node builder for ${name}`);
  }
}

describe("requests", () => {
  test("every op the Node client sends has a vector", () => {
    const covered = new Set(vectors.requests.map((v) => v.message["op"]));
    const missing = Object.values(Op).filter((op) => !covered.has(op));
    assert.deepEqual(missing, []);
  });
  for (const [i, v] of vectors.requests.entries()) {
    test(`${i} ${v.call} is built byte for byte`, () => {
      const call = build(v.call, v.args);
      assert.equal(hex(encode({ id: v.message["id"], ...call.fields })), v.hex);
      assert.equal(call.idempotent, v.idempotent);
      assert.deepEqual(new FrameDecoder().feed(Buffer.from(v.hex, "hex")), [v.message]);
    });
  }
});

describe("answers", () => {
  for (const v of vectors.answers) {
    test(`${v.name} decodes to its meaning, whole or a byte at a time`, () => {
      const frame = Buffer.from(v.hex, "hex");
      assert.deepEqual(new FrameDecoder().feed(frame), [v.message]);
      const decoder = new FrameDecoder();
      const decoded = [...frame].flatMap((_, i) => decoder.feed(frame.subarray(i, i + 1)));
      assert.deepEqual(decoded, [v.message]);
      assert.equal(decoder.error, null);
    });
  }
});

describe("session answers", () => {
  const named = (name: string): Record<string, unknown> => {
    const found = vectors.answers.find((v) => v.name === name);
    assert.ok(found, `no answer vector ${name}`);
    return found.message;
  };
  test("session_login: a CustomerSession that keeps its handle out of sight", () => {
    const message = named("session_login");
    const session = answer(parseCustomerSession, message);
    assert.equal(session.handle, message["handle"]);
    assert.equal(session.sessionEndsAt, message["session_ends_at"]);
    assert.equal(session.remember, true);
    assert.doesNotMatch(JSON.stringify(session) + inspect(session), new RegExp(String(message["handle"])));
    assert.equal(answer(parseCustomerSession, named("session_login, no absolute end")).sessionEndsAt, null);
  });
  test("session_token, session_info, sessions, session_end, session_passwd", () => {
    const token = answer(sessionTokenParser("shop"), named("session_token"));
    assert.equal(token.authorization, `Bearer ${String(named("session_token")["token"])}`);
    assert.equal(answer(parseSessionInfo, named("session_info")).customerType, "PERSON");
    const listed = answer(parseSessionListings, named("sessions"));
    assert.deepEqual(
      listed.map((s) => [s.session, s.username]),
      [
        ["9f86d081", "demo@example.com"],
        ["2c26b46b", null],
      ],
    );
    assert.equal(answer(parseEnded, named("session_end")), 3);
    assert.equal(answer(parseExpiresAt, named("session_passwd")), 1800000900.5);
    assert.equal(answer(parseNothing, named("session_logout")), undefined);
  });
});

describe("error codes", () => {
  test("cover every code the Python client knows, one class each", () => {
    assert.deepEqual(Object.keys(errors.ERROR_CLASSES), vectors.error_codes.map((v) => v.code));
    const classes = new Set(Object.values(errors.ERROR_CLASSES));
    assert.equal(classes.size, vectors.error_codes.length);
  });
  for (const v of vectors.error_codes) {
    test(`${v.code} becomes its class, in its family`, () => {
      const [message] = new FrameDecoder().feed(Buffer.from(v.hex, "hex"));
      assert.throws(
        () => answer(parseNothing, message!),
        (error: unknown) => {
          const family = (errors as unknown as Record<string, new (...a: never[]) => Error>)[v.family];
          assert.ok(family, `no family ${v.family}`);
          assert.ok(error instanceof family, `${String(error)} is not a ${v.family}`);
          assert.ok(error instanceof errors.BrokerError);
          assert.equal(error.constructor, errors.ERROR_CLASSES[v.code]);
          assert.equal(error.code, v.code);
          assert.equal(error.message, v.message);
          return true;
        },
      );
    });
  }
  test("an unknown code from a newer daemon is kept", () => {
    const error = errors.errorFromWire("quota_exceeded", "slow down");
    assert.equal(error.constructor, errors.BrokerError);
    assert.equal(error.code, "quota_exceeded");
  });
});

describe("bad frames", () => {
  for (const v of vectors.bad_frames) {
    test(`${v.name} stops the decoder`, () => {
      const decoder = new FrameDecoder(v.max_size);
      const good = encode({ id: 1, ok: true });
      const stream = Buffer.concat([good, Buffer.from(v.hex, "hex"), good]);
      assert.deepEqual(decoder.feed(stream), [{ id: 1, ok: true }]);
      assert.notEqual(decoder.error, null);
      assert.deepEqual(decoder.feed(good), []);
    });
  }
});

test("the watch stream decodes in any split", () => {
  const stream = Buffer.from(vectors.watch.stream, "hex");
  for (let cut = 0; cut < stream.length; cut++) {
    const decoder = new FrameDecoder(MAX_RESPONSE_SIZE);
    const got = [...decoder.feed(stream.subarray(0, cut)), ...decoder.feed(stream.subarray(cut))];
    assert.deepEqual(got, vectors.watch.events);
  }
  const events = vectors.watch.events.map((e) => answer(parseWatchEvent, e));
  assert.deepEqual(
    events.map((e) => e.event),
    ["token", "token", "logged_out", "login_required"],
  );
  assert.equal(events[1]!.token!.expiresAt, vectors.watch.events[1]!["expires_at"]);
  assert.equal(events[2]!.token, null);
  assert.equal(hex(encode({ id: 5, ...calls.watch("default").fields })), vectors.watch.request);
});

describe("socket paths", () => {
  const uid = process.geteuid!();
  const withUid = (text: string) => text.replaceAll("{uid}", String(uid));
  for (const [i, v] of vectors.socket_paths.entries()) {
    test(`candidates ${i}: ${JSON.stringify(v.env)}`, () => {
      const env = Object.fromEntries(Object.entries(v.env).map(([k, x]) => [k, withUid(x)]));
      assert.deepEqual(candidateSockets(env, uid), v.candidates.map(withUid));
    });
  }
});

describe("socket trust rule", () => {
  const trusted = new Set(vectors.trust.trusted_uids);
  for (const v of vectors.trust.cases) {
    test(`${v.name}: ${v.accept ? "accepted" : "refused"}`, () => {
      const reason = checkTrusted(v.directory, v.socket, trusted);
      assert.equal(reason === null, v.accept, reason ?? "accepted");
    });
  }
  test("trusted uids: this process, root, and geins-broker from /etc/passwd", () => {
    const passwd = "root:x:0:0::/root:/bin/sh\ngeins-broker:x:997:997::/var/lib:/usr/sbin/nologin\n";
    assert.equal(systemUser(passwd), 997);
    assert.equal(systemUser("geins-brokers:x:5:5::/:/bin/sh\n"), null);
    assert.deepEqual(trustedUids(1000, 997), new Set([1000, 0, 997]));
    assert.deepEqual(trustedUids(1000, null), new Set([1000, 0]));
  });
});
