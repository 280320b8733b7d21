// Real processes for the tests: the project's own emulator and daemon from .venv, started
// per test file, and children under another uid. Waits are short and bounded; no test
// asserts a timing.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, rmSync, writeFileSync, chmodSync } from "node:fs";
import { createInterface } from "node:readline";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { BrokerClient } from "../src/client.js";

function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "docs", "protocol-vectors.json"))) {
    const parent = dirname(dir);
    if (parent === dir) throw new Error("cannot find the repository root above the tests");
    dir = parent;
  }
  return dir;
}

export const ROOT = repoRoot();
export const VECTORS_PATH = join(ROOT, "docs", "protocol-vectors.json");
export const GEINS_BROKER = process.env["GEINS_BROKER_BIN"] ?? join(ROOT, ".venv", "bin", "geins-broker");
/** The compiled package root (build-test/), for children that import the client. */
export const BUILD = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const DEMO_USER = "demo@example.com";
export const DEMO_PASSWORD = "demo-password";
export const NOBODY = 65534;

/** A short temporary directory (a Unix socket path has at most 107 bytes). */
export function shortTmp(mode = 0o700): string {
  const dir = mkdtempSync("/tmp/gbn-");
  chmodSync(dir, mode);
  return dir;
}

export function removeTmp(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((done) => child.once("exit", () => done()));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

export class Emulator {
  private constructor(
    readonly process: ChildProcess,
    readonly url: string,
  ) {}

  static async start(...args: string[]): Promise<Emulator> {
    const child = spawn(GEINS_BROKER, ["emulator", "--listen", "127.0.0.1:0", ...args], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    const lines = createInterface({ input: child.stdout! });
    const first = await new Promise<string>((resolve, reject) => {
      lines.once("line", resolve);
      child.once("exit", (code) => reject(new Error(`emulator exited with ${code}`)));
    });
    lines.close();
    child.stdout!.resume();
    if (!first.startsWith("listening on http://")) throw new Error(`emulator said: ${first}`);
    return new Emulator(child, first.slice("listening on ".length));
  }

  /** The emulator's control API (faults, revoke, stats). */
  async control(method: string, action: string, body?: unknown): Promise<unknown> {
    const response = await fetch(`${this.url}/_emulator/${action}`, {
      method,
      headers: { "Content-Type": "application/json" },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
    if (!response.ok) throw new Error(`control ${action}: ${response.status} ${await response.text()}`);
    return response.json();
  }

  stop(): Promise<void> {
    return stopProcess(this.process);
  }
}

export interface DaemonOptions {
  profiles?: string[];
  /** Storefront apps ([apps.NAME]) on the same emulator, with these extra keys. */
  apps?: Record<string, Record<string, unknown>>;
  broker?: Record<string, unknown>;
  profile?: Record<string, unknown>;
}

function toml(value: unknown): string {
  return JSON.stringify(value); // TOML strings, numbers, booleans and arrays read the same
}

export class Daemon {
  process: ChildProcess | null = null;
  readonly socket: string;
  readonly config: string;

  constructor(
    readonly dir: string,
    emulator: Emulator,
    options: DaemonOptions = {},
  ) {
    this.socket = join(dir, "run", "broker.sock");
    this.config = join(dir, "config.toml");
    const lines = ["[broker]", `socket = ${toml(this.socket)}`, `state_dir = ${toml(join(dir, "state"))}`];
    for (const [k, v] of Object.entries(options.broker ?? {})) lines.push(`${k} = ${toml(v)}`);
    for (const name of options.profiles ?? ["default"]) {
      lines.push(
        `[profiles.${name}]`,
        'account = "demo"',
        'api_key = "demo-api-key"',
        `auth_service_url = ${toml(emulator.url)}`,
        `merchant_api_url = ${toml(emulator.url)}`,
      );
      for (const [k, v] of Object.entries(options.profile ?? {})) lines.push(`${k} = ${toml(v)}`);
    }
    for (const [name, keys] of Object.entries(options.apps ?? {})) {
      lines.push(
        `[apps.${name}]`,
        'account = "demo"',
        'api_key = "demo-api-key"',
        `auth_service_url = ${toml(emulator.url)}`,
        `merchant_api_url = ${toml(emulator.url)}`,
      );
      for (const [k, v] of Object.entries(keys)) lines.push(`${k} = ${toml(v)}`);
    }
    writeFileSync(this.config, lines.join("\n") + "\n");
  }

  static async start(dir: string, emulator: Emulator, options: DaemonOptions = {}): Promise<Daemon> {
    const daemon = new Daemon(dir, emulator, options);
    await daemon.start();
    return daemon;
  }

  /** Start (or start again) and wait until it answers hello. */
  async start(): Promise<void> {
    const env = { ...process.env };
    delete env["NOTIFY_SOCKET"];
    this.process = spawn(GEINS_BROKER, ["serve", "--config", this.config], { stdio: ["ignore", "ignore", "inherit"], env });
    const client = new BrokerClient({ socketPath: this.socket, timeout: 2000 });
    const deadline = Date.now() + 15_000;
    try {
      for (;;) {
        if (this.process.exitCode !== null) throw new Error(`daemon exited with ${this.process.exitCode}`);
        try {
          await client.hello();
          return;
        } catch (error) {
          if (Date.now() > deadline) throw error;
          await new Promise((done) => setTimeout(done, 50));
        }
      }
    } finally {
      client.close();
    }
  }

  async stop(): Promise<void> {
    if (this.process !== null) await stopProcess(this.process);
  }
}

/** A daemon and its emulator, logged in as the demo user, for one test file. */
export async function startBroker(
  options: DaemonOptions & { emulatorArgs?: string[]; login?: string[]; dirMode?: number } = {},
): Promise<{ emulator: Emulator; daemon: Daemon; dir: string; close: () => Promise<void> }> {
  const dir = shortTmp(options.dirMode ?? 0o700);
  const emulator = await Emulator.start(...(options.emulatorArgs ?? []));
  const daemon = await Daemon.start(dir, emulator, options);
  const client = new BrokerClient({ socketPath: daemon.socket });
  for (const profile of options.login ?? ["default"]) {
    await client.login({ profile, username: DEMO_USER, password: DEMO_PASSWORD });
  }
  client.close();
  return {
    emulator,
    daemon,
    dir,
    close: async () => {
      await daemon.stop();
      await emulator.stop();
      removeTmp(dir);
    },
  };
}

/** Whether this process may switch to another uid (CI runs as root). */
export function canSwitchUid(): boolean {
  return process.geteuid?.() === 0 && spawnSync("setpriv", ["--version"]).status === 0;
}

let otherUidsCopy: string | undefined;

/**
 * The compiled client (src/ of build-test) with its package.json and its dependency, copied
 * once per test file to a world-traversable temporary directory: another uid cannot read a
 * checkout under a directory it may not traverse (root's home is 0700). Removed at exit.
 */
export function forOtherUids(): string {
  if (otherUidsCopy !== undefined) return otherUidsCopy;
  const copy = shortTmp(0o755);
  process.once("exit", () => removeTmp(copy));
  const packageRoot = resolve(BUILD, "..");
  cpSync(join(BUILD, "src"), join(copy, "src"), { recursive: true });
  cpSync(join(packageRoot, "package.json"), join(copy, "package.json"));
  const msgpack = join("node_modules", "@msgpack", "msgpack");
  cpSync(join(packageRoot, msgpack), join(copy, msgpack), { recursive: true });
  const ran = spawnSync("setpriv", [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", process.execPath, "-e", ""]);
  if (ran.status !== 0) throw new Error(`uid ${NOBODY} cannot run ${process.execPath}: ${ran.stderr}`);
  otherUidsCopy = copy;
  return copy;
}

/** Run a Node script as uid 65534 in the copy `forOtherUids` makes; its stdout, parsed as JSON. */
export function asNobody(script: string, args: string[] = [], env: Record<string, string> = {}): Promise<unknown> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(
      "setpriv",
      [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", process.execPath, "--input-type=module", "-e", script, "--", ...args],
      { stdio: ["ignore", "pipe", "pipe"], cwd: forOtherUids(), env: { PATH: process.env["PATH"] ?? "", ...env } },
    );
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
    child.on("exit", (code) => {
      clearTimeout(timer);
      if (code !== 0) reject(new Error(`child exited with ${code}: ${err}`));
      else {
        try {
          resolvePromise(JSON.parse(out));
        } catch {
          reject(new Error(`child printed no JSON: ${out} ${err}`));
        }
      }
    });
  });
}
