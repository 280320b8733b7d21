/**
 * Where the daemon's socket is, and whether it may be trusted, without asking the daemon.
 *
 * The order is the daemon's own and the Python client's (docs/protocol.md, "Transport"):
 * an explicit path, then $GEINS_BROKER_SOCKET, then the user's runtime directory
 * ($XDG_RUNTIME_DIR, /run/user/UID, or TMPDIR/runtime-UID), last the system service's.
 *
 * Trust: a client that sends a password or asks for a bearer to a socket another user
 * planted has handed it over. Before any byte is sent, the socket's directory must be a
 * real directory (not a symlink) owned by a trusted uid and writable by nobody else, and
 * the socket itself a socket owned by a trusted uid. Trusted: this process's euid, root,
 * and the system user `geins-broker` if it exists. The Python client also checks the
 * peer's uid with SO_PEERCRED after connecting; Node has no way to read it without a native
 * addon, so this client relies on the path rule alone (which is what makes SO_PEERCRED
 * redundant: nobody untrusted can put a socket where the rule accepts one).
 */

import { readFileSync } from "node:fs";
import { lstat } from "node:fs/promises";
import { dirname } from "node:path";

import { BrokerNotRunning, UntrustedSocket } from "./errors.js";

export const ENV_SOCKET = "GEINS_BROKER_SOCKET";
export const APP_DIR = "geins-broker";
export const SOCKET_NAME = "broker.sock";
export const SYSTEM_SOCKET = `/run/${APP_DIR}/${SOCKET_NAME}`;
export const SYSTEM_USER = "geins-broker";

type Env = Readonly<Record<string, string | undefined>>;

export function effectiveUid(): number {
  return process.geteuid?.() ?? 0;
}

/** Every default location, most specific first (exactly the Python client's list). */
export function candidateSockets(env: Env = process.env, uid: number = effectiveUid()): string[] {
  const tmp = env["TMPDIR"] || env["TEMP"] || env["TMP"] || "/tmp";
  const runtimeDirs = [env["XDG_RUNTIME_DIR"], `/run/user/${uid}`, `${tmp}/runtime-${uid}`];
  const paths = runtimeDirs.filter((d) => d).map((d) => `${d}/${APP_DIR}/${SOCKET_NAME}`);
  paths.push(SYSTEM_SOCKET);
  return [...new Set(paths)];
}

/** What the trust rule needs from an lstat: the file's type, owner and permission bits. */
export interface StatInfo {
  readonly type: "directory" | "socket" | "symlink" | "file" | "other";
  readonly uid: number;
  /** Permission bits (mode & 0o7777). */
  readonly mode: number;
  readonly dev?: number;
  readonly ino?: number;
}

interface StatsLike {
  uid: number;
  mode: number;
  dev: number;
  ino: number;
  isDirectory(): boolean;
  isSocket(): boolean;
  isSymbolicLink(): boolean;
  isFile(): boolean;
}

export function statInfo(stats: StatsLike): StatInfo {
  const type = stats.isSymbolicLink()
    ? "symlink"
    : stats.isDirectory()
      ? "directory"
      : stats.isSocket()
        ? "socket"
        : stats.isFile()
          ? "file"
          : "other";
  return { type, uid: stats.uid, mode: stats.mode & 0o7777, dev: stats.dev, ino: stats.ino };
}

/**
 * Why a socket may not be trusted, or null when nothing is wrong: rules 1 and 2 of
 * docs/protocol.md ("Finding and trusting the socket") as a pure function of the two lstat
 * results and the trusted uids. A directory or socket that does not exist (null) is no
 * trust problem: connecting to it says "not running", and nothing can appear later under
 * a directory that passed. The Python twin is geins_broker_client/trust.py.
 */
