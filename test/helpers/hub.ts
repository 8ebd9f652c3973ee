/**
 * A hub for tests (src/federation/local-hub.ts), each bridged homeserver's
 * leafnode reaching it through a TCP proxy a test can cut: a link down.
 */
import { startLocalHub, type LocalHub, type Topology } from "../../src/federation/local-hub.ts";
import { startTcpProxy, type TcpProxy } from "./tcp-proxy.ts";

export type { Topology };

export interface Hub extends LocalHub {
  /** The proxy between a bridged homeserver's server and the hub's leafnode port: cut() is a link down. */
  link(name: string): TcpProxy;
}

export async function startHub(homeservers: Readonly<Record<string, Topology>>): Promise<Hub> {
  const links = new Map<string, TcpProxy>();
  const hub = await startLocalHub({
    homeservers,
    async leafVia(name, port) {
      const link = await startTcpProxy({ host: "127.0.0.1", port });
      links.set(name, link);
      return link.port;
    },
  });
  // The hub's own getters (federation, keys) stay live through the prototype.
  return Object.assign(Object.create(hub) as LocalHub, {
    link(name: string): TcpProxy {
      const link = links.get(name);
      if (!link) throw new Error(`${name} is not bridged`);
      return link;
    },
    async stop(): Promise<void> {
      await hub.stop();
      for (const link of links.values()) await link.close();
    },
  }) as Hub;
}

/**
 * A leafnode connection spoken by hand (what a homeserver's operator can run in
 * place of, or beside, its own server): a hub refuses reserved reply subjects
 * (`$JS.ACK.…`) on client connections, not on leafnodes.
 */
export interface RawLeaf {
  /** A message into the hub, as the leaf's account. */
  publish(subject: string, reply: string | undefined, body: string): void;
  /** Everything the hub sent that is not INFO, PING or PONG. */
  readonly received: readonly string[];
  /** Resolves when the hub has handled everything sent before. */
  flush(): Promise<void>;
  close(): void;
}

/** Connects to a hub's leafnode port with a homeserver's seed; rejects with the hub's -ERR if refused. */
export async function rawLeaf(port: number, seed: string): Promise<RawLeaf> {
  const { connect: tcp } = await import("node:net");
  const { fromSeed } = await import("@nats-io/nkeys");
  const key = fromSeed(new TextEncoder().encode(seed));
  const socket = tcp({ host: "127.0.0.1", port });
  const received: string[] = [];
  let pongs: (() => void)[] = [];
  let buffer = "";
  let sentConnect = false;
  const ready = new Promise<void>((resolve, reject) => {
    socket.on("error", reject);
    socket.on("close", () => reject(new Error(received.find((l) => l.startsWith("-ERR")) ?? "closed")));
    socket.on("data", (data) => {
      buffer += data.toString("latin1");
      for (let end = buffer.indexOf("\r\n"); end >= 0; end = buffer.indexOf("\r\n")) {
        const line = buffer.slice(0, end);
        if (line.startsWith("LMSG ") || line.startsWith("HMSG ")) {
          const size = Number(line.split(" ").at(-1));
          if (buffer.length < end + 2 + size + 2) return;
          received.push(`${line} ${buffer.slice(end + 2, end + 2 + size)}`);
          buffer = buffer.slice(end + 2 + size + 2);
          continue;
        }
        buffer = buffer.slice(end + 2);
        if (line.startsWith("INFO ") && !sentConnect) {
          sentConnect = true;
          const { nonce } = JSON.parse(line.slice(5)) as { nonce: string };
          const sig = Buffer.from(key.sign(new TextEncoder().encode(nonce))).toString("base64url");
          socket.write(`CONNECT ${JSON.stringify({ nkey: key.getPublicKey(), sig, name: "raw-leaf", headers: true })}\r\nPING\r\n`);
        } else if (line === "PING") {
          socket.write("PONG\r\n");
        } else if (line === "PONG") {
          resolve();
          const waiting = pongs;
          pongs = [];
          for (const f of waiting) f();
        } else if (!line.startsWith("INFO ")) {
          received.push(line);
        }
      }
    });
  });
  await ready;
  return {
    received,
    publish(subject, reply, body) {
      const bytes = Buffer.from(body);
      socket.write(`LMSG ${subject}${reply === undefined ? "" : ` ${reply}`} ${bytes.length}\r\n`);
      socket.write(bytes);
      socket.write("\r\n");
    },
    flush: () => new Promise<void>((resolve) => {
      pongs.push(resolve);
      socket.write("PING\r\n");
    }),
    close: () => socket.destroy(),
  };
}
