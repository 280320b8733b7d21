/**
 * Cross-site request forgery, decided without any I/O.
 *
 * A browser puts the page's origin in `Origin` on every POST (same-origin ones too) and a
 * page cannot forge it; `Sec-Fetch-Site` says the same in newer browsers. So a
 * state-changing request passes only when its `Origin` is one of the storefront's own
 * origins, or, with no `Origin` at all, when `Sec-Fetch-Site` says `same-origin`. The
 * session cookie's SameSite=Lax keeps it off cross-site POSTs as a second guard; the
 * Origin check is the one that stops login CSRF (which needs no cookie).
 */

/** Methods that change nothing (RFC 9110's safe methods): never refused here. */
const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);

export interface OriginFacts {
  readonly method: string;
  /** The `Origin` header, or null. */
  readonly origin: string | null;
  /** The `Sec-Fetch-Site` header, or null. */
  readonly fetchSite: string | null;
}

/**
 * Why the request must be refused, or null to let it pass. `allowed`: the storefront's
 * origins, each `scheme://host[:port]` as a browser writes it.
 */
export function crossSiteRefusal(facts: OriginFacts, allowed: readonly string[]): string | null {
  if (SAFE.has(facts.method.toUpperCase())) return null;
  if (facts.origin === null) {
    return facts.fetchSite === "same-origin" ? null : "a state-changing request without an Origin header";
  }
  return allowed.includes(facts.origin) ? null : "a request from another origin";
}

/**
 * An origin as browsers serialise it (`https://shop.example`, no path, default port
 * dropped), or null for something that is not an http(s) origin.
 */
export function normalOrigin(text: string): string | null {
  try {
    const url = new URL(text);
    if (url.protocol !== "https:" && url.protocol !== "http:") return null;
    return url.origin;
  } catch {
    return null;
  }
}