export function checkTrusted(
  directory: StatInfo | null,
  socket: StatInfo | null,
  trusted: ReadonlySet<number>,
): string | null {
  if (directory === null) return null;
  if (directory.type !== "directory") return `its directory is a ${directory.type}, not a directory`;
  if (!trusted.has(directory.uid)) return `its directory is owned by uid ${directory.uid}, not by ${WHO}`;
  if ((directory.mode & 0o022) !== 0) {
    return `its directory may be written by others (mode ${directory.mode.toString(8).padStart(4, "0")})`;
  }
  if (socket === null) return null;
  if (socket.type !== "socket") return `it is a ${socket.type}, not a socket`;
  if (!trusted.has(socket.uid)) return `it is owned by uid ${socket.uid}, not by ${WHO}`;
  return null;
}

const WHO = "you, root or the geins-broker service";

let systemUserUid: number | null | undefined;

/** The uid of the system user `geins-broker`, read from /etc/passwd (Node has no getpwnam). */
export function systemUser(passwd?: string): number | null {
  if (passwd === undefined && systemUserUid !== undefined) return systemUserUid;
  let text = passwd;
  if (text === undefined) {
    try {
      text = readFileSync("/etc/passwd", "utf8");
    } catch {
      text = "";
    }
  }
  let uid: number | null = null;
  for (const line of text.split("\n")) {
    const fields = line.split(":");
    if (fields[0] === SYSTEM_USER && fields.length >= 3 && /^\d+$/.test(fields[2] ?? "")) {
      uid = Number(fields[2]);
      break;
    }
  }
  if (passwd === undefined) systemUserUid = uid;
  return uid;
}

export function trustedUids(euid: number = effectiveUid(), system: number | null = systemUser()): Set<number> {
  const uids = new Set([euid, 0]);
  if (system !== null) uids.add(system);
  return uids;
}

async function lstatInfo(path: string): Promise<StatInfo | null> {
  // Any other error (EACCES on a directory above) propagates: it is not "missing".
  try {
    return statInfo(await lstat(path));
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") return null;
    throw error;
  }
}

/** The two lstat results for a socket path and the rule's verdict on them. */
export async function inspectSocket(
  path: string,
  trusted: ReadonlySet<number> = trustedUids(),
): Promise<{ socket: StatInfo | null; problem: string | null }> {
  const directory = await lstatInfo(dirname(path));
  const socket = directory === null ? null : await lstatInfo(path);
  return { socket, problem: checkTrusted(directory, socket, trusted) };
}

/** A socket that passed the trust rule, with its identity to check again after connecting. */
export interface TrustedSocket {
  readonly path: string;
  readonly identity: StatInfo;
}

/**
 * The socket to connect to, checked before a byte is sent. An explicit path (argument or
 * $GEINS_BROKER_SOCKET) that fails the trust rule is UntrustedSocket. The default search
 * takes the first candidate that exists and passes; when some exist but none passes, the
 * first of those is refused (UntrustedSocket, naming why); when none exists,
 * BrokerNotRunning names the most likely path.
 */
export async function locateSocket(explicit?: string, env: Env = process.env): Promise<TrustedSocket> {
  const trusted = trustedUids();
  const given = explicit ?? (env[ENV_SOCKET] || undefined);
  if (given !== undefined) {
    const { socket, problem } = await inspectSocket(given, trusted);
    if (socket === null) throw new BrokerNotRunning(`no broker is listening at ${given} (no such socket)`);
    if (problem !== null) throw new UntrustedSocket(`refusing the socket ${given}: ${problem}`);
    return { path: given, identity: socket };
  }
  const candidates = candidateSockets(env);
  let refused: string | null = null;
  for (const path of candidates) {
    const { socket, problem } = await inspectSocket(path, trusted);
    if (socket === null) continue;
    if (problem === null) return { path, identity: socket };
    refused ??= `refusing the socket ${path}: ${problem}`;
  }
  if (refused !== null) throw new UntrustedSocket(refused);
  throw new BrokerNotRunning(`no broker is listening at ${candidates[0]} (no such socket)`);
}

/** Whether the path still names the same socket the rule accepted (checked after connecting). */
export async function stillSame(found: TrustedSocket): Promise<boolean> {
  const now = await inspectSocket(found.path);
  return (
    now.problem === null &&
    now.socket !== null &&
    now.socket.dev === found.identity.dev &&
    now.socket.ino === found.identity.ino
  );
}
