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
