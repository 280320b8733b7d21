/**
 * BrokerClient: every op of protocol v1 as a promise, on one pipelined connection.
 *
 * Any number of calls may be in flight at once; the daemon answers each by id. Every call
 * takes an AbortSignal and a timeout (milliseconds; the client's default is 30 s): when
 * either fires, the call rejects at once (with the signal's reason, or `Timeout`) and a late
 * answer is dropped; the connection stays up for the other calls.
 *
 * After the daemon restarts, the next call connects again: a connection the daemon closed is
 * noticed before anything is sent on it, and an idempotent call (hello, token, user, status,
 * sessionToken, sessionInfo, sessions) whose connection dies under it is sent once more on
 * a new one. A call that changes a session (login, logout, ...) is not sent twice: it
 * fails with BrokerNotRunning.
 */

import { type Call, answer, calls } from "./calls.js";
import { ClosedByClient, Connection, ConnectionLost, type Waiter } from "./connection.js";
import { BrokerNotRunning, Timeout, UntrustedSocket } from "./errors.js";
import { locateSocket, stillSame } from "./paths.js";
import type { Message } from "./protocol.js";
import {
  type CustomerSession,
  type Hello,
  type Session,
  type SessionInfo,
  type SessionListing,
  type SessionToken,
  type Status,
  type Token,
  type User,
  type WatchEvent,
  parseHello,
  parseNothing,
  parseSession,
  parseStatus,
  parseToken,
  parseUser,
  parseWatchEvent,
  parseCustomerSession,
  parseEnded,
  parseExpiresAt,
  parseSessionInfo,
  parseSessionListings,
  sessionTokenParser,
} from "./results.js";

export const DEFAULT_TIMEOUT_MS = 30_000;

export interface ClientOptions {
  /** The daemon's socket; default: $GEINS_BROKER_SOCKET, then the usual places. */
  socketPath?: string;
  /** Milliseconds each call may take, unless the call says otherwise; null: no limit. */
  timeout?: number | null;
  /** The environment the default socket search reads (default: process.env). */
  env?: Readonly<Record<string, string | undefined>>;
}

export interface CallOptions {
  signal?: AbortSignal;
  /** Milliseconds this call may take; null: no limit; default: the client's. */
  timeout?: number | null;
}

export interface ProfileOptions extends CallOptions {
  profile?: string;
}

export interface AppOptions extends CallOptions {
  /** The `[apps.NAME]` section of the daemon's config. */
  app: string;
}

/** A customer's session: its app and its handle (a `CustomerSession` is one). */
export interface SessionRef {
  readonly app: string;
  readonly handle: string;
}

export interface CustomerLoginOptions extends AppOptions {
  username: string;
  password: string;
  /** Ask Geins for a long session ("remember me"); default false. */
  remember?: boolean;
}

export class BrokerClient {
  readonly timeout: number | null;
  private readonly socketPath: string | undefined;
  private readonly env: Readonly<Record<string, string | undefined>> | undefined;
  private connection: Connection | null = null;
  private connecting: Promise<Connection> | null = null;

  constructor(options: ClientOptions = {}) {
    this.socketPath = options.socketPath;
    this.env = options.env;
    this.timeout = options.timeout === undefined ? DEFAULT_TIMEOUT_MS : options.timeout;
  }

  hello(options: CallOptions & { client?: string } = {}): Promise<Hello> {
    return this.call(calls.hello(options.client), parseHello, options);
  }

  /** The profile's bearer, with at least `minValid` seconds left (the daemon refreshes first if needed). */
  token(options: ProfileOptions & { minValid?: number } = {}): Promise<Token> {
    return this.call(calls.token(options.profile, options.minValid), parseToken, options);
  }

  user(options: ProfileOptions = {}): Promise<User> {
    return this.call(calls.user(options.profile), parseUser, options);
  }

  status(options: CallOptions = {}): Promise<Status> {
    return this.call(calls.status(), parseStatus, options);
  }

  login(options: ProfileOptions & { username: string; password: string; remember?: boolean }): Promise<Session> {
    const call = calls.login(options.username, options.password, options.profile, options.remember);
    return this.call(call, parseSession, options);
  }

