/**
 * The session cookie as text, without any I/O: what goes in a `Set-Cookie` header and
 * how the handle is read back from a `Cookie` header.
 *
 * The cookie holds only the handle (43 characters of base64url, nothing to escape). It is
 * set once, at login, and never again while the session lives: the broker rotates the
 * customer's tokens behind the same handle, so no response of a page's fan-out carries a
 * `Set-Cookie` that could race a logout in another tab.
 */

/** A handle as the daemon makes them: 32 random bytes, unpadded base64url. */
const HANDLE = /^[A-Za-z0-9_-]{43}$/;
/** A cookie name (RFC 6265 token), so an option cannot inject attributes. */
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** Longest Cookie header read: browsers send at most about 4 KiB per cookie, a few dozen cookies. */
export const MAX_COOKIE_HEADER = 16 * 1024;

export type SameSite = "Lax" | "Strict";

export interface CookiePolicy {
  /** The name before any prefix (default "geins-session"). */
  readonly name: string;
  /**
   * true (the default): `__Host-` prefix and `Secure`, so only HTTPS (and http://localhost,
   * which browsers treat as secure) ever carries the cookie and no subdomain can set it.
   * false: neither, for plain-http development on another host name.
   */
  readonly secure: boolean;
  readonly sameSite: SameSite;
}

export const DEFAULT_COOKIE: CookiePolicy = Object.freeze({ name: "geins-session", secure: true, sameSite: "Lax" });

/** The policy with `overrides` applied; throws on a name that is not a cookie token. */
export function cookiePolicy(overrides: Partial<CookiePolicy> = {}): CookiePolicy {
  const policy = { ...DEFAULT_COOKIE, ...overrides };
  if (!TOKEN.test(policy.name) || policy.name.startsWith("__")) {
    throw new TypeError(`cookie name ${JSON.stringify(policy.name)} is not a plain cookie token`);
  }
  if (policy.sameSite !== "Lax" && policy.sameSite !== "Strict") {
    // None would send the cookie on cross-site POSTs: the Origin check would be the only guard.
    throw new TypeError("sameSite must be Lax or Strict");
  }
  return Object.freeze(policy);
}

/** The cookie's full name: `__Host-NAME` when secure. */
export function cookieName(policy: CookiePolicy): string {
  return policy.secure ? `__Host-${policy.name}` : policy.name;
}

/**
 * `Set-Cookie` for a new session. `maxAge` (seconds): how long the browser keeps it; null
 * makes a session cookie (gone when the browser closes), for a customer not remembered.
 */
export function sessionCookie(policy: CookiePolicy, handle: string, maxAge: number | null): string {
  if (!HANDLE.test(handle)) throw new TypeError("not a session handle");
  const age = maxAge === null ? [] : [`Max-Age=${Math.max(0, Math.floor(maxAge))}`];
  return [`${cookieName(policy)}=${handle}`, ...attributes(policy), ...age].join("; ");
}

/** `Set-Cookie` that removes the session cookie. */
export function clearedCookie(policy: CookiePolicy): string {
  return [`${cookieName(policy)}=`, ...attributes(policy), "Max-Age=0"].join("; ");
}

function attributes(policy: CookiePolicy): string[] {
  return ["Path=/", "HttpOnly", ...(policy.secure ? ["Secure"] : []), `SameSite=${policy.sameSite}`];
}

/**
 * The handle in a `Cookie` header, or null. Anything that is not a well-formed handle
 * (a forged, truncated or oversized value) reads as no cookie, so junk never reaches the
 * daemon. Two cookies of the name (one planted by a sibling subdomain when not secure):
 * null, since which one the browser meant cannot be told.
 */
export function handleFrom(policy: CookiePolicy, header: string | null | undefined): string | null {
  if (!header || header.length > MAX_COOKIE_HEADER) return null;
  const wanted = cookieName(policy);
  let found: string | null = null;
  for (const pair of header.split(";")) {
    const eq = pair.indexOf("=");
    if (eq < 0 || pair.slice(0, eq).trim() !== wanted) continue;
    if (found !== null) return null;
    found = pair.slice(eq + 1).trim();
  }
  return found !== null && HANDLE.test(found) ? found : null;
}
