/**
 * One connection to the daemon: requests pipelined on it, answers matched by id.
 *
 * The daemon may answer out of order (a `token` from memory overtakes a `login` waiting on
 * Geins), so each request waits on its own id. A frame with `id: null` and `ok: false` is
 * about the connection itself (busy, bad_frame): every call waiting on it gets that error.
 * When the stream ends, every call still waiting gets ConnectionLost, and the client
 * decides whether to send it again.
 *
 * The socket is unref'd while nothing waits on it, so an idle client never keeps a Node
 * process alive.
 */

import { createConnection, type Socket } from "node:net";

import { BadFrame, BadRequest, BrokerError, BrokerNotRunning, errorFromWire } from "./errors.js";
import { FrameDecoder, HEADER_SIZE, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, encode, type Message } from "./protocol.js";

/** The stream ended or broke before the answer came. */
export class ConnectionLost extends Error {
  override name = "ConnectionLost";
}

/** The client closed the connection itself: nothing to retry. */
export class ClosedByClient extends ConnectionLost {
  override name = "ClosedByClient";
}

/** Whatever waits for frames with one id: a call (one frame) or a watch (many). */
export interface Waiter {
  frame(message: Message): void;
  fail(error: Error): void;
}

export class Connection {
  private readonly decoder = new FrameDecoder(MAX_RESPONSE_SIZE);
  private readonly waiters = new Map<number, Waiter>();
  private nextId = 1;
  private failure: Error | null = null;

  private constructor(private readonly socket: Socket) {
    socket.setNoDelay?.(true);
    socket.on("data", (data: Buffer) => this.receive(data));
    socket.on("error", (error) => this.close(lostFrom(error)));
    socket.on("close", () => this.close(new ConnectionLost("the broker closed the connection")));
    socket.unref();
  }

  /** Connect to `path`; BrokerNotRunning when nothing listens there. */
  static open(path: string): Promise<Connection> {
    return new Promise((resolve, reject) => {
      const socket = createConnection({ path });
      const onError = (error: NodeJS.ErrnoException): void => {
        socket.destroy();
        reject(new BrokerNotRunning(`no broker is listening at ${path} (${error.code ?? error.message})`));
      };
      socket.once("error", onError);
      socket.once("connect", () => {
        socket.off("error", onError);
        resolve(new Connection(socket));
      });
    });
  }

  /** Whether a request sent now could still be answered. */
  get usable(): boolean {
    return this.failure === null && !this.socket.destroyed && !this.socket.readableEnded;
  }

  /** Send one request; frames with its id go to `waiter` until `forget(id)`. */
  send(fields: Readonly<Message>, waiter: Waiter): number {
    if (!this.usable) throw this.failure ?? new ConnectionLost("the connection is closed");
    const id = this.nextId++;
    const frame = encode({ id, ...fields });
    if (frame.byteLength - HEADER_SIZE > MAX_REQUEST_SIZE) {
      // The daemon would end the connection (bad_frame) and every call on it with it.
      throw new BadRequest(`request of ${frame.byteLength - HEADER_SIZE} bytes is over the ${MAX_REQUEST_SIZE} limit`);
    }
    this.waiters.set(id, waiter);
    if (this.waiters.size === 1) this.socket.ref();
    this.socket.write(frame);
    return id;
  }

  /** Stop routing frames for `id` (answered, timed out or aborted); late frames are dropped. */
  forget(id: number): void {
    if (this.waiters.delete(id) && this.waiters.size === 0) this.socket.unref();
  }

  destroy(): void {
    this.close(new ClosedByClient("the connection was closed by the client"));
  }

  private receive(data: Buffer): void {
    const messages = this.decoder.feed(data);
    for (const message of messages) {
      const id = message["id"];
      if (typeof id === "number") {
        this.waiters.get(id)?.frame(message);
      } else if (id === null && message["ok"] === false) {
        const error = message["error"] as Message | undefined;
        this.close(errorFromWire(error?.["code"], error?.["message"], error?.["retry_after"]));
        return;
      }
    }
    if (this.decoder.error !== null) {
      this.close(new BadFrame(`unreadable response: ${this.decoder.error.message}`));
    }
  }

  private close(error: Error): void {
    if (this.failure === null) this.failure = error;
    this.socket.destroy();
    const waiters = [...this.waiters.values()];
    this.waiters.clear();
    for (const waiter of waiters) waiter.fail(this.failure);
  }
}

function lostFrom(error: NodeJS.ErrnoException): Error {
  return new ConnectionLost(`the connection to the broker broke (${error.code ?? error.message})`);
}

export function isBrokerError(error: unknown): error is BrokerError {
  return error instanceof BrokerError;
}