  logout(options: ProfileOptions = {}): Promise<void> {
    return this.call(calls.logout(options.profile), parseNothing, options);
  }

  refresh(options: ProfileOptions = {}): Promise<Session> {
    return this.call(calls.refresh(options.profile), parseSession, options);
  }

  changePassword(options: ProfileOptions & { password: string; newPassword: string }): Promise<Session> {
    const call = calls.changePassword(options.password, options.newPassword, options.profile);
    return this.call(call, parseSession, options);
  }

  register(
    options: ProfileOptions & {
      username: string;
      password: string;
      remember?: boolean;
      /** Geins' UserInputType; default `{newsletter: false, customerType: "PERSON"}`. */
      user?: Readonly<Record<string, unknown>>;
    },
  ): Promise<Session> {
    const call = calls.register(options.username, options.password, options.profile, options.remember, options.user);
    return this.call(call, parseSession, options);
  }

  // -- customer sessions (a storefront's customers, named by handle) ----------------------

  /** Log a customer in; the result's handle names the session from now on (keep it secret). */
  sessionLogin(options: CustomerLoginOptions): Promise<CustomerSession> {
    const call = calls.sessionLogin(options.app, options.username, options.password, options.remember);
    return this.call(call, parseCustomerSession, options);
  }

  /** Register a new customer at Geins and log them in (`user`: Geins' UserInputType). */
  sessionRegister(options: CustomerLoginOptions & { user?: Readonly<Record<string, unknown>> }): Promise<CustomerSession> {
    const call = calls.sessionRegister(options.app, options.username, options.password, options.remember, options.user);
    return this.call(call, parseCustomerSession, options);
  }

  /** The customer's bearer, with at least `minValid` seconds left; UnknownSession when it ended. */
  sessionToken(options: CallOptions & SessionRef & { minValid?: number }): Promise<SessionToken> {
    const call = calls.sessionToken(options.app, options.handle, options.minValid);
    return this.call(call, sessionTokenParser(options.app), options);
  }

  sessionInfo(options: CallOptions & SessionRef): Promise<SessionInfo> {
    return this.call(calls.sessionInfo(options.app, options.handle), parseSessionInfo, options);
  }

  /** Change the customer's password; resolves to the new bearer's expiry (Unix seconds). */
  sessionPasswd(options: CallOptions & SessionRef & { password: string; newPassword: string }): Promise<number> {
    const call = calls.sessionPasswd(options.app, options.handle, options.password, options.newPassword);
    return this.call(call, parseExpiresAt, options);
  }

  /** Log the customer out at Geins and end the session at the broker. */
  sessionLogout(options: CallOptions & SessionRef): Promise<void> {
    return this.call(calls.sessionLogout(options.app, options.handle), parseNothing, options);
  }

  /** Admins: the app's sessions (at most 1,000), optionally one customer's. */
  sessions(options: AppOptions & { username?: string }): Promise<readonly SessionListing[]> {
    return this.call(calls.sessions(options.app, options.username), parseSessionListings, options);
  }

  /** Admins: end every session of one customer ("log out everywhere"); resolves to how many. */
  sessionEnd(options: AppOptions & { username: string }): Promise<number> {
    return this.call(calls.sessionEnd(options.app, options.username), parseEnded, options);
  }

