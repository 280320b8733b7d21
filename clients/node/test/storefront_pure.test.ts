// The storefront kit's pure parts: the session cookie's text, the Origin rule, and the
// results that must never show a handle or a token.

import assert from "node:assert/strict";
import { inspect } from "node:util";
import { describe, test } from "node:test";

import { RateLimited, errorFromWire } from "../src/errors.js";
import { CustomerSession, SessionToken } from "../src/results.js";
import {
  clearedCookie,
  cookieName,
  cookiePolicy,
  crossSiteRefusal,
  handleFrom,
  sessionCookie,
} from "../src/index.js";
import { normalOrigin } from "../src/storefront/origin.js";

const HANDLE = "A".repeat(21) + "-_" + "z9".repeat(10);

describe("the session cookie", () => {
  test("defaults: __Host- prefix, HttpOnly, Secure, SameSite=Lax, Path=/, no Domain", () => {
    const policy = cookiePolicy();
    assert.equal(cookieName(policy), "__Host-geins-session");
    assert.equal(
      sessionCookie(policy, HANDLE, 604_800.7),
      `__Host-geins-session=${HANDLE}; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age=604800`,
    );
    assert.doesNotMatch(sessionCookie(policy, HANDLE, null), /Domain|Expires/i);
  });

  test("a customer not remembered gets a session cookie: no Max-Age, no Expires", () => {
    assert.equal(
      sessionCookie(cookiePolicy(), HANDLE, null),
      `__Host-geins-session=${HANDLE}; Path=/; HttpOnly; Secure; SameSite=Lax`,
    );
  });

  test("local http development: no prefix, no Secure, still HttpOnly and SameSite", () => {
    const policy = cookiePolicy({ secure: false });
    assert.equal(sessionCookie(policy, HANDLE, 60), `geins-session=${HANDLE}; Path=/; HttpOnly; SameSite=Lax; Max-Age=60`);
    assert.equal(clearedCookie(policy), "geins-session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0");
  });

  test("cleared: same name and attributes, Max-Age=0", () => {
    assert.equal(clearedCookie(cookiePolicy()), "__Host-geins-session=; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age=0");
  });

  test("options cannot inject attributes or weaken SameSite to None", () => {
    assert.throws(() => cookiePolicy({ name: "x; Domain=evil.example" }), TypeError);
    assert.throws(() => cookiePolicy({ name: "__Secure-x" }), TypeError);
    assert.throws(() => cookiePolicy({ sameSite: "None" as "Lax" }), TypeError);
    assert.throws(() => sessionCookie(cookiePolicy(), "not a handle; Domain=x", null), TypeError);
  });

  test("the handle is read back; junk, duplicates and other names read as no cookie", () => {
    const policy = cookiePolicy();
    assert.equal(handleFrom(policy, `a=1; __Host-geins-session=${HANDLE}; b=2`), HANDLE);
    assert.equal(handleFrom(policy, `__Host-geins-session=${HANDLE}`), HANDLE);
    assert.equal(handleFrom(policy, `geins-session=${HANDLE}`), null, "the unprefixed name is not the secure cookie");
    assert.equal(handleFrom(policy, `__Host-geins-session=${HANDLE}x`), null);
    assert.equal(handleFrom(policy, "__Host-geins-session=../../etc"), null);
    assert.equal(handleFrom(policy, `__Host-geins-session=${HANDLE}; __Host-geins-session=${HANDLE.replace("A", "B")}`), null);
    assert.equal(handleFrom(policy, null), null);
    assert.equal(handleFrom(policy, `x=${"y".repeat(20_000)}; __Host-geins-session=${HANDLE}`), null);
  });
});

describe("the Origin rule", () => {
  const shop = ["https://shop.example"];
  const post = (origin: string | null, fetchSite: string | null = null) => ({ method: "POST", origin, fetchSite });

  test("a POST from the shop's own origin passes", () => {
    assert.equal(crossSiteRefusal(post("https://shop.example", "same-origin"), shop), null);
    assert.equal(crossSiteRefusal(post("https://shop.example"), shop), null);
  });

  test("a POST from another origin, a look-alike, or the opaque null origin is refused", () => {
    for (const origin of ["https://evil.example", "http://shop.example", "https://shop.example.evil.example", "null"]) {
      assert.match(crossSiteRefusal(post(origin, "cross-site"), shop) ?? "", /another origin/, origin);
    }
  });

  test("no Origin: only a same-origin Sec-Fetch-Site passes", () => {
    assert.equal(crossSiteRefusal(post(null, "same-origin"), shop), null);
    assert.match(crossSiteRefusal(post(null), shop) ?? "", /without an Origin/);
    assert.match(crossSiteRefusal(post(null, "same-site"), shop) ?? "", /without an Origin/);
  });

  test("safe methods are never refused; every other method is checked", () => {
    assert.equal(crossSiteRefusal({ method: "GET", origin: "https://evil.example", fetchSite: "cross-site" }, shop), null);
    for (const method of ["PUT", "DELETE", "PATCH", "post"]) {
      assert.notEqual(crossSiteRefusal({ method, origin: "https://evil.example", fetchSite: null }, shop), null);
    }
  });

  test("origins are compared as browsers serialise them", () => {
    assert.equal(normalOrigin("https://Shop.Example:443/path"), "https://shop.example");
    assert.equal(normalOrigin("http://localhost:8080"), "http://localhost:8080");
    assert.equal(normalOrigin("javascript:alert(1)"), null);
    assert.equal(normalOrigin("not a url"), null);
  });
});

describe("results that hold secrets", () => {
  test("a CustomerSession never shows its handle in inspect, JSON or string form", () => {
    const session = new CustomerSession("shop", HANDLE, "ann@example.com", 1_800_000_900, 1_800_600_000, true);
    assert.equal(session.handle, HANDLE);
    for (const shown of [inspect(session), JSON.stringify(session), String(session), inspect({ session }, { depth: 5 })]) {
      assert.doesNotMatch(shown, new RegExp(HANDLE), shown);
    }
    assert.match(inspect(session), /ann@example.com/);
    assert.deepEqual(Object.keys(session), ["app", "username", "expiresAt", "sessionEndsAt", "remember"]);
  });

  test("a SessionToken never shows its bearer", () => {
    const token = new SessionToken("shop", "eyJ.secret.sig", 1_800_000_900);
    assert.equal(token.authorization, "Bearer eyJ.secret.sig");
    assert.doesNotMatch(inspect(token) + JSON.stringify(token), /secret/);
  });

  test("rate_limited carries retry_after, bounded and sane", () => {
    const limited = errorFromWire("rate_limited", "slow down", 12.5);
    assert.ok(limited instanceof RateLimited);
    assert.equal(limited.retryAfter, 12.5);
    assert.equal((errorFromWire("rate_limited", "x", 1e12) as RateLimited).retryAfter, 86_400);
    assert.equal((errorFromWire("rate_limited", "x", -1) as RateLimited).retryAfter, null);
    assert.equal((errorFromWire("rate_limited", "x", "soon") as RateLimited).retryAfter, null);
  });
});
