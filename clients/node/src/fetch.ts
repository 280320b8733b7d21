/**
 * A fetch that signs each request with the broker's bearer token: a profile's, or a
 * customer's session's (by handle).
 *
 *     const fetch = withBrokerAuth(globalThis.fetch, { profile: "default" });
 *     const response = await fetch("https://merchantapi.geins.io/graphql", { method: "POST", body });
 *     const asCustomer = withBrokerAuth(globalThis.fetch, { session: { app: "shop", handle } });
 *
 * On a 401 it asks the daemon for a token other than the refused one (forcing a refresh,
 * see TokenCache.renew) and sends the request once more; a second 401 is returned to the
 * caller as it is. A request whose body is a stream cannot be sent twice: its 401 is
 * returned without a retry.
 */

import { SessionTokens, TokenCache, type TokenCacheOptions } from "./cache.js";
import type { SessionRef } from "./client.js";

export type FetchLike = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

export interface BrokerAuthOptions extends TokenCacheOptions {
  /** A cache to share (e.g. with other wrapped fetches); default: a new one. */
  cache?: TokenCache;
}

export interface SessionAuthOptions extends Omit<TokenCacheOptions, "profile"> {
  /** The customer's session: every request goes out with its bearer. */
  session: SessionRef;
}

interface Tokens<T extends { token: string; authorization: string }> {
  get(options: { signal?: AbortSignal }): Promise<T>;
  renew(refused: T): Promise<T>;
}

export function withBrokerAuth(
  fetchImpl: FetchLike = globalThis.fetch,
  options: BrokerAuthOptions | SessionAuthOptions = {},
): FetchLike {
  if ("session" in options) return signing(fetchImpl, new SessionTokens(options.session, options));
  return signing(fetchImpl, options.cache ?? new TokenCache(options));
}

function signing<T extends { token: string; authorization: string }>(fetchImpl: FetchLike, cache: Tokens<T>): FetchLike {
  return async (input, init) => {
    const isRequest = typeof Request !== "undefined" && input instanceof Request;
    const spare = isRequest && input.body !== null ? input.clone() : null;
    const replayable = isRequest ? true : isReplayable(init?.body);
    const token = await cache.get(init?.signal ? { signal: init.signal } : {});
    const response = await fetchImpl(input, signed(input, init, token.authorization));
    if (response.status !== 401 || !replayable) return response;
    const fresh = await cache.renew(token);
    await response.body?.cancel().catch(() => undefined);
    return fetchImpl(spare ?? input, signed(input, init, fresh.authorization));
  };
}

function signed(input: string | URL | Request, init: RequestInit | undefined, authorization: string): RequestInit {
  const isRequest = typeof Request !== "undefined" && input instanceof Request;
  const headers = new Headers(init?.headers ?? (isRequest ? input.headers : undefined));
  headers.set("Authorization", authorization);
  return { ...init, headers };
}

function isReplayable(body: RequestInit["body"] | undefined): boolean {
  return !(typeof ReadableStream !== "undefined" && body instanceof ReadableStream);
}

let defaultFetch: FetchLike | null = null;

/** `fetch` with the default profile's bearer from the default socket (one cache per process). */
export function brokerFetch(input: string | URL | Request, init?: RequestInit): Promise<Response> {
  defaultFetch ??= withBrokerAuth((i, n) => globalThis.fetch(i, n));
  return defaultFetch(input, init);
}
