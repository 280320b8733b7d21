// The Node client's figures for benchmarks/node_client.py, printed as one JSON line:
//   node build-test/bench/bench.js SOCKET SECONDS
// token() round trip at 1 connection (p50/p99 µs), token() req/s over 8 connections (one
// client each, one request in flight on each, one event loop), and a TokenCache hit (ns).

import { performance } from "node:perf_hooks";

import { BrokerClient, TokenCache } from "../src/index.js";

const [socketPath = "", secondsText = "2"] = process.argv.slice(2);
const seconds = Number(secondsText);

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
}

async function roundTrips(): Promise<{ p50_us: number; p99_us: number; count: number }> {
  const client = new BrokerClient({ socketPath });
  const warm = performance.now() + 300;
  while (performance.now() < warm) await client.token();
  const samples: number[] = [];
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) {
    const start = performance.now();
    await client.token();
    samples.push((performance.now() - start) * 1000);
  }
  client.close();
  samples.sort((a, b) => a - b);
  return { p50_us: quantile(samples, 0.5), p99_us: quantile(samples, 0.99), count: samples.length };
}

async function throughput(connections: number): Promise<{ rps: number }> {
  const clients = Array.from({ length: connections }, () => new BrokerClient({ socketPath }));
  await Promise.all(clients.map((c) => c.token()));
  let done = 0;
  const end = performance.now() + seconds * 1000;
  const start = performance.now();
  await Promise.all(
    clients.map(async (client) => {
      while (performance.now() < end) {
        await client.token();
        done++;
      }
    }),
  );
  const elapsed = (performance.now() - start) / 1000;
  clients.forEach((c) => c.close());
  return { rps: done / elapsed };
}

async function cacheHit(): Promise<{ hit_ns: number }> {
  const client = new BrokerClient({ socketPath });
  const cache = new TokenCache({ client });
  await cache.get();
  const rounds = 1_000_000;
  for (let i = 0; i < 100_000; i++) await cache.get();
  const start = performance.now();
  for (let i = 0; i < rounds; i++) await cache.get();
  const hitNs = ((performance.now() - start) * 1e6) / rounds;
  client.close();
  return { hit_ns: hitNs };
}

const result = {
  node: process.version,
  round_trip: await roundTrips(),
  eight: await throughput(8),
  cache: await cacheHit(),
};
console.log(JSON.stringify(result));
