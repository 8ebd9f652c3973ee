/**
 * A TCP proxy on a free loopback port in front of a real server, so a test can
 * take that server away from one process (Postgres for one worker) without
 * touching the server itself, which other tests use at the same time.
 */
import { createConnection, createServer, type Socket } from "node:net";

export interface TcpProxy {
  readonly port: number;
  /** `url` with its host and port replaced by the proxy's (e.g. a postgresql:// URL). */
  via(url: string): string;
  /** As a dead server: every open connection is reset and new ones are reset at once. */
  cut(): void;
  /** As a hung server: connections stay open but nothing passes either way; new ones get no answer. */
  stall(): void;
  /** Back to forwarding (stalled connections resume; cut ones are gone for good). */
  restore(): void;
  close(): Promise<void>;
}

type Mode = "open" | "cut" | "stall";

export async function startTcpProxy(target: { host: string; port: number }): Promise<TcpProxy> {
  let mode: Mode = "open";
  const pairs = new Set<{ client: Socket; upstream?: Socket }>();
  /** Connections accepted during a stall: connected upstream only on restore. */
  const held = new Set<Socket>();

  const kill = (s: Socket | undefined): void => {
    if (s && !s.destroyed) s.resetAndDestroy();
  };

  const forward = (client: Socket): void => {
    const pair: { client: Socket; upstream?: Socket } = { client };
    pairs.add(pair);
    const upstream = createConnection(target);
    pair.upstream = upstream;
    const end = (): void => {
      pairs.delete(pair);
      kill(client);
      kill(upstream);
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
    // Plain data handlers rather than pipe(): pipe() resumes a paused source on 'drain', which would end a stall.
    client.on("data", (chunk) => upstream.write(chunk));
    upstream.on("data", (chunk) => client.write(chunk));
    if (mode === "stall") upstream.pause();
  };

  const server = createServer({ pauseOnConnect: true }, (client) => {
    client.on("error", () => undefined);
    if (mode === "cut") return kill(client);
    if (mode === "stall") {
      held.add(client);
      client.once("close", () => held.delete(client));
      return;
    }
    forward(client);
    client.resume();
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const port = (server.address() as { port: number }).port;

  return {
    port,
    via(url) {
      const u = new URL(url);
      u.hostname = "127.0.0.1";
      u.port = String(port);
      return u.toString();
    },
    cut() {
      mode = "cut";
      for (const { client, upstream } of [...pairs]) {
        kill(client);
        kill(upstream);
      }
      pairs.clear();
      for (const s of held) kill(s);
      held.clear();
    },
    stall() {
      mode = "stall";
      for (const { client, upstream } of pairs) {
        client.pause();
        upstream?.pause();
      }
    },
    restore() {
      mode = "open";
      for (const { client, upstream } of pairs) {
        client.resume();
        upstream?.resume();
      }
      for (const s of [...held]) {
        held.delete(s);
        if (s.destroyed) continue;
        forward(s);
        s.resume();
      }
    },
    async close() {
      mode = "cut";
      for (const { client, upstream } of [...pairs]) {
        kill(client);
        kill(upstream);
      }
      for (const s of held) kill(s);
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