  /**
   * Each new token as the daemon rotates it (the first event is the current state), on a
   * connection of its own. Ends cleanly when the loop breaks or the signal aborts; the
   * timeout bounds only the wait for the first event.
   */
  async *watch(options: ProfileOptions = {}): AsyncGenerator<WatchEvent, void, undefined> {
    const { signal } = options;
    const timeoutMs = options.timeout === undefined ? this.timeout : options.timeout;
    const queue: (Message | Error)[] = [];
    let wake: (() => void) | null = null;
    const push = (item: Message | Error | null): void => {
      if (item !== null) queue.push(item);
      wake?.();
    };
    const onAbort = (): void => push(null);
    signal?.addEventListener("abort", onAbort);
    // Bounds the connect and the first event; the events after it come at rotations.
    const timer =
      timeoutMs === null
        ? undefined
        : setTimeout(() => push(new Timeout(`the broker did not start the watch within ${timeoutMs} ms`)), timeoutMs);
    const opening = this.open(false);
    let connection: Connection | null = null;
    try {
      opening.then(
        () => push(null),
        (error: unknown) => push(error instanceof Error ? error : new Error(String(error))),
      );
      while (connection === null) {
        if (signal?.aborted) return;
        const failure = queue.shift();
        if (failure instanceof Error) throw failure;
        connection = await Promise.race([opening, new Promise<null>((resolve) => (wake = () => resolve(null)))]);
      }
      connection.send(calls.watch(options.profile).fields, { frame: push, fail: push });
      for (;;) {
        while (queue.length === 0 && !signal?.aborted) await new Promise<void>((resolve) => (wake = resolve));
        if (signal?.aborted) return;
        const item = queue.shift() as Message | Error;
        if (item instanceof ClosedByClient) return;
        if (item instanceof ConnectionLost) throw new BrokerNotRunning("the broker closed the watch");
        if (item instanceof Error) throw item;
        clearTimeout(timer);
        yield answer(parseWatchEvent, item);
      }
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      if (connection !== null) connection.destroy();
      else opening.then((c) => c.destroy(), () => undefined);
    }
  }

  /** Close the connection. Calls in flight fail with BrokerNotRunning; later calls connect again. */
  close(): void {
    const connection = this.connection;
    this.connection = null;
    connection?.destroy();
  }

  /** One request and its answer, within the call's timeout and signal. */
  call<T>(call: Call, parse: (message: Message) => T, options: CallOptions = {}): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const { signal } = options;
      if (signal?.aborted) {
        reject(signal.reason);
        return;
      }
      let done = false;
      let sent: { connection: Connection; id: number } | null = null;
      const timeoutMs = options.timeout === undefined ? this.timeout : options.timeout;
      const finish = (settle: () => void): void => {
        if (done) return;
        done = true;
        if (timer !== undefined) clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        if (sent !== null) sent.connection.forget(sent.id);
        settle();
      };
      const onAbort = (): void => finish(() => reject(signal?.reason));
      signal?.addEventListener("abort", onAbort, { once: true });
      const timer =
        timeoutMs === null
          ? undefined
          : setTimeout(
              () => finish(() => reject(new Timeout(`the broker did not answer within ${timeoutMs} ms`))),
              timeoutMs,
            );

      const send = (connection: Connection, attempt: number): void => {
        if (done) return;
        const waiter: Waiter = {
          frame: (message) =>
            finish(() => {
              try {
                resolve(answer(parse, message));
              } catch (error) {
                reject(error);
              }
            }),
          fail: (error) => {
            sent = null;
            if (done) return;
            if (error instanceof ConnectionLost && !(error instanceof ClosedByClient) && call.idempotent && attempt === 0) {
              start(1);
            } else if (error instanceof ConnectionLost) {
              finish(() => reject(new BrokerNotRunning(error.message)));
            } else {
              finish(() => reject(error));
            }
          },
        };
        try {
          sent = { connection, id: connection.send(call.fields, waiter) };
        } catch (error) {
          waiter.fail(error as Error);
        }
      };
      const start = (attempt: number): void => {
        const current = this.connection;
        if (current !== null && current.usable) {
          send(current, attempt);
          return;
        }
        this.connect().then(
          (connection) => send(connection, attempt),
          (error: unknown) => finish(() => reject(error)),
        );
      };
      start(0);
    });
  }

  /** The shared connection: opened once however many calls wait for it. */
  private connect(): Promise<Connection> {
    if (this.connection !== null && this.connection.usable) return Promise.resolve(this.connection);
    this.connection = null;
    if (this.connecting === null) {
      this.connecting = this.open(true).finally(() => {
        this.connecting = null;
      });
    }
    return this.connecting;
  }

  private async open(shared: boolean): Promise<Connection> {
    const found = await locateSocket(this.socketPath, this.env);
    const connection = await Connection.open(found.path);
    // The rule was checked on the path; make sure the path still names that socket.
    if (!(await stillSame(found))) {
      connection.destroy();
      throw new UntrustedSocket(`refusing the socket ${found.path}: it was replaced while connecting`);
    }
    if (shared) this.connection = connection;
    return connection;
  }
}
